"""PEFT (Hugging Face) LoRA adapters: export from mlx-lm, import for mounting in mlx-lm.

Layouts. mlx-lm computes  y = W x + scale * (x @ lora_a) @ lora_b  with lora_a (in, r),
lora_b (r, out) and one `scale` for every module. PEFT computes
y = W x + (alpha / r) * lora_B(lora_A(x))  with lora_A.weight (r, in), lora_B.weight
(out, r) and per-module r and alpha through `rank_pattern` / `alpha_pattern`.
So lora_A.weight = lora_a.T, lora_B.weight = lora_b.T and alpha_l = scale * r_l.
On import, a per-module scaling alpha_l / r_l (or alpha_l / sqrt(r_l) with
rsLoRA) that differs from the common one is folded into lora_b, which is exact.

Keys: PEFT saves `base_model.model.<module path>.lora_A.weight`; for Llama-style
models the module path is the same as mlx-lm's (`model.layers.0.self_attn.q_proj`).

Functions other features call:
  export_peft(adapter_path, out_dir)                 -> out_dir
  load_peft_adapter(path) -> (lora_config, weights)  lora_config: {"rank": r_max,
      "ranks": {path: r}, "scale", "dropout", "fine_tune_type": "lora"};
      weights: {"<path>.lora_a": (in, r), "<path>.lora_b": (r, out)} (compact)
  mount_peft_adapter(model, path)                    compact LoRA layers on `model`
  import_peft(path, out_dir, base_model)             a stock mlx-lm adapter directory
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lm_optiq.core.jsonio import OptiqFileError, atomic_output_dir
from mlx_lm_optiq.core.model_tree import resolve_model_path
from mlx_lm_optiq.lora import adapter_files

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<leaf>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def export_peft(adapter_path: str | Path, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_model.safetensors` + PEFT `adapter_config.json` for an mlx-lm LoRA adapter."""
    from safetensors.numpy import save_file

    ranks, weights, meta = adapter_files.read_adapter(adapter_path)
    if meta["fine_tune_type"] != "lora":
        raise ValueError(
            f"{adapter_path}: fine_tune_type is {meta['fine_tune_type']!r}; PEFT export supports LoRA only"
        )
    extra = [k for k in weights if not k.endswith((".lora_a", ".lora_b"))]
    if extra:
        raise ValueError(f"{adapter_path}: tensors {extra[:3]} are not LoRA matrices; cannot export to PEFT")
    scale = float(meta["scale"])
    tensors = {}
    for path in ranks:
        a = np.array(weights[f"{path}.lora_a"].astype(mx.float32))
        b = np.array(weights[f"{path}.lora_b"].astype(mx.float32))
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or meta.get("base_model"),
        "r": default_rank,
        "lora_alpha": scale * default_rank,
        # Full module paths: PEFT matches them as `(.*\.)?<key>$`, so each names exactly one module.
        "target_modules": sorted(ranks),
        "rank_pattern": {p: r for p, r in ranks.items() if r != default_rank},
        "alpha_pattern": {p: scale * r for p, r in ranks.items() if r != default_rank},
        "lora_dropout": float(meta["dropout"]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _pattern_value(patterns, path, default):
    """PEFT's own rule (peft.utils.other.get_pattern_key): first key matching `(.*\\.)?key$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_peft_adapter(path: str | Path) -> tuple[dict, dict[str, mx.array]]:
    """Read a PEFT LoRA adapter directory; returns (lora_config, {mlx-lm key: array}).

    Errors name the file and field for everything mlx-lm's LoRA cannot express
    (DoRA, biases, fan_in_fan_out, modules_to_save, non-LoRA PEFT types).
    """
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_file.is_file():
        raise OptiqFileError(f"{config_file}: file not found")
    if not weights_file.is_file():
        hint = (
            " (adapter_model.bin is not supported; re-save with safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise OptiqFileError(f"{weights_file}: file not found{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise OptiqFileError(f"{config_file}: not valid JSON ({e})") from None
    checks = [("peft_type", "LORA"), ("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)]
    for field, expected in checks:
        value = config.get(field, expected if field != "peft_type" else None)
        if value != expected:
            raise OptiqFileError(f"{config_file}: field {field!r} is {value!r}, expected {expected!r}")
    if config.get("modules_to_save"):
        raise OptiqFileError(f"{config_file}: field 'modules_to_save' is set; only LoRA matrices can be imported")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)):
            raise OptiqFileError(f"{config_file}: field {field!r} must be a number, got {config.get(field)!r}")

    pairs = {}
    for key, w in mx.load(str(weights_file)).items():
        m = _KEY.match(key)
        if m is None:
            raise OptiqFileError(f"{weights_file}: tensor {key!r} is not a LoRA matrix (lora_A/lora_B)")
        pairs.setdefault(m["path"], {})[m["leaf"]] = w
    if not pairs:
        raise OptiqFileError(f"{weights_file}: no LoRA tensors")

    ranks, scalings, weights = {}, {}, {}
    for mpath, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise OptiqFileError(f"{weights_file}: module {mpath} has {sorted(ab)}, expected lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        r = int(a.shape[0])
        if b.shape[1] != r:
            raise OptiqFileError(f"{weights_file}: {mpath} lora_A is {tuple(a.shape)} but lora_B is {tuple(b.shape)}")
        expected_r = _pattern_value(config.get("rank_pattern"), mpath, config["r"])
        if expected_r != r:
            raise OptiqFileError(
                f"{config_file}: rank for {mpath} is {expected_r} (field 'r'/'rank_pattern') "
                f"but its tensors have rank {r}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), mpath, config["lora_alpha"])
        scalings[mpath] = alpha / (r**0.5 if config.get("use_rslora") else r)
        ranks[mpath] = r
        weights[f"{mpath}.lora_a"] = a.T.astype(mx.float32)
        weights[f"{mpath}.lora_b"] = b.T.astype(mx.float32)
    scale = Counter(scalings.values()).most_common(1)[0][0]
    for mpath, s in scalings.items():
        if s != scale:  # mlx-lm has one scale: fold the ratio into lora_b (exact)
            weights[f"{mpath}.lora_b"] = weights[f"{mpath}.lora_b"] * (s / scale)
    lora_config = {
        "fine_tune_type": "lora",
        "rank": max(ranks.values()),
        "ranks": ranks,
        "scale": float(scale),
        "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
        "base_model": config.get("base_model_name_or_path"),
    }
    return lora_config, weights


def mount_peft_adapter(model: Any, path: str | Path) -> Any:
    """Put a PEFT adapter on an mlx-lm model at its own per-module ranks; returns the model."""
    from mlx.utils import tree_flatten

    lora_config, weights = load_peft_adapter(path)
    adapter_files.build_lora_modules(
        model, lora_config["ranks"], scale=lora_config["scale"], dropout=lora_config["dropout"]
    )
    params = dict(tree_flatten(model.parameters()))
    bad = [k for k, w in weights.items() if k not in params or params[k].shape != w.shape]
    if bad:
        raise ValueError(f"PEFT adapter {path}: tensors {bad[:3]} do not fit the model")
    model.load_weights(list(weights.items()), strict=False)
    return model


def import_peft(path: str | Path, out_dir: str | Path, base_model: str | Path) -> Path:
    """Convert a PEFT LoRA adapter into an mlx-lm adapter directory.

    The result loads with stock `mlx_lm.load(base_model, adapter_path=out_dir)` (zero-padded
    to the largest rank, exact) and, with optiq enabled, at its compact ranks.
    """
    from mlx_lm.utils import load_config, save_config

    lora_config, weights = load_peft_adapter(path)
    model_config = load_config(resolve_model_path(base_model))
    num_blocks = model_config.get("num_hidden_layers")
    block = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    keys, first_block = set(), None
    for mpath in lora_config["ranks"]:
        m = block.match(mpath)
        if m:
            keys.add(m[2])
            first_block = int(m[1]) if first_block is None else min(first_block, int(m[1]))
        else:
            keys.add(mpath)  # stock linear_to_lora_layers also converts full paths (e.g. lm_head)
    if first_block is not None and not isinstance(num_blocks, int):
        raise OptiqFileError(f"{base_model}/config.json: field 'num_hidden_layers' is missing")
    num_layers = (num_blocks - first_block) if first_block is not None else 0
    padded_rank = lora_config["rank"]
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as staging:
        adapter_files.save_safetensors_atomic(
            staging / adapter_files.ADAPTER_WEIGHTS, adapter_files.pad_adapter_weights(weights, padded_rank)
        )
        save_config(
            {
                "fine_tune_type": "lora",
                "model": str(base_model),
                "num_layers": num_layers,
                "lora_parameters": {
                    "rank": padded_rank,
                    "scale": lora_config["scale"],
                    "dropout": lora_config["dropout"],
                    "keys": sorted(keys),
                },
                "optiq_imported_from": str(path),
            },
            staging / adapter_files.ADAPTER_CONFIG,
        )
        shapes = adapter_files.adapter_shapes(weights)
        adapter_files.write_record(
            staging,
            adapter_files.new_record(
                base_model=str(base_model),
                fine_tune_type="lora",
                rank_scaling="imported",
                base_rank=Counter(lora_config["ranks"].values()).most_common(1)[0][0],
                padded_rank=padded_rank,
                scale=lora_config["scale"],
                dropout=lora_config["dropout"],
                modules=shapes,
            ),
        )
    return out_dir
