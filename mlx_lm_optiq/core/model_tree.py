"""The model as a tree of modules, and the one way each feature finds and loads a model.

mlx-lm models are nested `nn.Module`s whose quantizable leaves (`to_quantized`) are
addressed by dotted paths ("model.layers.3.mlp.down_proj"). Every feature walks,
swaps and loads them through these functions so that a path, a "float model" and a
"local model directory" mean the same thing everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.errors import OptiqError, brief, one_line

MODEL_CONVERSION_DTYPES = ("float16", "bfloat16", "float32")


class ModelError(OptiqError):
    """A model that cannot be used as asked (missing, already quantized, no weight ...)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No local model directory and no hub snapshot for a model spec (a FileNotFoundError too)."""


# ---------------------------------------------------------------- the module tree


def get_module(model: Any, path: str) -> Any:
    """The submodule at dotted `path` (list items by index)."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def set_module(model: Any, path: str, module: Any) -> None:
    """Replace the submodule at dotted `path` with `module`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def quantizable_modules(model: Any) -> dict[str, Any]:
    """{path: module} of every `to_quantized` leaf, in model order.

    Raises when the model has already-quantized leaves: their float weights are
    gone, so they must be dequantized first (`dequantize`).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    out = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if "scales" in module:
            raise ModelError(
                f"module {path} is already quantized ({type(module).__name__}); "
                "dequantize the model first (mlx_lm.utils.dequantize_model)"
            )
        if hasattr(module, "to_quantized"):
            if not isinstance(module.get("weight"), mx.array):
                raise ModelError(f"module {path} ({type(module).__name__}) has no 'weight' array")
            out[path] = module
    return out


def is_quantized(model: Any) -> bool:
    """Whether any module of the loaded `model` is quantized."""
    return any("scales" in m and hasattr(m, "bits") for _, m in model.named_modules())


def float_dtype_of(model: Any) -> Any:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def cast_floats(model: Any, dtype: Any) -> Any:
    """Cast every floating-point parameter of `model` to `dtype` in place (integers untouched)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    return model


# ---------------------------------------------------------------- finding and loading


def looks_like_local_path(spec: str) -> bool:
    """A spec that can only be a local path (not a hub id "org/name")."""
    s = str(spec)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """The local directory of a model: the path itself, or the hub snapshot mlx-lm would download.

    A spec that can only be a local path and does not exist is a clear ModelNotFoundError
    (a FileNotFoundError), not a hub lookup of a mistyped path; so is a spec that is not a
    valid hub id either, and a failed hub lookup, whose one-line message names the spec and
    the hub's reason.
    """
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelError(f"{path_or_repo}: not a model directory (a model is a folder with config.json)")
    if looks_like_local_path(str(path_or_repo)):
        raise ModelNotFoundError(f"{path_or_repo}: no such model directory")
    from huggingface_hub.utils import HFValidationError
    from mlx_lm.utils import _download

    try:
        return Path(_download(str(path_or_repo), revision=revision))
    except HFValidationError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelNotFoundError(
            f"{path_or_repo}: no such local path, and not a valid Hugging Face Hub id ({reason})"
        ) from None
    except Exception as e:  # huggingface_hub's errors (offline, unknown repo) have no common base
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelNotFoundError(
            f"{path_or_repo}: no such model directory, and the Hugging Face Hub lookup failed ({reason})"
        ) from e


def read_model_config(model_path: str | Path) -> dict[str, Any]:
    """A model directory's config.json as mlx-lm reads it, checked far enough to load the model.

    mlx-lm itself fails on a missing or garbage config.json with a traceback
    (FileNotFoundError, UnicodeDecodeError, JSONDecodeError, KeyError 'model_type'); here
    each is a ModelError naming the file and what is wrong, raised before any long work.
    An architecture mlx-lm does not know is named too.
    """
    from mlx_lm.utils import load_config

    from mlx_lm_optiq.core.jsonio import OptiqFileError, parse_json_bytes

    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: file not found (a model directory needs its config.json)")
    try:
        data = parse_json_bytes(path.read_bytes(), path)
    except (OptiqFileError, OSError) as e:
        raise ModelError(str(e)) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{path}: field 'model_type' must be a non-empty string, got {brief(model_type)}")
    from mlx_lm import utils

    get_classes = getattr(utils, "_get_classes", None)  # mlx-lm's own architecture lookup
    if get_classes is not None:
        try:
            get_classes(data)
        except (ValueError, TypeError) as e:  # "Model type X not supported.", a non-list `architectures`
            raise ModelError(f"{path}: field 'model_type' is {brief(model_type)}: {one_line(str(e), 200)}") from None
    return load_config(Path(model_path))


def is_quantized_checkpoint(config: dict) -> bool:
    """Whether a model's config.json describes a quantized checkpoint."""
    return "quantization" in config or "quantization_config" in config


def conversion_dtype(config: dict, dtype_arg: str | None) -> Any:
    """The dtype stock convert casts float weights to (same rule as mlx_lm.convert), or None."""
    import mlx.core as mx

    dtype = dtype_arg or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return getattr(mx, dtype) if dtype in MODEL_CONVERSION_DTYPES else None


def dequantize(model: Any) -> tuple[Any, dict[str, Any]]:
    """(model with every quantized leaf dequantized, {path: the original quantized module}).

    Lazy weights stay lazy. The originals let a caller re-read one module's exact
    quantized values (the low-bit reference of the sweep does).
    """
    from mlx_lm.utils import dequantize_model

    originals = {name: m for name, m in model.named_modules() if "scales" in m and hasattr(m, "bits")}
    if originals:
        model = dequantize_model(model)
    return model, originals


def load_float_model(
    path_or_repo: str | Path, dtype: Any = None, *, lazy: bool = True, revision: str | None = None
) -> tuple[Any, dict]:
    """(model, config) of a model as floats: a quantized checkpoint is dequantized.

    dtype: None keeps the checkpoint's float dtype, else an `mx.Dtype` or its name
    ("float32": fastest on CPU, and what simulated-quantization measurements use).
    With lazy=False the weights are evaluated before returning.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model

    path = resolve_model_path(path_or_repo, revision)
    read_model_config(path)  # a missing or garbage config.json: one clear error first
    model, config = load_model(path, lazy=True)
    model, originals = dequantize(model)
    if originals:
        logging.info("mlx_lm_optiq: %s is quantized; the float model is its dequantization", path)
    if dtype is not None:
        cast_floats(model, getattr(mx, dtype) if isinstance(dtype, str) else dtype)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def write_float_source(model_path: str | Path, dst: Path) -> Path:
    """Dequantize a quantized checkpoint into `dst` with mlx-lm's own functions.

    Stock convert cannot re-quantize quantized layers (QuantizedLinear has no
    `to_quantized`, so `-q` would silently keep the old bits); the dequantized
    copy is the float source every plan is made for.
    """
    from mlx_lm.utils import dequantize_model, load, save

    model, tokenizer, config = load(str(model_path), lazy=True, return_config=True)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    model = dequantize_model(model)
    save(dst, model_path, model, tokenizer, config)
    return dst


def float_leaf(module: Any) -> Any:
    """The float module of a quantized leaf, exactly as mlx_lm's `dequantize_model` makes it (its
    own function, run on a holder of this one module: the same classes, dequantized in the scales'
    dtype), or None when `dequantize_model` leaves the module as it is. Lazy weights stay lazy."""
    import mlx.nn as nn
    from mlx_lm import utils

    holder = nn.Module()
    holder.m = module
    utils.dequantize_model(holder)
    out = holder.m
    return None if out is module else out


def requantize_leaves(
    model: Any,
    config: dict,
    quantization: tuple[int, int, str],
    quant_predicate: Any,
    dtype: Any = None,
    progress: bool = True,
) -> dict:
    """Stock convert's `-q` of the dequantized `model`, one leaf module at a time; returns the config
    stock `quantize_model` would write (`config`: the source's, without its quantization entries).

    What `write_float_source` + stock convert do to the whole model, done per leaf and evaluated
    before the next: a quantized leaf is dequantized (`float_leaf`), its floats cast to `dtype` as
    stock convert casts them (`model.cast_predicate`), `quant_predicate` is asked under stock
    `quantize_model`'s rules (a leaf with `to_quantized` whose input dim the top-level group size
    divides; a dict result is the module's config entry), stock `nn.quantize` makes the quantized
    module, which replaces the leaf. The source leaf is dropped once replaced, so memory holds the
    written modules, the source still to read (a lazily loaded source: not yet read) and one float
    module. quantization: the top-level (group_size, bits, mode)."""
    import copy

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map_with_path
    from tqdm import tqdm

    if "quantization" in config or "quantization_config" in config:
        raise ModelError("requantize_leaves: pass the config without its quantization entries")
    group_size, bits, mode = quantization
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)

    def cast(prefix: str, params: Any) -> Any:
        def one(k, v):
            if dtype is not None and cast_predicate(prefix + k) and mx.issubdtype(v.dtype, mx.floating):
                return v if v.dtype == dtype else v.astype(dtype)
            return v

        return tree_map_with_path(one, params)

    quantized_config = copy.deepcopy(config)
    quantized_config["quantization"] = {"group_size": group_size, "bits": bits, "mode": mode}
    # Paths only: a list of the modules themselves would keep every source leaf (and its read
    # arrays) alive to the end.
    paths = [p for p, _ in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)]
    for path in tqdm(paths, desc="optiq: re-quantizing module by module", disable=not progress):
        source = get_module(model, path)
        module = float_leaf(source) if "scales" in source else None
        module = source if module is None else module
        module.update(cast(path + ".", module.parameters()))
        params = False
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0:
            params = quant_predicate(path, module)
        if isinstance(params, dict):
            quantized_config["quantization"][path] = params
        if params:
            holder = nn.Module()
            holder.m = module
            nn.quantize(holder, group_size, bits, mode=mode, class_predicate=lambda _, m, params=params: params)
            module = holder.m
            del holder
        mx.eval(module.parameters())
        if module is not source:
            set_module(model, path, module)
        del source, module
        mx.clear_cache()
    model.update(cast("", model.parameters()))  # parameters outside the leaves, as stock casts them
    quantized_config["quantization_config"] = quantized_config["quantization"]
    return quantized_config
