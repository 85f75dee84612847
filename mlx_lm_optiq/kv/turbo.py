"""TurboQuant KV cache: random rotation + Lloyd-Max scalar codes, attention in rotated space.

TurboQuant (Zandieh et al., arXiv 2504.19874) stores a vector x as its norm and
the codes of the rotated unit vector Pi x/|x|. After a random rotation each
coordinate of a unit vector in d dimensions follows the density
    f(t) = (1 - t^2)^((d-3)/2) / B(1/2, (d-1)/2)   on [-1, 1]   (~ N(0, 1/d)),
whatever x was, so one scalar codebook that is Lloyd-Max-optimal for f serves
every coordinate of every vector (no per-group scales). Two quantizers:
  * "mse":  b-bit codes; E|x - x_hat|^2 <= (sqrt(3)*pi/2) * 4^-b * |x|^2.
  * "prod": (b-1)-bit mse codes + a 1-bit QJL sketch sign(S r) of the residual
            r, which makes <y, x_hat> an unbiased estimate of <y, x>.

Attention never rotates keys back: with q' = Pi q,
    <q, k_j> = |k_j| <q', c[code_j]>      (+ the QJL term for "prod" keys)
    sum_j p_j v_j = Pi^T sum_j (p_j |v_j|) c[code_j]
so the query is rotated once, scores and the value sum are computed against
unit-norm centroid vectors, and the output is rotated back once. The centroid
vectors are read straight from the packed code bytes through small lookup tables
(one gather reads several codes' centroids; no unpacking pass). Pure MLX ops, so it
runs on every MLX backend; on CUDA fused kernels (kv/cuda_turbo.py) compute the same
functions for decode: attention in two launches per call, the pack in one per tensor.

The caches store one packed uint8 row per vector and subclass mlx-lm's KVCache /
BatchKVCache, so they batch like stock caches (merge / filter / extend / extract,
left padding through the mask): BatchGenerator and mlx_lm.server batch them.

This module is hook-free: models reach `turbo_scaled_dot_product_attention`
through `mlx_lm_optiq.hooks.turbo` (patch_attention() or mlx_lm_optiq.enable()).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_lm_optiq.core.jsonio import OptiqFileError, read_json, write_json
from mlx_lm_optiq.kv import attention, cuda_turbo

SUPPORTED_BITS = tuple(range(1, 7))  # 1..6; above that affine 8-bit is already near lossless
KEY_MODES = ("mse", "prod")
CODEBOOK_FILE = Path(__file__).resolve().parents[1] / "data" / "turbo_codebooks.json"
CODEBOOK_KIND = "optiq-turbo-codebooks"
# Head dims whose codebooks ship in CODEBOOK_FILE (others are computed on first use).
SHIPPED_DIMS = (32, 64, 80, 96, 128, 192, 256)
# Tests set this to run the mx.compile'd graphs on CPU too (they are used on GPUs only).
COMPILE_ON_CPU = False
# Storage of the per-vector norms; counted in bits_per_channel.
NORM_DTYPE = mx.float16


# ---------------------------------------------------------------- codebooks
def _coordinate_mass_and_moment(dim, lo, hi):
    """P(lo < t < hi) and E[t; lo < t < hi] for a rotated unit-vector coordinate (closed forms)."""
    from scipy.special import betainc, betaln

    a = (dim - 1) / 2.0  # (t+1)/2 ~ Beta(a, a)
    mass = betainc(a, a, (hi + 1) / 2) - betainc(a, a, (lo + 1) / 2)
    # int t (1-t^2)^k dt = -(1-t^2)^(k+1) / (2(k+1)),  k = (d-3)/2, normaliser B(1/2, a)
    log_norm = betaln(0.5, a)
    moment = (np.power(1 - lo**2, a) - np.power(1 - hi**2, a)) / (2 * a) / np.exp(log_norm)
    return mass, moment


def compute_codebook(dim: int, bits: int, tol: float = 1e-9, max_iter: int = 100000) -> np.ndarray:
    """Lloyd-Max centroids (sorted, float64) for one coordinate of a rotated unit vector in `dim` dims."""
    from scipy.special import betaincinv

    if dim < 3:
        raise ValueError(f"TurboQuant needs head_dim >= 3, got {dim}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"TurboQuant bits must be one of {list(SUPPORTED_BITS)}, got {bits}")
    n = 2**bits
    a = (dim - 1) / 2.0
    # Start from the centres of equal-mass cells; f is log-concave, so Lloyd's
    # iteration converges to the unique optimum from any start.
    centroids = 2 * betaincinv(a, a, (np.arange(n) + 0.5) / n) - 1
    for _ in range(max_iter):
        edges = np.concatenate([[-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]])
        mass, moment = _coordinate_mass_and_moment(dim, edges[:-1], edges[1:])
        new = moment / mass
        new = (new - new[::-1]) / 2  # f is symmetric: keep the codebook exactly symmetric
        done = np.max(np.abs(new - centroids)) < tol / math.sqrt(dim)
        centroids = new
        if done:
            return centroids
    raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits}")


def codebook_mse(dim: int, centroids: np.ndarray) -> float:
    """E[(t - Q(t))^2] of one coordinate (times dim = the unit-vector MSE of TurboQuant_mse)."""
    c = np.asarray(centroids, dtype=np.float64)
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    mass, moment = _coordinate_mass_and_moment(dim, edges[:-1], edges[1:])
    # E[t^2] over the whole line is 1/dim; E[(t-c)^2; cell] = E[t^2; cell] - 2c E[t; cell] + c^2 P(cell)
    return float(1.0 / dim - np.sum(2 * c * moment - c**2 * mass))


@functools.cache
def _shipped_codebooks():
    if not CODEBOOK_FILE.exists():
        return {}
    data = read_json(CODEBOOK_FILE, kind=CODEBOOK_KIND, required=["codebooks"])
    books = data["codebooks"]
    if not isinstance(books, dict):
        raise OptiqFileError(f"{CODEBOOK_FILE}: field 'codebooks' must be an object of 'dim:bits' -> list")
    return books


@functools.cache
def codebook(dim: int, bits: int) -> np.ndarray:
    """Lloyd-Max codebook for (dim, bits) as a read-only float64 array: shipped file first, else computed."""
    shipped = _shipped_codebooks().get(f"{dim}:{bits}")
    if shipped is not None:
        c = np.asarray(shipped, dtype=np.float64)
        if c.shape != (2**bits,) or np.any(np.diff(c) <= 0):
            raise OptiqFileError(f"{CODEBOOK_FILE}: codebook '{dim}:{bits}' must be {2**bits} increasing numbers")
    else:
        c = compute_codebook(dim, bits)
    c.setflags(write=False)
    return c


def write_codebook_file(
    path: str | Path = CODEBOOK_FILE, dims: tuple[int, ...] = SHIPPED_DIMS, bits: tuple[int, ...] = SUPPORTED_BITS
) -> Path:
    books = {f"{d}:{b}": compute_codebook(d, b).tolist() for d in dims for b in bits}
    return write_json(
        path,
        {"distribution": "rotated unit-vector coordinate, (1-t^2)^((d-3)/2)", "codebooks": books},
        kind=CODEBOOK_KIND,
    )


# ---------------------------------------------------------------- rotations
def _is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0


@functools.cache
def rotation_matrix(dim: int, seed: int, hadamard_rounds: int = 3) -> np.ndarray:
    """Orthogonal dim x dim matrix R (float32 numpy); vectors rotate as x @ R.T.

    Power-of-two dims: `hadamard_rounds` rounds of randomized Hadamard,
    prod_i (H D_i / sqrt(d)). One round maps a basis vector (an outlier channel)
    to a flat +-1/sqrt(d) vector, far from the Beta law the codebook is built
    for (MSE 0.25 at 2 bits vs 0.117); two rounds leave its coordinates on a
    coarse lattice (4-bit MSE 0.0113, above the paper's 0.0106 bound); three
    behave like a Haar rotation (measured on all basis vectors of d=64/128).
    Other dims: a seeded Haar-random orthogonal matrix (QR of a Gaussian with
    the sign fix).
    """
    rng = np.random.default_rng(seed)
    if _is_power_of_two(dim):
        h = np.ones((1, 1))
        while h.shape[0] < dim:  # Sylvester's construction
            h = np.block([[h, h], [h, -h]])
        h = h / math.sqrt(dim)
        r = np.eye(dim)
        for _ in range(hadamard_rounds):
            r = (h * rng.choice([-1.0, 1.0], size=dim)) @ r
    else:
        q, rr = np.linalg.qr(rng.standard_normal((dim, dim)))
        r = q * np.sign(np.diag(rr))
    return r.astype(np.float32)


@functools.cache
def qjl_matrix(dim: int, seed: int) -> np.ndarray:
    """Gaussian sketch S (dim x dim, float32) for the 1-bit QJL residual of "prod" keys."""
    rng = np.random.default_rng([seed, 0x51A])
    return rng.standard_normal((dim, dim)).astype(np.float32)


# ---------------------------------------------------------------- bit packing
def _planes(bits):
    """Bit widths of the planes a code is split into (each packs evenly into bytes)."""
    return [w for w in (4, 2, 1) if bits & w]


def pack_codes(codes: mx.array, bits: int) -> list[mx.array]:
    """uint8 codes (..., dim) -> list of uint8 planes (..., dim*w/8); exactly `bits` bits per code."""
    planes, shift = [], 0
    dim = codes.shape[-1]
    for w in _planes(bits):
        per = 8 // w
        if dim % per:
            raise ValueError(f"head_dim {dim} must be a multiple of {per} for {bits}-bit TurboQuant codes")
        part = (codes.astype(mx.uint32) >> shift) & (2**w - 1)
        part = part.reshape(*codes.shape[:-1], dim // per, per)
        shifts = mx.arange(0, 8, w, dtype=mx.uint32)
        planes.append((part << shifts).sum(axis=-1).astype(mx.uint8))
        shift += w
    return planes


def unpack_codes(planes: list[mx.array], bits: int) -> mx.array:
    """Inverse of pack_codes: list of uint8 planes -> uint32 codes (..., dim)."""
    codes, shift = None, 0
    for plane, w in zip(planes, _planes(bits)):
        shifts = mx.arange(0, 8, w, dtype=mx.uint32)
        part = (plane.astype(mx.uint32)[..., None] >> shifts) & (2**w - 1)
        part = part.reshape(*plane.shape[:-1], -1) << shift
        codes = part if codes is None else codes | part
        shift += w
    return codes


def split_widths(dim: int, bits: float) -> tuple[tuple[int, int], ...]:
    """((n_coords, int_bits), ...) for `bits` per coordinate on average.

    Integer widths are one segment. Fractional widths split the rotated
    coordinates, which are exchangeable after the rotation: the first
    frac*dim get ceil(bits), the rest floor(bits) (e.g. 3.5 bits on d=64:
    32 coordinates at 4 bits + 32 at 3). Segments must pack into whole bytes.
    """
    check_bits(bits, "bits")
    lo = math.floor(bits)
    hi_dims = (bits - lo) * dim
    if hi_dims == 0:
        return ((dim, int(lo)),)
    if hi_dims != round(hi_dims) or round(hi_dims) % 8 or (dim - round(hi_dims)) % 8:
        raise ValueError(
            f"TurboQuant bits {bits} on head_dim {dim}: the fractional part must put a multiple of 8 "
            f"coordinates at {lo + 1} bits and the rest (a multiple of 8) at {lo} bits"
        )
    return ((round(hi_dims), lo + 1), (dim - round(hi_dims), lo))


def check_bits(bits: float, name: str) -> float:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, float))
        or not (SUPPORTED_BITS[0] <= bits <= SUPPORTED_BITS[-1])
    ):
        raise ValueError(
            f"TurboQuant {name} must be a number of bits in [{SUPPORTED_BITS[0]}, {SUPPORTED_BITS[-1]}] "
            f"(integers, or fractions that split channels), got {bits!r}"
        )
    return bits


def _encode(y, boundaries, segments):
    """Rotated unit vectors (..., dim) -> (packed planes of every segment, per-segment codes)."""
    planes, codes, start = [], [], 0
    for (n, b), bnd in zip(segments, boundaries):
        c = _nearest_codes(y[..., start : start + n], bnd, b)
        codes.append(c)
        planes += pack_codes(c, b)
        start += n
    return planes, codes


def _n_planes(segments):
    return sum(len(_planes(b)) for _, b in segments)


# ---------------------------------------------------------------- byte lookups
# Reading codes back goes through lookup tables indexed by the packed bytes themselves:
# one table entry holds the centroid values of `k` consecutive codes, stored as one
# unsigned integer of k * itemsize bytes (e.g. two float32 centroids in a uint64), so a
# single gather turns a code byte into k float values (viewed back as floats) with no
# shift/mask unpacking pass. mx.take_along_axis with a broadcast table is MLX's fast
# gather on CPU (about 10x mx.take's speed here; docs/turbo.md has the measurement).
LOOKUP_INDEX_BITS = 12  # tables have at most 2**12 entries (codes split over planes combine into one index)
_UINT_OF_SIZE = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _lookup_plan(bits: int, value_size: int) -> tuple:
    """(k, ((w, groups_per_byte, index_bit_offset) per plane), index_bits) for `bits`-bit codes
    read as values of `value_size` bytes: k codes per lookup, k * value_size <= 8."""
    widths = _planes(bits)
    k = min([8 // value_size] + [8 // w for w in widths])
    while k > 1 and k * bits > LOOKUP_INDEX_BITS:
        k //= 2
    planes, offset = [], 0
    for w in widths:
        planes.append((w, 8 // w // k, offset))
        offset += k * w
    return k, tuple(planes), k * bits


def _lookup_table(values: np.ndarray, bits: int, dtype: mx.Dtype) -> mx.array:
    """The lookup table of `_lookup_plan(bits, dtype.size)`: entry i holds, as one unsigned
    integer, the `values[code]` (cast to `dtype`) of the k codes whose plane bits form i."""
    k, planes, index_bits = _lookup_plan(bits, dtype.size)
    index = np.arange(2**index_bits)
    codes = np.zeros((index.size, k), dtype=np.int64)
    shift = 0  # pack_codes puts the first (widest) plane in the low bits of a code
    for w, _, offset in planes:
        sub = (index >> offset) & (2 ** (k * w) - 1)
        for t in range(k):
            codes[:, t] |= ((sub >> (t * w)) & (2**w - 1)) << shift
        shift += w
    table = mx.array(np.asarray(values, dtype=np.float32)[codes]).astype(dtype)
    return table.view(_UINT_OF_SIZE[k * dtype.size]).reshape(-1)


def _lookup_values(planes, plan, table, dtype):
    """One segment's packed planes (..., n*w/8 bytes each) -> its code values (..., n) in `dtype`."""
    k, plane_plans, index_bits = plan
    index_dtype = mx.uint8 if index_bits <= 8 else mx.uint16
    idx = None
    for plane, (w, groups, offset) in zip(planes, plane_plans):
        if groups == 1:  # one lookup per byte: the byte is the index
            sub = plane
        else:  # `groups` indices per byte (one op per group: broadcast shifts are slower on CPU)
            bits = k * w
            parts = [plane & (2**bits - 1)] + [(plane >> (j * bits)) & (2**bits - 1) for j in range(1, groups)]
            sub = mx.stack(parts, axis=-1).reshape(*plane.shape[:-1], -1)
        sub = sub.astype(index_dtype)
        idx = sub if idx is None else idx | (sub << offset)
    table = table.reshape((1,) * (idx.ndim - 1) + (-1,))
    return mx.take_along_axis(table, idx, axis=-1).view(dtype)


def _unit_vectors(planes, plans, tables, dtype):
    """Packed planes of every segment -> unit centroid vectors (..., dim) in rotated space."""
    outs, i = [], 0
    for plan, table in zip(plans, tables):
        n = len(plan[1])
        outs.append(_lookup_values(planes[i : i + n], plan, table, dtype))
        i += n
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def _f16_at(packed, at):
    """The fp16 stored at byte `at` of each packed vector, as (..., 1)."""
    return packed[..., at : at + 2].view(NORM_DTYPE)


# ---------------------------------------------------------------- quantizers
class TurboQuantizer:
    """TurboQuant for vectors of one dimension: quantize() -> dict of arrays, dequantize() back.

    mode "mse": `bits`-bit Lloyd-Max codes of the rotated unit vector + its norm.
    mode "prod": (bits-1)-bit mse codes + sign(S r) for the residual r + |r|
    (unbiased inner products; needs bits >= 2).
    Fractional `bits` split the coordinates between two widths (split_widths).

    `pack()` stores the same as one uint8 row per vector (what the caches hold):
    [code planes | fp16 norm] (+ [QJL sign plane | fp16 residual norm] for "prod"), so
    every cache operation that moves whole vectors (mlx-lm's KVCache / BatchKVCache code)
    runs on it unchanged; `unpack()` gives the fields back as views.
    """

    def __init__(self, dim: int, bits: float, seed: int = 0, mode: str = "mse"):
        if mode not in KEY_MODES:
            raise ValueError(f"TurboQuant mode must be one of {list(KEY_MODES)}, got {mode!r}")
        check_bits(bits, "bits")
        if mode == "prod" and bits < 2:
            raise ValueError("TurboQuant mode 'prod' needs bits >= 2 (bits-1 for codes, 1 for the QJL sign)")
        self.dim, self.bits, self.seed, self.mode = dim, bits, seed, mode
        self.code_bits = bits - 1 if mode == "prod" else bits
        self.segments = split_widths(dim, self.code_bits)
        books = [codebook(dim, b) for _, b in self.segments]
        self._books = books
        self.centroids = [mx.array(c.astype(np.float32)) for c in books]
        self.boundaries = [mx.array(((c[1:] + c[:-1]) / 2).astype(np.float32)) for c in books]
        self.rotation = mx.array(rotation_matrix(dim, seed))
        self.sketch = mx.array(qjl_matrix(dim, seed)) if mode == "prod" else None
        # byte layout of a packed vector
        slices, at = [], 0
        for n, b in self.segments:
            for w in _planes(b):
                slices.append((at, at + n * w // 8))
                at += n * w // 8
        self.plane_slices = tuple(slices)
        self.norm_at = at
        self.width = at + 2
        if mode == "prod":
            self.qjl_at, self.residual_norm_at = self.width, self.width + dim // 8
            self.width = self.residual_norm_at + 2
        self._lookups = {}

    def __deepcopy__(self, memo):
        # immutable and shared (get_quantizer): prompt-cache copies keep the one instance
        return self

    def bits_per_channel(self) -> float:
        """Stored bits per vector coordinate, norms included (fp16 each)."""
        norms = 2 if self.mode == "prod" else 1
        return self.bits + norms * 16 / self.dim

    def rotate(self, x: mx.array) -> mx.array:
        return x @ self.rotation.astype(x.dtype).T

    def unrotate(self, y: mx.array) -> mx.array:
        return y @ self.rotation.astype(y.dtype)

    def _tables(self):
        return (self.rotation, *self.boundaries, *self.centroids, *([self.sketch] if self.sketch is not None else []))

    def quantize(self, x: mx.array) -> dict:
        arrays = _compiled_quantize(self.segments, self.mode == "prod", False)(x, *self._tables())
        n = _n_planes(self.segments)
        out = {"codes": list(arrays[:n]), "norm": arrays[n]}
        if self.mode == "prod":
            out["qjl"] = [arrays[n + 1]]
            out["residual_norm"] = arrays[n + 2]
        return out

    def pack(self, x: mx.array) -> mx.array:
        """x (..., dim) -> its packed rows (..., width) uint8 (the fields of quantize(), concatenated).

        On CUDA one fused kernel does it for "mse" quantizers (kv/cuda_turbo.py: the MLX graph
        is a dozen launches per decode step, the larger share of a turbo step there)."""
        if cuda_turbo.use_fused_pack(self, x):
            return cuda_turbo.pack(self, x)
        return _compiled_quantize(self.segments, self.mode == "prod", True)(x, *self._tables())

    def unpack(self, packed: mx.array) -> dict:
        """Packed rows (..., width) -> quantize()'s dict (views into `packed`)."""
        if packed.shape[-1] != self.width or packed.dtype != mx.uint8:
            raise ValueError(
                f"TurboQuant: packed vectors of this quantizer are uint8 rows of {self.width} bytes, "
                f"got {str(packed.dtype).rsplit('.', 1)[-1]} rows of {packed.shape[-1]}"
            )
        out = {"codes": [packed[..., a:b] for a, b in self.plane_slices], "norm": _f16_at(packed, self.norm_at)}
        if self.mode == "prod":
            out["qjl"] = [packed[..., self.qjl_at : self.residual_norm_at]]
            out["residual_norm"] = _f16_at(packed, self.residual_norm_at)
        return out

    def lookup(self, dtype: mx.Dtype) -> tuple[tuple, list[mx.array], tuple | None, mx.array | None]:
        """Byte-lookup plans and tables for reading codes as `dtype` values:
        (plans per segment, tables per segment, QJL sign plan, QJL sign table)."""
        if dtype not in self._lookups:
            plans = tuple(_lookup_plan(b, dtype.size) for _, b in self.segments)
            tables = [_lookup_table(c, b, dtype) for c, (_, b) in zip(self._books, self.segments)]
            sign_plan = sign_table = None
            if self.mode == "prod":
                sign_plan, sign_table = _lookup_plan(1, dtype.size), _lookup_table(np.array([-1.0, 1.0]), 1, dtype)
            self._lookups[dtype] = (plans, tables, sign_plan, sign_table)
        return self._lookups[dtype]

    def rotated_unit(self, q: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Centroid vectors in rotated space, unit-norm scale (..., dim): what attention multiplies against."""
        plans, tables, _, _ = self.lookup(dtype)
        return _unit_vectors(q["codes"], plans, tables, dtype)

    def qjl_signs(self, q: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
        """+-1 sketch signs (..., dim) of "prod" codes."""
        _, _, sign_plan, sign_table = self.lookup(dtype)
        return _lookup_values(q["qjl"], sign_plan, sign_table, dtype)

    def dequantize(self, q: dict | mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """quantize()'s dict, or pack()'s rows, -> vectors (..., dim)."""
        if isinstance(q, mx.array):
            q = self.unpack(q)
        unit = self.unrotate(self.rotated_unit(q))
        if self.mode == "prod":
            scale = math.sqrt(math.pi / 2) / self.dim * q["residual_norm"].astype(mx.float32)
            unit = unit + scale * (self.qjl_signs(q) @ self.sketch)
        return (unit * q["norm"].astype(mx.float32)).astype(dtype)


def _gpu_compiled(fn):
    """`fn` compiled with mx.compile on GPU backends, plain on CPU.

    On a GPU the win is fewer kernel launches per decode step; MLX's CPU
    backend compiles each new graph shape with the system C++ compiler, which
    costs seconds per shape and gains little on a BLAS-bound CPU.
    """
    compiled = mx.compile(fn)

    def call(*args):
        return compiled(*args) if _compiling() else fn(*args)

    return call


def _compiling():
    return COMPILE_ON_CPU or mx.default_device().type == mx.DeviceType.gpu


def _nearest_codes(y, boundaries, bits):
    """Index of the nearest centroid (binary search over the sorted boundaries: `bits` steps)."""
    idx = mx.zeros(y.shape, dtype=mx.uint32)
    for s in reversed(range(bits)):
        cand = idx + (1 << s)
        idx = mx.where(y > boundaries[cand - 1], cand, idx)
    return idx


@functools.cache
def _compiled_quantize(segments, prod, packed):
    """x -> (code planes..., fp16 norm[, qjl plane, fp16 residual norm]) as one compiled graph,
    or (packed) those fields concatenated as one uint8 row per vector.

    Decode feeds one token at a time, so most of the cost is kernel launches:
    compiling fuses the ~30 elementwise ops of normalise/compare/pack.
    """

    n_seg = len(segments)

    def quant(x, rotation, *tables):
        boundaries, centroids, sketch = tables[:n_seg], tables[n_seg : 2 * n_seg], tables[2 * n_seg :]
        xf = x.astype(mx.float32)
        norm = mx.linalg.norm(xf, axis=-1, keepdims=True)
        unit = xf / mx.maximum(norm, 1e-30)
        planes, codes = _encode(unit @ rotation.T, boundaries, segments)
        out = [*planes, norm.astype(NORM_DTYPE)]
        if prod:
            rotated_hat = mx.concatenate([c[k] for c, k in zip(centroids, codes)], axis=-1)
            residual = unit - rotated_hat @ rotation
            signs = (residual @ sketch[0].T) >= 0
            out += [
                *pack_codes(signs.astype(mx.uint8), 1),
                mx.linalg.norm(residual, axis=-1, keepdims=True).astype(NORM_DTYPE),
            ]
        if packed:
            return mx.concatenate([a.view(mx.uint8) for a in out], axis=-1)
        return tuple(out)

    return _gpu_compiled(quant)


@functools.cache
def get_quantizer(dim: int, bits: float, seed: int = 0, mode: str = "mse") -> TurboQuantizer:
    """Shared quantizer (rotation/codebook arrays built once per (dim, bits, seed, mode))."""
    return TurboQuantizer(dim, bits, seed=seed, mode=mode)


# ---------------------------------------------------------------- the caches
# Storage: each tensor (keys, values) is ONE uint8 array (B, heads, capacity, width) of
# packed rows (TurboQuantizer.pack). Everything mlx-lm's KVCache and BatchKVCache do
# (grow, trim, merge, filter, extend, extract, left/right padding, rolls) only moves
# whole rows along the batch and sequence axes, so their code runs unchanged on the
# bytes: the caches subclass them and only quantize on the way in (the same design as
# the affine per-layer caches in kv/caches.py). Before `quantized_kv_start` tokens the
# buffers hold float K/V and attention is stock; then what is held is packed once.


class _TurboQuantization:
    """What the single and the batched TurboQuant caches share: settings, quantizers, the
    float -> packed switch, and the TurboKV handed to attention."""

    def _init_turbo(self, head_dim, bits, seed, key_bits, value_bits, key_mode, value_head_dim, quantized_kv_start):
        for name, v in (
            ("head_dim", head_dim),
            ("value_head_dim", value_head_dim),
            ("seed", seed),
            ("quantized_kv_start", quantized_kv_start),
        ):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"TurboQuantKVCache {name} must be an int, got {v!r}")
        if seed is None:
            raise ValueError("TurboQuantKVCache seed must be an int, got None")
        if quantized_kv_start is None or quantized_kv_start < 0:
            raise ValueError(f"TurboQuantKVCache quantized_kv_start must be an int >= 0, got {quantized_kv_start!r}")
        self.key_bits = bits if key_bits is None else key_bits
        self.value_bits = bits if value_bits is None else value_bits
        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        if key_mode not in KEY_MODES:
            raise ValueError(f"TurboQuantKVCache key_mode must be one of {list(KEY_MODES)}, got {key_mode!r}")
        if key_mode == "prod" and self.key_bits < 2:
            raise ValueError("TurboQuantKVCache key_mode='prod' needs key_bits >= 2")
        self.seed = seed
        self.key_mode = key_mode
        self.quantized_kv_start = quantized_kv_start
        self.head_dim = head_dim
        self.key_quantizer = self.value_quantizer = None
        if head_dim is not None:
            self._make_quantizers(head_dim, value_head_dim or head_dim)

    def turbo_args(self) -> dict:
        """The settings rows of one batch must share (and what rebuilds a cache like this one)."""
        return dict(
            key_bits=self.key_bits,
            value_bits=self.value_bits,
            key_mode=self.key_mode,
            seed=self.seed,
            quantized_kv_start=self.quantized_kv_start,
        )

    def _dims(self):
        return None if self.key_quantizer is None else (self.key_quantizer.dim, self.value_quantizer.dim)

    def _make_quantizers(self, k_dim, v_dim):
        self.key_quantizer = get_quantizer(k_dim, self.key_bits, self.seed, self.key_mode)
        self.value_quantizer = get_quantizer(v_dim, self.value_bits, self.seed + 1, "mse")

    def _adopt_quantizers(self, other):
        if self.key_quantizer is None and other.key_quantizer is not None:
            self.key_quantizer, self.value_quantizer = other.key_quantizer, other.value_quantizer

    @property
    def quantized(self) -> bool:
        """Whether the buffers hold packed codes (uint8) rather than float K/V."""
        return self.keys is not None and self.keys.dtype == mx.uint8

    def _pack_held(self):
        """Quantize the float K/V held so far (the quantized_kv_start switch)."""
        if self.keys is not None and not self.quantized:
            self.keys = self.key_quantizer.pack(self.keys)
            self.values = self.value_quantizer.pack(self.values)

    def _filled(self):
        # positions filled in the buffers: a single request's token count (the batch overrides)
        return self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        if not attention_patched():
            raise RuntimeError(
                "TurboQuantKVCache needs mlx-lm's attention to know it: call "
                "mlx_lm_optiq.hooks.turbo.patch_attention() or mlx_lm_optiq.enable() first"
            )
        k_dim, v_dim = keys.shape[-1], values.shape[-1]
        if self.key_quantizer is None:
            self._make_quantizers(k_dim, v_dim)
        elif (k_dim, v_dim) != self._dims():
            raise ValueError(
                f"TurboQuantKVCache was built for key/value head_dim "
                f"{self.key_quantizer.dim}/{self.value_quantizer.dim}, got {k_dim}/{v_dim}"
            )
        if not self.quantized and self._filled() < self.quantized_kv_start:
            return super().update_and_fetch(keys, values)  # float until the start: stock attention
        self._pack_held()
        super().update_and_fetch(self.key_quantizer.pack(keys), self.value_quantizer.pack(values))
        # Models unpack `keys, values = cache.update_and_fetch(...)`; both names get the one view
        # over the whole buffers (stable shapes for compiled graphs; attention masks the tail).
        view = TurboKV(self.key_quantizer, self.value_quantizer, self.keys, self.values, self._filled())
        return view, view

    def bits_per_channel(self) -> float:
        """Stored bits per K/V coordinate, norms included (mean of keys and values)."""
        if self.key_quantizer is None:
            raise ValueError("TurboQuantKVCache: head_dim unknown until the first update")
        return (self.key_quantizer.bits_per_channel() + self.value_quantizer.bits_per_channel()) / 2

    @property
    def to_quantized(self) -> Any:
        # mlx-lm's maybe_quantize_kv_cache (kv_bits) converts every cache with a `to_quantized`
        # (hasattr check) to a uniform affine QuantizedKVCache: this one is already quantized.
        raise AttributeError("TurboQuantKVCache is quantized by its own settings")


class TurboQuantKVCache(_TurboQuantization, KVCache):
    """Drop-in for mlx-lm's KVCache storing TurboQuant codes.

    `update_and_fetch` returns a TurboKV view (as keys and values) that the patched
    `scaled_dot_product_attention` (mlx_lm_optiq.hooks.turbo) recognises.
    Keys use `key_bits` (default `bits`) and `key_mode` ("mse" or "prod");
    values always use the mse quantizer with `value_bits` (default `bits`).
    head_dim=None takes the dims from the first update (key and value dims may differ).
    `quantized_kv_start` (mlx-lm's meaning): K/V stay float until the cache holds that
    many tokens, then everything held is quantized. `merge` batches it
    (BatchTurboQuantKVCache), so mlx-lm's BatchGenerator and server batch it.
    """

    def __init__(
        self,
        head_dim: int | None = None,
        bits: float = 4,
        seed: int = 0,
        key_bits: float | None = None,
        value_bits: float | None = None,
        key_mode: str = "mse",
        value_head_dim: int | None = None,
        quantized_kv_start: int = 0,
    ):
        KVCache.__init__(self)
        self._init_turbo(head_dim, bits, seed, key_bits, value_bits, key_mode, value_head_dim, quantized_kv_start)

    @classmethod
    def merge(cls, caches: list) -> BatchTurboQuantKVCache:
        return BatchTurboQuantKVCache.merge(caches)

    def __repr__(self):
        return (
            f"TurboQuantKVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"key_mode={self.key_mode!r}, seed={self.seed}, offset={self.offset}, quantized={self.quantized})"
        )


class BatchTurboQuantKVCache(_TurboQuantization, BatchKVCache):
    """Left-padded batch of TurboQuantKVCaches, as mlx-lm's BatchGenerator drives them.

    Rows share one buffer, so the batch switches from float to codes once, when its
    longest row reaches quantized_kv_start (the single-request switch point whenever
    rows are aligned, and always when the start is 0). Attention masks the left padding
    through the mask mlx-lm builds from `left_padding` (make_mask)."""

    def __init__(
        self,
        left_padding: list[int],
        key_bits: float = 4,
        value_bits: float = 4,
        key_mode: str = "mse",
        seed: int = 0,
        quantized_kv_start: int = 0,
    ):
        BatchKVCache.__init__(self, left_padding)
        self._init_turbo(None, key_bits, seed, key_bits, value_bits, key_mode, None, quantized_kv_start)

    def _filled(self):
        return self._idx  # the buffers' filled extent (rows are left-padded to it)

    @classmethod
    def merge(cls, caches: list) -> BatchTurboQuantKVCache:
        first = caches[0]
        for c in caches:
            _check_batchable(first, c)
        reference = next((c for c in caches if c.quantized), None)
        if reference is not None:
            # rows share one buffer, so all must hold codes; convert copies, so the
            # caller's (prompt-cache) entries stay as they are
            caches = [c if c.quantized or c.keys is None else _packed_copy(c) for c in caches]
        merged = BatchKVCache.merge(caches)  # stock: pads, copies rows (any dtype)
        batch = cls([0] * len(caches), **first.turbo_args())
        batch.state = merged.state
        for c in caches:
            batch._adopt_quantizers(c)
        logging.debug("mlx_lm_optiq KV: batch of %d rows (merge, turbo)", len(caches))
        return batch

    def extend(self, other: BatchTurboQuantKVCache) -> None:
        _check_batchable(self, other)
        self._adopt_quantizers(other)
        other._adopt_quantizers(self)
        if self.quantized or other.quantized:
            self._pack_held()
            other._pack_held()
        super().extend(other)
        logging.debug("mlx_lm_optiq KV: batch of %d rows (extend, turbo)", self.left_padding.size)

    def extract(self, idx: int) -> TurboQuantKVCache:
        row = super().extract(idx)  # a KVCache holding that row's buffers, padding dropped
        cache = TurboQuantKVCache(**self.turbo_args())
        cache._adopt_quantizers(self)
        cache.keys, cache.values, cache.offset = row.keys, row.values, row.offset
        return cache

    def __repr__(self):
        return (
            f"BatchTurboQuantKVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"key_mode={self.key_mode!r}, seed={self.seed}, size={self._idx}, quantized={self.quantized})"
        )


def _check_batchable(a, b):
    if not isinstance(b, _TurboQuantization):
        raise ValueError(f"cannot batch {type(b).__name__} with TurboQuant caches: {a!r} vs {b!r}")
    if a.turbo_args() != b.turbo_args():
        raise ValueError(f"cannot batch TurboQuant caches with different settings: {a!r} vs {b!r}")
    if a._dims() is not None and b._dims() is not None and a._dims() != b._dims():
        raise ValueError(f"cannot batch TurboQuant caches with key/value head_dim {a._dims()} and {b._dims()}")


def _packed_copy(cache):
    """A copy of a float-holding single cache with what it holds quantized."""
    copy = TurboQuantKVCache(**cache.turbo_args())
    copy._adopt_quantizers(cache)
    copy.keys, copy.values, copy.offset = cache.keys, cache.values, cache.offset
    copy._pack_held()
    return copy


class TurboKV:
    """What the TurboQuant caches' update_and_fetch return, twice (as the keys and as the values).

    `full_keys`/`full_values` are the whole packed buffers (B, heads, capacity, width),
    of which the first `length` positions are filled (stable shapes for compiled graphs);
    `keys`/`values` are the filled part.
    """

    def __init__(
        self,
        key_quantizer: TurboQuantizer,
        value_quantizer: TurboQuantizer,
        full_keys: mx.array,
        full_values: mx.array,
        length: int,
    ) -> None:
        self.key_quantizer, self.value_quantizer = key_quantizer, value_quantizer
        self.full_keys, self.full_values, self.length = full_keys, full_values, length

    @property
    def keys(self) -> mx.array:
        return self.full_keys[:, :, : self.length]

    @property
    def values(self) -> mx.array:
        return self.full_values[:, :, : self.length]


# ---------------------------------------------------------------- attention
def attention_patched() -> bool:
    """Whether mlx-lm's attention dispatches TurboKV here (mlx_lm_optiq.hooks.turbo sets the
    flag it shares with the per-layer caches' packed attention, kv/attention.py)."""
    return attention.attention_patched()


def turbo_scaled_dot_product_attention(
    queries: mx.array, kv: TurboKV, scale: float, mask: Any, sinks: mx.array | None = None
) -> mx.array:
    """Attention of `queries` (B, n_heads, L, D) against a TurboKV, in rotated space.

    Masks: None, "causal", or arrays (L, S) / (B|1, heads|1, L, S), boolean or additive (a
    batch's left padding comes as such a mask). On MLX's CUDA backend the fused kernel of
    kv/cuda_turbo.py computes the calls it covers (decode, short chunks; `why_unsupported`
    names the rest) and `reference_attention` the others; elsewhere, or with
    MLX_LM_OPTIQ_TURBO_ATTENTION=reference, `reference_attention` computes every call.
    """
    if sinks is not None:
        raise ValueError("TurboQuantKVCache does not support attention sinks; keep such layers unquantized")
    if cuda_turbo.selected_path() == "cuda":
        reason = cuda_turbo.why_unsupported(queries, kv, mask)
        if reason is None:
            return cuda_turbo.attention(queries, kv, scale, mask)
        cuda_turbo.note_reference(reason)
    return reference_attention(queries, kv, scale, mask)


def reference_attention(queries: mx.array, kv: TurboKV, scale: float, mask: Any) -> mx.array:
    """The pure-MLX rotated-space attention: every backend, every call shape; the reference the
    fused CUDA kernel (kv/cuda_turbo.py) is checked against.

    On GPUs the graph is compiled and runs on the cache's full-capacity buffers with the
    unfilled tail masked out, so input shapes change only every `step` tokens and the
    compiled graph is reused across decode steps; on CPU (not compiled) it reads only
    the filled prefix."""
    kq, vq = kv.key_quantizer, kv.value_quantizer
    keys, values, n = kv.full_keys, kv.full_values, kv.length
    compiled = _compiling()
    if not compiled and keys.shape[2] != n:
        keys, values = keys[:, :, :n], values[:, :, :n]
    B, n_q_heads, L, D = queries.shape
    n_kv_heads, span = keys.shape[1], keys.shape[2]
    n_rep = n_q_heads // n_kv_heads
    dtype = queries.dtype
    additive = _additive_mask(mask, L, n, span, n_rep, dtype)

    k_plans, k_tables, sign_plan, sign_table = kq.lookup(dtype)
    v_plans, v_tables, _, _ = vq.lookup(dtype)
    k_spec = (kq.plane_slices, kq.norm_at, k_plans)
    prod = None
    extra = []
    if kq.mode == "prod":
        prod = (kq.qjl_at, kq.residual_norm_at, sign_plan)
        extra = [kq.sketch.astype(dtype), sign_table]
    v_spec = (vq.plane_slices, vq.norm_at, v_plans)
    fn = _attention_graph(k_spec, v_spec, prod, n_rep, float(scale), additive is not None, compiled)
    return fn(
        queries,
        kq.rotation.astype(dtype),
        vq.rotation.astype(dtype),
        keys,
        values,
        *([additive] if additive is not None else []),
        *k_tables,
        *v_tables,
        *extra,
    )


def _additive_mask(mask, L, n, span, n_rep, dtype):
    """The mask as an additive (0 / -inf) array broadcastable against scores shaped
    (B, kv_heads, n_rep, L, span), with positions >= n (unfilled capacity) masked;
    None when nothing is masked."""
    if mask is None and span == n:
        return None
    valid = mx.arange(span) < n
    if mask is None:
        allowed = valid[None]
    else:
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unsupported attention mask {mask!r}")
            from mlx_lm.models.base import create_causal_mask

            mask = create_causal_mask(L, offset=n - L)
        pad = [(0, 0)] * (mask.ndim - 1) + [(0, span - mask.shape[-1])]
        if mask.dtype == mx.bool_:
            allowed = mx.pad(mask, pad, constant_values=False) & valid
        else:
            allowed = mx.where(valid, mx.pad(mask, pad), -mx.inf)
        if allowed.ndim == 4:  # (B or 1, n_heads or 1, L, span): split heads like the queries
            allowed = allowed.reshape(allowed.shape[0], -1, 1 if allowed.shape[1] == 1 else n_rep, *allowed.shape[-2:])
    if allowed.dtype == mx.bool_:
        return mx.where(allowed, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    return allowed.astype(dtype)


@functools.cache
def _attention_graph(k_spec, v_spec, prod, n_rep, scale, masked, compiled):
    """The attention computation for one cache layout, compiled on GPUs.

    Scores: the query is rotated once and multiplied against the keys' unit centroid
    vectors (read from the code bytes through lookup tables), then scaled by |k|;
    values: softmax weights times |v| against the values' unit centroid vectors, rotated
    back once. Query heads of one KV head are stacked as rows of one matmul (GQA).
    """
    k_slices, k_norm_at, k_plans = k_spec
    v_slices, v_norm_at, v_plans = v_spec
    nkt, nvt = len(k_plans), len(v_plans)

    def attend(queries, k_rot, v_rot, keys, values, *rest):
        additive, rest = (rest[0], rest[1:]) if masked else (None, rest)
        k_tables, v_tables, extra = rest[:nkt], rest[nkt : nkt + nvt], rest[nkt + nvt :]
        B, n_q_heads, L, D = queries.shape
        n_kv_heads, span = keys.shape[1], keys.shape[2]
        dtype = queries.dtype
        rows = n_rep * L
        q = (queries * scale).reshape(B, n_kv_heads, rows, D)

        def per_key(packed, at):  # fp16 norms (B, Hkv, span, 1) -> (B, Hkv, 1, span)
            return _f16_at(packed, at).astype(dtype).swapaxes(-1, -2)

        k_unit = _unit_vectors([keys[..., a:b] for a, b in k_slices], k_plans, k_tables, dtype)
        scores = (q @ k_rot.T) @ k_unit.swapaxes(-1, -2)  # (B, Hkv, rows, span)
        if prod is not None:
            qjl_at, res_at, sign_plan = prod
            sketch, sign_table = extra
            signs = _lookup_values([keys[..., qjl_at:res_at]], sign_plan, sign_table, dtype)
            sketched = (q @ sketch.T) @ signs.swapaxes(-1, -2)
            scores = scores + (math.sqrt(math.pi / 2) / D) * per_key(keys, res_at) * sketched
        scores = scores * per_key(keys, k_norm_at)
        if masked:
            scores = (scores.reshape(B, n_kv_heads, n_rep, L, span) + additive).reshape(B, n_kv_heads, rows, span)
        probs = mx.softmax(scores, axis=-1, precise=True)

        v_unit = _unit_vectors([values[..., a:b] for a, b in v_slices], v_plans, v_tables, dtype)
        out = ((probs * per_key(values, v_norm_at)) @ v_unit) @ v_rot  # (B, Hkv, rows, Dv)
        return out.reshape(B, n_q_heads, L, -1)

    return mx.compile(attend) if compiled else attend


# ---------------------------------------------------------------- helpers
def make_turbo_prompt_cache(
    model: Any,
    bits: float = 4,
    seed: int = 0,
    key_mode: str = "mse",
    key_bits: float | None = None,
    value_bits: float | None = None,
) -> TurboPromptCache:
    """mlx-lm's prompt cache for `model` with every plain KVCache replaced by a TurboQuantKVCache.

    Other slots (sliding-window RotatingKVCache, recurrent ArraysCache, ...) stay as mlx-lm
    made them, in float: TurboQuant has no such caches. That is said, never silent: a
    warning gives how many slots and why (on gemma3, 5 of every 6 layers slide), and the
    returned list's `left_as_is` maps each such slot to its reason.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    out = TurboPromptCache(
        TurboQuantKVCache(bits=bits, seed=seed + 2 * i, key_mode=key_mode, key_bits=key_bits, value_bits=value_bits)
        if type(c) is KVCache
        else c
        for i, c in enumerate(caches)
    )
    out.left_as_is = {i: _why_not_turbo(c) for i, c in enumerate(caches) if type(c) is not KVCache}
    if out.left_as_is:
        reasons = list(out.left_as_is.values())
        counts = ", ".join(f"{reasons.count(r)} {r}" for r in dict.fromkeys(reasons))
        warnings.warn(
            f"make_turbo_prompt_cache: {len(reasons)} of {len(caches)} cache slots stay in float, not "
            f"TurboQuant: {counts} (the returned list's .left_as_is names each slot)",
            stacklevel=2,
        )
    return out


class TurboPromptCache(list):
    """make_turbo_prompt_cache's result: the prompt cache list itself (pass it as
    `prompt_cache=`), plus `left_as_is`, {slot index: reason} for every slot that is not a
    TurboQuantKVCache, so callers can check what was left in float without parsing a warning."""

    left_as_is: dict[int, str]


def _why_not_turbo(cache: Any) -> str:
    from mlx_lm.models.cache import ArraysCache, RotatingKVCache

    name = type(cache).__name__
    if isinstance(cache, RotatingKVCache):
        return f"sliding-window {name} (TurboQuant has no sliding-window cache)"
    if isinstance(cache, ArraysCache):
        return f"{name} (recurrent state, not keys and values)"
    return f"{name} (TurboQuant replaces only plain KVCache slots)"


def affine_bits_per_channel(bits: int, group_size: int) -> float:
    """mlx-lm's QuantizedKVCache cost: codes + one fp16 scale and one fp16 bias per group."""
    return bits + 32 / group_size


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Regenerate the shipped TurboQuant codebooks.")
    p.add_argument("--write-codebooks", action="store_true", help=f"write {CODEBOOK_FILE}")
    if p.parse_args().write_codebooks:
        print(write_codebook_file())
