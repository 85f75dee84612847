"""Fused CUDA kernels for the TurboQuant cache's decode step: attention over the packed rows,
and the pack (quantize) of the new token's K/V, for MLX's CUDA backend.

Why: the rotated-space attention of `turbo.py` is a few dozen small MLX ops per layer per
step (byte lookups over the whole cache, two matmuls, a softmax, two rotations), and the pack
another dozen (norm, rotation, binary search, bit planes); on the H200 a decode step then
costs several times the fp16 cache's (docs/results/turbo-speed-h200.txt). Attention here is
two kernels per call reading each packed row once; the pack is one kernel per tensor
(`pack`, below `_PACK_SOURCE`), which `TurboQuantizer.pack` takes on CUDA for "mse" quantizers.

Design: the flash-decoding split of `cuda_attention.py` (its `split_job` device function and
`_split_plan`, imported, not copied). One warp owns one (batch row, KV head, split) and all
query rows that read that KV head (the GQA group times the L query positions), so every
packed byte is read once per step, not once per query head.

* Before the loop each block rotates its queries once, q' = q R_k^T, with the softmax scale
  folded in, into shared memory (the rotation is read from global memory: L2-resident; it
  saves the separate matmul launch the reference pays).
* A tile of 32 positions' packed rows (keys and values) is staged in shared memory with
  coalesced 16-bit loads (rows are only 2-byte aligned: codes + one fp16 norm), padded to an
  odd number of 32-bit words per row so lanes reading their own rows hit distinct banks.
* Scores: lane j takes position t0+j, decodes its codes from the row's words at offsets that
  are compile-time constants once the loop unrolls (codes live in bit planes of 4/2/1 bits,
  the widest plane in the low bits, as `turbo.pack_codes` writes them), looks each code up in
  the codebook (shared memory, float32) and accumulates q'[d] * centroid against every query
  row; then times |k|. Masks: none, causal, or an array read through its strides.
* Online softmax per query row (running max and sum per lane, warp reductions per tile).
* Values: the weights p_t * |v_t| go to shared memory; the warp walks the tile's positions,
  lane d owns D/32 consecutive rotated dims, takes their codes from one 64-bit window of the
  staged row and accumulates weight * centroid.
* A second kernel merges the splits (max-rescaled sums, one block per query row) and rotates
  the output back once, out = o' R_v, in the queries' dtype.

Covered: "mse" keys and values, any widths 1-6 and fractional splits (two code segments)
whose packed rows have an even byte count (all integer widths; not e.g. 2.125 bits on d=64),
head dims 64/128/256 (keys and values alike), float16/bfloat16/float32 queries, GQA, up to
MAX_ROWS query rows per KV head. Not covered, computed by the reference path: "prod" keys
(the QJL sketch), prefill chunks with more query rows, attention sinks (refused everywhere).
`why_unsupported` says which. `MLX_LM_OPTIQ_TURBO_ATTENTION=auto|reference|cuda` picks the
path for attention and pack alike (auto: these kernels on CUDA, the MLX graphs elsewhere;
"cuda" on another backend is an error). `tests/test_turbo_device.py` checks parity on the GPU; `tests/test_turbo_cuda.py`
checks the kernel's indexing with a numpy emulation on any machine.
"""

from __future__ import annotations

import logging
import struct
from functools import cache, lru_cache
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lm_optiq.core.backend import path_from_env
from mlx_lm_optiq.kv.cuda_attention import _HEADER, _split_plan

ENV_VAR = "MLX_LM_OPTIQ_TURBO_ATTENTION"
PATHS = ("reference", "cuda")
HEAD_DIMS = (64, 128, 256)
MAX_ROWS = 16  # query rows per KV head one warp serves (GQA ratio x L); more: the reference path
TARGET_WARPS = 4096  # the affine float32 kernel's plan (docs/kv.md): similar work per position
MIN_CHUNK = 64
SHARED_BYTES = 48 * 1024  # static shared memory per block
QUERY_DTYPES = (mx.float16, mx.bfloat16, mx.float32)

_TURBO_HEADER = (
    _HEADER
    + """
// Code j of one TurboQuant code segment held in the 32-bit words `w` of a packed row: N
// coordinates of B bits stored in bit planes of 4, 2, 1 bits (those set in B, widest first,
// 8/w codes per byte, little-endian) starting at byte OFF; the widest plane holds a code's low
// bits (turbo.pack_codes). One shift and one mask per plane: offsets are compile-time
// constants once the caller's loop over j is unrolled (codes never straddle a byte).
template <int N, int B, int OFF>
__device__ __forceinline__ unsigned int turbo_code(const unsigned int* w, const int j) {
  unsigned int c = 0u;
  int sh = 0, bit0 = OFF * 8;
#pragma unroll
  for (int pw = 4; pw >= 1; pw >>= 1) {
    if (B & pw) {
      const int bit = bit0 + j * pw;
      c |= ((w[bit >> 5] >> (bit & 31)) & ((1u << pw) - 1u)) << sh;
      sh += pw;
      bit0 += N * pw;
    }
  }
  return c;
}

// Codes j0 .. j0+DPL-1 of such a segment, j0 (a multiple of DPL) known only at run time: a
// plane's DPL*w <= 16 bits sit inside the 64-bit window of two consecutive words (rows are
// padded by one word, so the second word always exists).
template <int N, int B, int OFF, int DPL>
__device__ __forceinline__ void turbo_codes(const unsigned int* w, const int j0, unsigned int (&c)[DPL]) {
#pragma unroll
  for (int i = 0; i < DPL; i++) c[i] = 0u;
  int sh = 0, bit0 = OFF * 8;
#pragma unroll
  for (int pw = 4; pw >= 1; pw >>= 1) {
    if (B & pw) {
      const int bit = bit0 + j0 * pw;
      const unsigned long long x = (((unsigned long long)w[(bit >> 5) + 1] << 32) | w[bit >> 5]) >> (bit & 31);
#pragma unroll
      for (int i = 0; i < DPL; i++) c[i] |= ((unsigned int)(x >> (i * pw)) & ((1u << pw) - 1u)) << sh;
      sh += pw;
      bit0 += N * pw;
    }
  }
}

// Byte k (< the norm's offset) of a packed row from the row's codes `cs` (one byte per coordinate):
// the code segments' bit planes in turbo.pack_codes' layout, read back by turbo_code above.
template <int N0, int B0, int N1, int B1>
__device__ __forceinline__ unsigned int turbo_pack_byte(const unsigned char* cs, const int k) {
  int off = 0;
#pragma unroll
  for (int seg = 0; seg < 2; seg++) {
    const int N = seg ? N1 : N0, B = seg ? B1 : B0, first = seg ? N0 : 0;
    int sh = 0;
#pragma unroll
    for (int pw = 4; pw >= 1; pw >>= 1) {
      if (B & pw) {
        const int nb = N * pw / 8;
        if (k < off + nb) {
          const int per = 8 / pw, j0 = first + (k - off) * per;
          unsigned int byte = 0u;
          for (int t = 0; t < per; t++) byte |= ((cs[j0 + t] >> sh) & ((1u << pw) - 1u)) << (t * pw);
          return byte;
        }
        off += nb;
        sh += pw;
      }
    }
  }
  return 0u;
}

// Index of the nearest of the 2^B sorted centroids of one coordinate: binary search over the
// 2^B - 1 boundaries (midpoints), as turbo._nearest_codes does.
template <int B>
__device__ __forceinline__ unsigned int turbo_nearest(const float y, const float* bnd) {
  unsigned int idx = 0u;
#pragma unroll
  for (int s = B - 1; s >= 0; s--) {
    const unsigned int cand = idx + (1u << s);
    if (y > bnd[cand - 1]) idx = cand;
  }
  return idx;
}

// The fp16 stored at (even) byte `at` of a row held as 32-bit words.
__device__ __forceinline__ float turbo_half_at(const unsigned int* w, const int at) {
  const unsigned short h = (unsigned short)(w[at >> 2] >> ((at & 2) * 8));
  return __half2float(__ushort_as_half(h));
}
"""
)

# Template constants (kernel_constants): D, NREP, L, R (= NREP*L), RP (R rounded up
# to 4), WARPS, TARGET_WARPS, MIN_CHUNK, SCALE_BITS, HAS_MASK, MASK_BOOL, CAUSAL, and per tensor
# (K, V) the layout: xN0/xB0, xN1/xB1 (coordinates and bits of the two code segments; N1 = 0
# for integer widths), xOFF1 (byte offset of segment 1), xNORM (byte offset of the fp16 norm),
# xW2 (row width in 16-bit halves), xROW (words per staged row: odd), CBK1/CBV0/CBV1 (where each
# segment's codebook starts in `cb`; keys' segment 0 at 0), CBN (codebook entries in all).
_SPLIT_SOURCE = """
  constexpr int DPL = D / 32;            // value dims per lane
  constexpr int R4 = RP / 4;
  const float NEG_INF = OPTIQ_NEG_INF;
  __shared__ float4 qs4[D * R4];                  // qs[d * RP + r]: rotated, scaled queries
  __shared__ float qraw[R * D];                   // the queries as given, float32
  __shared__ float cbs[CBN];                      // codebooks: keys' segments, then values'
  __shared__ float4 ps4[WARPS * 32 * R4];         // a tile's weights p * |v|, per warp
  __shared__ unsigned int ktile[WARPS * (32 * KROW + 1)];  // a tile's packed key rows, per warp
  __shared__ unsigned int vtile[WARPS * (32 * VROW + 1)];
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

  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    const int r = i / D, e = i % D;
    const int hq = kvh * NREP + r / L, l = r % L;
    qraw[i] = (float)q[b * q_strides[0] + hq * q_strides[1] + l * q_strides[2] + e * q_strides[3]];
  }
  for (int i = threadIdx.x; i < CBN; i += blockDim.x) cbs[i] = cb[i];
  __syncthreads();
  // q' = scale * q R_k^T; rot_t is R_k^T row-major (rot_t[e * D + d] = R_k[d, e]): coalesced over d
  for (int i = threadIdx.x; i < D * RP; i += blockDim.x) {
    const int d = i % D, r = i / D;
    float x = 0.f;
    if (r < R) {
      const float* qr = qraw + r * D;
      for (int e = 0; e < D; e++) x += qr[e] * rot_t[e * D + d];
      x *= sm_scale;
    }
    qs[d * RP + r] = x;
  }
  __syncthreads();
  if (split >= NS) return;  // no block-wide barrier below

  const int start = split * chunk;
  const int end = min(start + chunk, S);
  const unsigned char* kbase = kp + b * kp_strides[0] + kvh * kp_strides[1];
  const unsigned char* vbase = vp + b * vp_strides[0] + kvh * vp_strides[1];
  const long long kstep = kp_strides[2];
  const long long vstep = vp_strides[2];
  float* my_ps = ps + warp * 32 * RP;
  unsigned int* my_k = ktile + warp * (32 * KROW + 1);
  unsigned int* my_v = vtile + warp * (32 * VROW + 1);
  unsigned short* k16 = (unsigned short*)my_k;
  unsigned short* v16 = (unsigned short*)my_v;
  const int dim0 = lane * DPL;  // this lane's first value dim

  float m[R], lsum[R], acc[R][DPL];
#pragma unroll
  for (int r = 0; r < R; r++) {
    m[r] = NEG_INF;
    lsum[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[r][i] = 0.f;
  }

  for (int t0 = start; t0 < end; t0 += 32) {
    const int tn = min(32, end - t0);
    // stage the tile's rows: coalesced 16-bit loads (rows are 2-byte aligned), KROW/VROW words a row
    for (int i = lane; i < 32 * KW2; i += 32) {
      const int t = i / KW2, h = i % KW2;
      if (t < tn) k16[t * 2 * KROW + h] = ((const unsigned short*)(kbase + (t0 + t) * kstep))[h];
    }
    for (int i = lane; i < 32 * VW2; i += 32) {
      const int t = i / VW2, h = i % VW2;
      if (t < tn) v16[t * 2 * VROW + h] = ((const unsigned short*)(vbase + (t0 + t) * vstep))[h];
    }
    __syncwarp();

    const int p = t0 + lane;
    float s[RP];
#pragma unroll
    for (int r = 0; r < RP; r++) s[r] = 0.f;
    float vn = 0.f;
    if (p < end) {
      unsigned int kw[KROW];
#pragma unroll
      for (int i = 0; i < KROW; i++) kw[i] = my_k[lane * KROW + i];
      float part[RP];
#pragma unroll
      for (int r = 0; r < RP; r++) part[r] = 0.f;
#pragma unroll
      for (int j = 0; j < KN0; j++) {
        const float c = cbs[turbo_code<KN0, KB0, 0>(kw, j)];
#pragma unroll
        for (int k = 0; k < R4; k++) {
          const float4 x = qs4[j * R4 + k];
          part[4 * k] += x.x * c;
          part[4 * k + 1] += x.y * c;
          part[4 * k + 2] += x.z * c;
          part[4 * k + 3] += x.w * c;
        }
      }
#pragma unroll
      for (int j = 0; j < KN1; j++) {
        const float c = cbs[CBK1 + turbo_code<KN1, KB1, KOFF1>(kw, j)];
#pragma unroll
        for (int k = 0; k < R4; k++) {
          const float4 x = qs4[(KN0 + j) * R4 + k];
          part[4 * k] += x.x * c;
          part[4 * k + 1] += x.y * c;
          part[4 * k + 2] += x.z * c;
          part[4 * k + 3] += x.w * c;
        }
      }
      const float kn = turbo_half_at(kw, KNORM);
      vn = turbo_half_at(my_v + lane * VROW, VNORM);
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int hq = kvh * NREP + r / L, l = r % L;
        s[r] = apply_mask<CAUSAL, HAS_MASK, MASK_BOOL>(kn * part[r], mask, mask_strides, b, hq, l, p, S, L);
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; r++) s[r] = NEG_INF;
    }
    softmax_tile<R, DPL>(s, m, lsum, acc, my_ps + lane * RP, vn);  // the value pass weighs p by |v|
    __syncwarp();

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
      unsigned int vc[DPL];
      float cv[DPL];
      if (VN1 == 0 || dim0 < VN0) {
        turbo_codes<VN0, VB0, 0, DPL>(vrow, dim0, vc);
#pragma unroll
        for (int i = 0; i < DPL; i++) cv[i] = cbs[CBV0 + vc[i]];
      } else {
        turbo_codes<VN1, VB1, VOFF1, DPL>(vrow, dim0 - VN0, vc);
#pragma unroll
        for (int i = 0; i < DPL; i++) cv[i] = cbs[CBV1 + vc[i]];
      }
#pragma unroll
      for (int i = 0; i < DPL; i++) {
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][i] += pt[r] * cv[i];
      }
    }
    __syncwarp();
  }

  write_partials<R, DPL, D, NREP, L>(m, lsum, acc, o_part, m_part, l_part, b, kvh, HQ, NS, split, lane, dim0);
"""

# One block per query row (`merge_splits`, as the affine merge): thread (sp, d) folds splits sp, sp+SP, ... of rotated dim d with a
# running max, the SP partial results are combined through shared memory, and the merged
# rotated output is rotated back (out = o' R_v, R_v row-major: coalesced over d).
_MERGE_SOURCE = """
  __shared__ float sm[3 * SP * D];
  __shared__ float orot[D];
  const long long row = blockIdx.x;
  const int d = threadIdx.x % D;
  const float x = merge_splits<D, SP>(o_part, m_part, l_part, row, m_part_shape[1], sm);
  if (threadIdx.x < D) orot[d] = x;  // the sp == 0 threads
  __syncthreads();
  if (threadIdx.x >= D) return;
  float y = 0.f;
  for (int e = 0; e < D; e++) y += orot[e] * rot[e * D + d];
  out[row * D + d] = (T)y;
"""


# The quantize side of a decode step (TurboQuantizer.pack for "mse" quantizers): one warp per
# vector reads it (strided, any float dtype), takes its norm (warp sum), normalises, rotates
# (y = u R^T, R^T read from global memory, u from shared), picks each coordinate's code by binary
# search over its segment's boundaries, and writes the packed row byte by byte: code planes, then
# the fp16 norm. Template constants: D, DPL (= D/32), WARPS, N0/B0/N1/B1 (code segments), BND1
# (where segment 1's boundaries start in `bnd`), NORM (byte offset of the norm), WIDTH (row bytes).
_PACK_SOURCE = """
  __shared__ float unit_s[WARPS * D];
  __shared__ unsigned char code_s[WARPS * D];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const long long row = (long long)blockIdx.x * WARPS + warp;
  const int H = x_shape[1], Lx = x_shape[2];
  if (row >= (long long)x_shape[0] * H * Lx) return;  // no block-wide barrier below
  const int l = row % Lx;
  const long long bh = row / Lx;
  const int h = bh % H, b = bh / H;
  const auto* xr = x + b * x_strides[0] + h * x_strides[1] + l * x_strides[2];
  float xv[DPL];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    xv[i] = (float)xr[(lane + 32 * i) * x_strides[3]];
    ss += xv[i] * xv[i];
  }
  const float norm = sqrtf(warp_sum(ss));
  const float den = fmaxf(norm, 1e-30f);
  float* u = unit_s + warp * D;
#pragma unroll
  for (int i = 0; i < DPL; i++) u[lane + 32 * i] = xv[i] / den;
  __syncwarp();
  float y[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) y[i] = 0.f;
  for (int e = 0; e < D; e++) {
    const float ue = u[e];
#pragma unroll
    for (int i = 0; i < DPL; i++) y[i] += ue * rot_t[e * D + lane * DPL + i];
  }
  unsigned char* cs = code_s + warp * D;
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    const int d = lane * DPL + i;
    if (N1 == 0 || d < N0) {
      cs[d] = (unsigned char)turbo_nearest<B0>(y[i], bnd);
    } else {
      cs[d] = (unsigned char)turbo_nearest<B1>(y[i], bnd + BND1);
    }
  }
  __syncwarp();
  unsigned char* orow = out + row * WIDTH;
  const unsigned short nbits = __half_as_ushort(__float2half_rn(norm));
  for (int k = lane; k < WIDTH; k += 32) {
    unsigned int byte;
    if (k == NORM) byte = nbits & 0xFFu;
    else if (k == NORM + 1) byte = nbits >> 8;
    else byte = turbo_pack_byte<N0, B0, N1, B1>(cs, k);
    orow[k] = (unsigned char)byte;
  }
"""

PACK_WARPS = 4


@cache
def _pack_kernel():
    return mx.fast.cuda_kernel(
        name="optiq_turbo_pack",
        input_names=["x", "rot_t", "bnd"],
        output_names=["out"],
        source=_PACK_SOURCE,
        header=_TURBO_HEADER,
        ensure_row_contiguous=False,  # the model's K/V come transposed: read through strides
    )


@lru_cache(maxsize=256)
def pack_constants(quantizer: Any) -> dict:
    """The pack kernel's template constants for `quantizer` (memoised; callers must not change it)."""
    lay = segment_layout(quantizer)
    return dict(
        D=quantizer.dim,
        DPL=quantizer.dim // 32,
        WARPS=PACK_WARPS,
        N0=lay["N0"],
        B0=lay["B0"],
        N1=lay["N1"],
        B1=lay["B1"],
        BND1=2 ** lay["B0"] - 1,
        NORM=quantizer.norm_at,
        WIDTH=quantizer.width,
    )


@cache
def _pack_tables(quantizer: Any) -> tuple[mx.array, mx.array]:
    """(R^T float32, every segment's boundaries concatenated, float32), once per quantizer."""
    rot_t = mx.contiguous(quantizer.rotation.astype(mx.float32).T)
    bnd = mx.concatenate([b.astype(mx.float32) for b in quantizer.boundaries])
    mx.eval(rot_t, bnd)
    return rot_t, bnd


def why_not_pack(quantizer: Any, x: mx.array) -> str | None:
    """None when the fused pack kernel covers quantizing `x` (B, H, L, dim), else why
    (`TurboQuantizer.pack`'s MLX graph takes it)."""
    if quantizer.mode != "mse":
        return f"{quantizer.mode!r} mode (QJL sketch)"
    if quantizer.dim not in HEAD_DIMS:
        return f"head dim {quantizer.dim} (kernel: one of {HEAD_DIMS})"
    if x.ndim != 4 or x.shape[-1] != quantizer.dim:
        return f"input of shape {x.shape} (kernel: (B, heads, L, {quantizer.dim}))"
    if x.dtype not in QUERY_DTYPES:
        return f"input in {x.dtype}"
    return None


def pack(quantizer: Any, x: mx.array) -> mx.array:
    """`quantizer.pack(x)` ("mse" quantizers) as one kernel: packed rows (B, H, L, width) uint8."""
    reason = why_not_pack(quantizer, x)
    if reason is not None:
        raise ValueError(f"fused CUDA TurboQuant pack does not cover this call: {reason}")
    B, H, L, D = x.shape
    rows = B * H * L
    rot_t, bnd = _pack_tables(quantizer)
    (out,) = _pack_kernel()(
        inputs=[x, rot_t, bnd],
        template=list(pack_constants(quantizer).items()),
        grid=(-(-rows // PACK_WARPS) * 32 * PACK_WARPS, 1, 1),
        threadgroup=(32 * PACK_WARPS, 1, 1),
        output_shapes=[(B, H, L, quantizer.width)],
        output_dtypes=[mx.uint8],
    )
    return out


def use_fused_pack(quantizer: Any, x: mx.array) -> bool:
    """Whether `TurboQuantizer.pack` should take the fused kernel: the CUDA path is selected
    (`selected_path`, same variable as attention) and `why_not_pack` has no objection."""
    return selected_path() == "cuda" and why_not_pack(quantizer, x) is None


@cache
def _kernels():
    split = mx.fast.cuda_kernel(
        name="optiq_turbo_decode_split",
        input_names=["q", "kp", "vp", "mask", "cb", "rot_t"],
        output_names=["o_part", "m_part", "l_part"],
        source=_SPLIT_SOURCE,
        header=_TURBO_HEADER,
        ensure_row_contiguous=False,  # read the cache's strided prefix views in place
    )
    merge = mx.fast.cuda_kernel(
        name="optiq_turbo_decode_merge",
        input_names=["o_part", "m_part", "l_part", "rot"],
        output_names=["out"],
        source=_MERGE_SOURCE,
        header=_TURBO_HEADER,
    )
    return split, merge


# ---------------------------------------------------------------- path selection
def selected_path() -> str:
    """ "cuda" (this kernel where it covers the call) or "reference" (turbo.py's MLX graph).

    `MLX_LM_OPTIQ_TURBO_ATTENTION=auto|reference|cuda` (auto: "cuda" on MLX's CUDA backend,
    else "reference"). Raises ValueError for an unknown value and RuntimeError for "cuda"
    on another backend (`core.backend.path_from_env`, the affine path's rule too)."""
    return path_from_env(ENV_VAR, PATHS, {"cuda": "cuda"}, "reference", "the fused TurboQuant kernel")


# ---------------------------------------------------------------- layout and coverage
def segment_layout(quantizer: Any) -> dict:
    """The packed row of `quantizer` as the kernel's constants: code segments (N0, B0, N1, B1;
    N1 = 0 for one segment), OFF1 (byte offset of segment 1's planes), NORM (byte offset of the
    fp16 norm), W2 (row width in 16-bit halves) and ROW (32-bit words per staged row: the
    width rounded up, made odd so lanes reading their own rows hit distinct shared-memory banks)."""
    segs = list(quantizer.segments) + [(0, 0)] * (2 - len(quantizer.segments))
    (n0, b0), (n1, b1) = segs
    words = -(-quantizer.width // 4)
    return dict(
        N0=n0, B0=b0, N1=n1, B1=b1, OFF1=n0 * b0 // 8, NORM=quantizer.norm_at, W2=quantizer.width // 2, ROW=words | 1
    )


def warps_per_block(D: int, rows: int, codebook_entries: int, key_row_words: int, value_row_words: int) -> int:
    """The most warps (4, 2, 1) whose static shared memory fits: rotated queries, the raw
    queries, codebooks, and per warp a tile's weights and staged key and value rows."""
    rp = -(-rows // 4) * 4
    shared = 4 * (D * rp + rows * D + codebook_entries)
    for warps in (4, 2, 1):
        per_warp = 4 * (32 * rp + 32 * key_row_words + 1 + 32 * value_row_words + 1)
        if shared + warps * per_warp <= SHARED_BYTES:
            return warps
    return 0


def _codebook_entries(kq: Any, vq: Any) -> int:
    return sum(2**b for _, b in kq.segments) + sum(2**b for _, b in vq.segments)


def why_unsupported(queries: mx.array, kv: Any, mask: Any) -> str | None:
    """None when the fused kernel covers this call, else the reason (the reference path takes it)."""
    keys = kv.full_keys
    reason = _why_not_layout(
        tuple(queries.shape), queries.dtype, kv.key_quantizer, kv.value_quantizer, tuple(keys.shape), keys.dtype
    )
    if reason is not None:
        return reason
    L = queries.shape[2]
    if isinstance(mask, str):
        if mask != "causal":
            return f"mask {mask!r}"
    elif mask is not None:
        if mask.ndim > 4:
            return f"mask with {mask.ndim} dims"
        if mask.shape[-1] != kv.length or (mask.ndim >= 2 and mask.shape[-2] not in (1, L)):
            return f"mask of shape {mask.shape} for {L} queries over {kv.length} positions"
    return None


@lru_cache(maxsize=1024)
def _why_not_layout(
    q_shape: tuple, q_dtype: mx.Dtype, kq: Any, vq: Any, k_shape: tuple, k_dtype: mx.Dtype
) -> str | None:
    """What `why_unsupported` checks that does not change from one decode step to the next
    (memoised: the dispatcher asks every layer, every step)."""
    B, n_q, L, D = q_shape
    if kq.mode != "mse":
        return f"keys in {kq.mode!r} mode (QJL sketch; the kernel reads mse codes only)"
    if D not in HEAD_DIMS or kq.dim != D or vq.dim != D:
        return f"head dims q={D} k={kq.dim} v={vq.dim} (kernel: equal, one of {HEAD_DIMS})"
    if q_dtype not in QUERY_DTYPES:
        return f"queries in {q_dtype}"
    if kq.width % 2 or vq.width % 2:
        return (
            f"packed rows of {kq.width}/{vq.width} bytes (a fractional width whose odd-bit segment has an "
            "odd byte count; the kernel stages rows as 16-bit halves)"
        )
    if k_dtype != mx.uint8 or len(k_shape) != 4 or k_shape[0] != B:
        return f"keys buffer {k_dtype} {k_shape} (kernel: uint8 (B, heads, capacity, width))"
    n_kv = k_shape[1]
    if n_q % n_kv:
        return f"{n_q} query heads over {n_kv} KV heads"
    rows = n_q // n_kv * L
    if rows > MAX_ROWS:
        return f"{rows} query rows per KV head (kernel: <= {MAX_ROWS}; prefill takes the reference)"
    kl, vl = segment_layout(kq), segment_layout(vq)
    if warps_per_block(D, rows, _codebook_entries(kq, vq), kl["ROW"], vl["ROW"]) == 0:
        return "shared memory: too many query rows for this head dim and row width"
    return None


def supports(queries: mx.array, kv: Any, mask: Any) -> bool:
    return why_unsupported(queries, kv, mask) is None


@cache
def _tables(kq: Any, vq: Any) -> tuple[mx.array, mx.array, mx.array]:
    """(codebooks of every key then value segment, float32; R_k^T; R_v), once per quantizer pair
    (quantizers are immutable and shared: turbo.get_quantizer)."""
    books = [np.asarray(c, dtype=np.float32) for c in (*kq._books, *vq._books)]
    cb = mx.array(np.concatenate(books))
    rot_t = mx.contiguous(kq.rotation.astype(mx.float32).T)
    rot = vq.rotation.astype(mx.float32)
    mx.eval(cb, rot_t, rot)
    return cb, rot_t, rot


@lru_cache(maxsize=1024)
def kernel_constants(queries_shape: tuple, kq: Any, vq: Any, n_kv: int, scale: float) -> dict:
    """The split kernel's template constants for a call (mask constants excluded; memoised, so
    callers must not change the dict); the CPU emulation in tests/test_turbo_cuda.py reads the
    same dict."""
    B, n_q, L, D = queries_shape
    rep = n_q // n_kv
    rows = rep * L
    kl, vl = segment_layout(kq), segment_layout(vq)
    cbk1 = 2 ** kl["B0"]
    cbv0 = cbk1 + (2 ** kl["B1"] if kl["N1"] else 0)
    cbv1 = cbv0 + 2 ** vl["B0"]
    return dict(
        D=D,
        NREP=rep,
        L=L,
        R=rows,
        RP=-(-rows // 4) * 4,
        WARPS=warps_per_block(D, rows, _codebook_entries(kq, vq), kl["ROW"], vl["ROW"]),
        TARGET_WARPS=TARGET_WARPS,
        MIN_CHUNK=MIN_CHUNK,
        SCALE_BITS=struct.unpack("<i", struct.pack("<f", scale))[0],
        **{f"K{k}": v for k, v in kl.items()},
        **{f"V{k}": v for k, v in vl.items()},
        CBK1=cbk1,
        CBV0=cbv0,
        CBV1=cbv1,
        CBN=_codebook_entries(kq, vq),
    )


def merge_constants(dtype: mx.Dtype, D: int) -> dict:
    return dict(T=dtype, D=D, SP=max(1, min(8, 1024 // D)))


def attention(queries: mx.array, kv: Any, scale: float, mask: Any = None) -> mx.array:
    """Fused attention of queries (B, Hq, L, D) over a TurboKV (see the module docstring).

    A call `why_unsupported` refuses is an error here (the dispatcher in turbo.py sends such
    calls to the reference path instead)."""
    reason = why_unsupported(queries, kv, mask)
    if reason is not None:
        raise ValueError(f"fused CUDA TurboQuant attention does not cover this call: {reason}")
    kq, vq = kv.key_quantizer, kv.value_quantizer
    keys, values, n = kv.full_keys, kv.full_values, kv.length
    if keys.shape[2] != n:
        keys, values = keys[:, :, :n], values[:, :, :n]
    B, n_q, L, D = queries.shape
    n_kv = keys.shape[1]
    consts = kernel_constants(tuple(queries.shape), kq, vq, n_kv, float(scale))
    chunk, n_splits = _split_plan(B * n_kv, n, TARGET_WARPS, MIN_CHUNK)
    rows = B * n_q * L
    warps = consts["WARPS"]

    causal = isinstance(mask, str) and L > 1
    has_mask = mask is not None and not isinstance(mask, str)
    if has_mask:
        m = mask
        while m.ndim < 4:
            m = mx.expand_dims(m, 0)
        m = mx.broadcast_to(m, (B, n_q, L, n))  # stride-0 view, read in place
        mask_bool = m.dtype == mx.bool_
    else:
        m = queries  # never read (HAS_MASK is false)
        mask_bool = False

    cb, rot_t, rot = _tables(kq, vq)
    split, merge = _kernels()
    o_part, m_part, l_part = split(
        inputs=[queries, keys, values, m, cb, rot_t],
        template=[*consts.items(), ("HAS_MASK", has_mask), ("MASK_BOOL", mask_bool), ("CAUSAL", causal)],
        grid=(B * n_kv * -(-n_splits // warps) * 32 * warps, 1, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(rows * n_splits * D,), (rows, n_splits), (rows, n_splits)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    mc = merge_constants(queries.dtype, D)
    (out,) = merge(
        inputs=[o_part, m_part, l_part, rot],
        template=list(mc.items()),
        grid=(rows * D * mc["SP"], 1, 1),
        threadgroup=(D * mc["SP"], 1, 1),
        output_shapes=[(B, n_q, L, D)],
        output_dtypes=[queries.dtype],
    )
    return out


_noted: set = set()


def note_reference(reason: str) -> None:
    """Log once per reason that a call on the CUDA path went to the reference graph."""
    if reason not in _noted:
        _noted.add(reason)
        logging.info("mlx_lm_optiq TurboQuant attention: reference path for %s", reason)
