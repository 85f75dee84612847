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
                          "budget_params", "trainable_params", "init"?: "zero|loftq",
                          "modules": {path: {"rank", "input_dims", "output_dims", "bits"?, "kl"?,
                                             "residual_energy"?, "residual_captured"?}}}

This module is the one reader (`read_record`), validator (`validate_record`) and
writer (`new_record` + `write_record`) of optiq_lora_config.json.

Plain functions other features call (e.g. multi-adapter mounting, PEFT export):
  build_lora_modules(model, ranks, scale, dropout, use_dora)
  lora_from_base(base, rank, scale, dropout, use_dora)  -> one LoRA/DoRA layer (DoRA right at 3/5/6 bits)
  fit_adapter_weights(weights, ranks, source)  -> compact weights (zero-checked)
  read_adapter(adapter_path)                   -> (ranks, compact weights, meta) of any mlx-lm adapter dir
  load_compact_adapters(model, adapter_path)   -> model with compact LoRA layers loaded
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lm_optiq.core.errors import OptiqError, brief
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_keys, read_json, write_json

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
            raise OptiqError(f"{path}: per-module LoRA ranks support linear layers only, not {type(module).__name__}")
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


def base_dims(base: Any) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear.

    A quantized weight packs `bits`-bit values into uint32 columns, `input_dims * bits / 32` of
    them, so input_dims = columns * 32 / bits, exact for every width (3/5/6 bits included).
    """
    output_dims, columns = (int(d) for d in base.weight.shape)
    if isinstance(base, nn.QuantizedLinear):
        return columns * 32 // base.bits, output_dims
    return columns, output_dims


def stock_dora_dims_wrong(base: Any) -> bool:
    """Whether stock `DoRALinear.from_base` builds adapters of the wrong input dims on `base`.

    Stock computes a quantized layer's input dims as `columns * (32 // bits)`, right only when
    `bits` divides 32: a 3-, 5- or 6-bit layer (which our mixed-precision convert writes) gets
    lora_a of 540 rows instead of 576, and the first forward fails on a shape mismatch.
    """
    return isinstance(base, nn.QuantizedLinear) and 32 % base.bits != 0


def lora_from_base(base: Any, rank: int, scale: float, dropout: float = 0.0, use_dora: bool = False) -> Any:
    """A LoRA (or DoRA) layer of `rank` on a Linear/QuantizedLinear `base`, drawn as stock draws it.

    LoRA is stock's `LoRALinear.from_base`. DoRA is built here with the input dims of
    `base_dims` (stock's `from_base` gets them wrong for 3/5/6-bit layers: see
    `stock_dora_dims_wrong`), in stock's order (the layer, then its magnitude from the base), so
    a seeded run draws the same lora_a as stock does wherever stock is right.
    """
    LoRALinear, DoRALinear = _lora_classes()
    if not use_dora:
        return LoRALinear.from_base(base, r=rank, scale=scale, dropout=dropout)
    input_dims, output_dims = base_dims(base)
    layer = DoRALinear(input_dims=input_dims, output_dims=output_dims, r=rank, dropout=dropout, scale=scale)
    layer.set_linear(base)
    return layer


def build_lora_modules(
    model: Any, ranks: Mapping[str, int], scale: float, dropout: float = 0.0, use_dora: bool = False
) -> Any:
    """Put a LoRA (or DoRA) layer of rank `ranks[path]` on each module path.

    A path that already holds a LoRA layer is rebuilt on its base layer, so this
    also re-ranks a model stock `linear_to_lora_layers` converted. New lora_a is
    drawn like stock's (uniform, +-1/sqrt(input_dims)); lora_b is zero.
    """
    modules = dict(model.named_modules())
    rebuilt = []
    for path, rank in ranks.items():
        if path not in modules:
            raise OptiqError(f"LoRA module {path!r} does not exist in the model")
        base = _base_layer(modules[path])
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise OptiqError(f"{path}: cannot put a LoRA layer on {type(base).__name__}")
        rebuilt.append((path, lora_from_base(base, int(rank), scale=scale, dropout=dropout, use_dora=use_dora)))
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
            raise OptiqFileError(f"{source}: tensor {key} belongs to no module of the rank record")
        r = ranks[path]
        if w.ndim != 2:
            raise OptiqFileError(f"{source}: tensor {key} has shape {tuple(w.shape)}, expected a matrix")
        have = w.shape[1] if leaf == "lora_a" else w.shape[0]
        if have < r:
            raise OptiqFileError(
                f"{source}: tensor {key} has rank {have}, smaller than the recorded rank {r} of {path}"
            )
        if have > r:
            extra = w[:, r:] if leaf == "lora_a" else w[r:, :]
            if mx.any(extra != 0).item():
                raise OptiqFileError(
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


# Every field a record may hold (what every version of our writers produced, the PEFT import
# included); any other key is refused by name, as a misspelt one must not be ignored.
RECORD_FIELDS = (
    "format_version",
    "kind",
    "base_model",
    "fine_tune_type",
    "rank_scaling",
    "base_rank",
    "padded_rank",
    "scale",
    "dropout",
    "metadata",
    "budget_params",
    "trainable_params",
    "modules",
    "init",
)
# per-module residual fields (rank scaling by_residual / LoftQ init): ||W - Q||_F^2 and the share
# of it the module's rank can remove (lora/residual.py)
RESIDUAL_FIELDS = ("residual_energy", "residual_captured")
MODULE_FIELDS = ("rank", "input_dims", "output_dims", "bits", "kl", *RESIDUAL_FIELDS)
LORA_INITS = ("zero", "loftq")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_record(data: Mapping, path: str | Path) -> Mapping:
    """Check an optiq_lora_config.json payload; errors name `path` and the field."""

    def bad(field, expected, value):
        raise OptiqFileError(f"{path}: field '{field}' must be {expected}, got {brief(value)}")

    for field in ("modules", "scale", "fine_tune_type"):
        if field not in data:
            raise OptiqFileError(f"{path}: missing required field {field!r}")
    check_keys(data, RECORD_FIELDS, path)
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        bad("modules", "a non-empty object of module path -> entry", modules)
    for name, entry in modules.items():
        at = f"modules.{name}"
        if not isinstance(entry, dict):
            bad(at, "an object", entry)
        check_keys(entry, MODULE_FIELDS, path, at)
        if not _is_int(entry.get("rank"), 1):
            bad(f"{at}.rank", "a positive integer", entry.get("rank"))
        for key in ("input_dims", "output_dims"):
            if key in entry and not _is_int(entry[key], 1):
                bad(f"{at}.{key}", "a positive integer", entry[key])
        for key in ("bits", "kl", *RESIDUAL_FIELDS):
            if entry.get(key) is not None and not (_is_number(entry[key]) and entry[key] >= 0):
                bad(f"{at}.{key}", "a finite number >= 0", entry[key])
    if not isinstance(data["fine_tune_type"], str) or data["fine_tune_type"] not in FINE_TUNE_TYPES:
        bad("fine_tune_type", "'lora' or 'dora'", data["fine_tune_type"])
    if data.get("init") is not None and data["init"] not in LORA_INITS:
        bad("init", f"one of {list(LORA_INITS)}", data["init"])
    if not _is_number(data["scale"]):
        bad("scale", "a finite number", data["scale"])
    if data.get("dropout") is not None and not (_is_number(data["dropout"]) and 0 <= data["dropout"] < 1):
        bad("dropout", "a number in [0, 1)", data["dropout"])
    for field in ("base_rank", "padded_rank"):
        if data.get(field) is not None and not _is_int(data[field], 1):
            bad(field, "a positive integer", data[field])
    for field in ("budget_params", "trainable_params"):
        if data.get(field) is not None and not _is_int(data[field], 0):
            bad(field, "an integer >= 0", data[field])
    for field in ("base_model", "rank_scaling", "metadata"):
        if data.get(field) is not None and not isinstance(data[field], str):
            bad(field, "a string", data[field])
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
    init: str | None = None,
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
        **({"init": init} if init is not None else {}),
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


def record_beside(adapter_file: str | Path | None) -> dict | None:
    """The rank record of the directory holding `adapter_file` (an adapters.safetensors or one of its
    checkpoints), or None when there is none: the ranks that file was trained at."""
    if adapter_file is None:
        return None
    folder = Path(adapter_file).parent
    return read_record(folder) if has_record(folder) else None


def load_weights_file(adapter_path: str | Path) -> tuple[Path, dict[str, mx.array]]:
    """(path, tensors) of an adapter directory's adapters.safetensors; a clear error if it is missing."""
    weights_file = Path(adapter_path) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise OptiqFileError(f"{weights_file}: file not found")
    return weights_file, mx.load(str(weights_file))


def read_stock_config(adapter_path: str | Path) -> dict:
    """mlx-lm's own adapter_config.json of an adapter directory (an object; errors name the file)."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    return read_json(config_file)


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


def pad_adapter_file(src: str | Path, dst: str | Path, ranks: Mapping[str, int]) -> None:
    """Write the adapter tensors of `src` (compact or padded, checked against `ranks`) to `dst`
    zero-padded to the largest rank: the stock-loadable form. `dst` appears whole or not at all."""
    weights = fit_adapter_weights(mx.load(str(src)), ranks, source=str(src))
    save_safetensors_atomic(dst, pad_adapter_weights(weights, max(ranks.values())))


def set_padded_rank(adapter_path: str | Path, config_updates: Mapping | None = None) -> int:
    """Set the stock adapter_config.json's `lora_parameters.rank` (and the record's `padded_rank`) to
    the largest recorded rank, plus `config_updates`; returns that rank. Done before the first save
    of a run, so that every adapter file the run writes is loadable by stock mlx-lm as it appears."""
    from mlx_lm.utils import save_config

    adapter_path = Path(adapter_path)
    record = read_record(adapter_path)
    padded_rank = max(record_ranks(record).values())
    config = read_stock_config(adapter_path)
    lora_parameters = dict(config.get("lora_parameters") or {})
    lora_parameters["rank"] = padded_rank
    config["lora_parameters"] = lora_parameters
    config.update(config_updates or {})
    save_config(config, adapter_path / ADAPTER_CONFIG)
    record["padded_rank"] = padded_rank
    write_record(adapter_path, record)
    return padded_rank


def finalize_adapter_dir(adapter_path: str | Path, config_updates: Mapping | None = None) -> int:
    """Make an adapter directory trained at compact ranks loadable by stock mlx-lm.

    Zero-pads adapters.safetensors and every checkpoint `*_adapters.safetensors`
    to the largest recorded rank and sets `lora_parameters.rank` in the stock
    adapter_config.json to it (plus `config_updates`). Idempotent.
    """
    adapter_path = Path(adapter_path)
    ranks = record_ranks(read_record(adapter_path))
    for f in sorted(adapter_path.glob("*adapters.safetensors")):
        pad_adapter_file(f, f, ranks)  # validates the file against the record before rewriting it
    return set_padded_rank(adapter_path, config_updates)


def check_adapter_dir(adapter_path: str | Path) -> None:
    """Check that an adapter directory's record, tensors and stock config agree; an OptiqFileError
    lists every disagreement (a record that lies about its tensors would mount wrongly or not at all).

    Checked: every recorded module has lora_a (input_dims, r') and lora_b (r', output_dims) with
    r' >= its rank and zeros beyond it, and no tensor belongs to no recorded module; the stock
    config's `lora_parameters.rank` equals the tensors' padded rank and the record's `padded_rank`.
    """
    adapter_path = Path(adapter_path)
    record = read_record(adapter_path)
    weights_file, weights = load_weights_file(adapter_path)
    problems = []
    modules = record["modules"]
    for name, entry in modules.items():
        a, b = weights.get(f"{name}.lora_a"), weights.get(f"{name}.lora_b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            problems.append(f"module {name}: no 2-d lora_a/lora_b tensors in {weights_file.name}")
            continue
        dims = (int(a.shape[0]), int(b.shape[1]))
        want = (entry.get("input_dims", dims[0]), entry.get("output_dims", dims[1]))
        if dims != want:
            problems.append(
                f"module {name}: tensors are {dims[0]} -> {dims[1]}, the record says {want[0]} -> {want[1]}"
            )
        if a.shape[1] != b.shape[0]:
            problems.append(f"module {name}: lora_a has rank {a.shape[1]} but lora_b {b.shape[0]}")
    stray = sorted({_split_key(k)[0] for k in weights if _split_key(k)[1] in ADAPTER_LEAVES} - set(modules))
    if stray:
        problems.append(f"tensors of modules the record does not list: {', '.join(stray[:5])}")
    if not problems:
        try:
            fit_adapter_weights(weights, record_ranks(record), source=weights_file.name)
        except OptiqFileError as e:
            problems.append(str(e))
    stored = {int(w.shape[1]) for k, w in weights.items() if k.endswith(".lora_a") and w.ndim == 2}
    stock_rank = (read_stock_config(adapter_path).get("lora_parameters") or {}).get("rank")
    if len(stored) == 1 and stock_rank != next(iter(stored)):
        problems.append(
            f"{ADAPTER_CONFIG} has lora_parameters.rank {brief(stock_rank)} but the tensors have rank "
            f"{next(iter(stored))}: stock mlx-lm cannot load them"
        )
    if record.get("padded_rank") is not None and stored and record["padded_rank"] != max(stored):
        problems.append(f"the record's padded_rank is {record['padded_rank']}, the tensors' rank {max(stored)}")
    if problems:
        raise OptiqFileError(
            f"{adapter_path / RECORD_FILE} disagrees with the adapter it describes: " + "; ".join(problems[:8])
        )


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
        raise OptiqFileError(f"Adapter at {adapter_path} does not fit the model:\n" + "\n".join(errors))
    model.load_weights(list(weights.items()), strict=False)
    return model
