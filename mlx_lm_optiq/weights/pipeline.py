"""The weights feature end to end: `WeightsConfig` in, a plan for stock convert out.

    result = plan_weights(config, "org/model", staging_dir=tmp)   # before stock convert
    mlx_lm.convert(..., quant_predicate=result.quant_predicate, ...)
    finish_weights(result, out_dir, config)                        # after it

`plan_weights` resolves the model, dequantizes a quantized source (stock `-q` cannot
re-quantize it), loads or measures the per-module sensitivity table, checks it against
the model and plans bits per module exactly under the budget. `finish_weights` reloads
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

from mlx_lm_optiq.core import calibration, model_tree
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.formats import Candidate, FormatError, candidate_key, parse_candidates, top_level_quantization
from mlx_lm_optiq.weights import clipping, metadata, plan, sweep, text_only
from mlx_lm_optiq.weights.config import WeightsConfig

# The dequantized copy of a quantized source, inside the convert's staging directory.
FLOAT_SOURCE_DIR = ".optiq-float-source"


def _info(msg: str) -> None:
    print(f"[INFO] optiq: {msg}", file=sys.stderr)


@dataclass
class WeightsPlanResult:
    """What stock convert needs to write the planned model, and what the sidecar records.

    float_source: the dequantized copy stock convert must read instead of the quantized
    source (None when the source is float). quantization: the top-level
    (group_size, bits, mode) of the converted config (`core.formats.top_level_quantization`).
    """

    table: dict[str, Any]
    plan: dict[str, Any]
    candidates: list[Candidate]
    base_model: str
    float_source: Path | None
    quant_predicate: Callable[..., Any]
    quantization: tuple[int, int, str]


def plan_weights(
    config: WeightsConfig,
    model: str | Path,
    *,
    staging_dir: str | Path,
    dtype: str | None = None,
    revision: str | None = None,
) -> WeightsPlanResult:
    """Plan the mixed-precision conversion of `model` (a local path or a hub id) for `config`.

    staging_dir: where a dequantized float source may be written (the convert's staging
    directory: removed with it). dtype, revision: stock convert's arguments of those names.
    Re-planning from `config.sensitivity` chooses from the table's candidates when the config
    names none (`config.candidates` None), else from the named ones, which the table must hold.
    """
    if config.target_bpw is None:
        raise ConfigError("target_bpw", "is needed to plan mixed precision")
    table, source, candidates = None, "measured sensitivity", config.candidates
    if config.sensitivity is not None:  # read first: a bad file fails before any work
        source = str(config.sensitivity)
        table = metadata.load_sensitivity(source)
        candidates = _table_candidates(table, candidates, source)
    model_path = model_tree.resolve_model_path(model, revision)
    float_source = None
    if model_tree.is_quantized_checkpoint(_read_config(model_path)):
        _info("dequantizing the quantized source to plan and re-quantize it")
        float_source = model_tree.write_float_source(model_path, Path(staging_dir) / FLOAT_SOURCE_DIR)
    float_model, model_config = model_tree.load_float_model(float_source or model_path)
    if table is None:
        table = measure(model_path, config)
    plan.check_table_matches(table, float_model, source)
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
    return WeightsPlanResult(
        table=table,
        plan=result,
        candidates=candidates,
        base_model=str(model),
        float_source=float_source,
        quant_predicate=plan.quant_predicate(result["layers"], clipping.from_table(table)),
        quantization=top_level_quantization(candidates),
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


def _read_config(model_path: Path) -> dict[str, Any]:
    from mlx_lm.utils import load_config

    return load_config(model_path)


def measure(model_path: str | Path, config: WeightsConfig) -> dict[str, Any]:
    """The sensitivity table of the model at `model_path`, measured as `config` asks."""
    from mlx_lm.utils import load_tokenizer

    tokens = calibration.load_calibration(
        load_tokenizer(Path(model_path)), config.calibration, **config.calibration_sizes()
    )
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
            extra={"text_only": summary} if summary else {},
            rename=rename,
        )
    return {"achieved_bpw": bpw, "text_only": summary, "metadata": sidecar}
