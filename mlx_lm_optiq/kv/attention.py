"""Attention over the per-layer quantized caches, one implementation per backend.

The caches in `caches.py` store each position's keys and values as packed bytes
([codes | scales | biases], see `Packing`). Attention can consume them three ways:

* ``dequantize`` (the reference, and the CPU default): dequantize the used prefix to
  the model's float dtype and run `mx.fast.scaled_dot_product_attention`. Exact
  w.r.t. the stored values, works for every shape, mask and attention sinks, but
  reads the cache and then writes and re-reads a float copy of it every step.
* ``quantized_matmul`` (the Metal default): scores and values through
  `mx.quantized_matmul`, which has Metal kernels (what mlx-lm's own quantized SDPA
  does, here with K and V at their own bits). It reads codes instead of a float
  copy; we cannot run Metal here, so CI checks this path on the CPU backend, whose
  `quantized_matmul` computes the same function.
* ``cuda`` (the CUDA default for decode-shaped calls): one fused kernel
  (`cuda_attention.py`, flash-decoding style) reads the packed bytes once,
  dequantizes in registers, and keeps an online softmax per split of the sequence;
  a second small kernel merges the splits. MLX's CUDA backend has no
  `quantized_matmul` kernel for these shapes, which is why this path exists.

`MLX_LM_OPTIQ_KV_ATTENTION=auto|dequantize|quantized_matmul|cuda` overrides the
choice. A path the running backend cannot execute is an error, said once, not a
silent switch. Calls a fast path does not cover (prefill chunks with many query
rows, attention sinks) take the reference path: it computes the same function.

The caches hand out `PackedKV` instead of float arrays only while mlx-lm's
attention is patched (`set_attention_patched`, done by the attention hook), the
chosen path is not ``dequantize``, and the hooked attention has already been called
with that cache (`note_attention_call`: proof that its model's attention goes
through mlx-lm's `scaled_dot_product_attention`; a few model files call
`mx.fast.scaled_dot_product_attention` directly). Otherwise they return float
arrays as before, so every other use of the caches keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_lm_optiq.core.backend import path_from_env

ENV_VAR = "MLX_LM_OPTIQ_KV_ATTENTION"
PATHS = ("dequantize", "quantized_matmul", "cuda")

_patched = False


def set_attention_patched(active: bool) -> None:
    """Called by the attention hook: whether packed caches may be handed to attention."""
    global _patched
    _patched = bool(active)


def attention_patched() -> bool:
    return _patched


@dataclass(frozen=True)
class PackedKV:
    """The used prefix of one packed cache tensor, (B, H, S, width) uint8, and its layout.

    `packing` has `bits`, `group_size`, `dim`, `dtype`, `code_bytes`, `scale_bytes`
    and `unpack(data)` (caches.Packing)."""

    data: mx.array
    packing: Any

    @property
    def shape(self) -> tuple:
        # what attention code may ask of keys/values: the float tensor's shape
        return (*self.data.shape[:-1], self.packing.dim)

    def dequantize(self) -> mx.array:
        return self.packing.unpack(self.data)

    def split(self) -> tuple[mx.array, mx.array, mx.array]:
        """(codes uint32, scales, biases) as mx.quantize returns them."""
        c, s, p = self.packing.code_bytes, self.packing.scale_bytes, self.packing
        d = self.data
        return (
            mx.contiguous(d[..., :c]).view(mx.uint32),
            mx.contiguous(d[..., c : c + s]).view(p.dtype),
            mx.contiguous(d[..., c + s :]).view(p.dtype),
        )


# The path `auto` takes per backend (core.backend.compute_backend); any other GPU backend
# takes the reference.
_DEFAULTS = {"cpu": "dequantize", "metal": "quantized_matmul", "cuda": "cuda"}


def selected_path() -> str:
    """The attention path for packed caches on this backend (env override applied).

    Raises ValueError for an unknown value and RuntimeError when the backend cannot
    run the requested path (`core.backend.path_from_env`)."""
    return path_from_env(ENV_VAR, PATHS, _DEFAULTS, "dequantize", "the fused CUDA kernel")


def note_attention_call(cache: Any) -> None:
    """The hooked attention was called with `cache`: its model's attention goes through
    mlx-lm's scaled_dot_product_attention, so the cache may hand it PackedKV from now on."""
    if cache is not None and hasattr(cache, "packed_attention_seen"):
        cache.packed_attention_seen = True


def packed_attention_active() -> bool:
    """Whether caches should hand attention PackedKV (see the module docstring)."""
    return _patched and selected_path() != "dequantize"


def quantized_scaled_dot_product_attention(
    queries: mx.array,
    keys: PackedKV,
    values: PackedKV,
    scale: float,
    mask: Any = None,
    sinks: mx.array | None = None,
) -> mx.array:
    """Attention of `queries` (B, Hq, L, D) over packed keys/values (B, Hkv, S, ·)."""
    path = selected_path()
    if sinks is None:
        if path == "cuda":
            from mlx_lm_optiq.kv import cuda_attention

            if cuda_attention.supports(queries, keys, values, mask):
                return cuda_attention.attention(queries, keys, values, scale, mask)
        elif path == "quantized_matmul":
            return quantized_matmul_attention(queries, keys, values, scale, mask)
    return dequantized_attention(queries, keys, values, scale, mask, sinks)


def dequantized_attention(
    queries: mx.array,
    keys: PackedKV,
    values: PackedKV,
    scale: float,
    mask: Any = None,
    sinks: mx.array | None = None,
) -> mx.array:
    """The reference: dequantize the prefix, then MLX's fused float SDPA."""
    return mx.fast.scaled_dot_product_attention(
        queries, keys.dequantize(), values.dequantize(), scale=scale, mask=mask, sinks=sinks
    )


def quantized_matmul_attention(
    queries: mx.array, keys: PackedKV, values: PackedKV, scale: float, mask: Any = None
) -> mx.array:
    """Scores and values through mx.quantized_matmul (Metal kernels), K and V at their own bits.

    Softmax in float32 (`precise=True`), as mlx-lm's quantized SDPA does."""
    B, n_q, L, D = queries.shape
    n_kv = keys.data.shape[1]
    rep = n_q // n_kv
    q = queries * scale
    k, v = keys.split(), values.split()
    if rep > 1:
        q = q.reshape(B, n_kv, rep, L, D)
        k = tuple(mx.expand_dims(x, -3) for x in k)
        v = tuple(mx.expand_dims(x, -3) for x in v)
    kp, vp = keys.packing, values.packing
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=kp.group_size, bits=kp.bits)
    if mask is not None:
        S = scores.shape[-1]
        if isinstance(mask, str):
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        elif rep > 1 and mask.ndim == 4:
            # (B, 1|Hq, L, S) -> broadcastable against (B, Hkv, rep, L, S)
            if mask.shape[1] == n_q:
                mask = mask.reshape(mask.shape[0], n_kv, rep, *mask.shape[2:])
            else:
                mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-float("inf"), scores.dtype))
        else:
            scores = scores + mask
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=vp.group_size, bits=vp.bits)
    return out.reshape(B, n_q, L, -1) if rep > 1 else out
