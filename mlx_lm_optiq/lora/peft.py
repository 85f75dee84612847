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
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lm_optiq.core.errors import brief
from mlx_lm_optiq.core.jsonio import OptiqFileError, atomic_output_dir, read_json
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


# PEFT features that change what a module computes beyond W x + s * B A x: a config that
# turns one on cannot be expressed as mlx-lm LoRA, so it is refused rather than ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully fine-tuned modules",
    "layer_replication": "replicated layers",
    "use_qalora": "QALoRA input pooling",
    "alora_invocation_tokens": "activated LoRA",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters",
}


def _is_str_or_list(value: Any, item_type: type = str) -> bool:
    if value is None or (isinstance(value, item_type) and not isinstance(value, bool)):
        return True
    return isinstance(value, list) and all(isinstance(v, item_type) and not isinstance(v, bool) for v in value)


# Fields that do not change the arithmetic (which modules are adapted is read from the
# tensors), type-checked so that a corrupted file is reported as one.
_INFORMATIVE = {
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "peft_version": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (_is_str_or_list, "a module name, a list of them, or null"),
    "exclude_modules": (_is_str_or_list, "a module name, a list of them, or null"),
    "layers_pattern": (_is_str_or_list, "a string, a list of strings, or null"),
    "layers_to_transform": (lambda v: _is_str_or_list(v, int), "a layer index, a list of them, or null"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_peft_config(config_file: Path) -> dict:
    """Read and type-check the PEFT `adapter_config.json`; every error names the file and field.

    Only the fields that decide what the adapter computes are checked strictly (PEFT adds
    informative fields in every release; those are left alone unless they are fields we
    pass on). A pattern key is a regular expression in PEFT, so it must compile.
    """
    try:
        data = read_json(config_file)
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        if isinstance(e, OptiqFileError):
            raise
        raise OptiqFileError(f"{config_file}: not valid JSON ({type(e).__name__}: {brief(str(e), 120)})") from None

    def bad(field: str, expected: str) -> OptiqFileError:
        return OptiqFileError(f"{config_file}: field {field!r} is {brief(data.get(field))}, expected {expected}")

    if data.get("peft_type") != "LORA":
        raise bad("peft_type", "'LORA' (only LoRA adapters can be read)")
    for field, feature in _UNSUPPORTED.items():
        value = data.get(field)
        if value not in (None, False, [], {}):
            raise bad(field, f"unset or false: {feature} cannot be expressed as mlx-lm LoRA")
    if data.get("bias", "none") != "none":
        raise bad("bias", "'none': mlx-lm LoRA has no trainable biases")
    if not _is_rank(data.get("r")):
        raise bad("r", "a positive integer (the LoRA rank)")
    if not _is_number(data.get("lora_alpha")):
        raise bad("lora_alpha", "a finite number")
    if not isinstance(data.get("use_rslora", False), bool):
        raise bad("use_rslora", "true or false")
    dropout = data.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1) or null")
    for field, (is_value, expected) in _INFORMATIVE.items():
        if field in data and not is_value(data[field]):
            raise bad(field, expected)
    for field, is_value, expected in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        patterns = data.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise bad(field, "an object {module pattern: value} or null")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise OptiqFileError(
                    f"{config_file}: field {field!r}: key {brief(key)} is not a valid module pattern ({e})"
                ) from None
            if not is_value(value):
                raise OptiqFileError(
                    f"{config_file}: field {field!r}: {brief(key)} maps to {brief(value)}, expected {expected}"
                )
    return data


def _read_peft_tensors(weights_file: Path) -> dict[str, dict[str, mx.array]]:
    """{module path: {"lora_A": (r, in), "lora_B": (out, r)}} from `adapter_model.safetensors`, checked."""
    try:
        tensors = mx.load(str(weights_file))
    except Exception as e:  # mlx raises RuntimeError/ValueError with the parser's words
        raise OptiqFileError(f"{weights_file}: cannot read safetensors ({brief(str(e), 200)})") from None
    if not isinstance(tensors, dict):
        raise OptiqFileError(f"{weights_file}: expected a safetensors file of named tensors")
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, w in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise OptiqFileError(f"{weights_file}: tensor {brief(key)} is not a LoRA matrix (lora_A/lora_B)")
        if w.ndim != 2:
            raise OptiqFileError(f"{weights_file}: tensor {key!r} has shape {tuple(w.shape)}, expected a matrix")
        if not mx.issubdtype(w.dtype, mx.floating):
            raise OptiqFileError(f"{weights_file}: tensor {key!r} has dtype {w.dtype}, expected a floating type")
        pairs.setdefault(m["path"], {})[m["leaf"]] = w
    if not pairs:
        raise OptiqFileError(f"{weights_file}: no LoRA tensors")
    return pairs


def load_peft_adapter(path: str | Path) -> tuple[dict, dict[str, mx.array]]:
    """Read a PEFT LoRA adapter directory; returns (lora_config, {mlx-lm key: array}).

    Errors name the file and field for everything mlx-lm's LoRA cannot express
    (DoRA, biases, fan_in_fan_out, modules_to_save, non-LoRA PEFT types) and for every
    field of the wrong type, so a malformed file never ends in a traceback.
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
    config = _read_peft_config(config_file)
    pairs = _read_peft_tensors(weights_file)

    ranks, scalings, weights = {}, {}, {}
    for mpath, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise OptiqFileError(f"{weights_file}: module {mpath} has {sorted(ab)}, expected lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        r = int(a.shape[0])
        if r < 1 or b.shape[1] != r:
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
    # mlx-lm has one scale: the most common non-zero scaling, the others folded into lora_b (exact)
    nonzero = Counter(s for s in scalings.values() if s != 0)
    scale = nonzero.most_common(1)[0][0] if nonzero else 0.0
    for mpath, s in scalings.items():
        if s != scale:
            ratio = s / scale
            if not math.isfinite(ratio):
                raise OptiqFileError(
                    f"{config_file}: the scaling of {mpath} ({s:g}) is out of range of the others ({scale:g})"
                )
            weights[f"{mpath}.lora_b"] = weights[f"{mpath}.lora_b"] * ratio
    lora_config = {
        "fine_tune_type": "lora",
        "rank": max(ranks.values()),
        "ranks": ranks,
        "scale": float(scale),
        "dropout": float(config.get("lora_dropout") or 0.0),
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
