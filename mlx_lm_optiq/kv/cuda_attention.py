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

That is the float32-FMA split kernel (`_SPLIT_SOURCE`, "simt"). For fp16/bf16 queries, 2/4/8-bit
K and V and at most 8 query rows per KV head, a tensor-core variant (`_MMA_SPLIT_SOURCE`, "mma",
the default where `why_not_mma` allows) does both products on mma.sync with float32
accumulators: 1.6-2.7x faster at 32k-64k on the H200 (docs/kv.md).

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

// Two 16-bit floats (fp16, or bf16 when BF) in one register, low half first: what mma.sync
// takes as one A/B operand register.
template <bool BF>
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  if constexpr (BF) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  }
}

// Dequantized pair (code k of the low half-word of x, code k of its high half-word), each
// as scale * code + bias, packed like pack2. The codes become exact 16-bit floats by
// OR-ing them under the bits of 1024 (fp16) or 128 (bf16) and subtracting that, then one
// fused multiply-add with the pair's scales and biases: the value the dequantize path
// computes in the model's dtype. bf16 cannot hold 128 + an 8-bit code, so 8-bit bf16
// codes go through float32.
template <int BITS, bool BF>
__device__ __forceinline__ unsigned int dequant_pair(unsigned int x, const int k, unsigned int s2, unsigned int b2,
                                                     float s_lo, float s_hi, float b_lo, float b_hi) {
  constexpr unsigned int MASK2 = ((1u << BITS) - 1u) * 0x00010001u;
  const unsigned int c = (x >> (k * BITS)) & MASK2;
  if constexpr (BF && BITS == 8) {
    return pack2<true>(fmaf((float)(c & 0xFFu), s_lo, b_lo), fmaf((float)(c >> 16), s_hi, b_hi));
  } else if constexpr (BF) {
    const unsigned int m = 0x43004300u;  // bf16 128.0 twice
    const unsigned int v = c | m;
    __nv_bfloat162 r = __hfma2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                                       *reinterpret_cast<const __nv_bfloat162*>(&m)),
                               *reinterpret_cast<const __nv_bfloat162*>(&s2),
                               *reinterpret_cast<const __nv_bfloat162*>(&b2));
    return *reinterpret_cast<unsigned int*>(&r);
  } else {
    const unsigned int m = 0x64006400u;  // fp16 1024.0 twice
    const unsigned int v = c | m;
    __half2 r = __hfma2(__hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&m)),
                        *reinterpret_cast<const __half2*>(&s2), *reinterpret_cast<const __half2*>(&b2));
    return *reinterpret_cast<unsigned int*>(&r);
  }
}

// d += a * b on the tensor cores: a 16x16 (row), b 16x8 (col), d 16x8 float32 (PTX
// mma.m16n8k16 fragment layouts; group = lane / 4, t = lane % 4: a0 (row group, cols 2t, 2t+1),
// a1 (row group + 8, same cols), a2/a3 the same at cols + 8; b0 (rows 2t, 2t+1, col group),
// b1 (rows + 8); d0, d1 (row group, cols 2t, 2t+1), d2, d3 (row group + 8)).
template <bool BF>
__device__ __forceinline__ void mma16816(float& d0, float& d1, float& d2, float& d3, unsigned int a0,
                                         unsigned int a1, unsigned int a2, unsigned int a3, unsigned int b0,
                                         unsigned int b1) {
  if constexpr (BF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// The calling warp's job: (batch row b, KV head kvh, split) and the split plan (NS splits of
// `chunk` positions, a multiple of 32), computed exactly as cuda_attention._split_plan does on
// the host. Blocks hold `warps` warps, one split each, the splits of one (b, kvh) side by side.
__device__ __forceinline__ void split_job(const int S, const int HKV, const int batch, const int target_warps,
                                          const int min_chunk, const int warps, int& NS, int& chunk, int& b,
                                          int& kvh, int& split) {
  const int BH = batch * HKV;
  const int want = (target_warps + BH - 1) / BH;
  const int splits = max(1, min((S + min_chunk - 1) / min_chunk, want));
  chunk = ((S + splits - 1) / splits + 31) / 32 * 32;
  NS = (S + chunk - 1) / chunk;
  const int groups_of_splits = (NS + warps - 1) / warps;
  const int bh = blockIdx.x / groups_of_splits;
  kvh = bh % HKV;
  b = bh / HKV;
  split = (blockIdx.x % groups_of_splits) * warps + (threadIdx.x >> 5);
}

// Asynchronous 16-byte global -> shared copy (sm_80+): `src_bytes` < 16 copies that many and
// zero-fills the rest, so a tile's last row never reads past the cache. Committed in groups;
// wait_group N returns once at most N of this thread's groups are still in flight.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// N consecutive 32-bit words from `src`, as N/2 64-bit loads when V2 (src 8-byte aligned).
template <int N, bool V2>
__device__ __forceinline__ void load_words(unsigned int* dst, const unsigned int* src) {
  if constexpr (V2 && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; i++) {
      const uint2 x = reinterpret_cast<const uint2*>(src)[i];
      dst[2 * i] = x.x;
      dst[2 * i + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; i++) dst[i] = src[i];
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Score x of query row (hq, l) at cache position p after the call's mask: causal (offset S - L,
// as mlx-lm's "causal") and/or an array broadcastable to (B, Hq, L, S) read through its strides,
// boolean (false: -inf) or additive.
template <bool CAUSAL, bool HAS_MASK, bool MASK_BOOL, typename MaskPtr, typename Strides>
__device__ __forceinline__ float apply_mask(float x, const MaskPtr& mask, const Strides& mask_strides, const int b,
                                            const int hq, const int l, const int p, const int S, const int L) {
  if constexpr (CAUSAL) {
    if (p > S - L + l) x = OPTIQ_NEG_INF;
  }
  if constexpr (HAS_MASK) {
    const auto mv = mask[b * mask_strides[0] + hq * mask_strides[1] + l * mask_strides[2] + p * mask_strides[3]];
    if constexpr (MASK_BOOL) {
      if (!mv) x = OPTIQ_NEG_INF;
    } else {
      x += (float)mv;
    }
  }
  return x;
}

// One tile's online-softmax step in the float32 split kernels (lane j holds position t0 + j):
// each row's running max m and sum lsum take the lane's score s (-inf where masked or past the
// end), its accumulators are rescaled, and p * weight goes to the lane's slot `ps` of the warp's
// shared tile for the value pass.
template <int R, int DPL>
__device__ __forceinline__ void softmax_tile(const float* s, float* m, float* lsum, float (*acc)[DPL], float* ps,
                                             const float weight) {
  const float NEG_INF = OPTIQ_NEG_INF;
#pragma unroll
  for (int r = 0; r < R; r++) {
    const float mnew = fmaxf(m[r], warp_max(s[r]));
    const float corr = (mnew == NEG_INF) ? 1.f : __expf(m[r] - mnew);
    const float pr = (s[r] == NEG_INF) ? 0.f : __expf(s[r] - mnew);
    lsum[r] = lsum[r] * corr + pr;
    ps[r] = pr * weight;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[r][i] *= corr;
    m[r] = mnew;
  }
}

// A split's partial results in the float32 split kernels: per query row its running max, its
// sum over the warp's lanes, and this lane's DPL accumulated dims from dim0; rows are
// (b, head, l) in the output's order, NS splits each.
template <int R, int DPL, int D, int NREP, int L>
__device__ __forceinline__ void write_partials(const float* m, const float* lsum, const float (*acc)[DPL],
                                               float* o_part, float* m_part, float* l_part, const int b,
                                               const int kvh, const int HQ, const int NS, const int split,
                                               const int lane, const int dim0) {
#pragma unroll
  for (int r = 0; r < R; r++) {
    const float total = warp_sum(lsum[r]);
    const int hq = kvh * NREP + r / L, l = r % L;
    const long long rowid = ((long long)(b * HQ + hq) * L + l) * NS + split;
#pragma unroll
    for (int i = 0; i < DPL; i++) o_part[rowid * D + dim0 + i] = acc[r][i];
    if (lane == 0) {
      m_part[rowid] = m[r];
      l_part[rowid] = total;
    }
  }
}

// The merge kernels' fold of one query row's NS split results for dim d (blockDim = SP * D
// threads; thread (sp, d) folds splits sp, sp + SP, ... with a running max, then the SP partial
// results are combined through shared memory `sm` (3 * SP * D floats)). Every thread of the
// block must call it (it has a barrier); threads with sp == 0 get the merged value, the others 0.
template <int D, int SP>
__device__ __forceinline__ float merge_splits(const float* o_part, const float* m_part, const float* l_part,
                                              const long long row, const int NS, float* sm) {
  float* sm_m = sm;
  float* sm_l = sm + SP * D;
  float* sm_o = sm + 2 * SP * D;
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
  if (sp != 0) return 0.f;
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
  return den > 0.f ? num / den : 0.f;
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

  const int S = kp_shape[2];
  const int HKV = kp_shape[1];
  int NS, chunk, b, kvh, split;
  split_job(S, HKV, kp_shape[0], TARGET_WARPS, MIN_CHUNK, WARPS, NS, chunk, b, kvh, split);
  const int HQ = HKV * NREP;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
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
        s[r] = apply_mask<CAUSAL, HAS_MASK, MASK_BOOL>(s[r], mask, mask_strides, b, hq, l, p, S, L);
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; r++) s[r] = NEG_INF;
    }
    softmax_tile<R, DPL>(s, m, lsum, acc, my_ps + lane * RP, 1.f);
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

  write_partials<R, DPL, D, NREP, L>(m, lsum, acc, o_part, m_part, l_part, b, kvh, HQ, NS, split, lane, lane * DPL);
"""

# The tensor-core variant of the split kernel (fp16/bf16 queries, 2/4/8-bit K and V, at most
# 8 query rows per KV head). One warp per (batch row, KV head, split) as above, 32 positions
# per step, both products on mma.sync m16n8k16 with float32 accumulators:
# * scores S = Q K^T: A = the queries (rows = query rows, unscaled, loaded once into
#   registers), B = 8 positions' keys dequantized to 16-bit floats in registers. The 16
#   dims of a k-step are whichever codes the lanes hold (a dot product does not care about
#   order, and Q's registers use the same order): lane (group, t) decodes words
#   [t*KWPL, (t+1)*KWPL) of position group's key row, two codes per instruction pair;
# * O^T += V^T P^T: A = values of 16 positions, lane (group, t) holding positions 2t, 2t+1,
#   2t+8, 2t+9 at dims [group*D/8, (group+1)*D/8) (two positions' code words interleaved by
#   one byte permute); B = the probabilities, which the score fragments already hold in the
#   right lanes (no shuffles). Output row r, dim group*D/8 + 2m + h sits in lane
#   (group, r/2), accumulator m, register 2h + r%2.
# Template constants as _SPLIT_SOURCE plus BF (bf16 queries, else fp16).
_MMA_SPLIT_SOURCE = """
  constexpr int KW = D * KB / 32;      // code words per key row
  constexpr int NG = D / G;            // groups per row
  constexpr int KWPL = KW / 4;         // key words a lane decodes per position
  constexpr int VWPL = D * VB / 256;   // value words a lane decodes per position
  constexpr int KCPW = 32 / KB;        // codes per key word
  constexpr int KPPW = 16 / KB;        // code pairs per key word
  constexpr int VCPW = 32 / VB;
  constexpr int VPPW = 16 / VB;
  constexpr int NC = D / 16;           // k-steps of the score product, m-tiles of the value product
  constexpr int KDL = D / 4;           // key dims per lane
  constexpr int KGL = KDL >= G ? KDL / G : 1;  // key groups per lane
  constexpr unsigned int FULL = 0xffffffffu;
  constexpr int KROW = D * KB / 8 + 2 * NG * (int)sizeof(TS);  // bytes of one packed key row
  constexpr int VROW = D * VB / 8 + 2 * NG * (int)sizeof(TS);
  constexpr int TILE = STAGED ? 32 * (KROW + VROW) : 16;   // one 32-position tile of K and V
  // 64-bit code loads from a staged tile when every row and this lane's words are 8-byte aligned
  constexpr bool KV2 = KROW % 8 == 0 && KWPL % 2 == 0;
  constexpr bool VV2 = VROW % 8 == 0 && VWPL % 2 == 0;
  const float NEG_INF = OPTIQ_NEG_INF;
  // Per warp, two tiles (the one being computed, the next one arriving): warps only ever
  // touch their own, so __syncwarp is the only barrier and a warp may leave alone.
  __shared__ __align__(16) unsigned char tiles[WARPS * 2 * TILE];

  const int S = kp_shape[2];
  const int HKV = kp_shape[1];
  int NS, chunk, b, kvh, split;
  split_job(S, HKV, kp_shape[0], TARGET_WARPS, MIN_CHUNK, WARPS, NS, chunk, b, kvh, split);
  const int HQ = HKV * NREP;
  const int lane = threadIdx.x & 31;
  const int grp = lane >> 2;   // mma "group": a query row, a key position of an n-tile
  const int t = lane & 3;
  if (split >= NS) return;
  const float sm_scale = __int_as_float(SCALE_BITS);

  // this lane's query row (grp) at the dims its key codes hold, as A registers
  unsigned int qa[NC][2];
  {
    const int hq = kvh * NREP + grp / L, l = grp % L;
    const auto* qrow = q + b * q_strides[0] + hq * q_strides[1] + l * q_strides[2];
#pragma unroll
    for (int P = 0; P < 2 * NC; P++) {
      const int d0 = (t * KWPL + P / KPPW) * KCPW + P % KPPW;
      float x0 = 0.f, x1 = 0.f;
      if (grp < R) {
        x0 = (float)qrow[d0 * q_strides[3]];
        x1 = (float)qrow[(d0 + KPPW) * q_strides[3]];
      }
      qa[P >> 1][P & 1] = pack2<BF>(x0, x1);
    }
  }

  const int start = split * chunk;
  const int end = min(start + chunk, S);
  const unsigned char* kbase = kp + b * kp_strides[0] + kvh * kp_strides[1];
  const unsigned char* vbase = vp + b * vp_strides[0] + kvh * vp_strides[1];
  const long long kstep = kp_strides[2];
  const long long vstep = vp_strides[2];
  const int vgroup = (grp * (D / 8)) / G;  // the one group of this lane's value dims
  // Staged: each tile's K and V rows are one contiguous run of bytes in the cache, copied to
  // shared memory with coalesced 16-byte asynchronous copies while the warp computes the
  // previous tile, then decoded from there. Needs rows packed back to back and 16-byte aligned
  // runs (a tile starts at a multiple of 32 rows; 32 * row bytes is a multiple of 16): checked
  // here on the pointers themselves, and any view that fails it reads rows straight from the
  // cache instead (the unstaged loop, the same arithmetic).
  const bool staged = STAGED && kstep == KROW && vstep == VROW && kp_strides[3] == 1 && vp_strides[3] == 1 &&
                      ((reinterpret_cast<unsigned long long>(kbase) | reinterpret_cast<unsigned long long>(vbase)) & 15) == 0;
  unsigned char* const mine = tiles + (threadIdx.x >> 5) * 2 * TILE;
  auto stage = [&](const int from, unsigned char* dst) {
    const int rows = min(32, end - from);
    const int kbytes = rows * KROW, vbytes = rows * VROW;
    const unsigned char* ksrc = kbase + (long long)from * KROW;
    const unsigned char* vsrc = vbase + (long long)from * VROW;
    for (int c = 16 * lane; c < kbytes; c += 512) cp_async16(dst + c, ksrc + c, min(16, kbytes - c));
    for (int c = 16 * lane; c < vbytes; c += 512) cp_async16(dst + 32 * KROW + c, vsrc + c, min(16, vbytes - c));
  };
  if constexpr (STAGED) {
    if (staged) {
      stage(start, mine);
      cp_async_commit();
    }
  }

  float m_run = NEG_INF, l_run = 0.f;  // query row grp
  float o[NC][4];
#pragma unroll
  for (int m = 0; m < NC; m++) o[m][0] = o[m][1] = o[m][2] = o[m][3] = 0.f;

  for (int t0 = start, buf = 0; t0 < end; t0 += 32, buf ^= 1) {
    // this tile's rows: in shared memory (staged) or in the cache
    const unsigned char* ktile = kbase + t0 * kstep;
    const unsigned char* vtile = vbase + t0 * vstep;
    long long kst = kstep, vst = vstep;
    if constexpr (STAGED) {
      if (staged) {
        if (t0 + 32 < end) stage(t0 + 32, mine + (buf ^ 1) * TILE);
        cp_async_commit();  // possibly empty: wait_group 1 then always means "this tile is here"
        cp_async_wait_one();
        __syncwarp();
        ktile = mine + buf * TILE;
        vtile = ktile + 32 * KROW;
        kst = KROW;
        vst = VROW;
      }
    }
    // all of the step's loads first (independent, so their latencies overlap)
    unsigned int kw[4][KWPL];
    float ks[4][KGL], kz[4][KGL];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int p = t0 + 8 * j + grp;
      const bool ok = p < end;
      const unsigned char* row = ktile + (ok ? p - t0 : 0) * kst;
      const unsigned int* words = (const unsigned int*)row;
      const TS* sc = (const TS*)(row + KW * 4);
      if (STAGED && staged) {
        load_words<KWPL, KV2>(kw[j], words + t * KWPL);
      } else {
        load_words<KWPL, false>(kw[j], words + t * KWPL);
      }
#pragma unroll
      for (int i = 0; i < KWPL; i++) kw[j][i] = ok ? kw[j][i] : 0u;
#pragma unroll
      for (int h = 0; h < KGL; h++) {
        const int gi = (t * KDL) / G + h;
        ks[j][h] = ok ? (float)sc[gi] : 0.f;
        kz[j][h] = ok ? (float)sc[NG + gi] : 0.f;
      }
    }
    unsigned int vw[2][4][VWPL];
    float vs[2][4], vz[2][4];
#pragma unroll
    for (int c = 0; c < 2; c++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int p = t0 + 16 * c + 2 * t + (e & 1) + 8 * (e >> 1);
        const bool ok = p < end;
        const unsigned char* row = vtile + (ok ? p - t0 : 0) * vst;
        const unsigned int* words = (const unsigned int*)row;
        const TS* sc = (const TS*)(row + D * VB / 8);
        if (STAGED && staged) {
          load_words<VWPL, VV2>(vw[c][e], words + grp * VWPL);
        } else {
          load_words<VWPL, false>(vw[c][e], words + grp * VWPL);
        }
#pragma unroll
        for (int i = 0; i < VWPL; i++) vw[c][e][i] = ok ? vw[c][e][i] : 0u;
        vs[c][e] = ok ? (float)sc[vgroup] : 0.f;
        vz[c][e] = ok ? (float)sc[NG + vgroup] : 0.f;
      }
    }

    // scores of positions t0 + 8j + 2t + e for query row grp
    float s[4][2];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned int s2[KGL], z2[KGL];
#pragma unroll
      for (int h = 0; h < KGL; h++) {
        s2[h] = pack2<BF>(ks[j][h], ks[j][h]);
        z2[h] = pack2<BF>(kz[j][h], kz[j][h]);
      }
      float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
#pragma unroll
      for (int c = 0; c < NC; c++) {
        unsigned int kb2[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
          const int P = 2 * c + r, i = P / KPPW, k = P % KPPW;
          const int h = KDL >= G ? (i * KCPW) / G : 0;
          kb2[r] = dequant_pair<KB, BF>(kw[j][i], k, s2[h], z2[h], ks[j][h], ks[j][h], kz[j][h], kz[j][h]);
        }
        mma16816<BF>(c0, c1, c2, c3, qa[c][0], 0u, qa[c][1], 0u, kb2[0], kb2[1]);
      }
      s[j][0] = c0 * sm_scale;
      s[j][1] = c1 * sm_scale;
    }

    // masks, then the online softmax of row grp (its 32 scores sit in lanes 4grp .. 4grp+3)
    float tmax = NEG_INF;
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int p = t0 + 8 * j + 2 * t + e;
        float x = s[j][e];
        if (grp >= R || p >= end) {
          x = NEG_INF;
        } else {
          const int hq = kvh * NREP + grp / L, l = grp % L;
          x = apply_mask<CAUSAL, HAS_MASK, MASK_BOOL>(x, mask, mask_strides, b, hq, l, p, S, L);
        }
        s[j][e] = x;
        tmax = fmaxf(tmax, x);
      }
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(FULL, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(FULL, tmax, 2));
    const float mnew = fmaxf(m_run, tmax);
    const float corr = (mnew == NEG_INF) ? 1.f : __expf(m_run - mnew);
    unsigned int pb[4];  // row grp's probabilities of positions 8j + 2t, 8j + 2t + 1: B registers
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float p0 = (s[j][0] == NEG_INF) ? 0.f : __expf(s[j][0] - mnew);
      const float p1 = (s[j][1] == NEG_INF) ? 0.f : __expf(s[j][1] - mnew);
      psum += p0 + p1;
      pb[j] = pack2<BF>(p0, p1);
    }
    l_run = l_run * corr + psum;
    m_run = mnew;
    // this lane's accumulators hold query rows 2t and 2t + 1
    const float ca = __shfl_sync(FULL, corr, 8 * t), cb = __shfl_sync(FULL, corr, 8 * t + 4);
#pragma unroll
    for (int m = 0; m < NC; m++) {
      o[m][0] *= ca;
      o[m][1] *= cb;
      o[m][2] *= ca;
      o[m][3] *= cb;
    }

    // values of the two 16-position k-steps
#pragma unroll
    for (int c = 0; c < 2; c++) {
      const unsigned int sA = pack2<BF>(vs[c][0], vs[c][1]), zA = pack2<BF>(vz[c][0], vz[c][1]);
      const unsigned int sB = pack2<BF>(vs[c][2], vs[c][3]), zB = pack2<BF>(vz[c][2], vz[c][3]);
      unsigned int a[NC][4];
#pragma unroll
      for (int i = 0; i < VWPL; i++) {
        // low/high half-words of positions (2t, 2t+1) and (2t+8, 2t+9), side by side
        const unsigned int lA = __byte_perm(vw[c][0][i], vw[c][1][i], 0x5410);
        const unsigned int hA = __byte_perm(vw[c][0][i], vw[c][1][i], 0x7632);
        const unsigned int lB = __byte_perm(vw[c][2][i], vw[c][3][i], 0x5410);
        const unsigned int hB = __byte_perm(vw[c][2][i], vw[c][3][i], 0x7632);
#pragma unroll
        for (int k = 0; k < VCPW; k++) {
          const int jd = i * VCPW + k;  // this lane's dim grp*D/8 + jd
          const int kk = k % VPPW;
          a[jd >> 1][jd & 1] = dequant_pair<VB, BF>(k < VPPW ? lA : hA, kk, sA, zA, vs[c][0], vs[c][1], vz[c][0], vz[c][1]);
          a[jd >> 1][2 + (jd & 1)] = dequant_pair<VB, BF>(k < VPPW ? lB : hB, kk, sB, zB, vs[c][2], vs[c][3], vz[c][2], vz[c][3]);
        }
      }
#pragma unroll
      for (int m = 0; m < NC; m++) mma16816<BF>(o[m][0], o[m][1], o[m][2], o[m][3], a[m][0], a[m][1], a[m][2], a[m][3], pb[2 * c], pb[2 * c + 1]);
    }
    if constexpr (STAGED) {
      if (staged) __syncwarp();  // every lane has read this tile before the next step refills it
    }
  }

  float total = l_run + __shfl_xor_sync(FULL, l_run, 1);
  total += __shfl_xor_sync(FULL, total, 2);
  if (t == 0 && grp < R) {
    const int hq = kvh * NREP + grp / L, l = grp % L;
    const long long rowid = ((long long)(b * HQ + hq) * L + l) * NS + split;
    m_part[rowid] = m_run;
    l_part[rowid] = total;
  }
#pragma unroll
  for (int e = 0; e < 2; e++) {
    const int r = 2 * t + e;
    if (r < R) {
      const int hq = kvh * NREP + r / L, l = r % L;
      const long long rowid = ((long long)(b * HQ + hq) * L + l) * NS + split;
      float* dst = o_part + rowid * D + grp * (D / 8);
#pragma unroll
      for (int m = 0; m < NC; m++) {
        dst[2 * m] = o[m][e];
        dst[2 * m + 1] = o[m][2 + e];
      }
    }
  }
"""

# One block per query row (`merge_splits`): thread (sp, d) folds splits sp, sp+SP, ... of dim d with a
# running max, then the SP partial results are combined through shared memory.
_MERGE_SOURCE = """
  __shared__ float sm[3 * SP * D];
  const long long row = blockIdx.x;
  const float x = merge_splits<D, SP>(o_part, m_part, l_part, row, m_part_shape[1], sm);
  if (threadIdx.x < D) out[row * D + threadIdx.x] = (T)x;  // the sp == 0 threads
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
    mma_split = mx.fast.cuda_kernel(
        name="optiq_packed_kv_decode_split_mma",
        input_names=["q", "kp", "vp", "mask"],
        output_names=["o_part", "m_part", "l_part"],
        source=_MMA_SPLIT_SOURCE,
        header=_HEADER,
        ensure_row_contiguous=False,
    )
    merge = mx.fast.cuda_kernel(
        name="optiq_packed_kv_decode_merge",
        input_names=["o_part", "m_part", "l_part"],
        output_names=["out"],
        source=_MERGE_SOURCE,
        header=_HEADER,
    )
    return split, mma_split, merge


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


MMA_BITS = (2, 4, 8)
MMA_MAX_ROWS = 8
KERNELS = ("auto", "mma", "mma-staged", "simt")
MMA_MIN_CAPABILITY = (8, 0)  # mma.sync.m16n8k16 with bf16 inputs: Ampere and later


@cache
def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the GPU MLX computes on, from `mx.device_info()` (MLX's CUDA build
    reports it; None elsewhere or when it cannot be read)."""
    import re

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    major, minor = info.get("compute_capability_major"), info.get("compute_capability_minor")
    if major is not None:
        return int(major), int(minor or 0)
    m = re.fullmatch(r"sm_(\d+)(\d)", str(info.get("architecture", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def why_not_mma(queries: mx.array, keys: Any, values: Any) -> str | None:
    """None when the tensor-core split kernel covers a call the fused path covers, else why
    (the other split kernel, plain float32 FMAs, takes it)."""
    B, n_q, L, D = queries.shape
    rows = n_q // keys.data.shape[1] * L
    kp, vp = keys.packing, values.packing
    if queries.dtype not in (mx.float16, mx.bfloat16):
        return f"queries in {queries.dtype} (tensor cores: float16, bfloat16)"
    if rows > MMA_MAX_ROWS:
        return f"{rows} query rows per KV head (tensor-core kernel: <= {MMA_MAX_ROWS})"
    if kp.bits not in MMA_BITS or vp.bits not in MMA_BITS:
        return f"K{kp.bits}/V{vp.bits} (tensor-core kernel: bits in {MMA_BITS})"
    if D * vp.bits < 256:
        return f"head dim {D} with {vp.bits}-bit values (tensor-core kernel: head dim x value bits >= 256)"
    cc = compute_capability()
    if cc is None or cc < MMA_MIN_CAPABILITY:
        got = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
        need = ".".join(map(str, MMA_MIN_CAPABILITY))
        return f"GPU compute capability {got} (tensor-core kernel: >= {need})"
    return None


def supports(queries: mx.array, keys: Any, values: Any, mask: Any) -> bool:
    return why_unsupported(queries, keys, values, mask) is None


TARGET_WARPS = 4096  # ~31 warps per SM on an H100/H200 (132 SMs): the best of 2048-16384 in a sweep (docs/kv.md)
SHARED_BYTES = 48 * 1024  # static shared memory per block


MIN_CHUNK = 64  # fewest positions per split
MMA_TARGET_WARPS = 4096  # the tensor-core kernel's (it does less work per position)
MMA_MIN_CHUNK = 256  # with 4096 warps: the best of 2048-16384 x 64/256 in a sweep (docs/kv.md), by a little


def _split_plan(batch_heads: int, S: int, target_warps: int, min_chunk: int) -> tuple[int, int]:
    """(chunk, n_splits): about `target_warps` warps over the GPU, at least `min_chunk` positions
    each (more splits hide latency; fewer mean fewer partial results to write and merge).
    The split kernels compute the same plan from the cache's shape (`split_job`)."""
    want = _ceil_div(target_warps, max(batch_heads, 1))
    splits = max(1, min(_ceil_div(S, min_chunk), want))
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


def _mma_warps_per_block(key_row_bytes: int, value_row_bytes: int) -> int:
    """The most warps (4, 2, 1) whose staged tiles fit in static shared memory: two 32-row tiles
    of K and V per warp (1 for the widest rows, e.g. head dim 256 at 8 bits)."""
    for warps in (4, 2, 1):
        if warps * 2 * 32 * (key_row_bytes + value_row_bytes) <= SHARED_BYTES:
            return warps
    raise AssertionError("unreachable: one warp's tiles always fit (head dim <= 256, bits <= 8)")


def attention(
    queries: mx.array, keys: Any, values: Any, scale: float, mask: Any = None, kernel: str = "auto"
) -> mx.array:
    """Fused attention of queries (B, Hq, L, D) over packed keys/values (B, Hkv, S, width).

    `kernel`: "mma" (tensor cores, each lane loading its rows from the cache), "mma-staged"
    (the same with each tile's rows staged through shared memory by asynchronous copies: not
    yet run on a GPU, so not the default until its parity test has passed there), "simt"
    (float32 FMAs), or "auto" (mma where `why_not_mma` allows, the default; a named kernel
    that cannot take the call is an error)."""
    reason = why_unsupported(queries, keys, values, mask)
    if reason is not None:
        raise ValueError(f"fused CUDA KV attention does not cover this call: {reason}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
    no_mma = why_not_mma(queries, keys, values)
    if kernel.startswith("mma") and no_mma is not None:
        raise ValueError(f"the tensor-core KV attention kernel does not cover this call: {no_mma}")
    use_mma = kernel.startswith("mma") or (kernel == "auto" and no_mma is None)
    staged = kernel == "mma-staged"
    B, n_q, L, D = queries.shape
    n_kv, S = keys.data.shape[1], keys.data.shape[2]
    rep = n_q // n_kv
    kp, vp = keys.packing, values.packing
    target_warps, min_chunk = (MMA_TARGET_WARPS, MMA_MIN_CHUNK) if use_mma else (TARGET_WARPS, MIN_CHUNK)
    chunk, n_splits = _split_plan(B * n_kv, S, target_warps, min_chunk)
    rows = B * n_q * L
    rows_padded = (rep * L + 3) // 4 * 4
    if use_mma:
        warps = _mma_warps_per_block(kp.width, vp.width) if staged else 4
    else:
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

    split, mma_split, merge = _kernels()
    o_part, m_part, l_part = (mma_split if use_mma else split)(
        inputs=[queries, keys.data, values.data, m],
        template=[
            *([("BF", queries.dtype == mx.bfloat16), ("STAGED", staged)] if use_mma else []),
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
            ("TARGET_WARPS", target_warps),
            ("MIN_CHUNK", min_chunk),
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
