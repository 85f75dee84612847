"""Hook on `mlx_lm.models.base.scaled_dot_product_attention`: TurboQuant caches get
rotated-space attention, per-layer quantized caches get attention over their packed
bytes (kv/attention.py picks the backend's path).

Model files bind the function by name (`from .base import scaled_dot_product_attention`),
so the wrapper is also pointed at every `mlx_lm.models.*` module that holds the
original; modules imported later bind the wrapper themselves. Every binding is
recorded in `hooks.patching`, so `unpatch_attention()` / `mlx_lm_optiq.disable()`
restore the identical original everywhere. Calls whose cache is not a
TurboQuantKVCache or packed per-layer cache pass straight through to the wrapped
function.
"""

from __future__ import annotations

import pkgutil
import sys
from types import ModuleType

from mlx_lm_optiq.hooks import on_reset, patching
from mlx_lm_optiq.kv import attention

_ATTR = "scaled_dot_product_attention"


def _sdpa(wrapped, instance, args, kwargs):
    call = _bind(args, kwargs)
    keys = call.get("keys")
    # Looked up, not imported: this module is imported to install the hook as soon as
    # mlx_lm.models.base is, which can be from inside mlx_lm.models.cache's own import, and
    # kv/turbo.py subclasses that module's caches. No TurboKV exists before kv/turbo.py runs.
    turbo = sys.modules.get("mlx_lm_optiq.kv.turbo")
    if turbo is not None and isinstance(keys, turbo.TurboKV):
        return turbo.turbo_scaled_dot_product_attention(
            call["queries"], keys, scale=call["scale"], mask=call.get("mask"), sinks=call.get("sinks")
        )
    if isinstance(keys, attention.PackedKV):
        return attention.quantized_scaled_dot_product_attention(
            call["queries"], keys, call["values"], scale=call["scale"], mask=call.get("mask"), sinks=call.get("sinks")
        )
    attention.note_attention_call(call.get("cache"))
    return wrapped(*args, **kwargs)


_PARAMS = ("queries", "keys", "values", "cache", "scale", "mask", "sinks")


def _bind(args, kwargs):
    call = dict(zip(_PARAMS, args))
    call.update(kwargs)
    return call


def _model_module_names():
    import mlx_lm.models

    return [f"mlx_lm.models.{m.name}" for m in pkgutil.iter_modules(mlx_lm.models.__path__) if m.name != "base"]


def install(module: ModuleType) -> None:
    """Installer for mlx_lm_optiq.HOOKS["mlx_lm.models.base"] (also used by patch_attention)."""
    patching.wrap(module, _ATTR, _sdpa, aliases=[(name, _ATTR) for name in _model_module_names()])
    attention.set_attention_patched(True)


def patch_attention() -> None:
    """Make mlx-lm's attention use TurboQuantKVCache without enabling the other hooks."""
    import mlx_lm.models.base

    install(mlx_lm.models.base)


def unpatch_attention() -> None:
    """Undo patch_attention(): every module gets the identical original function back."""
    base = sys.modules.get("mlx_lm.models.base")
    if base is None:
        return
    if patching.unwrap(base, _ATTR, _sdpa):
        attention.set_attention_patched(False)


def _reset() -> None:
    attention.set_attention_patched(False)


on_reset(_reset)
