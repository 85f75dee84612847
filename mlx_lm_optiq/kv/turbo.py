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
unit-norm centroid vectors, and the output is rotated back once. Pure MLX ops,
so it runs on every MLX backend.

This module is hook-free: models reach `turbo_scaled_dot_product_attention`
through `mlx_lm_optiq.hooks.turbo` (patch_attention() or mlx_lm_optiq.enable()).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lm_optiq.core.jsonio import OptiqFileError, read_json, write_json

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


def _lookup(centroids, planes, segments):
    """Packed planes -> unit centroid vectors (..., dim) in rotated space."""
    outs, i = [], 0
    for (_, b), cent in zip(segments, centroids):
        k = len(_planes(b))
        outs.append(cent[unpack_codes(list(planes[i : i + k]), b)])
        i += k
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def _n_planes(segments):
    return sum(len(_planes(b)) for _, b in segments)


# ---------------------------------------------------------------- quantizers
class TurboQuantizer:
    """TurboQuant for vectors of one dimension: quantize() -> dict of arrays, dequantize() back.

    mode "mse": `bits`-bit Lloyd-Max codes of the rotated unit vector + its norm.
    mode "prod": (bits-1)-bit mse codes + sign(S r) for the residual r + |r|
    (unbiased inner products; needs bits >= 2).
    Fractional `bits` split the coordinates between two widths (split_widths).
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
        self.centroids = [mx.array(c.astype(np.float32)) for c in books]
        self.boundaries = [mx.array(((c[1:] + c[:-1]) / 2).astype(np.float32)) for c in books]
        self.rotation = mx.array(rotation_matrix(dim, seed))
        self.sketch = mx.array(qjl_matrix(dim, seed)) if mode == "prod" else None

    def bits_per_channel(self) -> float:
        """Stored bits per vector coordinate, norms included (fp16 each)."""
        norms = 2 if self.mode == "prod" else 1
        return self.bits + norms * 16 / self.dim

    def rotate(self, x: mx.array) -> mx.array:
        return x @ self.rotation.astype(x.dtype).T

    def unrotate(self, y: mx.array) -> mx.array:
        return y @ self.rotation.astype(y.dtype)

    def quantize(self, x: mx.array) -> dict:
        arrays = _compiled_quantize(self.segments, self.mode == "prod")(
            x, self.rotation, *self.boundaries, *self.centroids, *([self.sketch] if self.sketch is not None else [])
        )
        n = _n_planes(self.segments)
        out = {"codes": list(arrays[:n]), "norm": arrays[n]}
        if self.mode == "prod":
            out["qjl"] = [arrays[n + 1]]
            out["residual_norm"] = arrays[n + 2]
        return out

    def rotated_unit(self, q: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Centroid vectors in rotated space, unit-norm scale (..., dim): what attention multiplies against."""
        return _compiled_lookup(self.segments)(*[c.astype(dtype) for c in self.centroids], *q["codes"])

    def qjl_signs(self, q: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
        """+-1 sketch signs (..., dim) of "prod" codes."""
        return unpack_codes(q["qjl"], 1).astype(dtype) * 2 - 1

    def dequantize(self, q: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
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
        use = COMPILE_ON_CPU or mx.default_device().type == mx.DeviceType.gpu
        return compiled(*args) if use else fn(*args)

    return call


def _nearest_codes(y, boundaries, bits):
    """Index of the nearest centroid (binary search over the sorted boundaries: `bits` steps)."""
    idx = mx.zeros(y.shape, dtype=mx.uint32)
    for s in reversed(range(bits)):
        cand = idx + (1 << s)
        idx = mx.where(y > boundaries[cand - 1], cand, idx)
    return idx


@functools.cache
def _compiled_quantize(segments, prod):
    """x -> (code planes..., fp16 norm[, qjl plane, fp16 residual norm]) as one compiled graph.

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
        return tuple(out)

    return _gpu_compiled(quant)


@functools.cache
def _compiled_lookup(segments):
    """Codes -> unit centroid vectors in rotated space (dequantize's first half; attention inlines it)."""
    n_seg = len(segments)

    def lookup(*args):
        return _lookup(args[:n_seg], args[n_seg:], segments)

    return _gpu_compiled(lookup)


@functools.cache
def get_quantizer(dim: int, bits: float, seed: int = 0, mode: str = "mse") -> TurboQuantizer:
    """Shared quantizer (rotation/codebook arrays built once per (dim, bits, seed, mode))."""
    return TurboQuantizer(dim, bits, seed=seed, mode=mode)


# ---------------------------------------------------------------- the cache
class TurboQuantKVCache:
    """Drop-in for mlx-lm's KVCache storing TurboQuant codes.

    `update_and_fetch` returns a TurboKV view (as keys and values) that the patched
    `scaled_dot_product_attention` (mlx_lm_optiq.hooks.turbo) recognises.
    Keys use `key_bits` (default `bits`) and `key_mode` ("mse" or "prod");
    values always use the mse quantizer with `value_bits` (default `bits`).
    head_dim=None takes the dims from the first update (key and value dims may differ).
    """

    step = 256

    def __init__(
        self,
        head_dim: int | None = None,
        bits: float = 4,
        seed: int = 0,
        key_bits: float | None = None,
        value_bits: float | None = None,
        key_mode: str = "mse",
        value_head_dim: int | None = None,
    ):
        self.head_dim = head_dim
        for name, v in (("head_dim", head_dim), ("value_head_dim", value_head_dim), ("seed", seed)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"TurboQuantKVCache {name} must be an int, got {v!r}")
        if seed is None:
            raise ValueError("TurboQuantKVCache seed must be an int, got None")
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
        self.offset = 0
        self.keys = None  # dict of arrays, sequence axis 2, capacity >= offset
        self.values = None
        self.key_quantizer = self.value_quantizer = None
        if head_dim is not None:
            self._make_quantizers(head_dim, value_head_dim or head_dim)

    def _make_quantizers(self, k_dim, v_dim):
        self.key_quantizer = get_quantizer(k_dim, self.key_bits, self.seed, self.key_mode)
        self.value_quantizer = get_quantizer(v_dim, self.value_bits, self.seed + 1, "mse")

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[TurboKV, TurboKV]:
        if not attention_patched():
            raise RuntimeError(
                "TurboQuantKVCache needs mlx-lm's attention to know it: call "
                "mlx_lm_optiq.hooks.turbo.patch_attention() or mlx_lm_optiq.enable() first"
            )
        k_dim, v_dim = keys.shape[-1], values.shape[-1]
        if self.key_quantizer is None:
            self._make_quantizers(k_dim, v_dim)
        elif (k_dim, v_dim) != (self.key_quantizer.dim, self.value_quantizer.dim):
            raise ValueError(
                f"TurboQuantKVCache was built for key/value head_dim "
                f"{self.key_quantizer.dim}/{self.value_quantizer.dim}, got {k_dim}/{v_dim}"
            )
        qk = self.key_quantizer.quantize(keys)
        qv = self.value_quantizer.quantize(values)
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > _capacity(self.keys):
            new_cap = (self.step + n - 1) // self.step * self.step
            self.keys = _grow(self.keys, qk, prev, new_cap)
            self.values = _grow(self.values, qv, prev, new_cap)
        self.offset += n
        _assign(self.keys, qk, prev, self.offset)
        _assign(self.values, qv, prev, self.offset)
        # Models unpack `keys, values = cache.update_and_fetch(...)`; both names get the one view.
        view = TurboKV(self, self.keys, self.values, self.offset)
        return view, view

    # --- the _BaseCache protocol of mlx-lm
    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for part in (self.keys, self.values) for a in _leaves(part))

    def bits_per_channel(self) -> float:
        """Stored bits per K/V coordinate, norms included (mean of keys and values)."""
        if self.key_quantizer is None:
            raise ValueError("TurboQuantKVCache: head_dim unknown until the first update")
        return (self.key_quantizer.bits_per_channel() + self.value_quantizer.bits_per_channel()) / 2

    @property
    def state(self) -> Any:
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v: Any) -> None:
        self.keys, self.values, self.offset = v

    def __repr__(self):
        return (
            f"TurboQuantKVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"key_mode={self.key_mode!r}, seed={self.seed}, offset={self.offset})"
        )


class TurboKV:
    """What TurboQuantKVCache.update_and_fetch returns, twice (as the keys and as the values).

    `keys`/`values` hold the first `length` tokens; `full_keys`/`full_values` the
    whole preallocated buffers (stable shapes for the compiled lookup).
    """

    def __init__(self, cache: Any, full_keys: Any, full_values: Any, length: int) -> None:
        self.cache, self.full_keys, self.full_values, self.length = cache, full_keys, full_values, length

    @property
    def keys(self) -> Any:
        return _slice(self.full_keys, self.length)

    @property
    def values(self) -> Any:
        return _slice(self.full_values, self.length)


def _leaves(part):
    for v in part.values():
        yield from (v if isinstance(v, list) else [v])


def _map(part, fn):
    return {k: [fn(a) for a in v] if isinstance(v, list) else fn(v) for k, v in part.items()}


def _capacity(part):
    return part["norm"].shape[2]


def _grow(old, new, prev, cap):
    def grown(a_new, a_old=None):
        shape = list(a_new.shape)
        shape[2] = cap
        zeros = mx.zeros(shape, a_new.dtype)
        return zeros if a_old is None else mx.concatenate([a_old[:, :, :prev], zeros], axis=2)

    if old is None:
        return _map(new, grown)
    return {
        k: [grown(n, o) for n, o in zip(new[k], old[k])] if isinstance(new[k], list) else grown(new[k], old[k])
        for k in new
    }


def _assign(dst, src, start, stop):
    for k, v in src.items():
        if isinstance(v, list):
            for d, s in zip(dst[k], v):
                d[:, :, start:stop] = s
        else:
            dst[k][:, :, start:stop] = v


def _slice(part, n):
    if _capacity(part) == n:
        return part
    return _map(part, lambda a: a[:, :, :n])


# ---------------------------------------------------------------- attention
_ATTENTION_PATCH = {"active": False}


def attention_patched() -> bool:
    return _ATTENTION_PATCH["active"]


def set_attention_patched(active: bool) -> None:
    """Called by mlx_lm_optiq.hooks.turbo when it (un)installs the attention dispatch."""
    _ATTENTION_PATCH["active"] = bool(active)


def turbo_scaled_dot_product_attention(
    queries: mx.array, kv: TurboKV, scale: float, mask: Any, sinks: mx.array | None = None
) -> mx.array:
    """Attention of `queries` (B, n_heads, L, D) against a TurboKV, in rotated space.

    Runs on the cache's full-capacity buffers with the unfilled tail masked out,
    so input shapes change only every `step` tokens and the compiled graph is
    reused across decode steps.
    """
    if sinks is not None:
        raise ValueError("TurboQuantKVCache does not support attention sinks; keep such layers unquantized")
    kq, vq = kv.cache.key_quantizer, kv.cache.value_quantizer
    keys, values = kv.full_keys, kv.full_values
    B, n_q_heads, L, D = queries.shape
    n_kv_heads, cap = keys["norm"].shape[1], keys["norm"].shape[2]
    n_rep = n_q_heads // n_kv_heads
    dtype = queries.dtype
    n = kv.length

    valid = mx.arange(cap) < n  # (cap,)
    if mask is None:
        allowed = valid[None]
    else:
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unsupported attention mask {mask!r}")
            from mlx_lm.models.base import create_causal_mask

            mask = create_causal_mask(L, offset=n - L)
        pad = [(0, 0)] * (mask.ndim - 1) + [(0, cap - mask.shape[-1])]
        if mask.dtype == mx.bool_:
            allowed = mx.pad(mask, pad, constant_values=False) & valid
        else:
            allowed = mx.where(valid, mx.pad(mask, pad), -mx.inf)
        if allowed.ndim == 4:  # (B or 1, n_heads or 1, L, cap): split heads like the queries
            allowed = allowed.reshape(allowed.shape[0], -1, 1 if allowed.shape[1] == 1 else n_rep, *allowed.shape[-2:])
    if allowed.dtype == mx.bool_:
        additive = mx.where(allowed, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    else:
        additive = allowed.astype(dtype)

    fn = _compiled_attention(kq.segments, vq.segments, kq.mode == "prod", n_rep, float(scale))
    extra = [kq.sketch.astype(dtype), keys["qjl"][0], keys["residual_norm"]] if kq.mode == "prod" else []
    return fn(
        queries,
        kq.rotation.astype(dtype),
        vq.rotation.astype(dtype),
        keys["norm"],
        values["norm"],
        additive,
        *[c.astype(dtype) for c in kq.centroids],
        *[c.astype(dtype) for c in vq.centroids],
        *keys["codes"],
        *values["codes"],
        *extra,
    )


@functools.cache
def _compiled_attention(k_segments, v_segments, k_prod, n_rep, scale):
    nks, nvs, nk = len(k_segments), len(v_segments), _n_planes(k_segments)

    def attend(queries, k_rot, v_rot, k_norm, v_norm, additive, *rest):
        k_cent, v_cent, planes = rest[:nks], rest[nks : nks + nvs], rest[nks + nvs :]
        B, n_q_heads, L, D = queries.shape
        dtype = queries.dtype
        q = (queries * scale).reshape(B, -1, n_rep, L, D)

        def per_key(a):  # (B, Hkv, cap, 1) -> (B, Hkv, 1, 1, cap): broadcasts over query heads and rows
            return a.astype(dtype).swapaxes(-1, -2)[:, :, None]

        # scores: rotate the query once, multiply against unit centroid vectors, scale by |k|
        k_unit = _lookup(k_cent, planes[:nk], k_segments)[:, :, None]  # (B, Hkv, 1, cap, D)
        scores = (q @ k_rot.T) @ k_unit.swapaxes(-1, -2)
        if k_prod:
            sketch, qjl, res_norm = planes[-3:]
            signs = (unpack_codes([qjl], 1).astype(dtype) * 2 - 1)[:, :, None]
            sketched = (q @ sketch.T) @ signs.swapaxes(-1, -2)
            scores = scores + (math.sqrt(math.pi / 2) / D) * per_key(res_norm) * sketched
            v_planes = planes[nk:-3]
        else:
            v_planes = planes[nk:]
        scores = scores * per_key(k_norm) + additive
        probs = mx.softmax(scores, axis=-1, precise=True)

        # values: weight by |v|, sum unit centroid vectors in rotated space, rotate back once
        v_unit = _lookup(v_cent, v_planes, v_segments)[:, :, None]
        out = (probs * per_key(v_norm)) @ v_unit
        return (out @ v_rot).reshape(B, n_q_heads, L, D)

    return _gpu_compiled(attend)


# ---------------------------------------------------------------- helpers
def make_turbo_prompt_cache(
    model: Any,
    bits: float = 4,
    seed: int = 0,
    key_mode: str = "mse",
    key_bits: float | None = None,
    value_bits: float | None = None,
) -> list:
    """mlx-lm's prompt cache for `model` with every plain KVCache replaced by a TurboQuantKVCache.

    Other cache types (rotating, arrays, ...) are left as they are.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    return [
        TurboQuantKVCache(bits=bits, seed=seed + 2 * i, key_mode=key_mode, key_bits=key_bits, value_bits=value_bits)
        if type(c) is KVCache
        else c
        for i, c in enumerate(caches)
    ]


def affine_bits_per_channel(bits: int, group_size: int) -> float:
    """mlx-lm's QuantizedKVCache cost: codes + one fp16 scale and one fp16 bias per group."""
    return bits + 32 / group_size


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Regenerate the shipped TurboQuant codebooks.")
    p.add_argument("--write-codebooks", action="store_true", help=f"write {CODEBOOK_FILE}")
    if p.parse_args().write_codebooks:
        print(write_codebook_file())
