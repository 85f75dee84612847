"""Per-layer quantized KV caches that batch, and attention that runs on every MLX backend.

`MixedQuantizedKVCache` stores one layer's keys and values quantized at their own bit
widths (e.g. K8/V4) with mx.quantize's affine groups; `BatchMixedQuantizedKVCache` is
its continuous-batching counterpart, so a server with a per-layer plan keeps
batching (stock `--kv-bits` turns it off).

Two design choices, both about reusing mlx-lm rather than re-implementing it:

* Storage layout. A quantized tensor is mx.quantize's triple (packed uint32
  codes, scales, biases), all with the sequence on axis 2. We byte-view the three
  and concatenate them on the last axis into ONE uint8 array per tensor
  ([codes | scales | biases]). Every batch operation mlx-lm's BatchKVCache does
  (merge, filter, extend, extract, trim, left/right padding, roll) only moves
  whole rows along the batch and sequence axes, so the stock KVCache and
  BatchKVCache code runs unchanged on the packed bytes; we subclass them and only
  convert at the boundary (quantize on the way in, dequantize on the way out).

* Attention. Our caches deliberately have no `bits` attribute (which routes stock
  caches to mlx-lm's quantized SDPA, whose `mx.quantized_matmul` has no CUDA
  kernel for these shapes). `update_and_fetch` returns either the *dequantized*
  keys/values of the used prefix (the reference path, and what code using the
  caches without our attention hook gets), or, when the attention hook is
  installed and the backend has a faster path, `attention.PackedKV` views of the
  packed prefix that the hooked attention consumes directly (a fused CUDA kernel,
  or `mx.quantized_matmul` on Metal): see kv/attention.py. Either way the memory
  held between steps is the quantized cache.

`quantized_kv_start` follows mlx-lm's meaning: the cache stays in float until
it holds that many tokens, then converts what it has and stores everything
after quantized.

What a query attends to, whatever the chunking (docs/kv.md, "Chunked prefill,
prompt-cache hits and batches"): exactly the keys/values mlx-lm's float cache of
the same kind would give it (every earlier position; for sliding windows its last
`max_size` positions, as RotatingKVCache keeps `max_size + chunk - 1` entries
during a multi-token update), each in its *stored* form: quantized on the way in,
the keys of the query's own chunk included. mx.quantize groups run along
head_dim, so a position's stored form depends only on its own float vector, and
prefilling at once, in chunks of any size, after a prompt-cache hit or inside a
batch computes the same attention (tests: to 1e-5 on fixed inputs, like float
caches). The alternative, attending the current chunk in float, would make the
result depend on where chunks end. Through a model, the float vectors themselves
differ by rounding noise between call shapes (BLAS and SDPA sum in another order);
round-to-nearest turns the rare value on a code boundary into a one-step change,
which moves later logits by far more than the noise (tests.helpers
QUANTIZED_KV_NOISE). That is quantization noise, the same for full-attention
caches and for any 1e-7 perturbation of the weights, not a chunking rule.
With quantized_kv_start > 0 the float-to-quantized switch happens between
updates, so results near the switch do depend on chunk boundaries (as in mlx-lm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

from mlx_lm_optiq.core.formats import AFFINE_BITS, AFFINE_GROUPS  # what mx.quantize supports in affine mode
from mlx_lm_optiq.kv import attention


def check_kv_quantization(
    k_bits: int, v_bits: int, group_size: int, head_dim: int | None = None, where: str = "kv cache"
) -> None:
    """Raise ValueError naming `where` unless mx.quantize can hold this cache."""
    for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
        if bits not in AFFINE_BITS:
            raise ValueError(f"{where}: {name}={bits!r} is not supported; expected one of {list(AFFINE_BITS)}")
    if group_size not in AFFINE_GROUPS:
        raise ValueError(f"{where}: group_size={group_size!r} is not supported; expected one of {list(AFFINE_GROUPS)}")
    if head_dim is not None and head_dim % group_size != 0:
        raise ValueError(f"{where}: head_dim {head_dim} is not divisible by group_size {group_size}")


@dataclass(frozen=True)
class Packing:
    """Byte layout of one quantized tensor (keys or values) along its last axis."""

    bits: int
    group_size: int
    dim: int  # head_dim of the float tensor
    dtype: mx.Dtype  # dtype of the float tensor (and of scales/biases)

    def __deepcopy__(self, memo):
        # Immutable, and mx.Dtype cannot be pickled: mlx-lm's prompt cache deep-copies caches.
        return self

    @property
    def code_bytes(self) -> int:
        return self.dim * self.bits // 8

    @property
    def scale_bytes(self) -> int:
        return self.dim // self.group_size * self.dtype.size

    @property
    def width(self) -> int:
        return self.code_bytes + 2 * self.scale_bytes

    def pack(self, x: mx.array) -> mx.array:
        codes, scales, biases = mx.quantize(x, group_size=self.group_size, bits=self.bits)
        return mx.concatenate([codes.view(mx.uint8), scales.view(mx.uint8), biases.view(mx.uint8)], axis=-1)

    def unpack(self, packed: mx.array) -> mx.array:
        c, s = self.code_bytes, self.scale_bytes
        return mx.dequantize(
            packed[..., :c].view(mx.uint32),
            packed[..., c : c + s].view(self.dtype),
            packed[..., c + s :].view(self.dtype),
            group_size=self.group_size,
            bits=self.bits,
        )


class _PerLayerQuantization:
    """What the single and batched caches share: the bit plan and the float→packed switch."""

    # Set by the attention hook when this cache was passed (as `cache=`) to mlx-lm's
    # scaled_dot_product_attention, i.e. its model's attention goes through the hook:
    # only then may update_and_fetch hand out PackedKV (models that call
    # mx.fast.scaled_dot_product_attention directly keep getting float arrays).
    packed_attention_seen = False

    def _init_plan(self, k_bits, v_bits, group_size, quantized_kv_start):
        check_kv_quantization(k_bits, v_bits, group_size)
        if quantized_kv_start < 0:
            raise ValueError(f"kv cache: quantized_kv_start={quantized_kv_start} must be >= 0")
        self.k_bits = k_bits
        self.v_bits = v_bits
        self.group_size = group_size
        self.quantized_kv_start = quantized_kv_start
        self.packing = None  # (keys Packing, values Packing) once quantized

    def plan_args(self) -> dict:
        return dict(
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            group_size=self.group_size,
            quantized_kv_start=self.quantized_kv_start,
        )

    @property
    def quantized(self) -> bool:
        return self.packing is not None

    def _start_quantizing(self, dtype, k_dim, v_dim):
        check_kv_quantization(self.k_bits, self.v_bits, self.group_size, k_dim, where="kv cache keys")
        check_kv_quantization(self.k_bits, self.v_bits, self.group_size, v_dim, where="kv cache values")
        self.packing = (
            Packing(self.k_bits, self.group_size, k_dim, dtype),
            Packing(self.v_bits, self.group_size, v_dim, dtype),
        )
        if self.keys is not None:  # the float tokens held so far become quantized too
            self.keys = self.packing[0].pack(self.keys)
            self.values = self.packing[1].pack(self.values)

    def _quantize_like(self, other):
        """Switch this (float) cache to `other`'s packing, converting what it holds."""
        if not self.quantized and other.quantized:
            pk, pv = other.packing
            self._start_quantizing(pk.dtype, pk.dim, pv.dim)

    def _filled(self):
        # a single request's cache: its own token count (the batched caches override this)
        return self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if not self.quantized and self._filled() >= self.quantized_kv_start:
            self._start_quantizing(keys.dtype, keys.shape[-1], values.shape[-1])
        if not self.quantized:
            return super().update_and_fetch(keys, values)
        pk, pv = self.packing
        keys, values = super().update_and_fetch(pk.pack(keys), pv.pack(values))
        return self._fetch(keys, values)

    def _fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """What attention gets from the packed prefix: PackedKV when a packed-attention
        path is active (kv/attention.py), else the dequantized float arrays."""
        pk, pv = self.packing
        if self.packed_attention_seen and attention.packed_attention_active():
            return attention.PackedKV(keys, pk), attention.PackedKV(values, pv)
        return pk.unpack(keys), pv.unpack(values)

    @property
    def to_quantized(self) -> Any:
        # mlx-lm's maybe_quantize_kv_cache converts every cache with a `to_quantized`
        # (hasattr check) to a uniform QuantizedKVCache; this cache is already
        # quantized per its plan, so it must not look convertible.
        raise AttributeError("per-layer KV caches are quantized by their plan")


class MixedQuantizedKVCache(_PerLayerQuantization, KVCache):
    """One layer's KV cache with keys at `k_bits` and values at `v_bits` (affine, `group_size`)."""

    def __init__(self, k_bits: int = 8, v_bits: int = 4, group_size: int = 64, quantized_kv_start: int = 0):
        KVCache.__init__(self)
        self._init_plan(k_bits, v_bits, group_size, quantized_kv_start)

    @classmethod
    def merge(cls, caches: list) -> Any:
        return BatchMixedQuantizedKVCache.merge(caches)

    def __repr__(self):
        return (
            f"MixedQuantizedKVCache(k_bits={self.k_bits}, v_bits={self.v_bits}, group_size={self.group_size}, "
            f"offset={self.offset}, quantized={self.quantized})"
        )


class _BatchPerLayerQuantization(_PerLayerQuantization):
    """What the two batched caches share: merging rows of one plan, extending, extracting a
    row, logging sizes."""

    _what = ""  # for the debug log

    @classmethod
    def merge(cls, caches: list) -> Any:
        first = caches[0]
        for c in caches[1:]:
            if c.plan_args() != first.plan_args():
                raise ValueError(f"cannot batch KV caches with different plans: {first!r} vs {c!r}")
        reference = next((c for c in caches if c.quantized), None)
        if reference is not None:
            # Rows share one buffer, so all must hold the same representation;
            # convert copies so the caller's (prompt-cache) entries stay untouched.
            caches = [_quantized_copy(c, reference) for c in caches]
        merged = cls._stock_merge(caches)
        batch = cls._empty_like(first, len(caches))
        batch.state = merged.state
        batch.packing = reference.packing if reference is not None else None
        logging.debug("mlx_lm_optiq KV: batch of %d rows (merge%s)", len(caches), cls._what)
        return batch

    def extend(self, other: Any) -> None:
        if other.plan_args() != self.plan_args():
            raise ValueError(f"cannot batch KV caches with different plans: {self!r} vs {other!r}")
        if self.quantized and not other.quantized:
            other._quantize_like(self)
        elif other.quantized and not self.quantized:
            self._quantize_like(other)
        super().extend(other)
        logging.debug("mlx_lm_optiq KV: batch of %d rows (extend%s)", self.left_padding.size, self._what)

    def extract(self, idx: int) -> Any:
        # mlx-lm's extract gives the row as a KVCache (or a RotatingKVCache with keep 0)
        cache = _with_positions_of(super().extract(idx), self.plan_args())
        cache.packing = self.packing
        return cache


class BatchMixedQuantizedKVCache(_BatchPerLayerQuantization, BatchKVCache):
    """Left-padded batch of MixedQuantizedKVCaches, as mlx-lm's BatchGenerator drives them."""

    def __init__(
        self,
        left_padding: list[int],
        k_bits: int = 8,
        v_bits: int = 4,
        group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        BatchKVCache.__init__(self, left_padding)
        self._init_plan(k_bits, v_bits, group_size, quantized_kv_start)

    def _filled(self):
        # One switch for the whole batch (rows share buffers): when the longest row
        # reaches the start. Equals the single-request switch point when rows are
        # aligned, and always when quantized_kv_start is 0.
        return self._idx

    _stock_merge = staticmethod(BatchKVCache.merge)

    @classmethod
    def _empty_like(cls, first, rows):
        return cls([0] * rows, **first.plan_args())

    def __repr__(self):
        return (
            f"BatchMixedQuantizedKVCache(k_bits={self.k_bits}, v_bits={self.v_bits}, group_size={self.group_size}, "
            f"size={self._idx}, quantized={self.quantized})"
        )


def _with_positions_of(src, plan_args):
    """A single-request per-layer cache of `src`'s kind (plain or sliding window) holding
    `src`'s buffers and position (`src` itself is any KVCache / RotatingKVCache)."""
    if isinstance(src, RotatingKVCache):
        cache = MixedQuantizedRotatingKVCache(src.max_size, src.keep, **plan_args)
        cache._idx = src._idx
    else:
        cache = MixedQuantizedKVCache(**plan_args)
    cache.keys, cache.values, cache.offset = src.keys, src.values, src.offset
    return cache


def _quantized_copy(cache, reference):
    if cache.quantized:
        return cache
    copy = _with_positions_of(cache, cache.plan_args())
    copy._quantize_like(reference)
    return copy


# Sliding-window layers. The same packed layout works for mlx-lm's rotating caches:
# their trimming, rotation, temporal re-ordering, left padding and rolls also move
# whole positions along the sequence axis, so RotatingKVCache / BatchRotatingKVCache
# run unchanged on the packed bytes.


class MixedQuantizedRotatingKVCache(_PerLayerQuantization, RotatingKVCache):
    """A sliding-window layer's cache (`max_size` tokens, the first `keep` never evicted)
    with keys at `k_bits` and values at `v_bits`.

    Every query attends its last `max_size` positions (RotatingKVCache's window logic,
    unchanged), each in its stored quantized form, its own chunk's keys included: the
    same result for any prefill chunking or prompt-cache hit (module docstring)."""

    def __init__(
        self,
        max_size: int,
        keep: int = 0,
        k_bits: int = 8,
        v_bits: int = 4,
        group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        RotatingKVCache.__init__(self, max_size, keep)
        self._init_plan(k_bits, v_bits, group_size, quantized_kv_start)

    @classmethod
    def merge(cls, caches: list) -> Any:
        return BatchMixedQuantizedRotatingKVCache.merge(caches)

    def __repr__(self):
        return (
            f"MixedQuantizedRotatingKVCache(max_size={self.max_size}, k_bits={self.k_bits}, v_bits={self.v_bits}, "
            f"group_size={self.group_size}, offset={self.offset}, quantized={self.quantized})"
        )


class BatchMixedQuantizedRotatingKVCache(_BatchPerLayerQuantization, BatchRotatingKVCache):
    """Left-padded batch of MixedQuantizedRotatingKVCaches, as mlx-lm's BatchGenerator drives them.

    Each row attends what it would attend alone (merge, right-padded chunked prefill,
    extend, filter, extract: BatchRotatingKVCache's code on the packed bytes)."""

    _what = ", sliding window"

    def __init__(
        self,
        max_size: int,
        left_padding: list[int],
        k_bits: int = 8,
        v_bits: int = 4,
        group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        BatchRotatingKVCache.__init__(self, max_size, left_padding)
        self._init_plan(k_bits, v_bits, group_size, quantized_kv_start)

    def _filled(self):
        return self._offset  # one switch for the whole batch, as in BatchMixedQuantizedKVCache

    _stock_merge = staticmethod(BatchRotatingKVCache.merge)  # also checks the windows agree

    @classmethod
    def _empty_like(cls, first, rows):
        return cls(first.max_size, [0] * rows, **first.plan_args())

    def __repr__(self):
        return (
            f"BatchMixedQuantizedRotatingKVCache(max_size={self.max_size}, k_bits={self.k_bits}, "
            f"v_bits={self.v_bits}, group_size={self.group_size}, size={self._offset}, quantized={self.quantized})"
        )
