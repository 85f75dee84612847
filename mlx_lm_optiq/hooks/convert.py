"""Hooks on `mlx_lm.convert`: `--optiq-*` flags on the console script and the Python API.

Extensions (modules listed in EXTENSIONS) each provide:
  add_arguments(group)                 add their `--optiq-*` flags (default None)
  is_requested(options) -> bool        whether their flags ask for any work
  before_convert(call, options) -> state or None
                                       may change stock convert's arguments `call` (e.g.
                                       quant_predicate); what it returns is this call's state
  write_model(out_dir, call, options, state) -> bool      (optional)
                                       write the model into out_dir itself instead of stock
                                       convert (True), or leave it to stock convert (False)
  after_convert(out_dir, call, options, state)
                                       write sidecars into the staging directory; `state`
                                       is what before_convert returned for this call
`options` holds every optiq_* value with the prefix stripped; extensions never write
into it (per-call state travels as the return value of before_convert). When any
extension is requested, stock convert writes into a staging directory that is renamed
to `--mlx-path` only after every extension has finished (atomic output).

The command line (`main`) reports every error a user can cause (`core.errors.OptiqError`:
a bad flag value, file or model path; the extensions word them with the flags) as one
`mlx_lm.convert: error: ...` line and exit status 1, like argparse's own errors; any other
exception is a bug and keeps its traceback. The Python API raises the errors themselves.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

from mlx_lm_optiq.core import model_tree
from mlx_lm_optiq.core.errors import UsageError, user_errors
from mlx_lm_optiq.core.jsonio import atomic_output_dir
from mlx_lm_optiq.hooks import patching, pop_options

EXTENSIONS = ["mlx_lm_optiq.hooks.convert_weights", "mlx_lm_optiq.hooks.convert_kv"]


def _extensions():
    return [importlib.import_module(name) for name in EXTENSIONS]


def _known_options() -> set[str]:
    """Every `optiq_*` keyword the extensions accept (their flags' dests, prefix stripped)."""
    import argparse

    group = argparse.ArgumentParser().add_argument_group("optiq")
    for ext in _extensions():
        ext.add_arguments(group)
    return {a.dest[len("optiq_") :] for a in group._group_actions}


def _configure_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    group = parser.add_argument_group("mlx_lm_optiq", "sensitivity-aware quantization (mlx-lm-optiq)")
    for ext in _extensions():
        ext.add_arguments(group)
    return parser


def _check_source(call: dict) -> None:
    """The model to convert exists and has a readable config.json, before any work: stock convert
    would fail on either with a traceback, and an extension only after stock convert ran."""
    if call.get("hf_path") is None:
        raise UsageError("--hf-path/--model: the model to convert is required")
    model_tree.read_model_config(model_tree.resolve_model_path(call["hf_path"], call.get("revision")))


def _written_by_extension(exts, states, out: Path, call: dict, options: dict) -> bool:
    """Whether an extension wrote the model into `out` itself (its `write_model`): the first that
    does replaces stock convert's writing."""
    for ext, state in zip(exts, states):
        write = getattr(ext, "write_model", None)
        if write is not None and write(out, call, options, state):
            return True
    return False


def _convert(wrapped, instance, args, kwargs):
    kwargs = dict(kwargs)
    options = pop_options(kwargs)  # stock convert() rejects unknown keywords
    unknown = sorted(set(options) - _known_options())
    if unknown:  # a misspelt keyword must not silently fall back to a default
        raise TypeError(
            f"convert() got unexpected keyword(s) {', '.join('optiq_' + k for k in unknown)}; "
            f"known: {', '.join('optiq_' + k for k in sorted(_known_options()))}"
        )
    exts = [e for e in _extensions() if e.is_requested(options)]
    if not exts:
        return wrapped(*args, **kwargs)
    call = dict(inspect.signature(wrapped).bind_partial(*args, **kwargs).arguments)
    _check_source(call)
    upload_repo = call.pop("upload_repo", None)  # upload the final folder, not the staging one
    final_path = Path(call.get("mlx_path", "mlx_model"))
    with atomic_output_dir(final_path) as staging:
        # stock convert refuses an existing directory: hand it a fresh child path
        call["mlx_path"] = str(staging / "model")
        states = [ext.before_convert(call, options) for ext in exts]
        out = staging / "model"
        if not _written_by_extension(exts, states, out, call, options):
            wrapped(**call)
        for ext, state in zip(exts, states):
            ext.after_convert(out, call, options, state)
        for p in out.iterdir():
            p.rename(staging / p.name)
        out.rmdir()
    if upload_repo is not None:
        sys.modules["mlx_lm.convert"].upload_to_hub(str(final_path), upload_repo)
    return None


def _main(wrapped, instance, args, kwargs):
    with user_errors("mlx_lm.convert"):
        return wrapped(*args, **kwargs)


def install(module: ModuleType) -> None:
    patching.wrap(module, "main", _main)
    patching.wrap(module, "configure_parser", _configure_parser)
    patching.wrap(module, "convert", _convert, aliases=[("mlx_lm", "convert")])
    # mlx_lm/__init__ binds `convert` after this module finishes importing when
    # the hook fires first; it then picks up the wrapper by itself.
    assert sys.modules.get("mlx_lm.convert") is module
