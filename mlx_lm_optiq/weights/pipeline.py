"""The weights feature end to end: `WeightsConfig` in, a plan for stock convert out.

    result = plan_weights(config, "org/model", staging_dir=tmp)   # before stock convert
    if result.direct:                                              # rtn from a quantized source
        write_model(result, out_dir)
    else:
        mlx_lm.convert(..., quant_predicate=result.quant_predicate, ...)
    finish_weights(result, out_dir, config)                        # after it

`plan_weights` resolves the model, loads or measures the per-module sensitivity table, checks
it against the model and plans bits per module exactly under the budget. A quantized source
written with rtn is written by `write_model` instead of stock convert (stock `-q` cannot
re-quantize quantized layers): module by module from the quantized source, never the whole
dequantized model; with gptq it is dequantized to a float copy that stock convert re-quantizes
(`model_tree.write_float_source`). `finish_weights` reloads
the written model with stock mlx-lm to check every layer and the BPW, rewrites a
multi-modal checkpoint as text only when asked, and writes optiq_metadata.json.
Data flows one way: this module calls the weights modules and core, never back.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core import backend as _backend
from mlx_lm_optiq.core import calibration, model_tree
from mlx_lm_optiq.core.config import ConfigError, spell_fields
from mlx_lm_optiq.core.durations import format_duration
from mlx_lm_optiq.core.formats import Candidate, FormatError, candidate_key, parse_candidates, top_level_quantization
from mlx_lm_optiq.weights import clipping, distill, gptq, metadata, plan, sweep, text_only
from mlx_lm_optiq.weights.config import (
    DISTILL_DEFAULT_MAX_S,
    EXACT_DEFAULT_MAX_S,
    GPTQ_NEEDS_FLOAT,
    GPTQ_NEEDS_RESIDENT,
    LOW_BIT_BELOW_BPW,
    WeightsConfig,
    added_low_bit_candidates,
    measurement_defaults,
)

# The dequantized copy of a quantized source, inside the convert's staging directory.
FLOAT_SOURCE_DIR = ".optiq-float-source"


def _info(msg: str) -> None:
    print(f"[INFO] optiq: {msg}", file=sys.stderr)


@dataclass
class WeightsPlanResult:
    """What stock convert needs to write the planned model, and what the sidecar records.

    float_source: the dequantized copy stock convert must read instead of the quantized
    source (None when the source is float, or when `direct`). direct: the model is written by
    `write_model` from the quantized source, one module at a time, instead of by stock convert
    (rtn from a quantized source). quantization: the top-level
    (group_size, bits, mode) of the converted config (`core.formats.top_level_quantization`).
    writer: "rtn" (stock convert's rounding is final) or "gptq" (`finish_weights` rewrites the
    planned affine modules with error-compensated codes from `tokens`, the calibration tokens,
    reading the float weights from float_source or `model_path`, clipped by `clipper`).
    """

    table: dict[str, Any]
    plan: dict[str, Any]
    candidates: list[Candidate]
    base_model: str
    float_source: Path | None
    quant_predicate: Callable[..., Any]
    quantization: tuple[int, int, str]
    writer: str = "rtn"
    tokens: Any = None
    model_path: Path | None = None
    clipper: clipping.Clipper | None = None
    direct: bool = False


def plan_weights(
    config: WeightsConfig,
    model: str | Path,
    *,
    staging_dir: str | Path,
    dtype: str | None = None,
    revision: str | None = None,
    spell: Callable[[str], str] = str,
) -> WeightsPlanResult:
    """Plan the mixed-precision conversion of `model` (a local path or a hub id) for `config`.

    staging_dir: where a dequantized float source may be written (the convert's staging
    directory: removed with it). dtype, revision: stock convert's arguments of those names.
    Re-planning from `config.sensitivity` chooses from the table's candidates when the config
    names none (`config.candidates` None), else from the named ones, which the table must hold.
    Before measuring it prints `measurement_line` (fields spelled by `spell`: the convert hook
    spells them as its flags).
    """
    if config.target_bpw is None:
        raise ConfigError("target_bpw", "is needed to plan mixed precision")
    # Everything that needs no measurement is checked first, cheapest first: a bad file, flag
    # or target fails in seconds, never after minutes of dequantizing and measuring.
    table, source, candidates = None, "measured sensitivity", config.candidates
    if config.sensitivity is not None:
        source = str(config.sensitivity)
        table = metadata.load_sensitivity(source)
        candidates = _table_candidates(table, candidates, source)
        writer = resolve_writer(config, table)
        hint = low_bit_hint(candidates, config.target_bpw, source, spell) if config.candidates is None else None
        if hint:
            _info(hint)
        if config.distill_steps:
            distill_calibration(config, table, source)  # a ConfigError before any work, or drops a default
    model_path = model_tree.resolve_model_path(model, revision)
    quantized = model_tree.is_quantized_checkpoint(model_tree.read_model_config(model_path))
    tokens = calibration_tokens(model_path, config) if table is None else None
    if table is not None and writer == "gptq":  # re-planning: gptq rounds on the table's own calibration
        tokens = table_calibration_tokens(model_path, table, source)
    # Lazily loaded (a quantized source lazily dequantized): only shapes and dtypes are read here.
    float_model, model_config = model_tree.load_float_model(model_path)
    if table is None:
        plan.check_feasible(float_model, model_config, candidates, config.target_bpw, dtype, config.protect)
    else:
        plan.check_table_matches(table, float_model, source)
    params = parameter_count(float_model)
    distill_length = distill_calibration(config, table or {}, source)[1] if config.distill_steps else 0
    fit_distill_to_model(config, params, distill_length)
    if table is None:
        fit_method_to_model(config, params, candidates, quantized=quantized)
        held = held_chunks_estimate(model_path, params) if holds_quantized(config, params, quantized) else 0
        if held and config.writer == "gptq":
            raise ConfigError("writer", GPTQ_NEEDS_RESIDENT)
        _info(measurement_line(config, candidates, params, spell, held_chunks=held))
        table = measure(model_path, config, tokens)
        plan.check_table_matches(table, float_model, source)
        writer = resolve_writer(config, table)
    result = plan.plan_for_model(
        float_model,
        model_config,
        table,
        candidates,
        config.target_bpw,
        dtype=dtype,
        protect=config.protect,
        source=source,
    )
    del float_model
    _info(
        f"planned {result['achieved_bpw']:.4f} bits per weight "
        f"(target {config.target_bpw}, cheapest possible {result['min_bpw']:.4f})"
    )
    _info(f"writer: {writer} ({writer_reason(config, table)})")
    line = distill_line(config, params, distill_length, spell)
    if line:
        _info(line)
    clipper = clipping.from_table(table)  # one Clipper: the alphas stock's writing finds, gptq reuses
    # A quantized source: rtn re-quantizes it module by module (`write_model`); gptq rewrites what
    # stock convert wrote from the dequantized float copy.
    direct, float_source = quantized and writer == "rtn", None
    if quantized and not direct:
        _info("dequantizing the quantized source to re-quantize it (the gptq writer reads the float copy)")
        float_source = model_tree.write_float_source(model_path, Path(staging_dir) / FLOAT_SOURCE_DIR)
    return WeightsPlanResult(
        table=table,
        plan=result,
        candidates=candidates,
        base_model=str(model),
        float_source=float_source,
        quant_predicate=plan.quant_predicate(result["layers"], clipper),
        quantization=top_level_quantization(candidates),
        writer=writer,
        tokens=tokens if writer == "gptq" else None,
        model_path=model_path,
        clipper=clipper,
        direct=direct,
    )


def write_model(
    result: WeightsPlanResult,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Write the planned model of a quantized source (`result.direct`) into `out_dir` as stock
    convert would write it from the dequantized copy, without that copy: the source loaded lazily
    with stock `load`, each module dequantized and re-quantized at its planned format (clipped as
    the table records) and evaluated before the next (`model_tree.requantize_leaves`), then saved
    with stock `save` (weights, config, tokenizer, the source's *.py and generation_config.json).
    Memory: the written model, the source modules not yet read, one float module. dtype,
    trust_remote_code: stock convert's arguments of those names."""
    from mlx_lm.utils import compute_bits_per_weight, load, save

    out_dir = Path(out_dir)
    _info("re-quantizing the quantized source module by module (no dequantized copy)")
    model, tokenizer, config = load(
        str(result.model_path),
        tokenizer_config={"trust_remote_code": trust_remote_code},
        lazy=True,
        return_config=True,
        trust_remote_code=trust_remote_code,
    )
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config = model_tree.requantize_leaves(
        model,
        config,
        result.quantization,
        result.quant_predicate,
        dtype=model_tree.conversion_dtype(config, dtype),
        progress=progress,
    )
    _info(f"re-quantized: {compute_bits_per_weight(model):.3f} bits per weight")
    save(out_dir, result.model_path, model, tokenizer, config)
    return out_dir


# Measured times of the 134.5M-parameter bundled model (docs/weights.md), from which
# `typical_seconds` scales a rough estimate for another model and calibration size.
_BUNDLED_PARAMS = 134.5e6


def typical_seconds(backend: str, method: str, params: int, tokens: int, candidates: list[Candidate]) -> float:
    """Rough seconds of a sweep (plus the gptq writer on a CPU), scaled from what was measured.

    CPU (2 cores, OpenBLAS), the bundled model, scaled linearly in parameters, calibration tokens
    and candidates: fisher 528 s on 16x256 tokens with 15 affine candidates, ~240 s of it the
    clipping search (per affine candidate, not per token); the gptq writer ~95 s; the exact sweep
    27.6 s for 21 of 211 modules x 2 candidates x 128 tokens. GPU (H200; Metal was not measured):
    the exact sweep 56 s for the bundled model x 16 candidates and 135 s for an 8B-shaped llama x 2
    candidates, both on 16x512 tokens (issue 13): per candidate and token it grows as parameters
    to the power 0.725 (a bigger model keeps the GPU busier), linear in candidates and tokens.
    Fisher 8.3 s for the bundled model on 8x256 tokens and 19 s for the 8B shape on 16x512 (2
    candidates, before the clipping search existed): mostly fixed costs at these sizes, so only
    parameters to the power 0.2 and linear in tokens, which errs long for big models."""
    size = params / _BUNDLED_PARAMS
    affine = sum(1 for c in candidates if c["mode"] == "affine")
    if backend == "cpu":
        clip = 240.0 * affine / 15
        if method == "fisher":
            return size * (288.0 * tokens / 4096 + clip + 95.0)
        return size * (27.6 * (211 / 21) * (len(candidates) / 2) * (tokens / 128) + clip + 95.0)
    if method == "exact":
        return 56.0 * size**0.725 * (tokens / 8192) * (len(candidates) / 16)
    return 8.3 * size**0.2 * (tokens / 2048)


def measurement_line(
    config: WeightsConfig,
    candidates: list[Candidate],
    params: int,
    spell: Callable[[str], str] = str,
    *,
    held_chunks: int = 0,
) -> str:
    """The one line that says what a measuring convert runs, on which backend, for about how long.

    Backend, method, candidates, calibration size, writer and a rough time (`typical_seconds`);
    which settings came from the backend's defaults, and on a CPU what a GPU would run instead
    and what that would cost here (the user can ask for it explicitly). held_chunks: when the sweep
    will hold the float reference quantized (`holds_quantized`), about how many chunks
    (`held_chunks_estimate`; 0: not held): said, with the backward passes that makes (the rough
    time counts the resident sweep's, so it errs short), and the writer is rtn."""
    c = config
    backend = c.backend or "cpu"
    samples, length = c.num_samples, c.sequence_length
    tokens = samples * length
    writer = c.writer or ("rtn" if c.reference == "low-bit" or held_chunks else gptq.DEFAULT_WRITER)
    keys = ",".join(candidate_key(**x) for x in candidates)
    where = "2 CPU cores" if backend == "cpu" else "an H200"
    line = (
        f"weights sensitivity on {backend}: method {c.sensitivity_method}, {len(candidates)} candidates "
        f"({keys}), calibration {samples}x{length} tokens of {c.calibration or 'the bundled set'}, writer "
        f"{writer}: ~{format_duration(typical_seconds(backend, c.sensitivity_method, params, tokens, candidates))} "
        f"(rough: measured times on {where}, scaled to {params / 1e6:.0f}M parameters)"
    )
    if held_chunks:
        line += (
            f"; float reference held quantized (its dequantization does not fit in memory): ~{held_chunks} "
            f"chunks of modules, one backward per sample and chunk (~{held_chunks * samples} backward passes, "
            f"the time above counts {samples}; rtn because gptq loads the whole float model)"
        )
    if c.method_note:
        line += "; method " + spell_fields(c.method_note, spell)
    if c.defaulted:
        line += f"; {backend} defaults for {', '.join(spell(n) for n in c.defaulted)}"
        gpu, own = measurement_defaults("gpu"), measurement_defaults(backend)
        added = added_low_bit_candidates(c.target_bpw)
        if "candidates" in c.defaulted and added:
            line += f" (with {added}: the target is below {LOW_BIT_BELOW_BPW} BPW)"
        chosen = {n: getattr(own, n) if n == "candidates" else getattr(c, n) for n in c.defaulted}
        other = [f"{spell(n)} {getattr(gpu, n)}" for n in c.defaulted if getattr(gpu, n) != chosen[n]]
        if backend == "cpu" and other:
            method = gpu.sensitivity_method if "sensitivity_method" in c.defaulted else c.sensitivity_method
            length = gpu.sequence_length if "sequence_length" in c.defaulted else length
            here = typical_seconds("cpu", method, params, samples * length, candidates)
            line += f" (GPU defaults: {' '.join(other)}, ~{format_duration(here)} on this CPU)"
    return line


def parameter_count(model: Any) -> int:
    """Values in `model`'s parameters (shapes only: a lazily loaded model stays unloaded)."""
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _float_fits(params: int) -> bool:
    """Whether the float model fits where `reference` auto measures with it (sweep's own rule)."""
    import mlx.core as mx

    size = 4 if mx.default_device() == mx.cpu else 2  # the sweep's compute dtype: fp32 on a CPU
    return params * size <= sweep._FLOAT_SHARE * sweep._memory_budget()


def fit_method_to_model(
    config: WeightsConfig, params: int, candidates: list[Candidate], *, quantized: bool = False
) -> None:
    """Adjust a defaulted `sensitivity_method` to the model's size (`method_for_model`; quantized:
    the source is a quantized checkpoint), saying why in `method_note`. A method the user gave, or
    one already adjusted, is left alone."""
    if "sensitivity_method" not in config.defaulted or config.method_note is not None:
        return
    config.sensitivity_method, config.method_note = method_for_model(
        config.sensitivity_method,
        backend=config.backend or "cpu",
        params=params,
        tokens=config.num_samples * config.sequence_length,
        candidates=candidates,
        checkpoint=config.checkpoint,
        reference=config.reference,
        quantized=quantized,
    )


def held_chunks_estimate(model_path: str | Path, params: int) -> int:
    """About how many chunks a held-quantized Fisher sweep of the quantized checkpoint at
    `model_path` (`params` float parameters) takes: the sweep's rule (weights/sweep.py) with the
    quantized model's size read from its safetensors files instead of loading it."""
    import math

    import mlx.core as mx

    size = 4 if mx.default_device() == mx.cpu else 2  # the sweep's compute dtype, as `_float_fits`
    stored = sum(f.stat().st_size for f in Path(model_path).glob("model*.safetensors"))
    room = sweep._FLOAT_SHARE * sweep._memory_budget() - stored
    need = params * (2 * size + sweep._ACCUMULATOR_BYTES)
    return max(1, math.ceil(need / room)) if room > 0 else 1


def holds_quantized(config: WeightsConfig, params: int, quantized: bool) -> bool:
    """Whether the sweep will hold the float reference quantized (weights/sweep.py, "Held
    quantized"): fisher on a quantized source whose dequantized model does not fit in memory,
    with the float reference (given or auto). The sweep decides from the same rule; the table it
    writes records what it did (`held_quantized`), which is what the writer follows."""
    return (
        quantized
        and config.sensitivity_method == "fisher"
        and config.reference in (None, "auto", "float")
        and not _float_fits(params)
    )


def method_for_model(
    method: str,
    *,
    backend: str,
    params: int,
    tokens: int,
    candidates: list[Candidate],
    checkpoint: str | None,
    reference: str | None,
    quantized: bool = False,
) -> tuple[str, str | None]:
    """The backend's default `method` fitted to a model of `params` parameters: (method, why it
    changed or None). The convert (`fit_method_to_model`) and the table command ask this;
    quantized: the source is a quantized checkpoint (both read it from its config.json).

    A fisher default needs the float reference: when `reference` auto will pick the low-bit one
    (the float model does not fit), exact instead — unless the source is quantized: then fisher
    holds it quantized and dequantizes a chunk of modules at a time (weights/sweep.py). An exact
    default (a GPU) costs one forward of the blocks after each module per module and candidate:
    when its rough time (`typical_seconds`) is over EXACT_DEFAULT_MAX_S and fisher can run (the
    float model fits, no checkpoint to resume, not the low-bit reference), fisher, which planned
    within 3% KL of exact on the GPU benchmark and took 19 s where exact x 2 candidates took
    135 s (8B shape). Where the float model does not fit, exact needs the low-bit reference (a
    70B: 80 blocks x 16 candidates, hours); a quantized source then measures with fisher held
    quantized instead."""
    fits = _float_fits(params)
    can_hold = quantized and checkpoint is None and reference in (None, "auto", "float")
    if method == "fisher":
        if reference in (None, "auto") and not fits and not can_hold:
            return "exact", "exact: the float model does not fit in memory, and fisher needs it"
        return method, None
    if checkpoint is not None or reference == "low-bit":
        return method, None
    if not fits:
        if not can_hold:
            return method, None
        exact = typical_seconds(backend, "exact", params, tokens, candidates)
        return "fisher", (
            f"fisher: the dequantized model does not fit in memory, so exact would run on the low-bit "
            f"reference (~{format_duration(exact)} or more); fisher holds the model quantized and makes "
            "a chunk of modules float at a time (give `sensitivity_method` exact to run exact)"
        )
    exact = typical_seconds(backend, "exact", params, tokens, candidates)
    if exact <= EXACT_DEFAULT_MAX_S:
        return method, None
    return "fisher", (
        f"fisher: the exact sweep would take ~{format_duration(exact)} on this model "
        f"(over {format_duration(EXACT_DEFAULT_MAX_S)}; give `sensitivity_method` exact to run it)"
    )


def resolve_writer(config: WeightsConfig, table: dict[str, Any]) -> str:
    """The writer of this conversion: `config.writer`, else gptq.DEFAULT_WRITER; rtn for a table
    measured with the low-bit reference (gptq needs the float model's inputs) or with the float
    reference held quantized (gptq loads the whole float model, which did not fit): a ConfigError
    on `writer` when gptq was asked for explicitly."""
    if table.get("reference") == "low-bit":
        if config.writer == "gptq":
            raise ConfigError("writer", GPTQ_NEEDS_FLOAT)
        return "rtn"
    if table.get("held_quantized"):
        if config.writer == "gptq":
            raise ConfigError("writer", GPTQ_NEEDS_RESIDENT)
        return "rtn"
    return config.writer or gptq.DEFAULT_WRITER


def writer_reason(config: WeightsConfig, table: dict[str, Any]) -> str:
    """Why `resolve_writer` chose what it chose, for the one line the convert prints."""
    if config.writer is not None:
        return "as asked"
    if table.get("reference") == "low-bit":
        return "round to nearest: the table was measured with the low-bit reference and gptq needs the float model"
    if table.get("held_quantized"):
        return (
            "round to nearest: the dequantized model does not fit in memory (the sweep held it quantized), "
            "and gptq loads it whole and factorises every layer's input Hessian on the CPU (a 70B's "
            "28672-wide ones: over an hour)"
        )
    return "the default: error-compensated rounding on the calibration inputs, same formats and size as planned"


def table_calibration_tokens(model_path: str | Path, table: dict[str, Any], source: str) -> Any:
    """The calibration tokens a table was measured on, re-read from its recorded source and
    checked against its recorded hash (gptq must round on the inputs the plan was measured on)."""
    from mlx_lm.utils import load_tokenizer

    calib = table.get("calibration") or {}
    text = calib.get("source")
    if not isinstance(text, str):
        raise ConfigError(
            "writer",
            f"gptq rounds on the table's calibration text, and {source} does not record it "
            "(field 'calibration.source'): use `writer` rtn, or measure again",
        )
    try:
        tokens = calibration.load_calibration(
            load_tokenizer(Path(model_path)),
            None if text == "bundled" else text,
            num_samples=calib["num_samples"],
            sequence_length=calib["sequence_length"],
        )
    except calibration.CalibrationError as e:
        raise ConfigError("writer", f"gptq rounds on the calibration text of {source}: {e}") from None
    if sweep._tokens_info(tokens)["sha256"] != calib.get("sha256"):
        raise ConfigError(
            "writer",
            f"gptq rounds on the calibration tokens of {source}, and {text} no longer gives them "
            "(its sha256 differs: another file or tokenizer): use `writer` rtn, or measure again",
        )
    return tokens


def _write_compensated(result: WeightsPlanResult, out_dir: Path) -> dict[str, Any]:
    """Rewrite the planned affine modules stock convert wrote in `out_dir` with GPTQ codes."""
    import mlx.core as mx

    source = result.float_source or result.model_path
    # The sweep's compute dtype: float32 on the CPU (BLAS), the checkpoint's own elsewhere.
    dtype = mx.float32 if mx.default_device() == mx.cpu else None
    model, _ = model_tree.load_float_model(source, dtype, lazy=False)
    layers = result.plan["layers"]
    write_dtypes = gptq.scales_dtypes(out_dir, [p for p, c in layers.items() if "group_size" in c])
    tensors, summary = gptq.compensate(model, layers, result.tokens, write_dtypes, clip=result.clipper, log=_info)
    del model
    gptq.write_compensated(out_dir, tensors)
    return summary


def distill_calibration(config: WeightsConfig, table: dict[str, Any], source: str) -> tuple[str | None, int]:
    """(text, sequence length) the distillation trains on: the calibration the table was measured
    on (this convert's `calibration` and `sequence_length` when it measures; None: the bundled
    set). A re-planned table that does not record them is a ConfigError on `distill_steps`
    (checked before any long work) when distillation was asked for; a defaulted one (a GPU) is
    dropped instead, `distill_note` saying why."""
    if config.sensitivity is None:
        return (None if config.calibration in (None, "bundled") else config.calibration), int(config.sequence_length)
    calib = table.get("calibration") or {}
    text, length = calib.get("source"), calib.get("sequence_length")
    if not isinstance(text, str) or not isinstance(length, int):
        missing = (
            f"{source} does not record the calibration text it was measured on (fields "
            "'calibration.source' and 'calibration.sequence_length')"
        )
        if config.distill_defaulted:
            config.distill_steps, config.distill_note = None, f"off: {missing}"
            return None, 0
        raise ConfigError(
            "distill_steps",
            f"distils on the calibration text the table was measured on, and {missing}: measure again, or drop it",
        )
    return (None if text == "bundled" else text), length


# Measured distillation times (weights.distill, 4 windows a step), from which `distill_seconds`
# scales: the bundled model on an H200, 88 steps of 4x512 tokens in 35-48 s (sharing the device
# with other jobs); on 2 CPU cores ~36 s a step of 4x256 tokens.
_DISTILL_GPU_S, _DISTILL_GPU_STEPS, _DISTILL_CPU_STEP_S = 45.0, 88, 36.0


def distill_seconds(backend: str, params: int, steps: int, sequence_length: int) -> float:
    """Rough seconds of `steps` distillation steps on a model of `params` parameters: linear in
    parameters, steps and tokens on a CPU; on a GPU parameters to the power 0.725 like the exact
    sweep (`typical_seconds`: small models leave the GPU idle), which errs long for big ones."""
    size = params / _BUNDLED_PARAMS
    if backend == "cpu":
        return _DISTILL_CPU_STEP_S * size * steps * sequence_length / 256
    return _DISTILL_GPU_S * size**0.725 * (steps / _DISTILL_GPU_STEPS) * (sequence_length / 512)


def fit_distill_to_model(config: WeightsConfig, params: int, sequence_length: int) -> None:
    """Drop a defaulted distillation (a GPU's) where it should not run by default on this model:
    the float teacher does not fit in memory, or its rough time (`distill_seconds`) is over
    DISTILL_DEFAULT_MAX_S (then the user can ask for it). `distill_note` says why. One the user
    asked for is left alone."""
    if not config.distill_defaulted or not config.distill_steps:
        return
    backend = config.backend or _backend.compute_backend()
    if not _float_fits(params):
        config.distill_steps, config.distill_note = None, "off: the float model it distils from does not fit in memory"
        return
    seconds = distill_seconds(backend, params, config.distill_steps, sequence_length)
    if seconds > DISTILL_DEFAULT_MAX_S:
        config.distill_note = (
            f"off: {config.distill_steps} steps would take ~{format_duration(seconds)} on this model (over "
            f"{format_duration(DISTILL_DEFAULT_MAX_S)}; give `distill_steps` {config.distill_steps} to run them)"
        )
        config.distill_steps = None


def distill_line(
    config: WeightsConfig, params: int, sequence_length: int, spell: Callable[[str], str] = str
) -> str | None:
    """The line saying whether the written model will be distilled, for about how long, and why:
    None when distillation was neither asked for nor defaulted."""
    if config.distill_note is not None:
        return "distillation " + spell_fields(config.distill_note, spell)
    if not config.distill_steps:
        return None
    backend = config.backend or _backend.compute_backend()
    rough = format_duration(distill_seconds(backend, params, config.distill_steps, sequence_length))
    why = f"the {backend} default; {spell('distill_steps')} 0 turns it off" if config.distill_defaulted else "asked"
    return f"distillation: {config.distill_steps} steps after writing, ~{rough} ({why})"


def _distill(result: WeightsPlanResult, out_dir: Path, config: WeightsConfig) -> dict[str, Any]:
    """Distil the written model's scales and biases (weights.distill) on windows of the text the
    plan was calibrated on (the table's, when re-planning), at its sequence length."""
    text, length = distill_calibration(config, result.table, str(config.sensitivity))
    _info(
        f"distilling scales and biases against the float model: {config.distill_steps} steps of "
        f"{distill.BATCH_SIZE}x{length} tokens of {text or 'the bundled set'} (mlx-lm's DWQ)"
    )
    return distill.distill(
        out_dir, result.float_source or result.model_path, text, length, config.distill_steps, log=_info
    )


def low_bit_hint(
    candidates: list[Candidate], target_bpw: float, source: str, spell: Callable[[str], str] = str
) -> str | None:
    """One line for a re-plan below LOW_BIT_BELOW_BPW from a table with no 2-bit candidate (a
    table measured without a target, or at a higher one, has the 16): a measuring convert at this
    target would have added LOW_BIT_CANDIDATES, which the quality curve shows pay there. The plan
    still uses the table's candidates (re-planning never measures); the line says how to get them."""
    added = added_low_bit_candidates(target_bpw)
    if not added or any(c["bits"] == 2 for c in candidates):
        return None
    keys = ",".join(candidate_key(**c) for c in candidates)
    return (
        f"{source} has no 2-bit candidates; below {LOW_BIT_BELOW_BPW} BPW a measuring convert adds "
        f"{added}, which lower the KL there (docs/weights.md, quality vs bits per weight): "
        f"measure the table again with {spell('candidates')} {keys},{added} to plan with them"
    )


def _table_candidates(table: dict[str, Any], given: list[Candidate] | None, source: str) -> list[Candidate]:
    """The candidates of a re-plan: the table's own when none were given, else the given ones,
    each of which the table must have measured (ConfigError on `sensitivity` naming the rest)."""
    try:
        measured = parse_candidates(table["candidates"])
    except FormatError as e:
        raise ConfigError("sensitivity", f"{source}: field 'candidates': {e}") from None
    if given is None:
        return measured
    keys = [candidate_key(**c) for c in measured]
    missing = [candidate_key(**c) for c in given if candidate_key(**c) not in keys]
    if missing:
        raise ConfigError(
            "sensitivity",
            f"{source} did not measure candidate(s) {missing} (it measured {keys}): "
            "measure again with them, or choose from the measured ones",
        )
    return given


def calibration_tokens(model_path: str | Path, config: WeightsConfig) -> Any:
    """The calibration tokens `config` asks for, tokenized for the model at `model_path`."""
    from mlx_lm.utils import load_tokenizer

    return calibration.load_calibration(
        load_tokenizer(Path(model_path)), config.calibration, **config.calibration_sizes()
    )


def measure(model_path: str | Path, config: WeightsConfig, tokens: Any = None) -> dict[str, Any]:
    """The sensitivity table of the model at `model_path`, measured as `config` asks
    (on `tokens` when the caller already read them: `calibration_tokens`)."""
    if tokens is None:
        tokens = calibration_tokens(model_path, config)
    table = sweep.measure_sensitivity(str(model_path), tokens, config.candidates, config.sweep_settings())
    table["calibration"]["source"] = str(Path(config.calibration).resolve()) if config.calibration else "bundled"
    return table


def finish_weights(result: WeightsPlanResult | None, out_dir: str | Path, config: WeightsConfig) -> dict[str, Any]:
    """After stock convert wrote `out_dir`: verify the plan, rewrite as text only, write the sidecar.

    result: plan_weights' result, or None when only `text_only` was asked.
    Returns {"achieved_bpw": float or None, "text_only": the rewrite's summary or None,
             "metadata": path of optiq_metadata.json or None}.
    """
    out_dir = Path(out_dir)
    writer = distilled = None
    if result is not None:
        writer = _write_compensated(result, out_dir) if result.writer == "gptq" else {"method": "rtn"}
    if result is not None and config.distill_steps:
        distilled = _distill(result, out_dir, config)
    if result is not None and result.float_source is not None:
        shutil.rmtree(result.float_source, ignore_errors=True)
    bpw = None
    if result is not None:
        bpw = plan.verify_converted(out_dir, result.plan["layers"], config.target_bpw, result.plan["predicted_bits"])
        _info(f"reloaded with stock mlx-lm: {bpw:.4f} bits per weight, every planned layer as planned")
    summary, rename = None, None
    if config.text_only:
        info = text_only.make_text_only(out_dir)
        rename = info.pop("renamed")
        summary = info
        _info(f"text-only {info['text_model_type']} model written (dropped config {info['dropped_config']})")
    sidecar = None
    if result is not None:
        sidecar = metadata.write_metadata(
            out_dir,
            base_model=result.base_model,
            table=result.table,
            plan=result.plan,
            target_bpw=config.target_bpw,
            achieved_bpw=bpw,
            candidates=result.candidates,
            extra={
                "writer": writer,
                **({"distill": distilled} if distilled else {}),
                **({"text_only": summary} if summary else {}),
            },
            rename=rename,
        )
    return {"achieved_bpw": bpw, "text_only": summary, "metadata": sidecar}
