"""LoRA adapters with per-module ranks: building, padding for stock mlx-lm, compact loading.

On disk an adapter directory keeps mlx-lm's own files, so stock
`mlx_lm.load(..., adapter_path=...)` loads it:
  adapters.safetensors   every module zero-padded to the largest rank r_max
                         (lora_a columns, lora_b rows); x @ [A, 0] @ [B; 0] == x @ A @ B,
                         so the padded adapter computes exactly what the compact one does
  adapter_config.json    stock; lora_parameters.rank == r_max
plus our record of the true ranks, which lets an optiq-enabled load build every
module at its own rank and slice the padding off (no padding cost):
  optiq_lora_config.json {"format_version": 1, "kind": "optiq-lora-config",
                          "base_model", "fine_tune_type": "lora|dora", "rank_scaling",
                          "base_rank", "padded_rank", "scale", "dropout", "metadata",
                          "budget_params", "trainable_params",
                          "modules": {path: {"rank", "input_dims", "output_dims", "bits"?, "kl"?}}}

This module is the one reader (`read_record`), validator (`validate_record`) and
writer (`new_record` + `write_record`) of optiq_lora_config.json.

Plain functions other features call (e.g. multi-adapter mounting, PEFT export):
  build_lora_modules(model, ranks, scale, dropout, use_dora)
  fit_adapter_weights(weights, ranks, source)  -> compact weights (zero-checked)
  read_adapter(adapter_path)                   -> (ranks, compact weights, meta) of any mlx-lm adapter dir
  load_compact_adapters(model, adapter_path)   -> model with compact LoRA layers loaded
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lm_optiq.core.jsonio import OptiqFileError, read_json, write_json

RECORD_FILE = "optiq_lora_config.json"
RECORD_KIND = "optiq-lora-config"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b")
FINE_TUNE_TYPES = ("lora", "dora")


def _lora_classes():
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear, DoRALinear


def lora_modules(model: Any) -> dict[str, Any]:
    """{module path: module} for every LoRA/DoRA layer in `model`.

    Only linear LoRA layers have a per-module rank here; switch/embedding
    adapters get a clear error instead of a silently wrong budget.
    """
    LoRALinear, DoRALinear = _lora_classes()
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            found[path] = module
        elif "lora_a" in module and "lora_b" in module:
            raise ValueError(f"{path}: per-module LoRA ranks support linear layers only, not {type(module).__name__}")
    return found


def module_dims(module: Any) -> tuple[int, int]:
    """(input_dims, output_dims) of a LoRA layer, from its adapter matrices."""
    return int(module.lora_a.shape[0]), int(module.lora_b.shape[1])


def module_rank(module: Any) -> int:
    """The rank of a LoRA layer (lora_a's columns)."""
    return int(module.lora_a.shape[1])


def _base_layer(module):
    LoRALinear, DoRALinear = _lora_classes()
    return module.linear if isinstance(module, (LoRALinear, DoRALinear)) else module


def build_lora_modules(
    model: Any, ranks: Mapping[str, int], scale: float, dropout: float = 0.0, use_dora: bool = False
) -> Any:
    """Put a LoRA (or DoRA) layer of rank `ranks[path]` on each module path.

    A path that already holds a LoRA layer is rebuilt on its base layer, so this
    also re-ranks a model stock `linear_to_lora_layers` converted. New lora_a is
    drawn like stock's (uniform, +-1/sqrt(input_dims)); lora_b is zero.
    """
    LoRALinear, DoRALinear = _lora_classes()
    cls = DoRALinear if use_dora else LoRALinear
    modules = dict(model.named_modules())
    rebuilt = []
    for path, rank in ranks.items():
        if path not in modules:
            raise ValueError(f"LoRA module {path!r} does not exist in the model")
        base = _base_layer(modules[path])
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"{path}: cannot put a LoRA layer on {type(base).__name__}")
        rebuilt.append((path, cls.from_base(base, r=int(rank), scale=scale, dropout=dropout)))
    if rebuilt:
        model.update_modules(tree_unflatten(rebuilt))
    return model


def remove_lora_modules(model: Any, paths: Iterable[str]) -> Any:
    """Put the base layer back on each path (a LoRA layer with nothing to load)."""
    modules = dict(model.named_modules())
    restored = [(p, _base_layer(modules[p])) for p in paths]
    if restored:
        model.update_modules(tree_unflatten(restored))
    return model


def _split_key(key):
    path, _, leaf = key.rpartition(".")
    return path, leaf


def fit_adapter_weights(
    weights: Mapping[str, mx.array], ranks: Mapping[str, int], source: str = "adapter weights"
) -> dict[str, mx.array]:
    """Cut padded adapter tensors down to `ranks` (or pass compact ones through).

    weights: {"<path>.lora_a": (in, r'), "<path>.lora_b": (r', out), "<path>.m": ...}
    Columns/rows beyond a module's rank must be exactly zero; anything else
    would drop trained capacity, so it is an error naming the tensor.
    """
    fitted = {}
    for key, w in weights.items():
        path, leaf = _split_key(key)
        if leaf not in ADAPTER_LEAVES:
            fitted[key] = w
            continue
        if path not in ranks:
            raise ValueError(f"{source}: tensor {key} belongs to no module of the rank record")
        r = ranks[path]
        have = w.shape[1] if leaf == "lora_a" else w.shape[0]
        if have < r:
            raise ValueError(f"{source}: tensor {key} has rank {have}, smaller than the recorded rank {r} of {path}")
        if have > r:
            extra = w[:, r:] if leaf == "lora_a" else w[r:, :]
            if mx.any(extra != 0).item():
                raise ValueError(
                    f"{source}: tensor {key} has non-zero values beyond the recorded rank {r} of {path}; "
                    "it is not a zero-padded adapter of these ranks"
                )
            w = w[:, :r] if leaf == "lora_a" else w[:r, :]
        fitted[key] = w
    return fitted


def pad_adapter_weights(weights: Mapping[str, mx.array], padded_rank: int) -> dict[str, mx.array]:
    """Zero-pad every lora_a (columns) and lora_b (rows) to `padded_rank`."""
    padded = {}
    for key, w in weights.items():
        _, leaf = _split_key(key)
        if leaf == "lora_a" and w.shape[1] < padded_rank:
            w = mx.concatenate([w, mx.zeros((w.shape[0], padded_rank - w.shape[1]), w.dtype)], axis=1)
        elif leaf == "lora_b" and w.shape[0] < padded_rank:
            w = mx.concatenate([w, mx.zeros((padded_rank - w.shape[0], w.shape[1]), w.dtype)], axis=0)
        padded[key] = w
    return padded


def adapter_shapes(weights: Mapping[str, mx.array]) -> dict[str, dict[str, int]]:
    """{module path: {"rank", "input_dims", "output_dims"}} from lora_a (in, r) / lora_b (r, out) tensors."""
    shapes = {}
    for key, a in weights.items():
        path, leaf = _split_key(key)
        if leaf == "lora_a":
            b = weights[f"{path}.lora_b"]
            shapes[path] = {"rank": int(a.shape[1]), "input_dims": int(a.shape[0]), "output_dims": int(b.shape[1])}
    return shapes


def save_safetensors_atomic(path: str | Path, weights: Mapping[str, mx.array], metadata: dict | None = None) -> None:
    """mx.save_safetensors through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.optiq-tmp.safetensors")
    mx.save_safetensors(str(tmp), weights, metadata=metadata or {"format": "mlx"})
    os.replace(tmp, path)


def validate_record(data: Mapping, path: str | Path) -> Mapping:
    """Check an optiq_lora_config.json payload; errors name `path` and the field."""
    for field in ("modules", "scale", "fine_tune_type"):
        if field not in data:
            raise OptiqFileError(f"{path}: missing required field {field!r}")
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        raise OptiqFileError(f"{path}: field 'modules' must be a non-empty object of module path -> entry")
    for name, entry in modules.items():
        rank = entry.get("rank") if isinstance(entry, dict) else None
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise OptiqFileError(f"{path}: field 'modules.{name}.rank' must be a positive integer, got {rank!r}")
    if data["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise OptiqFileError(f"{path}: field 'fine_tune_type' must be 'lora' or 'dora', got {data['fine_tune_type']!r}")
    return data


def read_record(adapter_path: str | Path) -> dict:
    """The optiq_lora_config.json of an adapter directory, validated."""
    path = Path(adapter_path) / RECORD_FILE
    data = read_json(path, kind=RECORD_KIND)
    validate_record(data, path)
    return data


def new_record(
    *,
    base_model: str,
    fine_tune_type: str,
    rank_scaling: str,
    base_rank: int,
    scale: float,
    dropout: float,
    modules: Mapping[str, dict],
    metadata: str | None = None,
    budget_params: int | None = None,
    padded_rank: int | None = None,
) -> dict:
    """An optiq_lora_config.json payload (the format in this module's docstring).

    modules: {path: {"rank", "input_dims", "output_dims", "bits"?, "kl"?}};
    trainable_params is counted from them.
    """
    return {
        "base_model": str(base_model),
        "fine_tune_type": fine_tune_type,
        "rank_scaling": rank_scaling,
        "base_rank": base_rank,
        "padded_rank": padded_rank,
        "scale": scale,
        "dropout": dropout,
        "metadata": metadata,
        "budget_params": budget_params,
        "trainable_params": sum(m["rank"] * (m["input_dims"] + m["output_dims"]) for m in modules.values()),
        "modules": dict(modules),
    }


def record_ranks(record: Mapping) -> dict[str, int]:
    """{module path: rank} of a rank record."""
    return {name: entry["rank"] for name, entry in record["modules"].items()}


def write_record(adapter_path: str | Path, record: Mapping) -> Path:
    """Validate `record` and write it as the adapter directory's optiq_lora_config.json."""
    path = Path(adapter_path) / RECORD_FILE
    validate_record(record, path)
    return write_json(path, record, kind=RECORD_KIND)


def has_record(adapter_path: str | Path | None) -> bool:
    """Whether an adapter directory has an optiq_lora_config.json (its modules have their own ranks)."""
    return adapter_path is not None and (Path(adapter_path) / RECORD_FILE).is_file()


def load_weights_file(adapter_path: str | Path) -> tuple[Path, dict[str, mx.array]]:
    """(path, tensors) of an adapter directory's adapters.safetensors; a clear error if it is missing."""
    weights_file = Path(adapter_path) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise OptiqFileError(f"{weights_file}: file not found")
    return weights_file, mx.load(str(weights_file))


def read_stock_config(adapter_path: str | Path) -> dict:
    """mlx-lm's own adapter_config.json of an adapter directory."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise OptiqFileError(f"{config_file}: file not found")
    return json.loads(config_file.read_text())


def read_adapter(adapter_path: str | Path) -> tuple[dict[str, int], dict[str, mx.array], dict]:
    """(ranks, compact weights, meta) of an mlx-lm adapter directory, optiq-ranked or stock constant rank.

    meta: {"scale", "dropout", "fine_tune_type", "base_model"}.
    """
    adapter_path = Path(adapter_path)
    weights_file, weights = load_weights_file(adapter_path)
    if has_record(adapter_path):
        record = read_record(adapter_path)
        ranks = record_ranks(record)
        meta = {
            "scale": record["scale"],
            "dropout": record.get("dropout", 0.0),
            "fine_tune_type": record["fine_tune_type"],
            "base_model": record.get("base_model"),
        }
        return ranks, fit_adapter_weights(weights, ranks, source=str(weights_file)), meta
    config = read_stock_config(adapter_path)
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise OptiqFileError(f"{adapter_path / ADAPTER_CONFIG}: field 'lora_parameters.scale' is missing")
    meta = {
        "scale": params["scale"],
        "dropout": params.get("dropout", 0.0),
        "fine_tune_type": config.get("fine_tune_type", "lora"),
        "base_model": config.get("model"),
    }
    ranks = {path: shape["rank"] for path, shape in adapter_shapes(weights).items()}
    return ranks, weights, meta


def finalize_adapter_dir(adapter_path: str | Path, config_updates: Mapping | None = None) -> int:
    """Make an adapter directory trained at compact ranks loadable by stock mlx-lm.

    Zero-pads adapters.safetensors and every checkpoint `*_adapters.safetensors`
    to the largest recorded rank and sets `lora_parameters.rank` in the stock
    adapter_config.json to it (plus `config_updates`). Idempotent.
    """
    from mlx_lm.utils import save_config

    adapter_path = Path(adapter_path)
    record = read_record(adapter_path)
    ranks = record_ranks(record)
    padded_rank = max(ranks.values())
    for f in sorted(adapter_path.glob("*adapters.safetensors")):
        weights = mx.load(str(f))
        # Validates the file against the record before rewriting it.
        compact = fit_adapter_weights(weights, ranks, source=str(f))
        save_safetensors_atomic(f, pad_adapter_weights(compact, padded_rank))
    config_path = adapter_path / ADAPTER_CONFIG
    config = read_stock_config(adapter_path)
    lora_parameters = dict(config.get("lora_parameters") or {})
    lora_parameters["rank"] = padded_rank
    config["lora_parameters"] = lora_parameters
    config.update(config_updates or {})
    save_config(config, config_path)
    record["padded_rank"] = padded_rank
    write_record(adapter_path, record)
    return padded_rank


def load_compact_adapters(model: Any, adapter_path: str | Path) -> Any:
    """Mount an adapter directory that has an optiq_lora_config.json at its true per-module ranks.

    Equivalent to stock `load_adapters` on the padded files (same outputs) but
    without the padding's compute and memory. Returns the model.
    """
    adapter_path = Path(adapter_path)
    record = read_record(adapter_path)
    ranks = record_ranks(record)
    build_lora_modules(
        model,
        ranks,
        scale=record["scale"],
        dropout=record.get("dropout", 0.0),
        use_dora=record["fine_tune_type"] == "dora",
    )
    weights_file, weights = load_weights_file(adapter_path)
    weights = fit_adapter_weights(weights, ranks, source=str(weights_file))
    params = dict(tree_flatten(model.parameters()))
    errors = [
        f"  {k}: shape {tuple(w.shape)} vs model {tuple(params[k].shape) if k in params else 'missing'}"
        for k, w in weights.items()
        if k not in params or params[k].shape != w.shape
    ]
    if errors:
        raise ValueError(f"Adapter at {adapter_path} does not fit the model:\n" + "\n".join(errors))
    model.load_weights(list(weights.items()), strict=False)
    return model
