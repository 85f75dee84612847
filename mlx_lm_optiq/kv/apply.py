"""Applying per-layer KV plans: the caches a plan builds, and which plan a model runs with.

`make_plan_cache(model, plan)` returns the per-slot cache list to pass as
`prompt_cache=`; `apply_plan` converts an existing cache list in place. With
`mlx_lm_optiq.enable()`, `generate`/`stream_generate` apply a plan by themselves:
the one set with `use_kv_config(...)` (or `set_override`), else the one attached to
the model (loading a folder with kv_config.json attaches it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from mlx_lm_optiq.kv.caches import (
    BatchMixedQuantizedKVCache,
    BatchMixedQuantizedRotatingKVCache,
    MixedQuantizedKVCache,
    MixedQuantizedRotatingKVCache,
)
from mlx_lm_optiq.kv.plan_file import FILENAME, KVConfigError, KVPlan, SlotPlan, read_kv_config, validate_plan
from mlx_lm_optiq.kv.turbo import BatchTurboQuantKVCache, TurboQuantKVCache

# ----------------------------------------------------------------------------- caches


def new_slot_cache(s: SlotPlan, quantized_kv_start: int = 0, like: Any = None) -> Any:
    """An empty cache for a planned (non-`none`) slot of a validated plan.

    Affine slots get kv_cache.MixedQuantizedKVCache (K and V at their own widths),
    turbo slots turbo.TurboQuantKVCache; both batch and apply quantized_kv_start by
    themselves (float until they hold that many tokens, also inside a batch)."""
    if s.scheme == "affine":
        # a sliding window comes from the cache being replaced (`like`: also what
        # max_kv_size makes of every slot), else from the model's geometry
        window = keep = None
        if isinstance(like, RotatingKVCache):
            window, keep = like.max_size, like.keep
        elif s.geometry is not None and s.geometry.kind == "RotatingKVCache":
            window, keep = s.geometry.window, s.geometry.keep
        if window is not None:
            return MixedQuantizedRotatingKVCache(window, keep, s.k_bits, s.v_bits, s.group_size, quantized_kv_start)
        return MixedQuantizedKVCache(s.k_bits, s.v_bits, s.group_size, quantized_kv_start)
    if s.scheme == "turbo":
        g = s.geometry
        return TurboQuantKVCache(
            head_dim=g.k_head_dim,
            value_head_dim=g.v_head_dim,
            bits=s.k_bits,
            key_bits=s.k_bits,
            value_bits=s.v_bits,
            seed=s.seed,
            quantized_kv_start=quantized_kv_start,
        )
    raise ValueError(f"slot {s.slot}: scheme {s.scheme!r} has no planned cache")


def convert_cache(c: Any, s: SlotPlan, quantized_kv_start: int = 0) -> Any:
    """The planned cache for slot plan `s`, holding everything the float KVCache `c` holds."""
    new = new_slot_cache(s, quantized_kv_start, like=c)
    # The planned caches are (Rotating)KVCache subclasses: they take the float buffers as
    # they are and quantize them themselves once they hold quantized_kv_start tokens.
    new.keys, new.values, new.offset = c.keys, c.values, c.offset
    if isinstance(c, RotatingKVCache):
        new._idx = c._idx
    return new


def apply_plan(caches: list, plan: KVPlan, model: Any = None) -> list:
    """Apply a plan in place to a cache list (as `maybe_quantize_kv_cache` does).

    Plain float `KVCache` slots become their planned cache (keeping what they hold);
    slots already planned are left alone. Any other cache where the plan wants
    quantization is an error, never silently kept in float.
    """
    if model is not None:
        validate_plan(plan, model)
    if len(caches) < len(plan.slots):
        raise KVConfigError(f"{plan.source}: has {len(plan.slots)} cache slots but the prompt cache has {len(caches)}")
    start = plan.quantized_kv_start
    for s in plan.slots:
        if s.scheme == "none":
            continue
        c = caches[s.slot]
        if type(c) is RotatingKVCache and s.scheme == "turbo":
            raise KVConfigError(
                f"{plan.source}: layers[{s.slot}] wants {s.describe()} but the prompt cache holds a sliding-window "
                f"RotatingKVCache there (e.g. max_kv_size makes them), which TurboQuant cannot hold"
            )
        elif type(c) in (KVCache, RotatingKVCache):
            caches[s.slot] = convert_cache(c, s, start)
        elif not _is_planned(c, s):
            raise KVConfigError(
                f"{plan.source}: layers[{s.slot}] wants {s.describe()} but the prompt cache holds a "
                f"{type(c).__name__} there, which cannot be quantized"
            )
    return caches


def _is_planned(c, s):
    if s.scheme == "affine":
        kinds = (
            MixedQuantizedKVCache,
            BatchMixedQuantizedKVCache,
            MixedQuantizedRotatingKVCache,
            BatchMixedQuantizedRotatingKVCache,
        )
        return isinstance(c, kinds) and (c.k_bits, c.v_bits, c.group_size) == (s.k_bits, s.v_bits, s.group_size)
    if s.scheme == "turbo":
        return isinstance(c, (TurboQuantKVCache, BatchTurboQuantKVCache))
    return False


def make_plan_cache(model: Any, plan: KVPlan, max_kv_size: int | None = None) -> list:
    """The prompt cache list for `model` under `plan` (pass it as `prompt_cache=`)."""
    validate_plan(plan, model)
    caches = make_prompt_cache(model, max_kv_size=max_kv_size)
    return apply_plan(caches, plan)


# ----------------------------------------------------------------------------- which plan is in force

_UNSET = object()
_OVERRIDE = contextvars.ContextVar("mlx_lm_optiq_kv_plan", default=_UNSET)
_ATTR = "_optiq_kv_plan"


def set_override(plan: KVPlan | None) -> contextvars.Token:
    """Make `plan` the one generate uses for every model in this context (None: float caches,
    even for a model whose folder has a plan); returns the token for `reset_override`.

    `use_kv_config` is the scoped form; the console scripts' flags set it for the process.
    """
    return _OVERRIDE.set(plan)


def reset_override(token: contextvars.Token) -> None:
    """Undo the `set_override` call that returned `token`."""
    _OVERRIDE.reset(token)


def override_is_set() -> bool:
    """Whether a plan (or None) was chosen with set_override/use_kv_config, so a model's
    attached plan is not the one in force."""
    return _OVERRIDE.get() is not _UNSET


@contextlib.contextmanager
def use_kv_config(plan_or_path: KVPlan | str | Path | None, model: Any = None) -> Iterator[KVPlan | None]:
    """Apply a plan to every generate/stream_generate call made inside the block.

    `plan_or_path`: a KVPlan, a kv_config.json path (or a folder holding one), or
    None to switch off the plan found next to a loaded model. A path is read now;
    it is validated against the model now when `model` is given, else at first use.
    Needs `mlx_lm_optiq.enable()` for generate/stream_generate to see it.
    """
    plan = plan_or_path
    if plan is not None and not isinstance(plan, KVPlan):
        plan = read_kv_config(plan)
    if plan is not None and model is not None:
        validate_plan(plan, model)
    token = set_override(plan)
    try:
        yield plan
    finally:
        reset_override(token)


def attach_plan(model: Any, plan: KVPlan | None, validate: bool = True) -> None:
    """Make `plan` the default for `model` (what loading a folder with kv_config.json does);
    None detaches. Unvalidated plans are validated at first use."""
    if plan is not None and validate:
        validate_plan(plan, model)
    object.__setattr__(model, _ATTR, plan)


def attached_plan(model: Any) -> KVPlan | None:
    """The plan attached to `model` (loading a folder with kv_config.json attaches it), or None."""
    return getattr(model, _ATTR, None)


def active_plan(model: Any) -> KVPlan | None:
    """The plan generate should use for `model`: use_kv_config's, else the model's own."""
    plan = _OVERRIDE.get()
    return attached_plan(model) if plan is _UNSET else plan


def find_kv_config(model_path: str | Path) -> Path | None:
    """The kv_config.json beside a model (a local folder or a cached Hub repo), or None."""
    p = Path(model_path)
    if p.is_dir():
        f = p / FILENAME
        return f if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(str(model_path), FILENAME)
    except Exception:  # not a repo id: nothing to pick up
        return None
    return Path(f) if isinstance(f, str) else None
