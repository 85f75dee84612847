"""Quantize a float base model while loading it (QLoRA on a model you only have in float).

`LoraTrainingConfig.load_in_4bits | load_in_6bits | load_in_8bits | load_in_mxfp4` or
`load_mixed` (the mlx_lm.lora flags of the same names, see hooks/lora.py) end up here.
The float weights are opened lazily (safetensors are memory-mapped by MLX and read on
evaluation) and each layer is quantized and evaluated on its
own, so at any moment at most one layer exists in float next to the quantized
model: the whole float model and the quantized one are never held at once.

Group sizes. The uniform flags use group size 128 (affine) or 32 (mxfp4). When
128 does not divide a layer's input dims (SmolLM2: 576), that layer uses the
largest of 64 or 32 that does, and the load prints how many layers that was;
a layer no candidate group divides is an error (stock mlx-lm would silently
leave it in float). `load_mixed` takes bits, group size and mode per
layer from an optiq_metadata.json sidecar; a layer with bits >= 16 stays float.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.core.model_tree import is_quantized_checkpoint, quantizable_modules, resolve_model_path
from mlx_lm_optiq.lora.config import LOAD_SCHEMES, MIXED_LOAD_SCHEME, locate_metadata
from mlx_lm_optiq.weights.metadata import read_metadata

# scheme (a LoraTrainingConfig field) -> quantization of every quantizable layer
UNIFORM_SCHEMES = {
    "load_in_4bits": {"bits": 4, "group_size": 128, "mode": "affine"},
    "load_in_6bits": {"bits": 6, "group_size": 128, "mode": "affine"},
    "load_in_8bits": {"bits": 8, "group_size": 128, "mode": "affine"},
    "load_in_mxfp4": {"bits": 4, "group_size": 32, "mode": "mxfp4"},
}
AFFINE_GROUP_FALLBACKS = (128, 64, 32)
QuantParams = dict[str, Any]  # {"group_size", "bits", "mode"} of one layer


def _input_dims(module):
    return int(module.weight.shape[-1])


def plan_uniform(model: Any, bits: int, group_size: int, mode: str) -> tuple[dict[str, QuantParams], dict[int, int]]:
    """{module path: quantization params} for one uniform scheme; and {group: n layers} fallbacks."""
    plan, fallbacks = {}, {}
    candidates = AFFINE_GROUP_FALLBACKS if mode == "affine" else (group_size,)
    candidates = [g for g in candidates if g <= group_size]
    for path, module in quantizable_modules(model).items():
        dims = _input_dims(module)
        group = next((g for g in candidates if dims % g == 0), None)
        if group is None:
            raise ValueError(
                f"{path}: input dims {dims} are not divisible by any {mode} group size in {candidates}; "
                "cannot quantize it at load time"
            )
        if group != group_size:
            fallbacks[group] = fallbacks.get(group, 0) + 1
        plan[path] = {"group_size": group, "bits": bits, "mode": mode}
    return plan, fallbacks


def plan_mixed(
    model: Any, metadata: Mapping, metadata_path: str | Path = "optiq_metadata.json"
) -> dict[str, QuantParams | bool]:
    """{module path: params, or False to keep float} from a sidecar's per-layer bits."""
    layers = metadata["layers"]
    plan = {}
    for path, module in quantizable_modules(model).items():
        if path not in layers:
            raise OptiqFileError(
                f"{metadata_path}: field 'layers' has no entry for {path}; "
                "mixed load-time quantization needs bits for every quantizable layer"
            )
        entry = layers[path]
        bits = entry["bits"]
        if bits >= 16:
            plan[path] = False
            continue
        group = entry.get("group_size")
        mode = entry.get("mode", "affine")
        if not isinstance(group, int) or group <= 0:
            raise OptiqFileError(
                f"{metadata_path}: field 'layers.{path}.group_size' must be a positive integer, got {group!r}"
            )
        if _input_dims(module) % group:
            raise OptiqFileError(
                f"{metadata_path}: field 'layers.{path}.group_size' is {group}, which does not divide "
                f"the layer's input dims {_input_dims(module)}"
            )
        plan[path] = {"group_size": group, "bits": int(bits), "mode": mode}
    return plan


def quantize_streaming(model: Any, plan: Mapping[str, QuantParams | bool], progress: bool = True) -> Any:
    """Quantize `model` in place following `plan`, one layer at a time.

    nn.quantize only builds lazy quantize ops; evaluating layer by layer then
    reads each float weight, quantizes it and drops it before the next.
    """
    from tqdm import tqdm

    nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))
    modules = dict(model.named_modules())
    for path in tqdm(list(plan), desc="optiq: quantizing while loading", disable=not progress):
        mx.eval(modules[path].parameters())
    mx.eval(model.parameters())
    return model


def quantization_config(plan: Mapping[str, QuantParams | bool]) -> dict | None:
    """The stock config.json "quantization" block for `plan` (per-layer entries)."""
    quantized = [p for p in plan.values() if p]
    if not quantized:
        return None
    first = quantized[0]
    block = {"group_size": first["group_size"], "bits": first["bits"], "mode": first["mode"]}
    block.update(plan)
    return block


def float_checkpoint_config(model_path: Path, field: str, why: str) -> dict:
    """The config.json of `model_path`, or a ConfigError on `field` when it is a quantized
    checkpoint (naming the file and the key that says so, then `why`)."""
    from mlx_lm.utils import load_config

    config = load_config(model_path)
    if is_quantized_checkpoint(config):
        key = "quantization" if "quantization" in config else "quantization_config"
        raise ConfigError(field, f"{model_path / 'config.json'}: field {key!r} is present: {why}")
    return config


def load_quantized(
    path_or_repo: str | Path,
    scheme: str,
    metadata_path: str | Path | None = None,
    tokenizer_config: dict | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> tuple[Any, Any, dict]:
    """Load a float model quantized on the fly; returns (model, tokenizer, config).

    scheme: one of UNIFORM_SCHEMES' keys, or "load_mixed" (per-layer bits from
    `metadata_path`, default the sidecar next to the model).
    """
    from mlx_lm.utils import load_model, load_tokenizer

    if scheme not in LOAD_SCHEMES:
        raise ValueError(f"unknown load-time quantization {scheme!r}; expected one of {list(LOAD_SCHEMES)}")
    model_path = resolve_model_path(path_or_repo)
    config = float_checkpoint_config(
        model_path, scheme, "the model is already quantized; load-time quantization needs a float base model"
    )
    model, config = load_model(model_path, lazy=True, trust_remote_code=trust_remote_code)
    if scheme == MIXED_LOAD_SCHEME:
        mpath = locate_metadata(model_path, metadata_path)
        plan = plan_mixed(model, read_metadata(mpath), mpath)
    else:
        params = UNIFORM_SCHEMES[scheme]
        plan, fallbacks = plan_uniform(model, **params)
        for group, n in sorted(fallbacks.items(), reverse=True):
            print(
                f"[optiq] group size {params['group_size']} does not divide the input dims of {n} layers; "
                f"quantized them with group size {group}"
            )
    quantize_streaming(model, plan, progress=progress)
    block = quantization_config(plan)
    if block is not None:
        config["quantization"] = block
        config["quantization_config"] = block
    tokenizer = load_tokenizer(model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None))
    return model, tokenizer, config
