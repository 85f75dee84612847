"""Fused decode attention over packed quantized KV caches, for MLX's CUDA backend.

Why: on CUDA the reference path (dequantize the whole used prefix to fp16, then
float SDPA) reads the packed cache, writes a float copy and reads that copy again
every decode step, 2-4x the bytes of fp16 attention; MLX has no CUDA
`quantized_matmul` kernel for attention shapes. This reads each packed position
once.

Design (flash-decoding): the sequence is cut into splits; one warp owns one
(batch row, KV head, split) and *all* query rows that read that KV head (the GQA
group times the L query positions), so every key/value byte is read once per
step, not once per query head. Inside a warp:

* scores: lane j dequantizes position t0+j's key in registers and dots it with
  the queries, which sit pre-scaled in shared memory together with their
  per-group sums (so scale*code+bias costs one FMA per group, not per element).
  Each group's code words (mx.quantize's little-endian packing, any of
  2/3/4/5/6/8 bits) are loaded as independent loads and decoded at bit offsets
  that are constants once the loops unroll: a shift and a mask per code, no
  running bit buffer (1.3-1.6x faster than the buffer; docs/kv.md);
* an online softmax per query row (running max, running sum per lane);
* values: the warp walks the 32 positions of the tile, lane d owns D/32
  consecutive dims, takes those codes from one 64-bit read of the tile's
  packed row in shared memory and accumulates p * (scale*code+bias).

A second kernel merges the splits (max-rescaled sums, one block per query row) and
writes the output in the queries' dtype. Masks: none, causal (offset S-L, as mlx-lm's "causal"), or an
array broadcastable to (B, Hq, L, S), boolean or additive, read through its
strides (no broadcast copy). Anything else (attention sinks, more query rows per
KV head than MAX_ROWS, head dims other than 64/128/256) is not covered:
`supports()` says so and the caller takes the reference path.

`tests/test_kv_attention_device.py` checks parity with the reference on the GPU
(results in docs/results/); CI runs the reference and the quantized_matmul path.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any

import mlx.core as mx

MAX_ROWS = 16  # query rows per KV head handled by one warp (GQA ratio x L)
HEAD_DIMS = (64, 128, 256)

_HEADER = """
#define OPTIQ_NEG_INF __int_as_float(0xff800000)

// Code i (a compile-time constant once the caller's loop is unrolled) of a little-endian
// BITS-bit stream held in registers `w`: one shift and one mask (two shifts when the code
// straddles two words), no runtime bit bookkeeping.
template <int BITS>
__device__ __forceinline__ float code_at(const unsigned int* w, const int i) {
  const int bit = i * BITS, wi = bit >> 5, sh = bit & 31;
  unsigned int c = w[wi] >> sh;
  if (sh + BITS > 32) c |= w[wi + 1] << (32 - sh);
  return __int_as_float(0x4B000000u | (c & ((1u << BITS) - 1u))) - 8388608.f;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""

# Template constants: TS (scale dtype), D, KB, VB, G, NREP, L, R (= NREP*L), RP (R rounded
# up to 4: queries and probabilities are read as float4), WARPS, TARGET_WARPS, SCALE_BITS
# (the softmax scale's float32 bits), HAS_MASK, MASK_BOOL, CAUSAL. Everything that changes
# from step to step (the cache length) is read from the inputs' shapes, so a call uploads
# nothing from the host.
_SPLIT_SOURCE = """
  constexpr int DPL = D / 32;            // value dims per lane
  constexpr int NG = D / G;              // groups per row
  constexpr int KWORDS = D * KB / 32;    // code words per key row
  constexpr int VWORDS = D * VB / 32;
  constexpr int R4 = RP / 4;
  constexpr int VROW = VWORDS + (2 * NG * (int)sizeof(TS)) / 4;  // 32-bit words per packed value row
  const float NEG_INF = OPTIQ_NEG_INF;
  __shared__ float4 qs4[D * R4];                  // qs[d * RP + r]: scaled queries
  __shared__ float qg[NG * RP];                   // per-group sums of the queries
  __shared__ float4 ps4[WARPS * 32 * R4];         // a tile's probabilities, per warp
  __shared__ unsigned int vtile[WARPS * 32 * VROW];  // a tile's packed value rows, per warp
  float* qs = (float*)qs4;
  float* ps = (float*)ps4;

  // The split plan, computed exactly as cuda_attention._split_plan does on the host.
  const int S = kp_shape[2];
  const int HKV = kp_shape[1];
  const int BH = kp_shape[0] * HKV;
  const int want = (TARGET_WARPS + BH - 1) / BH;
  const int splits = max(1, min((S + 63) / 64, want));
  const int chunk = ((S + splits - 1) / splits + 31) / 32 * 32;
  const int NS = (S + chunk - 1) / chunk;
  const int HQ = HKV * NREP;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int groups_of_splits = (NS + WARPS - 1) / WARPS;
  const int blk = blockIdx.x;
  const int sg = blk % groups_of_splits;
  const int bh = blk / groups_of_splits;
  const int kvh = bh % HKV;
  const int b = bh / HKV;
  const int split = sg * WARPS + warp;
  const float sm_scale = __int_as_float(SCALE_BITS);

  for (int i = threadIdx.x; i < D * RP; i += blockDim.x) {
    const int d = i / RP, r = i % RP;
    float x = 0.f;
    if (r < R) {
      const int hq = kvh * NREP + r / L, l = r % L;
      x = (float)q[b * q_strides[0] + hq * q_strides[1] + l * q_strides[2] + d * q_strides[3]] * sm_scale;
    }
    qs[i] = x;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < NG * RP; i += blockDim.x) {
    const int g = i / RP, r = i % RP;
    float s = 0.f;
    for (int j = 0; j < G; j++) s += qs[(g * G + j) * RP + r];
    qg[i] = s;
  }
  __syncthreads();
  if (split >= NS) return;

  const int start = split * chunk;
  const int end = min(start + chunk, S);
  const unsigned char* kbase = kp + b * kp_strides[0] + kvh * kp_strides[1];
  const unsigned char* vbase = vp + b * vp_strides[0] + kvh * vp_strides[1];
  const long long kstep = kp_strides[2];
  const long long vstep = vp_strides[2];
  float* my_ps = ps + warp * 32 * RP;
  unsigned int* my_v = vtile + warp * 32 * VROW;

  float m[R], lsum[R], acc[R][DPL];
#pragma unroll
  for (int r = 0; r < R; r++) {
    m[r] = NEG_INF;
    lsum[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[r][i] = 0.f;
  }

  for (int t0 = start; t0 < end; t0 += 32) {
    const int p = t0 + lane;
    const int tn = min(32, end - t0);
    // Stage the tile's value rows in shared memory first: independent coalesced loads
    // whose latency overlaps the key work below (read one position at a time later,
    // each load would stall the warp).
#pragma unroll
    for (int i = lane; i < 32 * VROW; i += 32) {
      const int t = i / VROW;
      if (t < tn) my_v[i] = ((const unsigned int*)(vbase + (t0 + t) * vstep))[i % VROW];
    }
    float s[RP];
#pragma unroll
    for (int r = 0; r < RP; r++) s[r] = 0.f;
    if (p < end) {
      const unsigned char* row = kbase + p * kstep;
      const unsigned int* words = (const unsigned int*)row;
      const TS* ksc = (const TS*)(row + KWORDS * 4);
      const TS* kbi = ksc + NG;
      constexpr int GW = G * KB / 32;  // code words per group (G is a multiple of 32)
#pragma unroll
      for (int g = 0; g < NG; g++) {
        // the group's code words as independent loads, decoded at constant offsets below
        unsigned int kw[GW + 1];
#pragma unroll
        for (int i = 0; i < GW; i++) kw[i] = words[g * GW + i];
        kw[GW] = 0u;
        float part[RP];
#pragma unroll
        for (int r = 0; r < RP; r++) part[r] = 0.f;
#pragma unroll
        for (int j = 0; j < G; j++) {
          const float c = code_at<KB>(kw, j);
#pragma unroll
          for (int k = 0; k < R4; k++) {
            const float4 x = qs4[(g * G + j) * R4 + k];
            part[4 * k] += x.x * c;
            part[4 * k + 1] += x.y * c;
            part[4 * k + 2] += x.z * c;
            part[4 * k + 3] += x.w * c;
          }
        }
        const float sc = (float)ksc[g], bi = (float)kbi[g];
#pragma unroll
        for (int r = 0; r < R; r++) s[r] += sc * part[r] + bi * qg[g * RP + r];
      }
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int hq = kvh * NREP + r / L, l = r % L;
        if constexpr (CAUSAL) {
          if (p > S - L + l) s[r] = NEG_INF;
        }
        if constexpr (HAS_MASK) {
          const auto mv = mask[b * mask_strides[0] + hq * mask_strides[1] + l * mask_strides[2] + p * mask_strides[3]];
          if constexpr (MASK_BOOL) {
            if (!mv) s[r] = NEG_INF;
          } else {
            s[r] += (float)mv;
          }
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; r++) s[r] = NEG_INF;
    }

#pragma unroll
    for (int r = 0; r < R; r++) {
      const float mnew = fmaxf(m[r], warp_max(s[r]));
      const float corr = (mnew == NEG_INF) ? 1.f : __expf(m[r] - mnew);
      const float pr = (s[r] == NEG_INF) ? 0.f : __expf(s[r] - mnew);
      lsum[r] = lsum[r] * corr + pr;
      my_ps[lane * RP + r] = pr;
#pragma unroll
      for (int i = 0; i < DPL; i++) acc[r][i] *= corr;
      m[r] = mnew;
    }
    __syncwarp();

    const int bitoff = lane * DPL * VB;
    const int g = (lane * DPL) / G;
    for (int t = 0; t < tn; t++) {
      float pt[RP];
#pragma unroll
      for (int k = 0; k < R4; k++) {
        const float4 x = ((const float4*)(my_ps + t * RP))[k];
        pt[4 * k] = x.x;
        pt[4 * k + 1] = x.y;
        pt[4 * k + 2] = x.z;
        pt[4 * k + 3] = x.w;
      }
      const unsigned int* vrow = my_v + t * VROW;
      // this lane's DPL codes start at bit `bitoff`; with its shift they fit in 64 bits for
      // every head dim and width the kernel takes (word w+1 is at worst the row's first scale)
      const int w = bitoff >> 5;
      const unsigned long long bits = (((unsigned long long)vrow[w + 1] << 32) | vrow[w]) >> (bitoff & 31);
      const TS* vsc = (const TS*)(vrow + VWORDS);
      const float sc = (float)vsc[g], bi = (float)vsc[NG + g];
#pragma unroll
      for (int i = 0; i < DPL; i++) {
        const unsigned int code = (unsigned int)(bits >> (i * VB)) & ((1u << VB) - 1u);
        const float v = sc * (__int_as_float(0x4B000000u | code) - 8388608.f) + bi;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][i] += pt[r] * v;
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < R; r++) {
    const float total = warp_sum(lsum[r]);
    const int hq = kvh * NREP + r / L, l = r % L;
    const long long rowid = ((long long)(b * HQ + hq) * L + l) * NS + split;
#pragma unroll
    for (int i = 0; i < DPL; i++) o_part[rowid * D + lane * DPL + i] = acc[r][i];
    if (lane == 0) {
      m_part[rowid] = m[r];
      l_part[rowid] = total;
    }
  }
"""

# One block per query row: thread (sp, d) folds splits sp, sp+SP, ... of dim d with a
# running max, then the SP partial results are combined through shared memory.
_MERGE_SOURCE = """
  __shared__ float sm_m[SP * D], sm_l[SP * D], sm_o[SP * D];
  const long long row = blockIdx.x;
  const int NS = m_part_shape[1];
  const int d = threadIdx.x % D;
  const int sp = threadIdx.x / D;
  const float NEG_INF = OPTIQ_NEG_INF;
  float m = NEG_INF, l = 0.f, o = 0.f;
  for (int s = sp; s < NS; s += SP) {
    const float ms = m_part[row * NS + s];
    if (ms == NEG_INF) continue;
    const float mn = fmaxf(m, ms);
    const float a = (m == NEG_INF) ? 0.f : __expf(m - mn);
    const float w = __expf(ms - mn);
    o = o * a + w * o_part[(row * NS + s) * D + d];
    l = l * a + w * l_part[row * NS + s];
    m = mn;
  }
  sm_m[threadIdx.x] = m;
  sm_l[threadIdx.x] = l;
  sm_o[threadIdx.x] = o;
  __syncthreads();
  if (sp != 0) return;
  float M = NEG_INF;
  for (int k = 0; k < SP; k++) M = fmaxf(M, sm_m[k * D + d]);
  float num = 0.f, den = 0.f;
  if (M != NEG_INF) {
    for (int k = 0; k < SP; k++) {
      const float mk = sm_m[k * D + d];
      if (mk == NEG_INF) continue;
      const float w = __expf(mk - M);
      num += w * sm_o[k * D + d];
      den += w * sm_l[k * D + d];
    }
  }
  out[row * D + d] = (T)(den > 0.f ? num / den : 0.f);
"""


@cache
def _kernels():
    split = mx.fast.cuda_kernel(
        name="optiq_packed_kv_decode_split",
        input_names=["q", "kp", "vp", "mask"],
        output_names=["o_part", "m_part", "l_part"],
        source=_SPLIT_SOURCE,
        header=_HEADER,
        ensure_row_contiguous=False,  # read the caches' strided prefix views in place
    )
    merge = mx.fast.cuda_kernel(
        name="optiq_packed_kv_decode_merge",
        input_names=["o_part", "m_part", "l_part"],
        output_names=["out"],
        source=_MERGE_SOURCE,
        header=_HEADER,
    )
    return split, merge


def why_unsupported(queries: mx.array, keys: Any, values: Any, mask: Any) -> str | None:
    """None when the fused kernel covers this call, else the reason (for logs and tests)."""
    B, n_q, L, D = queries.shape
    n_kv = keys.data.shape[1]
    kp, vp = keys.packing, values.packing
    if D not in HEAD_DIMS or kp.dim != D or vp.dim != D:
        return f"head dims q={D} k={kp.dim} v={vp.dim} (kernel: equal, one of {HEAD_DIMS})"
    if kp.group_size != vp.group_size:
        return "keys and values use different group sizes"
    if n_q % n_kv:
        return f"{n_q} query heads over {n_kv} KV heads"
    if (n_q // n_kv) * L > MAX_ROWS:
        return f"{(n_q // n_kv) * L} query rows per KV head (kernel: <= {MAX_ROWS}; prefill takes the reference)"
    if kp.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"scale dtype {kp.dtype}"
    if _warps_per_block(D, (n_q // n_kv * L + 3) // 4 * 4, D // kp.group_size, vp.width) == 0:
        return "shared memory: too many query rows for this head dim and value width"
    if mask is not None and not isinstance(mask, str) and mask.ndim > 4:
        return f"mask with {mask.ndim} dims"
    if isinstance(mask, str) and mask != "causal":
        return f"mask {mask!r}"
    return None


def supports(queries: mx.array, keys: Any, values: Any, mask: Any) -> bool:
    return why_unsupported(queries, keys, values, mask) is None


TARGET_WARPS = 4096  # ~31 warps per SM on an H100/H200 (132 SMs): the best of 2048-16384 in a sweep (docs/kv.md)
SHARED_BYTES = 48 * 1024  # static shared memory per block


def _split_plan(batch_heads: int, S: int) -> tuple[int, int]:
    """(chunk, n_splits): about one wave of warps over the GPU, at least 64 positions each
    (more splits hide latency; fewer mean fewer partial results to write and merge).
    The split kernel computes the same plan from the cache's shape."""
    want = _ceil_div(TARGET_WARPS, max(batch_heads, 1))
    splits = max(1, min(_ceil_div(S, 64), want))
    chunk = _ceil_div(_ceil_div(S, splits), 32) * 32
    return chunk, _ceil_div(S, chunk)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _warps_per_block(D: int, rows_padded: int, groups: int, value_row_bytes: int) -> int:
    """The most warps (4, 2, 1) whose shared memory fits: queries, group sums, and per warp
    a tile's probabilities and packed value rows."""
    shared = 4 * (D * rows_padded + groups * rows_padded)
    for warps in (4, 2, 1):
        if shared + warps * 32 * (4 * rows_padded + value_row_bytes) <= SHARED_BYTES:
            return warps
    return 0


def attention(queries: mx.array, keys: Any, values: Any, scale: float, mask: Any = None) -> mx.array:
    """Fused attention of queries (B, Hq, L, D) over packed keys/values (B, Hkv, S, width)."""
    reason = why_unsupported(queries, keys, values, mask)
    if reason is not None:
        raise ValueError(f"fused CUDA KV attention does not cover this call: {reason}")
    B, n_q, L, D = queries.shape
    n_kv, S = keys.data.shape[1], keys.data.shape[2]
    rep = n_q // n_kv
    kp, vp = keys.packing, values.packing
    chunk, n_splits = _split_plan(B * n_kv, S)
    rows = B * n_q * L
    rows_padded = (rep * L + 3) // 4 * 4
    warps = _warps_per_block(D, rows_padded, D // kp.group_size, vp.width)

    causal = isinstance(mask, str) and L > 1
    has_mask = mask is not None and not isinstance(mask, str)
    if has_mask:
        m = mask
        while m.ndim < 4:
            m = mx.expand_dims(m, 0)
        m = mx.broadcast_to(m, (B, n_q, L, S))  # stride-0 view, read in place
        mask_bool = m.dtype == mx.bool_
    else:
        m = queries  # never read (HAS_MASK is false); avoids allocating a dummy per call
        mask_bool = False

    split, merge = _kernels()
    o_part, m_part, l_part = split(
        inputs=[queries, keys.data, values.data, m],
        template=[
            ("TS", kp.dtype),
            ("D", D),
            ("KB", kp.bits),
            ("VB", vp.bits),
            ("G", kp.group_size),
            ("NREP", rep),
            ("L", L),
            ("R", rep * L),
            ("RP", rows_padded),
            ("WARPS", warps),
            ("TARGET_WARPS", TARGET_WARPS),
            ("SCALE_BITS", struct.unpack("<i", struct.pack("<f", scale))[0]),
            ("HAS_MASK", has_mask),
            ("MASK_BOOL", mask_bool),
            ("CAUSAL", causal),
        ],
        grid=(B * n_kv * _ceil_div(n_splits, warps) * 32 * warps, 1, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(rows * n_splits * D,), (rows, n_splits), (rows, n_splits)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    sp = max(1, min(8, 1024 // D))
    (out,) = merge(
        inputs=[o_part, m_part, l_part],
        template=[("T", queries.dtype), ("D", D), ("SP", sp)],
        grid=(rows * D * sp, 1, 1),
        threadgroup=(D * sp, 1, 1),
        output_shapes=[(B, n_q, L, D)],
        output_dtypes=[queries.dtype],
    )
    return out
