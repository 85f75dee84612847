"""Hooks on `mlx_lm.server`.

`main()` builds its argparse parser inline, so the only seam for new flags is
`ArgumentParser.parse_args` itself. Our `main` wrapper wraps it for one call only
(`_parse_args_once`, through the patch registry like every other patch): the wrap
removes itself at its first call, and `main`'s `finally` removes it if main never
parsed (an exception before parsing), so parse_args is never left patched
process-wide and `disable()` finds nothing stale.

Extensions (modules in EXTENSIONS) each provide:
  add_arguments(group)        add `--optiq-*` flags
  after_parse(args, parser)   validate/load what the flags name; call parser.error(...) on bad input
  install(server_module)      wrap the server symbols the feature needs (via patching.wrap)
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from mlx_lm_optiq.hooks import patching

EXTENSIONS = ["mlx_lm_optiq.hooks.server_kv", "mlx_lm_optiq.hooks.server_adapters"]


def _extensions():
    return [importlib.import_module(name) for name in EXTENSIONS]


def _parse_args_once(wrapped, parser, args, kwargs):
    """The server's parse_args: our flags added before, the extensions' checks after; unwraps itself first."""
    patching.unwrap(argparse.ArgumentParser, "parse_args", _parse_args_once)
    exts = _extensions()
    group = parser.add_argument_group("mlx_lm_optiq", "per-layer KV cache and multi-adapter serving (mlx-lm-optiq)")
    for ext in exts:
        ext.add_arguments(group)
    ns = wrapped(*args, **kwargs)
    for ext in exts:
        ext.after_parse(ns, parser)
    return ns


def _main(wrapped, instance, args, kwargs):
    patching.wrap(argparse.ArgumentParser, "parse_args", _parse_args_once)
    try:
        return wrapped(*args, **kwargs)
    finally:
        patching.unwrap(argparse.ArgumentParser, "parse_args", _parse_args_once)


def install(module: ModuleType) -> None:
    patching.wrap(module, "main", _main)
    for ext in _extensions():
        ext.install(module)
