"""What each cache slot of a model holds, and what it costs at a given precision.

A model's caches are the list `make_prompt_cache(model)` returns; a model indexes
them by position (the *cache slot*). Full-attention `KVCache` slots grow with the
context, sliding-window `RotatingKVCache` slots stop at their window, and other
caches (linear-attention/SSM `ArraysCache`, `CacheList`) hold no KV at all. Plans,
measurements and allocation all count bits through these functions, so "average
bits per cached element" means the same thing in kv_config.json, the sensitivity
table and the knapsack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

FLOAT_BITS = 16  # what a float cache costs per element (fp16/bf16 serving)
# Cache classes a scheme may replace (turbo has no sliding-window cache).
QUANTIZABLE_KINDS = {"affine": ("KVCache", "RotatingKVCache"), "turbo": ("KVCache",)}


@dataclass
class SlotGeometry:
    """What one cache slot of a model holds (found by a shape-only probe)."""

    slot: int
    layer: int | None
    kind: str  # the cache class name
    n_kv_heads: int | None = None
    k_head_dim: int | None = None
    v_head_dim: int | None = None
    window: int | None = None  # RotatingKVCache.max_size
    keep: int = 0  # RotatingKVCache.keep (tokens never evicted); not written to kv_config.json

    @property
    def holds_kv(self) -> bool:
        return self.kind in ("KVCache", "RotatingKVCache") and self.n_kv_heads is not None

    @property
    def quantizable(self) -> bool:
        """Whether some scheme can quantize this slot (affine can quantize every KV cache)."""
        return self.kind in QUANTIZABLE_KINDS["affine"] and self.n_kv_heads is not None


def cache_geometry(model: Any) -> list[SlotGeometry]:
    """Per-slot geometry of `make_prompt_cache(model)`.

    Runs the model on one token lazily: the cache arrays get their shapes from the
    graph without any evaluation, so this costs nothing even for large models.
    """
    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    layers = getattr(model, "layers", None)
    same_count = layers is not None and len(layers) == len(caches)
    out = []
    for i, c in enumerate(caches):
        g = SlotGeometry(slot=i, layer=i if same_count else None, kind=type(c).__name__)
        keys = getattr(c, "keys", None)
        values = getattr(c, "values", None)
        if g.kind in ("KVCache", "RotatingKVCache") and keys is not None:
            g.n_kv_heads = int(keys.shape[1])
            g.k_head_dim = int(keys.shape[-1])
            g.v_head_dim = int(values.shape[-1])
        if g.kind == "RotatingKVCache":
            g.window = int(c.max_size)
            g.keep = int(c.keep)
        out.append(g)
    return out


def elements_per_token(geom: SlotGeometry) -> int:
    """Cache elements one token adds to a slot (keys + values over all KV heads)."""
    if not geom.holds_kv:
        return 0
    return geom.n_kv_heads * (geom.k_head_dim + geom.v_head_dim)


def bits_per_token(
    geom: SlotGeometry,
    scheme: str,
    k_bits: int | None = None,
    v_bits: int | None = None,
    group_size: int | None = None,
    float_bits: int = FLOAT_BITS,
) -> int:
    """Bits one token occupies in a slot's cache, scales and biases included.

    affine: each group of `group_size` channels adds a scale and a bias in the float
    dtype (16 bits each); turbo: one float norm per (head, vector) besides the codes.
    """
    if not geom.holds_kv:
        return 0
    h, dk, dv = geom.n_kv_heads, geom.k_head_dim, geom.v_head_dim
    if scheme == "none":
        return h * (dk + dv) * float_bits
    if scheme == "affine":
        overhead = 2 * float_bits * (dk // group_size + dv // group_size)
        return h * (dk * k_bits + dv * v_bits + overhead)
    if scheme == "turbo":
        return h * (dk * k_bits + dv * v_bits + 2 * float_bits)
    raise ValueError(f"unknown scheme {scheme!r}")


def token_weight(geom: SlotGeometry, context_length: int) -> int:
    """How many tokens a slot holds at `context_length` (sliding layers stop at their window)."""
    if geom.kind == "RotatingKVCache" and geom.window is not None:
        return min(geom.window, context_length)
    return context_length


def average_bits(plan_slots: Sequence[Any], geometry: Sequence[SlotGeometry], context_length: int = 8192) -> float:
    """Average bits per cached element over every KV-holding slot, weighted by what it holds.

    `plan_slots`: one entry per slot with `scheme`, `k_bits`, `v_bits`, `group_size`
    (plan_file.SlotPlan)."""
    total = elems = 0
    for s, g in zip(plan_slots, geometry):
        if not g.holds_kv:
            continue
        w = token_weight(g, context_length)
        total += bits_per_token(g, s.scheme, s.k_bits, s.v_bits, s.group_size) * w
        elems += elements_per_token(g) * w
    return total / elems if elems else float(FLOAT_BITS)
