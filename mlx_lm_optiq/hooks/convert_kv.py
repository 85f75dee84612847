"""Convert extension: `--optiq-kv-target-bits 4.5` writes a per-layer KV plan (kv_config.json)
next to the converted model.

The plan is measured on the model as converted (dequantized to float32 for the
measurement), so it reflects the weights that will actually run; `mlx_lm.load`
of the output folder then picks the plan up (hooks/generate.py), and so does
`mlx_lm.server` (hooks/server_kv.py). Flags -> `KVPlanConfig` (validated before the
long conversion) -> `kv.pipeline.plan_kv` on the converted folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.errors import UsageError
from mlx_lm_optiq.kv.config import KVPlanConfig, flag_specs
from mlx_lm_optiq.kv.pipeline import plan_kv
from mlx_lm_optiq.kv.plan_file import FILENAME, write_kv_config

_PREFIX = "kv_"  # option key (optiq_ stripped) = "kv_" + config field


def _flag(field_name: str) -> str:
    return "--optiq-kv-" + field_name.replace("_", "-")


def _fields() -> list[str]:
    return [name for name, _ in flag_specs(table_paths=False)]


def add_arguments(group: Any) -> None:
    for name, kw in flag_specs(table_paths=False):
        kw = {**kw, "default": None, "required": False}
        if name == "target_bits":
            kw["help"] = (
                "Per-layer KV cache: measure each layer's KV sensitivity and write kv_config.json "
                "for this average bits per cached element (fp16 = 16; 4-bit g64 = 4.5)."
            )
        group.add_argument(_flag(name), **kw)  # dest: optiq_kv_<field>


def is_requested(options: dict) -> bool:
    if options.get("kv_target_bits") is not None:
        return True
    stray = [name for name in _fields() if options.get(_PREFIX + name) is not None]
    if stray:
        raise UsageError(f"{', '.join(_flag(n) for n in stray)} need --optiq-kv-target-bits")
    return False


def _config(options: dict) -> KVPlanConfig:
    given = {name: options[_PREFIX + name] for name in _fields() if options.get(_PREFIX + name) is not None}
    try:
        return KVPlanConfig(**given)
    except ConfigError as e:
        raise UsageError(e.render(_flag)) from None


def before_convert(call: dict, options: dict) -> KVPlanConfig:
    """Validate the flags before the (long) conversion; the config is the state after_convert needs."""
    return _config(options)


def after_convert(out_dir: Path, call: dict, options: dict, state: KVPlanConfig | None = None) -> None:
    config = state if state is not None else _config(options)
    try:
        plan = plan_kv(out_dir, config, model_name=str(call["hf_path"]), spell=_flag).plan
    except ConfigError as e:
        raise UsageError(e.render(_flag)) from None
    path = write_kv_config(plan, out_dir / FILENAME)
    print(f"[mlx_lm_optiq] wrote {path.name}: {plan.summary()}; average {plan.achieved_bits} KV bits")
