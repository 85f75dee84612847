"""One KV plan from one config: load the float model, measure, allocate.

`plan_kv(model_path, config)` is what both `python -m mlx_lm_optiq.kv` and
`mlx_lm.convert` with a KV target (hooks/convert_kv.py) run. The measurement runs on the model's
float version (a quantized checkpoint is dequantized, in float32: fastest on CPU)
with simulated cache quantization; see kv/sensitivity.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_tokenizer

from mlx_lm_optiq.core.backend import warn_if_slow_blas
from mlx_lm_optiq.core.calibration import load_calibration
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.durations import format_duration
from mlx_lm_optiq.core.model_tree import load_float_model, read_model_config, resolve_model_path
from mlx_lm_optiq.kv.apply import attach_plan
from mlx_lm_optiq.kv.candidates import KVCandidate
from mlx_lm_optiq.kv.config import KVPlanConfig, measurement_defaults
from mlx_lm_optiq.kv.plan_file import KVPlan
from mlx_lm_optiq.kv.sensitivity import (
    allocate_kv,
    measure_kv_sensitivity,
    read_kv_table,
    restrict_table,
    unmeasured_candidates,
    write_kv_table,
)


def _info(msg: str) -> None:
    print(f"[INFO] optiq: {msg}", file=sys.stderr, flush=True)


@dataclass
class KVPlanResult:
    """The allocated plan and the sensitivity table it was allocated from."""

    plan: KVPlan
    table: dict


def load_float_reference(model_path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer): every quantized layer dequantized, weights cast to `dtype` and evaluated."""
    path = resolve_model_path(model_path)
    model, config = load_float_model(path, dtype, lazy=False)
    # the folder's own kv_config.json (if any) must not shape the reference caches
    attach_plan(model, None)
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))


def load_model_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of a model (its config.json checked first), without loading the weights:
    the calibration text is read and tokenized before the (slow) model load and measurement."""
    path = resolve_model_path(model_path)
    config = read_model_config(path)
    return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))


def token_windows(tokenizer: Any, data: str | None, num_windows: int, length: int, seed: int = 0) -> list:
    """`num_windows` windows of `length` tokens from a .txt file, a calibration .jsonl,
    or (data=None) the bundled calibration set. Errors about the text name the `data` field."""
    if data is not None and Path(data).suffix == ".txt":
        path = Path(data)
        if not path.is_file():
            raise ConfigError("data", f"{path}: file not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("data", f"{path}: not a UTF-8 text file (byte {e.start})") from None
        ids = np.array(tokenizer.encode(text), dtype=np.int32)
        n = len(ids) // length
        if n < num_windows:
            raise ConfigError(
                "data", f"{path}: {len(ids)} tokens make only {n} windows of {length} tokens, {num_windows} requested"
            )
        picks = np.sort(np.random.default_rng(seed).choice(n, size=num_windows, replace=False))
        return [mx.array(ids[p * length : (p + 1) * length]) for p in picks]
    tokens = load_calibration(tokenizer, data, num_samples=num_windows, sequence_length=length, seed=seed)
    return [tokens[i] for i in range(tokens.shape[0])]


def _measured_subset(table: dict, candidates: Sequence[KVCandidate], source: str | Path) -> dict:
    """`table` restricted to `candidates`; one the table did not measure is an error on `candidates`."""
    missing = unmeasured_candidates(table, candidates)
    if missing:
        slot, keys = next(iter(missing.items()))
        measured = sorted(table["slots"][slot]["kl"])
        raise ConfigError(
            "candidates",
            f"{keys} not measured in {source} (slot {slot} has {measured}): measure again with them, "
            "or choose from the measured ones",
        )
    return restrict_table(table, candidates)


def measurement_line(
    config: KVPlanConfig, probes: int, seconds_per_probe: float, spell: Callable[[str], str] = str
) -> str:
    """The one line that says what a measurement runs and about how long it takes.

    Backend, candidates, windows, probe, and probes x estimated time per probe; which settings
    came from the backend's defaults, and, on a CPU, what a GPU would measure instead (the
    user can ask for that explicitly). `spell` writes a field the way the user would set it
    (a CLI flag, a convert flag).
    """
    c = config
    windows = "window" if c.num_windows == 1 else "windows"
    line = (
        f"KV measurement on {c.backend}: probe {c.probe}, {len(c.candidates)} candidates, "
        f"{c.num_windows} {windows} of {c.prefix_tokens} + {c.scored_tokens} scored tokens, "
        f"bits for a {c.context_length}-token context: {probes} probes x ~{seconds_per_probe:.2f} s "
        f"= ~{format_duration(probes * seconds_per_probe)} (estimate)"
    )
    if c.defaulted:
        line += f"; {c.backend} defaults for {', '.join(spell(n) for n in c.defaulted)}"
        gpu = measurement_defaults("gpu")
        thorough = [f"{spell(n)} {_value(getattr(gpu, n))}" for n in c.defaulted if getattr(gpu, n) != getattr(c, n)]
        if c.backend == "cpu" and thorough:
            line += f" (GPU defaults, more thorough but slower on a CPU: {' '.join(thorough)})"
    return line


def _value(v: Any) -> str:
    """A setting as it would be typed (candidates as their comma-separated keys)."""
    return ",".join(c.key for c in v) if isinstance(v, tuple) else str(v)


def plan_kv(
    model_path: str | Path,
    config: KVPlanConfig,
    *,
    model_name: str | None = None,
    progress: bool = True,
    spell: Callable[[str], str] = str,
) -> KVPlanResult:
    """Measure `model_path` (or read `config.sensitivity`) and allocate a KVPlan under `config.target_bits`.

    `config.sensitivity` may be a KV sensitivity table or a kv_config.json (its KLs); without
    `config.candidates` every candidate it measured is a choice, with them only those (each
    must have been measured). Measuring warns once when MLX's CPU BLAS is the slow one and,
    with `progress`, prints `measurement_line` (fields spelled by `spell`) before the first probe.

    `model_name` is what the table and the plan record as the model (default: `model_path`).
    A measured table is also written to `config.sensitivity_out` when set.
    """
    model_name = model_name or str(model_path)
    if config.sensitivity is not None:
        table = read_kv_table(config.sensitivity)
        if config.candidates is not None:  # given: a subset of what the table measured
            table = _measured_subset(table, config.candidates, config.sensitivity)
    else:
        # the text first: a bad calibration file fails before the model is loaded
        windows = token_windows(load_model_tokenizer(model_path), config.data, config.num_windows, config.window_tokens)
        warn_if_slow_blas()
        model, _ = load_float_reference(model_path)
        table = measure_kv_sensitivity(
            model,
            windows,
            config.prefix_tokens,
            config.candidates,
            progress=progress,
            model_name=model_name,
            probe=config.probe,
            on_start=(lambda n, sec: _info(measurement_line(config, n, sec, spell))) if progress else None,
        )
        if config.sensitivity_out is not None:
            write_kv_table(table, config.sensitivity_out)
    plan = allocate_kv(
        table,
        config.target_bits,
        context_length=config.context_length,
        quantized_kv_start=config.quantized_kv_start,
        model_name=model_name,
    )
    return KVPlanResult(plan=plan, table=table)
