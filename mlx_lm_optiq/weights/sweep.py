"""Per-module quantization sensitivity: how much does quantizing one module move the output?

For every quantizable module (every `to_quantized` leaf: attention and MLP
projections, MoE experts, embeddings, lm_head) and every candidate
(bits, group_size, mode), the table holds the mean per-token KL divergence
KL(P_ref || P_probe) of the next-token distribution on calibration tokens, where
the probe model differs from the reference in that one module only.

Reference modes (what "ref" and "probe" are; the probes live in probes.py):
  float    ref = the float model; probe = float model with module m quantized
           (quantize -> dequantize) at candidate c. kl[m][c] is the damage of
           quantizing m alone at c. A quantized input checkpoint is dequantized
           first and that dequantization is the float reference.
  low-bit  for models whose float weights exceed memory. The base model is every
           module at its cheapest applicable candidate (real quantized modules,
           built one module at a time from the lazily loaded float checkpoint).
           For module m the reference is the base model with m raised to its most
           expensive applicable candidate ("top"); kl[m][c] = KL(P_{m at top} ||
           P_{m at c}), all other modules at their cheapest candidate. So
           kl[m][top] = 0 and kl[m][cheapest] is the loss from moving m down from
           top to cheapest. The values are losses relative to "m at top" measured
           in the low-bit context, comparable across modules and candidates, which
           is what the knapsack needs; they exclude the (unmeasured) damage of the
           top candidate itself.
  auto     float when the float model fits comfortably in memory, else low-bit; with
           method fisher and a quantized input, float held quantized instead (below).

Methods:
  exact    one forward per (module, candidate, batch). The reference logits and
           the hidden states entering every block are computed once per batch;
           a probe of a module in block i replays the recorded output of block
           i-1 and runs only blocks i.. (lm_head probes run only the head).
  fisher   one backward per calibration sample (float reference only): diagonal
           Fisher F = sum over samples of (d log p(y)/dW)^2 with y sampled from the
           model, and kl[m][c] ~= 0.5 * sum(F * (W - Q_c(W))^2) / num_tokens — the
           second-order estimate of the same KL, in the same units.

Held quantized (fisher, quantized input whose dequantization does not fit): the float
reference of a quantized input is its dequantization, but it need not be resident all
at once. The model stays as stored (QuantizedLinear/QuantizedEmbedding); the measured
modules are split into chunks that fit the memory budget (float weight + gradient at
the compute dtype + fp32 accumulator per parameter), and for each chunk its modules are
swapped for float ones holding their dequantized weights, every calibration sample's
backward runs with gradients for that chunk only, the chunk's predicted KL sums are
taken exactly as above, and the quantized modules go back. Same table as the float
reference (to float rounding: the modules outside the chunk compute with the quantized
kernels, whose dequantization is not rounded to the checkpoint's dtype), for samples x
chunks backward passes instead of samples; the labels are sampled once per sample, with
the same keys, from the held model. The table records it in `held_quantized`.

Group ranges (clipping="activation", the default): every probe quantizes with each
affine group's range clipped by activation-weighted error (clipping.py), from input
moments measured on the calibration tokens and stored in the table, so the writer
clips exactly what was measured. clipping="none": stock min/max ranges.

The table file itself (writing, reading, validating) is weights/table.py; the
command line is weights/cli.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lm_optiq.core.backend import warn_if_slow_blas
from mlx_lm_optiq.core.formats import applicable, candidate_key, check_with_mlx, parse_candidates
from mlx_lm_optiq.core.model_tree import (
    dequantize,
    float_dtype_of,
    float_leaf,
    quantizable_modules,
    resolve_model_path,
    set_module,
)
from mlx_lm_optiq.weights import clipping
from mlx_lm_optiq.weights.checkpoint import SweepCheckpoint
from mlx_lm_optiq.weights.probes import (
    FloatProbe,
    Forward,
    LowBitProbe,
    SensitivityError,
    kl_sum,
    log_line,
    model_bytes,
    qdq,
)
from mlx_lm_optiq.weights.table import METHODS

REFERENCE_MODES = ("auto", "float", "low-bit")
# Memory for the (batch, length, vocab) float32 arrays a probe holds at once
# (reference log-probs and probabilities, probe logits/log-probs).
_LOGITS_BUDGET_BYTES = 1 << 30
# auto picks the float reference when the float model takes at most this share of memory.
_FLOAT_SHARE = 0.6


@dataclass
class SweepSettings:
    """How a sweep measures (every field has the default `measure_sensitivity` uses).

    method: "exact" (one forward per probe) or "fisher" (float reference only).
    reference: "auto", "float" or "low-bit" (module docstring).
    clipping: "activation" (default): every probe quantizes the module's weight with
      group ranges clipped by activation-weighted error (clipping.py), input moments
      measured on the tokens and stored in the table so the writer clips identically;
      "none": stock min/max ranges.
    batch_size: samples per forward (default: what fits a 1 GiB logits budget).
    modules: measure only these module paths (default: every quantizable module).
    reuse_hidden_states: False runs the full model for every probe (for checking).
    batch_probes: stack the probes of a block's modules into shared forwards of the
      later blocks and the head (float reference, exact method); False: one forward
      per probe; None (default): stack on a GPU, not on the CPU (no gain there).
      Same numbers either way (to float rounding).
    dtype: compute dtype, an mx.Dtype or its name (default float32 on CPU, the
      checkpoint's float dtype elsewhere).
    memory_budget: bytes `reference="auto"` (and the held-quantized Fisher rule and its
      chunks) compare the float model against; on a GPU, stacked probe passes may use 10% of
      it (at least 1 GiB) for logits.
    seed: seed of the Fisher method's sampled labels.
    hold_quantized: fisher with a quantized input: keep the model quantized and make one
      chunk of modules float at a time (module docstring). None (default): when the
      dequantized model would not fit (`_FLOAT_SHARE` of the memory budget); True: always;
      False: never (the whole dequantized model is resident).
    chunk_bytes: bytes a held-quantized chunk may take (float weight + gradient at the
      compute dtype + fp32 accumulator, per parameter); None (default): `_FLOAT_SHARE` of
      the memory budget less what the quantized model takes. Small values force many chunks.
    checkpoint_path: resume file of an exact sweep (weights/checkpoint.py); a sharded
      sweep writes one per rank (PATH.rankR-of-N).
    """

    method: str = "exact"
    reference: str = "auto"
    clipping: str = "activation"
    batch_size: int | None = None
    modules: list[str] | None = None
    reuse_hidden_states: bool = True
    batch_probes: bool | None = None
    dtype: Any = None
    memory_budget: int | None = None
    seed: int = 0
    checkpoint_path: str | Path | None = None
    hold_quantized: bool | None = None
    chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SensitivityError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.reference not in REFERENCE_MODES:
            raise SensitivityError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.clipping not in clipping.METHODS:
            raise SensitivityError(f"clipping must be one of {clipping.METHODS}, got {self.clipping!r}")
        if self.hold_quantized and (self.method != "fisher" or self.reference == "low-bit"):
            raise SensitivityError(
                "hold_quantized holds the float reference of a Fisher sweep quantized: it needs method "
                f"'fisher' and the float reference, got method {self.method!r}, reference {self.reference!r}"
            )
        if self.chunk_bytes is not None and not self.chunk_bytes >= 1:
            raise SensitivityError(f"chunk_bytes must be a positive number of bytes, got {self.chunk_bytes!r}")
        if self.method == "fisher" and self.checkpoint_path is not None:
            raise SensitivityError(
                "a checkpoint resumes an exact sweep; method 'fisher' is one quick pass with nothing "
                "to resume: drop the checkpoint or measure with method 'exact'"
            )


def measure_sensitivity(
    model_path: str | Path,
    tokens: Any,
    candidates: str | Iterable[Any],
    settings: SweepSettings | None = None,
    *,
    progress: bool = True,
    group: Any = None,
    on_probe: Callable[[int, str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Measure the sensitivity table of the model at `model_path` (see the module docstring).

    tokens: (N, L) calibration tokens (core.calibration.load_calibration).
    candidates: "4:64,8:64", ["4:64", "mxfp4:32"], [(4, 64)] or candidate dicts.
    settings: how to measure (SweepSettings); `overrides` replace its fields by name,
      e.g. measure_sensitivity(path, tokens, "4:64", method="fisher", reference="float").
    group: an mx.distributed group; modules (exact) or samples (fisher) are split
      over its ranks and the results summed, so every rank returns the full table.
    on_probe(batch_index, module_path): called after each module finishes a batch.
    """
    import mlx.core as mx

    settings = replace(settings or SweepSettings(), **overrides)
    cands = check_with_mlx(parse_candidates(candidates))
    keys = [candidate_key(**c) for c in cands]
    tokens = mx.array(tokens)
    calib = _tokens_info(tokens)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)

    model_path = resolve_model_path(model_path)
    if rank == 0:
        warn_if_slow_blas()
    model, quantized_input, originals = _load_lazy(model_path)
    quant_dtype = float_dtype_of(model)
    if quantized_input is not None:
        log_line(
            f"{model_path} is quantized ({quantized_input.get('bits')}-bit, group "
            f"{quantized_input.get('group_size')}): the float reference is its dequantization",
            rank,
        )
    every_module = quantizable_modules(model)
    shapes = {p: list(m.weight.shape) for p, m in every_module.items()}
    fits = {p: applicable(shapes[p], cands) for p in every_module}
    measured = _measured_modules(every_module, settings.modules, model_path)
    for p in measured:
        if not fits[p]:
            log_line(f"{p}: input dim {shapes[p][-1]} fits no candidate group size; recorded with no KL entries", rank)

    dtype = settings.dtype
    if dtype is None:
        dtype = mx.float32 if mx.default_device() == mx.cpu else quant_dtype
    elif isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    reference = settings.reference
    budget = settings.memory_budget or _memory_budget()
    float_bytes = _float_bytes(model, dtype)
    float_fits = float_bytes <= _FLOAT_SHARE * budget
    hold = _hold_quantized(settings, quantized_input, reference, float_fits, model_path)
    if reference == "auto":
        reference = _auto_reference(float_bytes, float_fits, budget, rank, hold)
    if settings.method == "fisher" and reference != "float":
        raise SensitivityError(
            "method='fisher' needs gradients of the float model, so it needs reference='float' "
            "(the low-bit reference is only available with method='exact')"
        )
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max().item()) >= vocab or int(tokens.min().item()) < 0):
        raise SensitivityError(
            f"calibration tokens must be ids in [0, {vocab}) for {model_path}, got "
            f"[{tokens.min().item()}, {tokens.max().item()}] (tokenized with another model's tokenizer?)"
        )
    batch_size = settings.batch_size
    if batch_size is None:
        vocab_bytes = 4 * 4 * _vocab_size(model)
        batch_size = max(1, min(calib["num_samples"], _LOGITS_BUDGET_BYTES // (vocab_bytes * calib["sequence_length"])))
    batch_size = int(batch_size)

    table = {
        "model": str(model_path),
        "method": settings.method,
        "reference": reference,
        "calibration": calib,
        "candidates": cands,
        "float_reference": (
            "dequantized from the quantized input" if quantized_input is not None else "float checkpoint"
        ),
        "modules": {},
    }
    started = time.perf_counter(), time.process_time()

    def measure_moments():
        # Every rank measures on all tokens: identical moments, so identical clipping.
        moments = clipping.input_moments(model, list(measured), tokens, batch_size)
        log_line(f"clipping: input moments of {len(moments)} modules measured on {calib['tokens']} tokens", rank)
        return clipping.Clipper(moments)

    clipper = None
    if hold:
        # The model as stored (the originals back in place of their lazy dequantizations);
        # its float parameters (norms, scales, biases) at the compute dtype. The chunks
        # dequantize from scales cast back to the stored dtype: exact (fp16/bf16 -> fp32 -> back).
        stored = {p: m.scales.dtype for p, m in originals.items()}
        for p, m in originals.items():
            set_module(model, p, m)
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        table["reference_model_bytes"] = model_bytes(model)
        if settings.clipping != "none":
            clipper = measure_moments()
        chunk_limit = settings.chunk_bytes or int(_FLOAT_SHARE * budget) - table["reference_model_bytes"]
        if chunk_limit <= 0:
            raise SensitivityError(
                f"{model_path}: the quantized model alone takes {table['reference_model_bytes'] / 2**30:.2f} GiB, "
                f"over {_FLOAT_SHARE:.0%} of the {budget / 2**30:.1f} GiB memory budget: no room for float chunks"
            )
        sums, chunks = _held_fisher_sweep(
            model,
            {p: originals.get(p, m) for p, m in measured.items()},
            stored,
            fits,
            tokens,
            dtype,
            quant_dtype,
            chunk_limit,
            rank,
            size,
            group,
            progress,
            settings.seed,
            clipper,
        )
        table["float_reference"] = "dequantized from the quantized input, held quantized"
        table["held_quantized"] = {
            "chunks": len(chunks),
            "chunk_bytes": int(chunk_limit),
            "backward_passes": calib["num_samples"] * len(chunks),
        }
    elif reference == "float":  # both methods; fisher needs it (checked above)
        originals = {}  # the dequantized weights are all we need
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        if settings.clipping != "none":
            clipper = measure_moments()
    if hold:
        pass  # measured above
    elif settings.method == "fisher":
        sums = _fisher_sweep(
            model, measured, fits, tokens, quant_dtype, rank, size, group, progress, settings.seed, clipper
        )
    else:
        fingerprint = dict(
            model=str(model_path),
            method=settings.method,
            reference=reference,
            candidates=keys,
            calibration_sha256=calib["sha256"],
            batch_size=batch_size,
            modules=list(measured),
            dtype=str(dtype),
            rank=rank,
            size=size,
            clipping=settings.clipping,
        )
        ckpt_path = settings.checkpoint_path
        if ckpt_path is not None and size > 1:
            ckpt_path = f"{ckpt_path}.rank{rank}-of-{size}"
        ckpt = SweepCheckpoint(ckpt_path, fingerprint)
        mine = [p for i, p in enumerate(measured) if i % size == rank]
        if reference == "float":
            probe = FloatProbe(model, measured, fits, quant_dtype, clipper)
        else:
            probe = LowBitProbe(model_path, model, originals, fits, dtype, rank, progress)
            if settings.clipping != "none":
                # The float model is never resident here: the moments come from the low-bit
                # reference, which is then rebuilt with clipped ranges.
                clipper = measure_moments()
                probe.rebuild_clipped(clipper, measured, progress and rank == 0)
        # What the reference model occupies (the whole point of the low-bit mode).
        table["reference_model_bytes"] = model_bytes(model)
        probes_per_pass = _probes_per_pass(settings, batch_size, calib["sequence_length"], vocab)
        forward = _exact_sweep(
            model,
            probe,
            mine,
            tokens,
            batch_size,
            ckpt,
            settings.reuse_hidden_states,
            rank,
            progress,
            on_probe,
            probes_per_pass,
        )
        table["probes_per_pass"] = probes_per_pass if forward.batched else 1
        if forward.kl_floor is not None:
            table["stacked_probe_kl_floor"] = forward.kl_floor
        sums = ckpt.sums
        if size > 1:
            sums = _all_sum_table(sums, list(measured), keys, fits, group)

    held = f", held quantized in {len(chunks)} chunks" if hold else ""
    log_line(
        f"{settings.method} sweep ({reference} reference{held}, {len(measured)} modules, {len(cands)} candidates, "
        f"{calib['tokens']} tokens): {time.perf_counter() - started[0]:.1f}s wall, "
        f"{time.process_time() - started[1]:.1f}s CPU",
        rank,
    )
    table["clipping"] = clipping.to_table(settings.clipping, clipper.moments if clipper is not None else None)
    num_tokens = calib["tokens"]
    for p in measured:
        table["modules"][p] = {
            "num_params": int(np.prod(shapes[p])),
            "shape": shapes[p],
            "kl": {candidate_key(**c): sums.get(p, {})[candidate_key(**c)] / num_tokens for c in fits[p]},
        }
    return table


# ---------------------------------------------------------------- setting up


def _tokens_info(tokens):
    import mlx.core as mx

    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise SensitivityError(f"tokens must be a (num_samples, sequence_length >= 2) array, got {tokens.shape}")
    arr = np.asarray(tokens.astype(mx.int32))
    return {
        "num_samples": int(arr.shape[0]),
        "sequence_length": int(arr.shape[1]),
        "tokens": int(arr.size),
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
    }


def _load_lazy(model_path):
    """(model with lazy weights, the config's quantization or None, {path: original quantized module}).

    A quantized input is dequantized (still lazy); its original modules let the
    low-bit reference re-read one module's exact values.
    """
    from mlx_lm.utils import load_model

    model, config = load_model(model_path, lazy=True)
    model, originals = dequantize(model)
    return model, config.get("quantization"), originals


def _measured_modules(every_module, wanted, model_path):
    if wanted is None:
        return every_module
    unknown = sorted(set(wanted) - set(every_module))
    if unknown:
        raise SensitivityError(f"modules {unknown} are not quantizable modules of {model_path}")
    wanted = set(wanted)
    return {p: m for p, m in every_module.items() if p in wanted}


def _memory_budget():
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _float_bytes(model, dtype):
    """Bytes of the (lazily dequantized) float model at `dtype`."""
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters())) * dtype.size


def _hold_quantized(settings, quantized_input, reference, float_fits, model_path):
    """Whether a Fisher sweep holds its float reference quantized (module docstring): asked for,
    or by default a quantized input whose dequantized model does not fit, with the float
    reference (given or auto). The table is the same either way; only the memory differs."""
    if settings.method != "fisher" or reference == "low-bit" or settings.hold_quantized is False:
        return False
    if settings.hold_quantized:
        if quantized_input is None:
            raise SensitivityError(
                f"hold_quantized keeps a quantized input quantized, and {model_path} is a float checkpoint "
                "(its config.json has no 'quantization'): drop hold_quantized"
            )
        return True
    return quantized_input is not None and not float_fits


def _auto_reference(float_bytes, fits, budget, rank, hold=False):
    """ "float" when the float model (`float_bytes` at the compute dtype) `fits` (at most
    _FLOAT_SHARE of the `budget`), or when a Fisher sweep holds it quantized (`hold`); else
    "low-bit"."""
    reference = "float" if fits or hold else "low-bit"
    how = " (fisher: held quantized, dequantized a chunk of modules at a time)" if hold and not fits else ""
    log_line(
        f"reference=auto: float model needs {float_bytes / 2**30:.2f} GiB of {budget / 2**30:.1f} GiB -> "
        f"{reference}{how}",
        rank,
    )
    return reference


def _vocab_size(model):
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab is None:
        raise SensitivityError("cannot infer the vocabulary size (model.args.vocab_size); pass batch_size")
    return int(vocab)


def _probes_per_pass(settings, batch_size, sequence_length, vocab):
    """Probes stacked in one forward (exact method): 1 unless stacking is on and they fit the logits budget.

    Stacked probes of one pass hold ~3 (rows, length, vocab) arrays (logits, their float32
    copy, log-probs) plus the reference pass's log-probs and probabilities. The CPU gains
    nothing from bigger passes (it is compute bound), a GPU gains from fewer, larger ones
    (a small model's forward is launch bound).
    """
    import mlx.core as mx

    on_gpu = mx.default_device() != mx.cpu
    pass_bytes = _LOGITS_BUDGET_BYTES
    if on_gpu:
        pass_bytes = max(pass_bytes, int(0.1 * (settings.memory_budget or _memory_budget())))
    batch_probes = on_gpu if settings.batch_probes is None else settings.batch_probes
    if not batch_probes or vocab is None:
        return 1
    # + the in-pass reference log-probs and probabilities (8 bytes)
    return max(1, pass_bytes // (20 * batch_size * sequence_length * int(vocab)))


# ---------------------------------------------------------------- exact


def _exact_sweep(model, probe, mine, tokens, batch_size, ckpt, reuse, rank, progress, on_probe, probes_per_pass=1):
    """Run every pending (batch, module) probe; returns the Forward (its kl_floor, batched flag)."""
    import mlx.core as mx
    from tqdm import tqdm

    # Stacking needs at least 2 probes a pass; the low-bit probe keeps one forward per probe.
    forward = Forward(model, reuse, batch_probes=probes_per_pass > 1 and hasattr(probe, "run_block"))
    num = tokens.shape[0]
    batches = [(b, tokens[s : s + batch_size]) for b, s in enumerate(range(0, num, batch_size))]
    todo = sum(1 for b, _ in batches for p in mine if (b, p) not in ckpt.done)
    bar = tqdm(total=todo, desc="Sensitivity (exact)", unit="module", disable=not progress or rank != 0)
    checked = False
    for b, batch in batches:
        pending = [p for p in mine if (b, p) not in ckpt.done]
        if not pending:
            continue
        ref_lp = forward.reference(batch)
        ref_p = mx.exp(ref_lp)
        mx.eval(ref_p)
        if forward.layers and not checked:
            _check_replay(forward, batch, ref_lp, rank)
            checked = True
        i = 0
        while i < len(pending):
            block = forward.block_of(pending[i]) if forward.batched else None
            group = [pending[i]]
            # Modules of the same block share their stacked passes.
            while (
                block is not None
                and i + len(group) < len(pending)
                and forward.block_of(pending[i + len(group)]) == block
            ):
                group.append(pending[i + len(group)])
            i += len(group)
            bar.set_postfix_str(group[0] if len(group) == 1 else f"block {block} ({len(group)} modules)", refresh=False)
            if block is None:
                results = {group[0]: probe.run(group[0], forward, batch, forward.start_block(group[0]), ref_p, ref_lp)}
            else:
                results = probe.run_block(group, forward, batch, block, probes_per_pass)
            for path in group:
                ckpt.record(b, path, results[path])
                bar.update(1)
                if on_probe is not None:
                    on_probe(b, path)
        del ref_lp, ref_p
        forward.outputs = forward.calls = None
    bar.close()
    return forward


def _check_replay(forward, batch, ref_lp, rank):
    """Replaying recorded block outputs must reproduce the reference; else run full forwards."""
    import mlx.core as mx

    start = max(1, forward.num_blocks // 2)
    diff = mx.abs(forward(batch, start) - ref_lp).max().item()
    if not diff <= 1e-3:
        log_line(f"replaying block outputs changed the log-probs by {diff:.2e}: using full forwards", rank)
        forward.layers = None
        forward.batched = False
        return
    if forward.batched:
        # A stacked pass of [recorded output, block `start` re-run on its recorded inputs] must
        # reproduce the reference log-probs, and match a stacked pass of two recorded outputs
        # (the in-pass reference) exactly: kl_floor is their KL, 0.0 when rounding depends only
        # on a row's slot and the pass size, which is what run_block relies on.
        n = batch.shape[0]
        recorded = forward.outputs[start]
        lp = forward.stacked(batch, start, mx.concatenate([recorded, forward.block_output(start)]))
        ref = forward.stacked(batch, start, mx.concatenate([recorded, recorded]))
        diff = max(mx.abs(lp[:n] - ref_lp).max().item(), mx.abs(lp[n:] - ref_lp).max().item())
        if not diff <= 1e-3:
            log_line(f"stacking probes changed the log-probs by {diff:.2e}: one forward per probe", rank)
            forward.batched = False
            forward.calls = None
            return
        forward.kl_floor = kl_sum(mx.exp(ref), ref, lp) / (2 * batch.size)


def _all_sum_table(sums, paths, keys, fits, group):
    """Sum the ranks' partial tables (each (module, candidate) was measured by one rank)."""
    import mlx.core as mx

    index = {k: i for i, k in enumerate(keys)}
    local = np.zeros((len(paths), len(keys)), dtype=np.float64)
    for i, p in enumerate(paths):
        for k, v in sums.get(p, {}).items():
            local[i, index[k]] = v
    total = mx.distributed.all_sum(mx.array(local), group=group, stream=mx.cpu)
    total = np.array(total)
    return {
        p: {candidate_key(**c): float(total[i, index[candidate_key(**c)]]) for c in fits[p]}
        for i, p in enumerate(paths)
    }


# ---------------------------------------------------------------- fisher


_FISHER_CHUNK_BYTES = 1 << 30  # accumulator bytes updated per eval (`_accumulate`)
# Held quantized: what a chunk holds per parameter besides the compute-dtype float weight and
# its gradient (2 x dtype size): the float32 Fisher accumulator.
_ACCUMULATOR_BYTES = 4


def _fisher_loss(model, x, key):
    """Summed cross-entropy of labels sampled from the model's own logits (key: the sample's)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(x).astype(mx.float32)
    # Labels sampled from the model make E[g g^T] the true Fisher (not the empirical one).
    y = mx.random.categorical(mx.stop_gradient(logits), key=key)
    return nn.losses.cross_entropy(logits, y, reduction="sum")


def _labelled_loss(model, x, y):
    """Summed cross-entropy of given labels (held quantized: sampled once per sample, `_sample_labels`)."""
    import mlx.core as mx
    import mlx.nn as nn

    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="sum")


def _sample_key(seed, i):
    """The key of sample i's labels (the same in the resident and the held-quantized sweep)."""
    import mlx.core as mx

    return mx.random.key(seed * 1_000_003 + i)


def _accumulate(fisher, grads, paths):
    """fisher[p] += grad(p.weight)^2 in float32 for `paths`, a few modules per eval.

    One update of every module at once holds an fp32 copy and a square of every gradient
    beside both accumulators (an 8B model: ~150 GB, out of memory on an H200); in chunks of
    _FISHER_CHUNK_BYTES the peak is the gradients, the accumulators and one chunk's temporaries."""
    import mlx.core as mx

    chunk, chunk_bytes = [], 0
    for p in paths:
        fisher[p] = fisher[p] + grads.pop(f"{p}.weight").astype(mx.float32) ** 2
        chunk.append(fisher[p])
        chunk_bytes += fisher[p].nbytes
        if chunk_bytes >= _FISHER_CHUNK_BYTES:
            mx.eval(chunk)
            chunk, chunk_bytes = [], 0
    mx.eval(chunk)


def _predicted_sums(fisher, weights, fits, quant_dtype, clipper, bar=None):
    """{path: {key: 0.5 * sum(F * (W - Q_c(W))^2)}} for `weights` {path: float weight at the compute dtype}:
    each weight as the writer quantizes it (in the checkpoint's dtype, clipped by `clipper`)."""
    import mlx.core as mx

    sums = {}
    for p, weight in weights.items():
        w = weight.astype(quant_dtype)
        sums[p] = {}
        for c in fits[p]:
            err = (w - qdq(clipper(p, w, c) if clipper is not None else w, c)).astype(mx.float32)
            sums[p][candidate_key(**c)] = 0.5 * (fisher[p] * err * err).sum().item()
        if bar is not None:
            bar.update(1)
    return sums


def _fisher_sweep(model, modules, fits, tokens, quant_dtype, rank, size, group, progress, seed, clipper=None):
    """Diagonal Fisher from one backward per sample (model already at its compute dtype);
    returns {path: {key: predicted KL sum}}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from tqdm import tqdm

    model.freeze()
    for m in modules.values():
        m.unfreeze(keys=["weight"], recurse=False)
    grad_fn = nn.value_and_grad(model, _fisher_loss)
    fisher = {p: mx.zeros(m.weight.shape, dtype=mx.float32) for p, m in modules.items()}
    mine = [i for i in range(tokens.shape[0]) if i % size == rank]
    for i in tqdm(mine, desc="Sensitivity (fisher)", unit="sample", disable=not progress or rank != 0):
        _, grads = grad_fn(model, tokens[i : i + 1], _sample_key(seed, i))
        grads = dict(tree_flatten(grads))
        mx.eval(grads)
        _accumulate(fisher, grads, modules)
        del grads
    model.unfreeze()
    if size > 1:
        for p in modules:
            fisher[p] = mx.distributed.all_sum(fisher[p], group=group, stream=mx.cpu)
    desc = "Fisher: clipped quantization errors" if clipper is not None else "Fisher: quantization errors"
    with tqdm(total=len(modules), desc=desc, unit="module", disable=not progress or rank != 0) as bar:
        return _predicted_sums(fisher, {p: m.weight for p, m in modules.items()}, fits, quant_dtype, clipper, bar)


# ---------------------------------------------------------------- fisher, held quantized


def held_chunks(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Paths in order, split greedily into chunks of at most `limit` (sizes: {path: bytes}); a
    module over the limit alone is a chunk of its own (the limit is a share of memory, not all of it)."""
    chunks, current, used = [], [], 0
    for p, n in sizes.items():
        if current and used + n > limit:
            chunks.append(current)
            current, used = [], 0
        current.append(p)
        used += n
    if current:
        chunks.append(current)
    return chunks


def _float_module(module, stored_dtype, dtype):
    """The float module of a quantized one, exactly as mlx_lm's `dequantize_model` makes it
    (`model_tree.float_leaf`, with the scales back in the checkpoint's dtype `stored_dtype`: the
    held model's were cast to the compute dtype), cast to `dtype`."""
    scales = {k: module[k] for k in ("scales", "biases") if module.get(k) is not None}
    module.update({k: v.astype(stored_dtype) for k, v in scales.items()})
    try:
        out = float_leaf(module)
    finally:
        module.update(scales)
    out.set_dtype(dtype)
    return out


def _sample_labels(model, tokens, mine, seed):
    """{i: labels of sample i sampled from the held model's logits with `_sample_key`} (one forward each)."""
    import mlx.core as mx

    labels = {}
    for i in mine:
        logits = model(tokens[i : i + 1]).astype(mx.float32)
        labels[i] = mx.random.categorical(logits, key=_sample_key(seed, i))
        mx.eval(labels[i])
        del logits
    return labels


def _held_fisher_sweep(
    model,
    modules,
    stored,
    fits,
    tokens,
    dtype,
    quant_dtype,
    chunk_limit,
    rank,
    size,
    group,
    progress,
    seed,
    clipper=None,
):
    """The Fisher sweep with the model held quantized: ({path: {key: predicted KL sum}}, chunks).

    modules: {path: the module at that path now (quantized, or float where the input left it
    float)}; stored: {path: scales dtype} of the quantized ones. The measured modules with a
    candidate are split into chunks of at most `chunk_limit` bytes (float weight + gradient at
    `dtype` + the fp32 accumulator per parameter, `held_chunks`); per chunk: its quantized
    modules become float (their dequantization), one backward per sample with gradients for
    the chunk only, the chunk's predicted KL sums, the quantized modules back. Cost: samples x
    chunks backward passes (plus one forward per sample for the labels), against one backward
    per sample with the whole float model resident."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from tqdm import tqdm

    per_param = 2 * dtype.size + _ACCUMULATOR_BYTES
    sizes = {
        p: int(np.prod(_float_shape(m) if p in stored else m.weight.shape)) * per_param
        for p, m in modules.items()
        if fits[p]
    }
    chunks = held_chunks(sizes, chunk_limit)
    mine = [i for i in range(tokens.shape[0]) if i % size == rank]
    log_line(
        f"fisher, held quantized: {len(sizes)} modules in {len(chunks)} chunks of at most "
        f"{chunk_limit / 2**30:.2f} GiB (float weight, gradient, fp32 accumulator): "
        f"{len(mine)} samples x {len(chunks)} chunks = {len(mine) * len(chunks)} backward passes",
        rank,
    )
    for p in sizes:
        if sizes[p] > chunk_limit:
            log_line(f"{p}: {sizes[p] / 2**30:.2f} GiB alone, over the chunk limit: a chunk of its own", rank)
    model.freeze()
    labels = _sample_labels(model, tokens, mine, seed)
    grad_fn = nn.value_and_grad(model, lambda m, x, y: _labelled_loss(m, x, y))
    sums = {p: {} for p in modules}
    desc = "Sensitivity (fisher, held quantized)"
    bar = tqdm(total=len(chunks) * len(mine), desc=desc, unit="backward", disable=not progress or rank != 0)
    desc = "Fisher: clipped quantization errors" if clipper is not None else "Fisher: quantization errors"
    errors = tqdm(total=len(sizes), desc=desc, unit="module", position=1, disable=not progress or rank != 0)
    try:
        for n, chunk in enumerate(chunks):
            floats = {p: _float_module(modules[p], stored[p], dtype) if p in stored else modules[p] for p in chunk}
            try:
                for p, m in floats.items():
                    m.freeze()
                    m.unfreeze(keys=["weight"], recurse=False)
                    set_module(model, p, m)
                mx.eval([m.weight for m in floats.values()])
                fisher = {p: mx.zeros(m.weight.shape, dtype=mx.float32) for p, m in floats.items()}
                for i in mine:
                    bar.set_postfix_str(f"chunk {n + 1}/{len(chunks)}", refresh=False)
                    _, grads = grad_fn(model, tokens[i : i + 1], labels[i])
                    grads = dict(tree_flatten(grads))
                    mx.eval(grads)
                    _accumulate(fisher, grads, chunk)
                    del grads
                    bar.update(1)
                if size > 1:
                    for p in chunk:
                        fisher[p] = mx.distributed.all_sum(fisher[p], group=group, stream=mx.cpu)
                weights = {p: m.weight for p, m in floats.items()}
                sums.update(_predicted_sums(fisher, weights, fits, quant_dtype, clipper, errors))
            finally:
                for p in chunk:
                    set_module(model, p, modules[p])
            del floats, fisher, weights
            mx.clear_cache()
    finally:
        bar.close()
        errors.close()
        model.unfreeze()
    return sums, chunks


def _float_shape(module):
    """(out, in) of a quantized module's float weight (packed weights hold 32 // bits values per word)."""
    shape = list(module.weight.shape)
    shape[-1] = shape[-1] * 32 // module.bits
    return shape
