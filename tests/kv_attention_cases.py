"""Shared cases for attention over packed KV caches (CPU tests and the device parity test)."""

import mlx.core as mx

from mlx_lm_optiq.kv.attention import PackedKV
from mlx_lm_optiq.kv.caches import Packing


def packed_case(B, n_q, n_kv, L, S, D, k_bits, v_bits, group, dtype=mx.float32, seed=0, pad=0):
    """Random queries and a packed cache, sliced like a cache's used prefix (`pad` spare
    positions after it, so the prefix is a strided view as in the real caches)."""
    mx.random.seed(seed)
    q = mx.random.normal((B, L, n_q, D)).astype(dtype).transpose(0, 2, 1, 3)  # non-contiguous, as models pass it
    k = mx.random.normal((B, n_kv, S + pad, D)).astype(dtype)
    v = mx.random.normal((B, n_kv, S + pad, D)).astype(dtype)
    pk, pv = Packing(k_bits, group, D, dtype), Packing(v_bits, group, D, dtype)
    kd, vd = pk.pack(k), pv.pack(v)
    mx.eval(q, kd, vd)
    return q, PackedKV(kd[..., :S, :], pk), PackedKV(vd[..., :S, :], pv)


def masks(B, L, S, seed=0):
    """The mask forms mlx-lm passes: none, "causal", boolean (left padding) and additive."""
    mx.random.seed(seed + 1)
    pad = mx.array([min(i * 7, S - L) for i in range(B)])
    keep = (mx.arange(S)[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
    keep = mx.broadcast_to(keep, (B, 1, L, S))
    additive = mx.where(keep, mx.random.uniform(-1, 0, (B, 1, L, S)), -float("inf"))
    return {"none": None, "causal": "causal", "bool": keep, "additive": additive}
