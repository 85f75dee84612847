"""Error-compensated writing: GPTQ rounding of the planned affine modules (`writer="gptq"`).

Round-to-nearest (RTN, what stock `mx.quantize` does) rounds every weight on its own. The
layer's output error on inputs x is ||x (W - Q)^T||^2, i.e. tr((W - Q) H (W - Q)^T) with
H = E[x^T x] over calibration inputs: errors of correlated input channels can cancel.
GPTQ (Frantar et al. 2022) rounds the input columns one after another and spreads each
column's rounding error onto the columns not yet rounded, in proportion to the inverse
Hessian, so later roundings compensate earlier ones (the optimal brain surgeon update).

What this writer keeps fixed, and why:
- The grid. Every group's scale and bias are the ones the RTN writer writes: mlx's affine
  formula on the group's (activation-clipped, `clipping.py`) range, rounded to the weight's
  dtype. GPTQ only chooses other codes on that grid. So each module keeps exactly the
  format, size and scales the plan counted, the clipping the sweep measured, and the codes
  are rounded against the scale as it is stored (fp16/bf16), not a float32 one.
  Fixed scales also make the column order free (`act_order`: largest diag(H) first).
- The float model's inputs. H comes from one forward of the float model over the
  calibration tokens (not the partly quantized model of sequential GPTQ); modules fed the
  same array (q/k/v, gate/up) share one H and are compensated together as one matrix.

Numerics (fp16/bf16 sources included): inputs are cast to float32 before x^T x and H is
the mean over tokens (stock `mlx_lm.gptq` sums x^T x in the model's dtype, where squares of
large fp16 activations overflow); the Cholesky factor of the inverse is computed in float64
(LAPACK on the CPU) with GPTQ's damping (a share of the mean diagonal, raised tenfold while
the factorisation fails); input channels never seen (zero diagonal) are rounded to nearest.
Before anything is written, the packed weights are dequantized exactly as mlx-lm's loader
does, in the stored dtype, and any non-finite value is refused with a WriterError naming
the module: nothing non-finite is ever written.

Left at round-to-nearest (said in the log and the summary): mlx's float formats
(nvfp4/mxfp4/mxfp8: fp8 or power-of-two scales of the absmax, a different grid), modules
that are not plain Linear layers (embeddings: their input is token ids; MoE experts).
Modules the plan keeps in float are not touched.

The written model is a stock mlx-lm model: stock convert writes the plan with RTN, then
`write_compensated` replaces the planned modules' packed weights, scales and biases in its
safetensors (same keys, shapes and dtypes, checked) before the pipeline reloads and verifies.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_lm_optiq.core.errors import OptiqError
from mlx_lm_optiq.core.formats import Candidate, candidate_key
from mlx_lm_optiq.weights.clipping import Clipper, _affine_params, record_inputs

if TYPE_CHECKING:
    import mlx.core as mx

WRITERS = ("rtn", "gptq")
DEFAULT_WRITER = "gptq"
# GPTQ's damping: this share of the mean diagonal of H is added to the diagonal.
DAMP = 0.01
# Columns rounded between two lazy updates of the rest of the matrix (GPTQ's B).
BLOCK_SIZE = 128
# Damping is raised tenfold at most this many times while H cannot be factorised.
_DAMP_RETRIES = 4
# Memory for the logits of one calibration forward (sizes the calibration batch).
_LOGITS_BYTES = 1 << 30
# float32 input Hessians held at once when the writer records them itself: the modules are
# compensated a few blocks at a time, one (partial) calibration forward per chunk, so an 8B
# model's ~33 GB or a 70B model's ~330 GB of Hessians never exist together.
_HESSIAN_BYTES = 4 << 30


class WriterError(OptiqError):
    """A module the writer refuses to write (non-finite weights, inputs or results)."""


@dataclass
class GPTQSettings:
    """How GPTQ rounds (every field has the default the writer uses).

    damp: share of the mean diagonal of H added to it (GPTQ's 1%).
    block_size: columns per lazy batch update (changes speed, not results beyond rounding).
    act_order: round the columns in order of decreasing diag(H) (GPTQ's act-order;
      the grid is fixed beforehand, so the order changes only which errors are compensated).
    """

    damp: float = DAMP
    block_size: int = BLOCK_SIZE
    act_order: bool = True


# ---------------------------------------------------------------- input Hessians


class _HessianState:
    """Running sums of x^T x per input group, and which module belongs to which group.

    `record` adds x^T x of a module's input (float32) to its input group. Modules handed the
    same array object in one forward (q/k/v, gate/up) share a group: their H is computed once.
    """

    def __init__(self):
        self.sums: dict[str, Any] = {}  # group key -> float32 (d, d) sum of x^T x
        self.counts: dict[str, int] = {}  # group key -> rows of x seen
        self.group_of: dict[str, str] = {}  # module path -> group key
        self._seen: list[tuple[Any, str]] = []  # (input array, group key) of the current forward

    def record(self, path, x):
        import mlx.core as mx

        key = next((k for a, k in self._seen if a is x), None)
        if key is None:
            key = self.group_of.get(path, path)
            x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            # The mean, not the sum, and in float32: sums of squares of large fp16 inputs overflow.
            s = x2.T @ x2
            self.sums[key] = self.sums[key] + s if key in self.sums else s
            self.counts[key] = self.counts.get(key, 0) + x2.shape[0]
            self._seen.append((x, key))
        known = self.group_of.setdefault(path, key)
        if known != key:  # the same module shares its input differently across forwards
            raise RuntimeError(f"{path}: its input was shared with {known!r} before, now with {key!r}")

    def end_forward(self):
        self._seen.clear()


def input_hessians(
    model: Any, paths: Sequence[str], tokens: mx.array, batch_size: int = 1
) -> tuple[dict[str, mx.array], dict[str, str]]:
    """({group key: H = mean over tokens of x^T x (float32)}, {module path: its group key}).

    One forward of `model` over `tokens` (N, L) with each module at `paths` wrapped to record
    its input, then put back. Modules fed the same array share a group (keyed by the first
    such module); modules never called on float inputs (embeddings) get no group.
    """
    state = _HessianState()
    record_inputs(model, paths, tokens, batch_size, state.record, lambda: list(state.sums.values()), state.end_forward)
    return {k: v / state.counts[k] for k, v in state.sums.items()}, dict(state.group_of)


def _block_of(path: str) -> tuple:
    """Sort key and chunk unit of a module path: the path up to its first numeric part
    ("model.layers.12"), with the number as an int so blocks sort in model order."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return (".".join(parts[:i]), int(part))
    return (path, -1)


def hessian_chunks(paths: Sequence[str], modules: Mapping[str, Any], budget: int) -> list[list[str]]:
    """`paths` cut into chunks of whole blocks in model order whose float32 Hessians (at most
    in_dim^2 * 4 bytes per module; shared inputs make it less) stay within `budget` bytes; a
    block larger than the budget is a chunk of its own. Whole blocks, because modules fed one
    array (q/k/v, gate/up) must be recorded in one forward to share their H."""
    blocks: dict[tuple, list[str]] = {}
    for p in paths:
        blocks.setdefault(_block_of(p), []).append(p)
    chunks, current, used = [], [], 0
    for key in sorted(blocks, key=lambda k: (k[1] < 0, k)):  # numbered blocks first, in order
        size = sum(4 * int(modules[p].weight.shape[-1]) ** 2 for p in blocks[key])
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current += blocks[key]
        used += size
    return chunks + ([current] if current else [])


def output_error(weight: mx.array, written: mx.array, hessian: mx.array) -> float:
    """Squared output error of writing `written` for `weight`, summed over output channels and
    averaged over the tokens H was measured on: tr((W - Q) H (W - Q)^T)."""
    import mlx.core as mx

    d = (written.astype(mx.float32) - weight.astype(mx.float32)).astype(mx.float32)
    return ((d @ hessian) * d).sum().item()


# ---------------------------------------------------------------- the grid


def affine_grid(weight: mx.array, cand: Candidate) -> tuple[mx.array, mx.array]:
    """(scales, biases) mlx's affine quantizer gives `weight` (rows, cols) at `cand`, in the
    weight's dtype: the range of every group, `_affine_params` in float32 (bit-exact with
    `mx.quantize`, tested), then rounded to the dtype as `mx.quantize` stores them."""
    import mlx.core as mx

    g = cand["group_size"]
    groups = weight.astype(mx.float32).reshape(weight.shape[0], -1, g)
    scales, biases = _affine_params(groups.min(-1), groups.max(-1), cand["bits"])
    return scales.astype(weight.dtype), biases.astype(weight.dtype)


def round_to_grid(w: mx.array, scales: mx.array, biases: mx.array, n_bins: mx.array) -> mx.array:
    """Codes (float32) of `w` rounded to nearest on the grid (all broadcast against each other)."""
    import mlx.core as mx

    return mx.clip(mx.round((w - biases) / scales), 0, n_bins)


# ---------------------------------------------------------------- GPTQ


def inverse_hessian_factor(hessian: mx.array, damp: float = DAMP, label: str = "") -> tuple[mx.array, float]:
    """(U, damping used): the upper Cholesky factor of (H + damping I)^-1 (float32), GPTQ's Hinv.

    `hessian_to_numpy` then `factor_numpy` (see there); `compensate` runs the second on a
    worker thread, overlapped with the previous Hessian's rounding."""
    import mlx.core as mx

    upper, used = factor_numpy(hessian_to_numpy(hessian, label), damp, label)
    return mx.array(upper), used


def hessian_to_numpy(hessian: mx.array, label: str = "") -> np.ndarray:
    """H as float64 numpy, checked finite (a non-finite H, inputs that overflowed, is a
    WriterError naming `label`). MLX work: call it on the thread that runs MLX."""
    import mlx.core as mx

    h = np.array(hessian.astype(mx.float32), dtype=np.float64)
    if not np.isfinite(h).all():
        raise WriterError(
            f"{label}: the calibration inputs are not finite (the float model overflows on the "
            "calibration text); refusing to write"
        )
    return h


def factor_numpy(h: np.ndarray, damp: float = DAMP, label: str = "") -> tuple[np.ndarray, float]:
    """(U float32, damping used) of a float64 H (modified in place): the upper Cholesky factor
    of (H + damping I)^-1.

    Float64 with numpy/SciPy's LAPACK, not MLX's CPU stream (whose Linux LAPACK is a slow
    reference one) and no MLX at all, so it can run on a worker thread (LAPACK releases the
    GIL) while the GPU rounds the previous Hessian's columns: on the H200 an 8B model's 32
    14336-wide down_proj factorisations take minutes of CPU (docs/weights.md, "Scale").
    Channels with a zero diagonal (never seen) get a unit diagonal (their columns are then
    rounded to nearest). The damping starts at `damp` times the mean diagonal and is raised
    tenfold while a factorisation fails or is not finite."""
    from scipy.linalg import lapack

    dead = np.diagonal(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diagonal(h)))
    for attempt in range(_DAMP_RETRIES + 1):
        lam = damp * (10**attempt) * mean
        a = h + lam * np.eye(h.shape[0])
        # (H + lam I) = R R^T with R upper (the Cholesky factor of the reversed matrix, reversed
        # back); then H^-1 = R^-T R^-1, so U = R^-1: two LAPACK calls, not three.
        try:
            upper_r = np.linalg.cholesky(a[::-1, ::-1])[::-1, ::-1]
        except np.linalg.LinAlgError:
            continue
        upper, info = lapack.dtrtri(np.ascontiguousarray(upper_r), lower=0)
        if info == 0 and np.isfinite(upper).all() and (np.diagonal(upper) > 0).all():
            return upper.astype(np.float32), damp * 10**attempt
    raise WriterError(f"{label}: the input Hessian cannot be factorised even with damping {damp * 10**_DAMP_RETRIES:g}")


def gptq_codes(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    n_bins: mx.array,
    hinv: mx.array,
    block_size: int = BLOCK_SIZE,
    order: mx.array | None = None,
) -> mx.array:
    """GPTQ's codes (float32, rows x cols) of `weight` on a fixed grid.

    weight: (rows, cols) float32; scales, biases: (rows, cols), the grid expanded to every
    column in the dtype it is stored in: a code's value is computed as mlx-lm's loader
    dequantizes it (q * scale + bias in that dtype, rounded after each operation), so the
    errors fed back are those of the weights as the written model holds them;
    n_bins: (rows, 1) 2**bits - 1 of each row (rows of several modules can share one H);
    hinv: the upper factor of the inverse Hessian (inverse_hessian_factor), in `order`;
    order: the column order (None: as is). Column i is rounded, its error e = (w_i - q_i) /
    U_ii spreads onto the later columns of its block at once (w_j -= e U_ij) and onto the
    columns after the block in one matmul when the block ends (GPTQ's lazy batch update).
    """
    import mlx.core as mx

    if order is not None:
        weight, scales, biases = (a[:, order] for a in (weight, scales, biases))
    rows, cols = weight.shape
    codes = []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = weight[:, i1:i2]
        s1, b1 = scales[:, i1:i2], biases[:, i1:i2]
        s1f, b1f = s1.astype(mx.float32), b1.astype(mx.float32)
        u1 = hinv[i1:i2, i1:i2]
        errs = []
        for i in range(i2 - i1):
            w = w1[:, i]
            q = round_to_grid(w, s1f[:, i], b1f[:, i], n_bins[:, 0])
            e = (w - (q.astype(s1.dtype) * s1[:, i] + b1[:, i]).astype(mx.float32)) / u1[i, i]
            # u1 is upper triangular: only columns i.. of the block move (column i itself
            # becomes its rounded value, which is recorded as q already).
            w1 = w1 - e[:, None] * u1[i][None, :]
            codes.append(q)
            errs.append(e)
        err = mx.stack(errs, axis=1)
        if i2 < cols:
            weight = mx.concatenate([weight[:, :i2], weight[:, i2:] - err @ hinv[i1:i2, i2:]], axis=1)
        mx.eval(codes[-(i2 - i1) :], weight)
    out = mx.stack(codes, axis=1)
    if order is not None:
        out = out[:, mx.argsort(order)]
    return out


# ---------------------------------------------------------------- packing and checks


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """mlx's packed affine weight (uint32, rows x cols * bits / 32) of integer `codes` (rows x cols).

    Every row is one little-endian bit stream, code j in bits [j * bits, (j + 1) * bits):
    the layout `mx.quantize` writes for every bit width (2/4/8 and the byte-packed 3/5/6
    alike; tested against it). Computed with MLX integer ops where the codes are (the GPU on
    CUDA): every 32 codes fill `bits` words in the same pattern, so each word is an OR of a
    few shifted code columns (at most 64 whole-array ops). The numpy bit-by-bit version this
    replaces took ~3 s per 4096 x 14336 module on one core, minutes for an 8B model.
    """
    import mlx.core as mx

    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} columns of {bits} bits do not fill whole uint32 words")
    c = codes.astype(mx.uint32)
    if cols % 32:  # zero codes up to whole blocks of 32; the words they alone fill are cut below
        c = mx.pad(c, [(0, 0), (0, -cols % 32)])
    c = c.reshape(rows, -1, 32)
    words = [mx.zeros(c.shape[:2], mx.uint32) for _ in range(bits)]
    for j in range(32):
        bit = j * bits
        w, sh = divmod(bit, 32)
        col = c[:, :, j]
        words[w] = words[w] | (col << sh)
        if sh + bits > 32:  # the code's high bits start the next word
            words[w + 1] = words[w + 1] | (col >> (32 - sh))
    packed = mx.stack(words, axis=-1).reshape(rows, -1)
    return packed[:, : cols * bits // 32]


def packed_module(path: str, codes: mx.array, scales: mx.array, biases: mx.array, cand: Candidate) -> dict[str, Any]:
    """{"weight", "scales", "biases"} of one module as mlx-lm stores it, checked.

    The packed weight is dequantized the way mlx-lm's loader does (`mx.dequantize` in the
    stored dtype); a non-finite code or dequantized value is a WriterError naming `path`:
    nothing non-finite is ever written.
    """
    import mlx.core as mx

    bits, g = cand["bits"], cand["group_size"]
    if not mx.isfinite(codes).all().item():
        raise WriterError(
            f"{path}: error-compensated rounding produced non-finite codes (non-finite weights or "
            "calibration inputs); refusing to write"
        )
    packed = pack_codes(codes, bits)
    written = mx.dequantize(packed, scales, biases, g, bits)
    if not mx.isfinite(written).all().item():
        raise WriterError(
            f"{path}: its {candidate_key(**cand)} weights would dequantize to non-finite values "
            f"in {scales.dtype} (non-finite or out-of-range float weights); refusing to write"
        )
    return {"weight": packed, "scales": scales, "biases": biases}


# ---------------------------------------------------------------- whole models


def _is_linear(module: Any) -> bool:
    import mlx.nn as nn

    return isinstance(module, nn.Linear)


def compensate(
    model: Any,
    layers: Mapping[str, Mapping[str, Any]],
    tokens: mx.array,
    write_dtypes: Mapping[str, Any],
    clip: Clipper | None = None,
    settings: GPTQSettings | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
    hessians: tuple[dict[str, mx.array], dict[str, str]] | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """GPTQ-written weights of the planned affine Linear modules of the float `model`.

    model: the float model at its compute dtype (float32 on a CPU), weights as the source has
    them; layers: the plan ({path: {"bits", "group_size", "mode"}}); tokens: (N, L)
    calibration tokens; write_dtypes: {path: the dtype stock convert writes that module's
    scales in (the cast float weight's)}; clip: the table's Clipper (same group ranges as
    the RTN writer), or None (stock ranges); batch_size: calibration samples per forward
    (default: what keeps the logits within 1 GiB); hessians: `input_hessians`' result for (at
    least) these modules on `tokens`, when the caller has it (several plans of one model);
    without it they are recorded here a few blocks at a time (`hessian_chunks`, at most
    _HESSIAN_BYTES of them at once, one partial forward per chunk).
    Returns ({path: {"weight", "scales", "biases"}} (packed_module), summary) where summary
    says which modules were compensated and which were left at round-to-nearest and why.
    """
    import mlx.core as mx
    from tqdm import tqdm

    settings = settings or GPTQSettings()
    log = log or (lambda msg: None)
    started = time.perf_counter()
    modules = dict(model.named_modules())
    jobs, left = {}, {}
    for path, choice in layers.items():
        if "group_size" not in choice:
            continue  # kept in float by the plan
        if choice.get("mode", "affine") != "affine":
            left[path] = f"{choice['mode']} (float format: round to nearest)"
        elif not _is_linear(modules.get(path)):
            left[path] = f"{type(modules.get(path)).__name__} (not a Linear layer: round to nearest)"
        else:
            jobs[path] = dict(choice)
    if hessians is not None:
        chunks = [(list(jobs), (dict(hessians[0]), hessians[1]))]
    else:  # recorded a few blocks at a time: all of a 70B model's Hessians would not fit
        chunks = [(c, None) for c in hessian_chunks(jobs, modules, _HESSIAN_BYTES)]
        if batch_size is None:  # only recording forwards use it
            vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 1
            batch_size = max(1, min(tokens.shape[0], _LOGITS_BYTES // (16 * int(vocab) * tokens.shape[1])))
    out, ratios, raised, n_hessians = {}, [], {}, 0
    # one worker: the next Hessian's LAPACK factorisation overlaps this one's rounding
    pool = ThreadPoolExecutor(max_workers=1)
    bar = tqdm(total=len(jobs), desc="GPTQ writing", unit="module", disable=not progress)
    try:
        for chunk, given in chunks:
            hs, group_of = given or input_hessians(model, chunk, tokens, batch_size)
            for path in [p for p in chunk if p not in group_of]:
                left[path] = "never called on float inputs (round to nearest)"
                del jobs[path]
            by_group: dict[tuple[str, Any], list[str]] = {}  # (input group, stored dtype): one matrix
            for path in chunk:
                if path in jobs:
                    by_group.setdefault((group_of[path], write_dtypes[path]), []).append(path)
            last_use = {key: i for i, (key, _) in enumerate(by_group)}
            n_hessians += len(last_use)
            items = list(by_group.items())

            def factor_next(i):
                """Start item i's factorisation on the worker thread (H to numpy here: MLX work)."""
                (key, _), paths = items[i]
                # (a copy of the caller's dict: each H is freed after its last use)
                h = hs.pop(key) if last_use[key] == i else hs[key]
                order = mx.argsort(-mx.diag(h)) if settings.act_order else None
                h_ordered = h[order][:, order] if order is not None else h
                label = ", ".join(paths)
                return (
                    h,
                    order,
                    label,
                    pool.submit(factor_numpy, hessian_to_numpy(h_ordered, label), settings.damp, label),
                )

            upcoming = factor_next(0) if items else None
            for i, (_, paths) in enumerate(items):
                h, order, label, factor = upcoming
                upcoming = factor_next(i + 1) if i + 1 < len(items) else None
                rows = []
                for p in paths:
                    cand = jobs[p]
                    w = modules[p].weight.astype(write_dtypes[p])
                    if clip is not None:
                        w = clip(p, w, cand)  # the clipped range: the grid the RTN writer and the sweep use
                    scales, biases = affine_grid(w, cand)
                    rows.append((p, cand, w, scales, biases))
                g_of = [c["group_size"] for _, c, *_ in rows]
                W = mx.concatenate([modules[p].weight.astype(write_dtypes[p]).astype(mx.float32) for p, *_ in rows])
                S = mx.concatenate([mx.repeat(s, g, axis=1) for (_, _, _, s, _), g in zip(rows, g_of)])
                B = mx.concatenate([mx.repeat(b, g, axis=1) for (_, _, _, _, b), g in zip(rows, g_of)])
                n_bins = mx.concatenate(
                    [mx.full((w.shape[0], 1), 2 ** c["bits"] - 1, dtype=mx.float32) for _, c, w, *_ in rows]
                )
                upper, damp = factor.result()
                hinv = mx.array(upper)
                if damp > settings.damp:
                    raised[label] = damp
                codes = gptq_codes(W, S, B, n_bins, hinv, settings.block_size, order)
                start = 0
                for p, cand, w, scales, biases in rows:
                    n = w.shape[0]
                    c = codes[start : start + n]
                    start += n
                    out[p] = packed_module(p, c, scales, biases, cand)
                    written = mx.dequantize(out[p]["weight"], scales, biases, cand["group_size"], cand["bits"])
                    ref = modules[p].weight.astype(write_dtypes[p])
                    rtn = mx.dequantize(
                        *mx.quantize(w, cand["group_size"], cand["bits"]), cand["group_size"], cand["bits"]
                    )
                    ratios.append(output_error(ref, written, h) / max(output_error(ref, rtn, h), 1e-30))
                del h, W, S, B, codes
                mx.clear_cache()
                bar.update(len(paths))
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - started
    summary = {
        "method": "gptq",
        "compensated": sorted(out),
        "round_to_nearest": dict(sorted(left.items())),
        "calibration_tokens": int(tokens.size),
        "output_error_vs_rtn_median": float(np.median(ratios)) if ratios else None,
        "damp": settings.damp,
        "raised_damp": raised,
        "act_order": settings.act_order,
        "seconds": seconds,
    }
    log(
        f"gptq: {len(out)} modules written with error compensation ({n_hessians} input Hessians from "
        f"{tokens.size} calibration tokens), {len(left)} left at round to nearest; calibration output error "
        f"vs round to nearest: median {summary['output_error_vs_rtn_median'] or 0:.3f}x; {seconds:.1f}s"
        + (f"; damping raised for {len(raised)} input(s) that could not be factorised" if raised else "")
    )
    return out, summary


def apply_to_model(model: Any, tensors: Mapping[str, Mapping[str, Any]]) -> None:
    """Put `compensate`'s tensors into a quantized in-memory `model` (as stock quantize_model left it),
    checking each module has the same format, shapes and dtypes."""
    modules = dict(model.named_modules())
    for path, arrays in tensors.items():
        m = modules.get(path)
        if m is None or "scales" not in m:
            raise WriterError(f"{path}: not a quantized module of the model")
        for name, arr in arrays.items():
            _check_same(f"{path}.{name}", m[name], arr, "the quantized model")
        m.update(dict(arrays))


def _check_same(key: str, old: Any, new: Any, where: str) -> None:
    if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
        raise RuntimeError(
            f"{key}: error-compensated tensor {tuple(new.shape)} {new.dtype} does not match "
            f"{tuple(old.shape)} {old.dtype} in {where}"
        )


def _shards(out_dir: Path, keys: Sequence[str]) -> list[str]:
    """Names of the safetensors files of `out_dir` holding any of `keys` (all when unindexed)."""
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({weight_map[k] for k in keys if k in weight_map})
    return sorted(p.name for p in out_dir.glob("model*.safetensors"))


def scales_dtypes(out_dir: str | Path, paths: Sequence[str]) -> dict[str, Any]:
    """{path: dtype of the scales stock mlx-lm wrote for that module in `out_dir`} (what GPTQ writes in)."""
    import mlx.core as mx

    out_dir = Path(out_dir)
    keys = {f"{p}.scales": p for p in paths}
    found = {}
    for name in _shards(out_dir, list(keys)):
        arrays = mx.load(str(out_dir / name))  # lazy: only dtypes are read
        found.update({keys[k]: a.dtype for k, a in arrays.items() if k in keys})
    missing = sorted(set(paths) - set(found))
    if missing:
        raise RuntimeError(f"{out_dir}: the written model has no scales for planned module(s) {missing[:5]}")
    return found


def write_compensated(out_dir: str | Path, tensors: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Replace the tensors of the modules in `tensors` in the safetensors stock mlx-lm wrote in `out_dir`.

    Same keys, shapes and dtypes as stock wrote (a mismatch is a bug: RuntimeError), each
    shard rewritten through a temporary file with its metadata kept. Returns the shards rewritten.
    """
    import mlx.core as mx

    out_dir = Path(out_dir)
    wanted = {f"{p}.{name}": arr for p, arrays in tensors.items() for name, arr in arrays.items()}
    rewritten, found = [], set()
    for name in _shards(out_dir, list(wanted)):
        path = out_dir / name
        arrays, meta = mx.load(str(path), return_metadata=True)
        hits = [k for k in arrays if k in wanted]
        if not hits:
            continue
        for k in hits:
            _check_same(k, arrays[k], wanted[k], str(path))
            arrays[k] = wanted[k]
        found.update(hits)
        tmp = path.with_name(f".{name}.optiq-tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        del arrays
        os.replace(tmp, path)
        rewritten.append(path)
    missing = sorted(set(wanted) - found)
    if missing:
        raise RuntimeError(f"{out_dir}: the written model has no tensor(s) {missing[:5]} to replace")
    return rewritten
