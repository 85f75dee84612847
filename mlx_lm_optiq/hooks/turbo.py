"""Hook on `mlx_lm.models.base.scaled_dot_product_attention`: TurboQuant caches get rotated-space attention.

Model files bind the function by name (`from .base import scaled_dot_product_attention`),
so the wrapper is also pointed at every `mlx_lm.models.*` module that holds the
original; modules imported later bind the wrapper themselves. Every binding is
recorded in `_patching`, so `unpatch_attention()` / `mlx_lm_optiq.disable()`
restore the identical original everywhere. Calls whose cache is not a
TurboQuantKVCache pass straight through to the wrapped function.
"""

import pkgutil
import sys

import wrapt

from .. import _patching, turbo
from . import on_reset

_ATTR = "scaled_dot_product_attention"


def _sdpa(wrapped, instance, args, kwargs):
    call = _bind(args, kwargs)
    keys = call.get("keys")
    if isinstance(keys, turbo.TurboKV):
        return turbo.turbo_scaled_dot_product_attention(
            call["queries"], keys, scale=call["scale"], mask=call.get("mask"), sinks=call.get("sinks")
        )
    return wrapped(*args, **kwargs)


_PARAMS = ("queries", "keys", "values", "cache", "scale", "mask", "sinks")


def _bind(args, kwargs):
    call = dict(zip(_PARAMS, args))
    call.update(kwargs)
    return call


def _model_module_names():
    import mlx_lm.models

    return [f"mlx_lm.models.{m.name}" for m in pkgutil.iter_modules(mlx_lm.models.__path__)
            if m.name != "base"]


def install(module):
    """Installer for mlx_lm_optiq.HOOKS["mlx_lm.models.base"] (also used by patch_attention)."""
    _patching.wrap(module, _ATTR, _sdpa, aliases=[(name, _ATTR) for name in _model_module_names()])
    turbo.set_attention_patched(True)


def patch_attention():
    """Make mlx-lm's attention use TurboQuantKVCache without enabling the other hooks."""
    import mlx_lm.models.base

    install(mlx_lm.models.base)


def unpatch_attention():
    """Undo patch_attention(): every module gets the identical original function back."""
    base = sys.modules.get("mlx_lm.models.base")
    if base is None:
        return
    current = vars(base)[_ATTR]
    handle = _patching._ours(current, _sdpa)
    if handle is None:
        return
    for i in reversed(range(len(_patching._ALIASES))):
        mod_name, alias, original, h = _patching._ALIASES[i]
        if h is handle:
            mod = sys.modules.get(mod_name)
            if mod is not None and getattr(mod, alias, None) is handle:
                setattr(mod, alias, original)
            del _patching._ALIASES[i]
    _patching._PATCHES[:] = [p for p in _patching._PATCHES if p[2] is not handle]
    wrapt.unwrap_object(base, _ATTR, handle, missing_ok=True)
    turbo.set_attention_patched(False)


on_reset(lambda: turbo.set_attention_patched(False))
