"""Hooks on `mlx_lm.server`.

`main()` builds its argparse parser inline, so the only seam for new flags is a
one-shot wrap of `ArgumentParser.parse_args`, installed by our `main` wrapper
and removed at its first call (never left patched process-wide).

Extensions (modules in EXTENSIONS) each provide:
  add_arguments(group)        add `--optiq-*` flags
  after_parse(args, parser)   validate/load what the flags name; call parser.error(...) on bad input
  install(server_module)      wrap the server symbols the feature needs (via _patching.wrap)
"""

import argparse
import importlib

import wrapt

from .. import _patching

EXTENSIONS = ["mlx_lm_optiq.hooks.server_kv", "mlx_lm_optiq.hooks.server_adapters"]


def _extensions():
    return [importlib.import_module(name) for name in EXTENSIONS]


def _main(wrapped, instance, args, kwargs):
    handle = None

    def parse_args_once(pa_wrapped, parser, pa_args, pa_kwargs):
        wrapt.unwrap_object(argparse.ArgumentParser, "parse_args", handle, missing_ok=True)
        exts = _extensions()
        group = parser.add_argument_group("mlx_lm_optiq", "per-layer KV cache and multi-adapter serving (mlx-lm-optiq)")
        for ext in exts:
            ext.add_arguments(group)
        ns = pa_wrapped(*pa_args, **pa_kwargs)
        for ext in exts:
            ext.after_parse(ns, parser)
        return ns

    handle = wrapt.wrap_function_wrapper(argparse.ArgumentParser, "parse_args", parse_args_once)
    try:
        return wrapped(*args, **kwargs)
    finally:
        wrapt.unwrap_object(argparse.ArgumentParser, "parse_args", handle, missing_ok=True)


def install(module):
    _patching.wrap(module, "main", _main)
    for ext in _extensions():
        ext.install(module)
