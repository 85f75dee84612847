"""Convert extension: sensitivity-aware mixed-precision weights (`--optiq-target-bpw`).

Translates flags into a `weights.config.WeightsConfig`, runs `weights.pipeline`, and
puts its result into the stock convert call, or, for a quantized source written with rtn,
writes the model itself (`pipeline.write_model`: module by module, no dequantized copy);
then `pipeline.finish_weights` verifies it and writes optiq_metadata.json. Errors below
name config fields; here they are spelled as the flags the user typed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.allocate import InfeasibleBudget
from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.weights import pipeline
from mlx_lm_optiq.weights.config import CHOICES, PLANNING_FIELDS, WeightsConfig
from mlx_lm_optiq.weights.plan import PlanError

# Stock convert arguments a WeightsConfig error may name, as the console script spells them.
_STOCK_FLAGS = {
    "q_group_size": "--q-group-size",
    "q_mode": "--q-mode",
    "dequantize": "-d/--dequantize",
    "quant_predicate": "--quant-predicate",
    "dtype": "--dtype",
}


def _flag(field: str) -> str:
    return _STOCK_FLAGS.get(field, "--optiq-" + field.replace("_", "-"))


@contextmanager
def _as_flags() -> Iterator[None]:
    """Re-raise a ConfigError as the class this hook has always raised, worded with flags."""
    try:
        yield
    except ConfigError as e:
        raise (InfeasibleBudget if isinstance(e, InfeasibleBudget) else PlanError)(e.render(_flag)) from None


def add_arguments(group: Any) -> None:
    helps = field_help(WeightsConfig)
    group.add_argument("--optiq-target-bpw", type=float, default=None, help=helps["target_bpw"])
    for name in ("candidate_bits", "group_sizes", "candidates", "calibration"):
        group.add_argument(_flag(name), default=None, help=helps[name])
    for name in ("num_samples", "sequence_length", "distill_steps"):
        group.add_argument(_flag(name), type=int, default=None, help=helps[name])
    group.add_argument("--optiq-sensitivity", default=None, help=helps["sensitivity"])
    for name in ("sensitivity_method", "reference", "clipping", "writer"):
        group.add_argument(_flag(name), choices=list(CHOICES[name]), default=None, help=helps[name])
    group.add_argument("--optiq-checkpoint", default=None, help=helps["checkpoint"])
    group.add_argument("--optiq-protect", default=None, help=helps["protect"])
    group.add_argument("--optiq-text-only", action="store_true", default=None, help=helps["text_only"])


def is_requested(options: dict[str, Any]) -> bool:
    # Any planning option asks for the feature: WeightsConfig then refuses those without a target.
    return (
        options.get("target_bpw") is not None
        or any(options.get(k) is not None for k in PLANNING_FIELDS)
        or bool(options.get("text_only"))
    )


@dataclass
class WeightsCall:
    """This extension's state for one convert call: the config and, with a target, the plan."""

    config: WeightsConfig
    result: pipeline.WeightsPlanResult | None


def before_convert(call: dict[str, Any], options: dict[str, Any]) -> WeightsCall:
    with _as_flags():
        config = WeightsConfig.from_convert(options, call)
        if config.target_bpw is None:
            return WeightsCall(config, None)
        result = pipeline.plan_weights(
            config,
            call["hf_path"],
            staging_dir=Path(call["mlx_path"]).parent,
            dtype=call.get("dtype"),
            revision=call.get("revision"),
            spell=_flag,
        )
    if result.float_source is not None:
        call["hf_path"] = str(result.float_source)
    call["quantize"] = True
    call["q_group_size"], call["q_bits"], call["q_mode"] = result.quantization
    call["quant_predicate"] = result.quant_predicate
    return WeightsCall(config, result)


def write_model(out_dir: Path, call: dict[str, Any], options: dict[str, Any], state: WeightsCall) -> bool:
    """Write the planned model instead of stock convert where the plan says so (`result.direct`:
    rtn from a quantized source); False leaves the writing to stock convert."""
    if state.result is None or not state.result.direct:
        return False
    with _as_flags():
        pipeline.write_model(
            state.result,
            out_dir,
            dtype=call.get("dtype"),
            trust_remote_code=bool(call.get("trust_remote_code", False)),
        )
    return True


def after_convert(out_dir: Path, call: dict[str, Any], options: dict[str, Any], state: WeightsCall) -> None:
    with _as_flags():
        pipeline.finish_weights(state.result, out_dir, state.config)
