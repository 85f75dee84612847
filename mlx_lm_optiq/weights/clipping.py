"""Activation-aware clipping of quantization groups (the range each group's scale covers).

mlx quantizes a group of weights over its full [min, max]. One outlier weight then
stretches the scale of the whole group and every other weight of the group is
rounded coarsely. Shrinking the range to [alpha * min, alpha * max] clips the
outliers and rounds the rest finer; which alpha is best depends on how much each
input channel matters to the layer's output. AWQ's criterion: choose, per group,
the alpha minimising

    sum_j E[x_j^2] * (w_j - Q(clip(w, alpha))_j)^2

with E[x_j^2] the second moment of input channel j on calibration text, i.e. the
expected squared error of the layer's output. Plain (unweighted) MSE clipping does
not help on SmolLM2 (benchmarks/clipping.py); the activation-weighted one does.

The clipped weight is an ordinary float weight: stock `mx.quantize` /
`to_quantized` of it gives the clipped quantization, so the written model is a
plain mlx-lm model. The sweep and the writer clip with the same Clipper on the
same moments (stored in the sensitivity table), so what is measured is what is
written. Left at the stock range: modules without moments (embeddings: their
input is token ids) and mlx's float formats (nvfp4/mxfp4/mxfp8: their scales are
fp8 or powers of two of the group's absmax, a different search).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_lm_optiq.core.errors import OptiqError, brief
from mlx_lm_optiq.core.formats import Candidate
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_keys
from mlx_lm_optiq.core.model_tree import get_module, set_module

if TYPE_CHECKING:
    import mlx.core as mx

METHODS = ("activation", "none")
# Range factors per group (index i: alpha = 1 - 0.025 i). 1.0 (stock) is always
# tried, so clipping never increases a group's weighted error as the search counts it.
_STEP = 0.025
GRID = tuple(round(1 - _STEP * i, 4) for i in range(13))
_COARSE = (0, 4, 8, 12)  # alphas 1, .9, .8, .7
_FINE = (-2, -1, 1, 2)
# Weight elements searched at once (bounds the search's temporaries on big matrices). A GPU
# takes whole modules unsynchronised: there the cost is kernel launches and syncs, not memory.
_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 26


class ClippingError(OptiqError):
    """A clipping method or candidate the search does not handle."""


def _affine_params(w_min, w_max, bits):
    """mlx's affine scale and bias of a group from its range (float32, as mx.quantize computes them).

    The edge of larger magnitude is made exactly representable; bit-exactness with
    mx.quantize + mx.dequantize is tested.
    """
    import mlx.core as mx

    n_bins = 2**bits - 1
    mask = mx.abs(w_min) > mx.abs(w_max)
    scales = mx.maximum((w_max - w_min) / n_bins, 1e-7)
    scales = mx.where(mask, scales, -scales)
    edge = mx.where(mask, w_min, w_max)
    q0 = mx.round(edge / scales)
    scales = mx.where(q0 != 0, edge / q0, scales)
    biases = mx.where(q0 == 0, 0, edge)
    return scales, biases


def _affine_errors(exact, importance, lo, hi, index, bits):
    """Weighted errors (K, rows, groups) of clipping at GRID[index] (index: (K, ...) broadcast
    against (rows, groups, 1)); exact: (rows, groups, g) float32; lo, hi: its group ranges.

    Written out in mx ops (fused by mx.compile) instead of a stock quantize call per
    alpha. The clipped group's range is known without reducing over it: min =
    max(lo, alpha lo), max = min(hi, alpha hi). The search runs in float32: it ignores
    the rounding of scales to the weight's dtype, which the final quantization (stock,
    on the clipped weight) does apply.
    """
    import mlx.core as mx

    a = 1 - _STEP * index.astype(mx.float32)
    lo_c, hi_c = lo * a, hi * a
    scales, biases = _affine_params(mx.maximum(lo, lo_c), mx.minimum(hi, hi_c), bits)
    codes = mx.clip(mx.round((mx.clip(exact, lo_c, hi_c) - biases) / scales), 0, 2**bits - 1)
    return (importance * (codes * scales + biases - exact) ** 2).sum(-1)


def _affine_search(exact, importance, bits):
    """Index into GRID of the best alpha per group: the 4 coarse alphas 1, .9, .8, .7, then
    the grid points within 0.05 of the best of them (8 error evaluations instead of 13)."""
    import mlx.core as mx

    lo, hi = exact.min(-1, keepdims=True), exact.max(-1, keepdims=True)
    coarse = mx.array(_COARSE, dtype=mx.uint8)
    err = _affine_errors(exact, importance, lo, hi, coarse.reshape(-1, 1, 1, 1), bits)
    k = mx.argmin(err, axis=0)
    best, best_err = coarse[k], mx.min(err, axis=0)
    fine = mx.clip(best[None].astype(mx.int32) + mx.array(_FINE).reshape(-1, 1, 1), 0, len(GRID) - 1)
    err = _affine_errors(exact, importance, lo, hi, fine[..., None], bits)
    k = mx.argmin(err, axis=0)
    better = mx.min(err, axis=0) < best_err
    return mx.where(better, mx.take_along_axis(fine, k[None], axis=0)[0].astype(mx.uint8), best)


_COMPILED = {}


def _search_fn(bits):
    """The search for one bit width: fused by mx.compile on the CPU (about 2x faster there);
    eager on a GPU, where MLX-CUDA JIT-compiles fused kernels and a sweep with the compiled
    search measured 139 s against 30 s eager (H200, both with first-use kernel builds)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return lambda e, imp: _affine_search(e, imp, bits)
    if bits not in _COMPILED:
        _COMPILED[bits] = mx.compile(lambda e, imp: _affine_search(e, imp, bits))
    return _COMPILED[bits]


def best_alphas(weight: mx.array, cand: Candidate, moments: mx.array) -> mx.array:
    """uint8 index into GRID of the best range factor of every group of `weight` (affine cand).

    weight: (..., in_dim); moments: (in_dim,) input second moments. Coarse-to-fine
    search of _affine_search, in row chunks (bounds its temporaries on big matrices).
    Ties go to the larger alpha (1.0, stock, first).
    """
    import mlx.core as mx

    g, bits = cand["group_size"], cand["bits"]
    if cand["mode"] != "affine":
        raise ClippingError(f"clipping searches affine group ranges, not {cand['mode']!r}")
    cols = weight.shape[-1]
    w2 = weight.reshape(-1, cols)
    importance = moments.astype(mx.float32).reshape(1, cols // g, g)
    search = _search_fn(bits)
    on_cpu = mx.default_device() == mx.cpu
    step = max(1, (_CHUNK_ELEMENTS if on_cpu else _GPU_CHUNK_ELEMENTS) // (cols * len(_COARSE)))
    out = []
    for r in range(0, w2.shape[0], step):
        rows = w2[r : r + step]
        best = search(rows.astype(mx.float32).reshape(rows.shape[0], cols // g, g), importance)
        if on_cpu:  # one chunk's temporaries at a time
            mx.eval(best)
        out.append(best)
    return mx.concatenate(out, axis=0) if len(out) > 1 else out[0]


def apply_alphas(weight: mx.array, cand: Candidate, alphas: mx.array) -> mx.array:
    """`weight` with every group clipped to its range times GRID[alphas] (same dtype and shape)."""
    import mlx.core as mx

    g = cand["group_size"]
    cols = weight.shape[-1]
    exact = weight.reshape(-1, cols // g, g).astype(mx.float32)
    a = 1 - _STEP * alphas.reshape(-1, cols // g, 1).astype(mx.float32)
    lo, hi = exact.min(-1, keepdims=True), exact.max(-1, keepdims=True)
    return mx.clip(exact, lo * a, hi * a).reshape(weight.shape).astype(weight.dtype)


class Clipper:
    """clip(path, weight, cand): the clipped weight of module `path`, or `weight` itself when
    the module has no moments or the candidate is one of mlx's float formats (their
    scales are powers of two or fp8 of the group's absmax: left stock).

    The sweep probes every candidate of a module once per calibration batch; the
    chosen factors (one byte per group) are kept up to `cache_bytes` so later
    batches only re-apply them.
    """

    def __init__(self, moments: dict[str, mx.array], cache_bytes: int = 1 << 30):
        self.moments = moments
        self.cache_bytes = cache_bytes
        self._alphas, self._cached = {}, 0

    def __call__(self, path: str, weight: mx.array, cand: Candidate) -> mx.array:
        m = self.moments.get(path)
        if m is None or cand["mode"] != "affine":
            return weight
        if m.shape[-1] != weight.shape[-1]:
            raise ClippingError(
                f"{path}: clipping moments have {m.shape[-1]} input channels, the weight has {weight.shape[-1]}"
            )
        key = (path, cand["bits"], cand["group_size"], cand["mode"], tuple(weight.shape), str(weight.dtype))
        alphas = self._alphas.get(key)
        if alphas is None:
            alphas = best_alphas(weight, cand, m)
            if self._cached + alphas.nbytes <= self.cache_bytes:
                self._alphas[key] = alphas
                self._cached += alphas.nbytes
        return apply_alphas(weight, cand, alphas)


# ---------------------------------------------------------------- input moments


def _recorder_class():
    import mlx.core as mx
    import mlx.nn as nn

    class Recorder(nn.Module):
        """Stands in for a module: hands its float input to `record(path, x)`, then calls it."""

        def __init__(self, module, record, path):
            super().__init__()
            self.inner = module
            object.__setattr__(self, "_at", (record, path))

        def __call__(self, x, *args, **kwargs):
            record, path = self._at
            if isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating):
                record(path, x)
            return self.inner(x, *args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "inner" or "inner" not in self:  # still in __init__
                    raise
                return getattr(self["inner"], name)

    return Recorder


def record_inputs(
    model: Any,
    paths: Sequence[str],
    tokens: mx.array,
    batch_size: int,
    record: Callable[[str, mx.array], None],
    pending: Callable[[], list],
    end_forward: Callable[[], None] = lambda: None,
) -> None:
    """One forward of `model` over `tokens` (N, L), `batch_size` rows at a time, with each module
    at `paths` (whatever sits there now: float or quantized) wrapped to hand its float input to
    `record(path, x)` first; the modules are put back afterwards, also on error. Modules called
    on token ids (embeddings) record nothing. After each batch `pending()` (the running sums
    `record` builds) is evaluated, not the output: a forward runs only as deep as the deepest
    recorded module. Then `end_forward()` is called.

    What the input moments (here) and GPTQ's input Hessians (weights/gptq.py) both measure from."""
    import mlx.core as mx

    Recorder = _recorder_class()
    modules = {p: get_module(model, p) for p in paths}
    for p, m in modules.items():
        set_module(model, p, Recorder(m, record, p))
    try:
        for s in range(0, tokens.shape[0], batch_size):
            out = model(tokens[s : s + batch_size])
            # only what was recorded: MLX is lazy, so the layers after the last recorded module
            # (and the logits) are never computed
            mx.eval(pending())
            end_forward()
            del out
    finally:
        for p, m in modules.items():
            set_module(model, p, m)


def input_moments(model: Any, paths: list[str], tokens: mx.array, batch_size: int = 1) -> dict[str, mx.array]:
    """{path: E[x^2] per input channel (float32)} of the modules at `paths` in `model`
    (`record_inputs`: one forward over `tokens`; embeddings get no entry)."""
    import mlx.core as mx

    store = {}

    def record(path, x):
        s = (x.astype(mx.float32) ** 2).reshape(-1, x.shape[-1]).sum(0)
        total, count = store.get(path, (0, 0))
        store[path] = (total + s, count + x.size // x.shape[-1])

    record_inputs(model, paths, tokens, batch_size, record, lambda: [v[0] for v in store.values()])
    return {p: total / count for p, (total, count) in store.items()}


# ---------------------------------------------------------------- table entry


def to_table(method: str, moments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The table's "clipping" field: the method, the grid and the moments (float32, base64)."""
    if method not in METHODS:
        raise ClippingError(f"clipping must be one of {METHODS}, got {method!r}")
    if method == "none":
        return {"method": "none"}
    encoded = {}
    for p, m in moments.items():
        arr = np.asarray(m, dtype="<f4")
        encoded[p] = base64.b64encode(arr.tobytes()).decode("ascii")
    return {"method": method, "grid": list(GRID), "moments_dtype": "float32", "moments": encoded}


def validate_table_entry(entry: Any, modules: dict[str, Any], where: Any, field: str = "clipping") -> None:
    """Check a table's "clipping" field against its modules; errors name the file and the field.

    where: the file; field: the field's name in it ("sensitivity.clipping" in a sidecar).
    """

    def bad(name, expected):
        raise OptiqFileError(f"{where}: field '{field}{name}' {expected}")

    if not isinstance(entry, dict):
        raise OptiqFileError(f"{where}: field '{field}' must be an object, got {brief(entry)}")
    if not isinstance(entry.get("method"), str) or entry["method"] not in METHODS:
        bad(".method", f"must be one of {list(METHODS)}, got {brief(entry.get('method'))}")
    if entry["method"] == "none":
        check_keys(entry, ("method",), where, field)
        return
    check_keys(entry, ("method", "grid", "moments_dtype", "moments"), where, field)
    if entry.get("grid") != list(GRID):
        bad(".grid", f"must be {list(GRID)} (this version's search grid), got {brief(entry.get('grid'))}")
    if entry.get("moments_dtype") != "float32":
        bad(".moments_dtype", f"must be 'float32', got {brief(entry.get('moments_dtype'))}")
    moments = entry.get("moments")
    if not isinstance(moments, dict):
        bad(".moments", "must be an object of module path -> base64 float32")
    for p, text in moments.items():
        at = f".moments.{p}"
        if p not in modules:
            bad(at, "names no module of the table")
        try:
            raw = base64.b64decode(text, validate=True)
        except (TypeError, ValueError):
            raw = None
        if raw is None:
            bad(at, "is not base64")
        width = modules[p]["shape"][-1]
        if len(raw) != 4 * width:
            bad(at, f"holds {len(raw) // 4} floats, expected {width} (the module's input dim)")
        arr = np.frombuffer(raw, dtype="<f4")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            bad(at, "must be finite second moments >= 0")


def from_table(table: dict[str, Any]) -> Clipper | None:
    """The Clipper a sensitivity table was measured with, or None (stock ranges).

    Tables written before clipping existed have no "clipping" field: stock ranges.
    """
    import mlx.core as mx

    entry = table.get("clipping") or {"method": "none"}
    if entry["method"] == "none":
        return None
    moments = {p: mx.array(np.frombuffer(base64.b64decode(t), dtype="<f4").copy()) for p, t in entry["moments"].items()}
    return Clipper(moments)


def method_of(table: dict[str, Any]) -> str:
    """The clipping method a table was measured with ("none" for tables older than clipping)."""
    return (table.get("clipping") or {"method": "none"})["method"]
