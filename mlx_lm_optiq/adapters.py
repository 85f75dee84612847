"""Many LoRA adapters resident on one base model, selected per request or per batch row.

    mount_adapter(model, "a", "path/or/hf-repo")   # mlx-lm, optiq per-layer-rank or PEFT adapter
    with use_adapter("a"):
        generate(model, tokenizer, prompt)          # every forward in this context uses "a"
    unmount_adapter(model, "a")                     # the last unmount restores the original modules

Each adapted linear layer is replaced by a `MultiLoRALinear` that keeps the original
module as `.linear` and a bank of LoRA pairs (one per mounted adapter). The adapter
tensors live in a plain Python object, not in the module tree, so they are never
parameters of the model and mounting changes nothing the stock tools save or train.

Selection, in order of precedence for one forward pass:
  1. `adapter_rows(model, names)`: one adapter name (or None for the base) per batch
     row. Rows of different adapters are computed in the same forward pass: with
     gathered matmuls over stacked A/B (`mx.gather_mm` on the CPU, `mx.take` + batched
     matmul elsewhere), see MIXED_ROWS_METHOD.
  2. `use_adapter(name)`: one adapter for the whole batch (a ContextVar).
When every row uses one adapter the layer computes exactly what mlx-lm's LoRALinear
computes (`y + (scale * ((x @ a) @ b)).astype(x.dtype)`), so a solo run matches stock.
"""

import contextlib
import contextvars
import itertools
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

ACTIVE_ADAPTER = contextvars.ContextVar("mlx_lm_optiq_active_adapter", default=None)
_BATCH_ROWS = contextvars.ContextVar("mlx_lm_optiq_adapter_rows", default=None)

# Mount serials make prompt-cache keys unique per mount, so re-mounting another
# adapter under an old name never reuses the old adapter's KV caches.
_SERIALS = itertools.count(1)


class AdapterError(ValueError):
    """An adapter file/directory is missing or malformed, or does not fit the model."""


class UnknownAdapterError(AdapterError):
    def __init__(self, name, mounted):
        self.name = name
        self.mounted = sorted(mounted)
        super().__init__(f"unknown adapter {name!r}; mounted adapters: {self.mounted}")


@dataclass
class AdapterWeights:
    """LoRA pairs read from disk: module path -> (a (in, r), b (r, out), scale)."""

    source: str
    format: str  # "mlx-lm" | "optiq" | "peft"
    layers: dict

    @property
    def nbytes(self):
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())

    @property
    def ranks(self):
        return {path: a.shape[1] for path, (a, _, _) in self.layers.items()}


@dataclass
class MountedAdapter:
    name: str
    slot: int
    serial: int
    source: str
    format: str
    nbytes: int
    ranks: dict = field(repr=False)


# ---------------------------------------------------------------------------
# Reading adapters


def _looks_like_hf_repo(spec):
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~"))
        and ".." not in parts
        and "\\" not in spec
    )


def resolve_adapter_path(spec):
    """A local adapter directory, or a Hugging Face repo id downloaded with huggingface_hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"adapter path {spec}: expected a directory, got a file")
    if not _looks_like_hf_repo(str(spec)):
        raise AdapterError(f"adapter path {spec}: no such directory (and not a Hugging Face repo id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise AdapterError(f"adapter {spec}: not a local directory and the Hugging Face download failed: {e}") from e


def _read_config(path, name):
    file = path / name
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{file}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file}: expected a JSON object at the top level")
    return data


def _load_tensors(file):
    if not file.is_file():
        raise AdapterError(f"{file}: file not found")
    try:
        return mx.load(str(file))
    except Exception as e:
        raise AdapterError(f"{file}: cannot read safetensors ({e})") from None


def _trim_zero_rank(a, b):
    """Drop rank components whose A column and B row are both all zero (exact).

    Per-layer-rank adapters saved for stock mlx-lm are zero-padded to the
    largest rank; mounting them at their true rank saves compute and memory.
    """
    live = mx.logical_or(mx.any(a != 0, axis=0), mx.any(b != 0, axis=1)).tolist()
    if all(live):
        return a, b
    keep = mx.array([i for i, v in enumerate(live) if v], dtype=mx.int32)
    if keep.size == 0:
        return a[:, :0], b[:0, :]
    return mx.take(a, keep, axis=1), mx.take(b, keep, axis=0)


def _pairs(tensors, file, suffix_a, suffix_b, prefix=""):
    """Group tensors into {module path: (a, b)}; errors name the file and key."""
    groups = {}
    for key, value in tensors.items():
        for suffix, slot in ((suffix_a, 0), (suffix_b, 1)):
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                if prefix and path.startswith(prefix):
                    path = path[len(prefix):]
                groups.setdefault(path, [None, None])[slot] = value
                break
        else:
            raise AdapterError(
                f"{file}: tensor {key!r} is not a LoRA tensor (expected names ending in {suffix_a!r} or {suffix_b!r})"
            )
    for path, (a, b) in groups.items():
        if a is None or b is None:
            missing = suffix_a if a is None else suffix_b
            raise AdapterError(f"{file}: layer {path!r} has no {missing!r} tensor")
    if not groups:
        raise AdapterError(f"{file}: contains no LoRA tensors")
    return groups


def _scale_of(config, file):
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{file}: missing field 'lora_parameters' (an object with 'rank' and 'scale')")
    scale = params.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise AdapterError(f"{file}: field 'lora_parameters.scale' must be a number, got {scale!r}")
    return float(scale)


def _read_mlx_lm(path, config):
    file = path / "adapter_config.json"
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "lora":
        raise AdapterError(
            f"{file}: field 'fine_tune_type' is {fine_tune_type!r}; only 'lora' adapters can be mounted"
            " (fuse DoRA/full fine-tunes with mlx_lm.fuse instead)"
        )
    scale = _scale_of(config, file)
    tensors_file = path / "adapters.safetensors"
    groups = _pairs(_load_tensors(tensors_file), tensors_file, ".lora_a", ".lora_b")
    layers = {}
    for module_path, (a, b) in groups.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{tensors_file}: layer {module_path!r} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)};"
                " expected (in, r) and (r, out)"
            )
        a, b = _trim_zero_rank(a, b)
        layers[module_path] = (a, b, scale)
    return layers


def _read_peft(path, config):
    """PEFT LoRA (adapter_config.json with peft_type LORA + adapter_model.safetensors)."""
    file = path / "adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: field 'peft_type' is {config.get('peft_type')!r}; only 'LORA' can be mounted")
    if config.get("use_dora"):
        raise AdapterError(f"{file}: field 'use_dora' is true; DoRA adapters cannot be mounted")
    tensors_file = path / "adapter_model.safetensors"
    if not tensors_file.is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterError(f"{tensors_file}: file not found (only safetensors PEFT adapters are supported, not .bin)")
    tensors = _load_tensors(tensors_file)
    groups = _pairs(tensors, tensors_file, ".lora_A.weight", ".lora_B.weight", prefix="base_model.model.")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)):
        raise AdapterError(f"{file}: field 'lora_alpha' must be a number, got {alpha!r}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    layers = {}
    for module_path, (a_t, b_t) in groups.items():
        # PEFT stores torch layouts: lora_A (r, in), lora_B (out, r).
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != b_t.shape[1]:
            raise AdapterError(
                f"{tensors_file}: layer {module_path!r} has lora_A {tuple(a_t.shape)} and lora_B {tuple(b_t.shape)};"
                " expected (r, in) and (out, r)"
            )
        r = a_t.shape[0]
        layer_alpha = next((v for k, v in alpha_pattern.items() if module_path.endswith(k)), alpha)
        expected_r = next((v for k, v in rank_pattern.items() if module_path.endswith(k)), config.get("r", r))
        if expected_r != r:
            raise AdapterError(f"{tensors_file}: layer {module_path!r} has rank {r}, config says {expected_r}")
        scale = layer_alpha / math.sqrt(r) if config.get("use_rslora") else layer_alpha / r
        layers[module_path] = (a_t.T, b_t.T, float(scale))
    return layers


def read_adapter(spec):
    """Read an adapter directory (or HF repo id) into AdapterWeights, whatever its format."""
    path = resolve_adapter_path(spec)
    if (path / "optiq_lora_config.json").is_file() and not (path / "adapters.safetensors").is_file():
        raise AdapterError(
            f"{path}: has optiq_lora_config.json but no adapters.safetensors; expected an mlx-lm-compatible"
            " per-layer-rank adapter written by mlx_lm.lora with --optiq-* flags"
        )
    config = _read_config(path, "adapter_config.json")
    if "peft_type" in config:
        return AdapterWeights(str(spec), "peft", _read_peft(path, config))
    layers = _read_mlx_lm(path, config)
    ranks = {a.shape[1] for a, _, _ in layers.values()}
    fmt = "optiq" if (path / "optiq_lora_config.json").is_file() or len(ranks) > 1 else "mlx-lm"
    return AdapterWeights(str(spec), fmt, layers)


# ---------------------------------------------------------------------------
# The layer


def _linear_dims(module):
    """(input_dims, output_dims) of a linear-like module, or None."""
    if isinstance(module, MultiLoRALinear):
        return module.input_dims, module.output_dims
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return packed * 32 // module.bits, out
    if isinstance(module, nn.Linear):
        out, inp = module.weight.shape
        return inp, out
    inner = getattr(module, "linear", None)  # mlx-lm's LoRALinear / DoRALinear
    if isinstance(inner, nn.Module) and inner is not module:
        return _linear_dims(inner)
    return None


class _Bank:
    """The LoRA pairs of one layer (a plain object: never part of the module tree)."""

    def __init__(self):
        self.entries = {}  # slot -> (a, b, scale); replaced, never mutated, so readers need no lock
        self.stacked = None  # (n_slots, layout, arrays...) for mixed batches, see MultiLoRALinear._stacked


# How a batch whose rows use different adapters is computed (None: by device).
#   "gather": per-row gathered A/B (`mx.gather_mm`): fewest FLOPs; fastest on the CPU
#     (mlx 0.32.4 has no working CUDA path for it: cuGraphAddKernelNode fails).
#   "take": the rows' A/B gathered with `mx.take`, then batched matmuls: the default off
#     the CPU (measured on an H200: 0.47x of base-row throughput in the server on a
#     30-layer SmolLM2-shaped model, against 0.14x for "masked", whose prefill stalls
#     there; masked decodes faster in-process and served a 1B shape at 0.73x).
#   "masked": every adapter's A side by side, one matmul for all, a per-row mask that
#     keeps each row's own adapter (scale folded in), one matmul with every B: fewer
#     kernels per layer whatever the number of adapters, more FLOPs.
# MLX_LM_OPTIQ_MIXED_ROWS=gather|take|masked sets it for a server process.
MIXED_ROWS_METHODS = ("gather", "take", "masked")


def _checked_method(method, name):
    if method not in MIXED_ROWS_METHODS:
        raise ValueError(f"{name} is {method!r}, expected one of {list(MIXED_ROWS_METHODS)}")
    return method


MIXED_ROWS_METHOD = os.environ.get("MLX_LM_OPTIQ_MIXED_ROWS") or None
if MIXED_ROWS_METHOD is not None:
    _checked_method(MIXED_ROWS_METHOD, "MLX_LM_OPTIQ_MIXED_ROWS")


def _mixed_rows_method():
    if MIXED_ROWS_METHOD is None:
        return "gather" if mx.default_device() == mx.cpu else "take"
    return _checked_method(MIXED_ROWS_METHOD, "mlx_lm_optiq.adapters.MIXED_ROWS_METHOD")


def _rows_gather(y, x, a, b, scales, index):
    z = mx.gather_mm(mx.gather_mm(x, a, rhs_indices=index), b, rhs_indices=index)
    return y + (scales[index][:, None, None] * z).astype(x.dtype)


def _rows_take(y, x, a, b, scales, index):
    z = (x @ mx.take(a, index, axis=0)) @ mx.take(b, index, axis=0)
    return y + (scales[index][:, None, None] * z).astype(x.dtype)


def _rows_masked(y, x, a_all, b_all, mask):
    return y + (((x @ a_all) * mask) @ b_all).astype(x.dtype)


_ROWS_EAGER = {"gather": _rows_gather, "take": _rows_take, "masked": _rows_masked}
# A decode step calls every adapted layer once on one token per row: there the few
# small ops above cost more in graph building and kernel launches than in arithmetic,
# so they run as one compiled function (traced once per batch size). Prefill shapes
# vary with every prompt, so prefill runs them eagerly. False (MLX_LM_OPTIQ_COMPILE_DECODE=0):
# always eager.
_COMPILE_ENV = os.environ.get("MLX_LM_OPTIQ_COMPILE_DECODE", "1")
if _COMPILE_ENV not in ("0", "1"):
    raise ValueError(f"MLX_LM_OPTIQ_COMPILE_DECODE is {_COMPILE_ENV!r}, expected 0 or 1")
COMPILE_DECODE = _COMPILE_ENV == "1"
_ROWS_COMPILED = {name: mx.compile(fn) for name, fn in _ROWS_EAGER.items()}


class MultiLoRALinear(nn.Module):
    """A linear layer plus any number of LoRA adapters, picked per forward or per batch row."""

    def __init__(self, linear, input_dims, output_dims, registry):
        super().__init__()
        self.linear = linear
        self.input_dims = input_dims
        self.output_dims = output_dims
        object.__setattr__(self, "_bank", _Bank())
        object.__setattr__(self, "_registry", registry)

    def __setitem__(self, key, value):
        # `self.linear` is a dict lookup through nn.Module.__getattr__ (~1 us, on every
        # call of every wrapped layer: what idle adapters cost on a launch-bound GPU), so
        # the call reads a plain attribute, kept in step with the module tree here
        # (attribute assignment and update_modules both store through __setitem__).
        super().__setitem__(key, value)
        if key == "linear":
            object.__setattr__(self, "_linear", value)

    def _stacked(self, n_slots, method):
        """The adapters of this layer stacked for mixed rows (ranks zero-padded to the largest).

        gather, take: (A (n+1, in, r), B (n+1, r, out), scales (n+1,)); slot n is the all-zero
        base slot that base rows point at. masked: (A (in, n*r), B (n*r, out), r, scales)
        with slot s in columns/rows s*r..(s+1)*r.
        """
        layout = "concatenated" if method == "masked" else "stacked"  # gather and take share one
        stacked = self._bank.stacked
        if stacked is not None and stacked[:2] == (n_slots, layout):
            return stacked[2:]
        entries = {s: e for s, e in self._bank.entries.items() if s < n_slots}  # later mounts: not this step's
        r = max([a.shape[1] for a, _, _ in entries.values()] + [1])
        dtypes = {t.dtype for a, b, _ in entries.values() for t in (a, b)}
        dtype = dtypes.pop() if len(dtypes) == 1 else mx.float32
        scales = [0.0] * (n_slots + 1)
        a_stack = mx.zeros((n_slots + 1, self.input_dims, r), dtype=dtype)
        b_stack = mx.zeros((n_slots + 1, r, self.output_dims), dtype=dtype)
        for slot, (a, b, scale) in entries.items():
            a_stack[slot, :, : a.shape[1]] = a.astype(dtype)
            b_stack[slot, : b.shape[0], :] = b.astype(dtype)
            scales[slot] = scale
        if layout == "stacked":
            arrays = (a_stack, b_stack, mx.array(scales, dtype=dtype))
        else:
            a_all = a_stack[:n_slots].transpose(1, 0, 2).reshape(self.input_dims, n_slots * r)
            b_all = b_stack[:n_slots].reshape(n_slots * r, self.output_dims)
            arrays = (a_all, b_all, r, tuple(scales[:n_slots]))
        mx.eval([t for t in arrays if isinstance(t, mx.array)])
        self._bank.stacked = (n_slots, layout) + arrays
        return arrays

    def __call__(self, x):
        y = self._linear(x)
        rows = _BATCH_ROWS.get()
        if rows is not None and rows.registry is self._registry:
            slot = rows.uniform
            if slot is _MIXED:
                if x.ndim != 3 or x.shape[0] != len(rows.slots):
                    raise ValueError(
                        f"adapter_rows: {len(rows.slots)} rows were selected but the layer input has shape {x.shape}"
                    )
                method = rows.method
                fn = (_ROWS_COMPILED if COMPILE_DECODE and x.shape[1] == 1 else _ROWS_EAGER)[method]
                if method != "masked":
                    a, b, scales = self._stacked(rows.n_slots, method)
                    return fn(y, x, a, b, scales, rows.index)
                a_all, b_all, r, scales = self._stacked(rows.n_slots, method)
                return fn(y, x, a_all, b_all, rows.mask(r, scales, a_all.dtype))
        else:
            name = ACTIVE_ADAPTER.get()
            if name is None:
                return y
            slot = self._registry.slot_of(name)
        entry = self._bank.entries.get(slot) if slot is not None else None
        if entry is None:
            return y
        a, b, scale = entry
        z = (x @ a) @ b
        return y + (scale * z).astype(x.dtype)


_MIXED = object()


class _Rows:
    def __init__(self, registry, slots):
        self.registry = registry
        self.n_slots = registry.n_slots
        self.slots = slots
        first = slots[0] if slots else None
        self.uniform = first if all(s == first for s in slots) else _MIXED
        if self.uniform is _MIXED:
            self.index = mx.array([self.n_slots if s is None else s for s in slots], dtype=mx.uint32)
            self.method = _mixed_rows_method()  # once per forward, not in every adapted layer
        self._masks = {}

    def mask(self, rank, scales, dtype):
        """(rows, 1, n_slots*rank): row i keeps the columns of its own slot, times its scale.
        Built once per forward for all layers sharing (rank, scales, dtype)."""
        key = (rank, scales, dtype)
        m = self._masks.get(key)
        if m is None:
            cols = [0.0] * (len(self.slots) * self.n_slots * rank)
            width = self.n_slots * rank
            for i, s in enumerate(self.slots):
                if s is not None and s < self.n_slots:
                    cols[i * width + s * rank : i * width + (s + 1) * rank] = [scales[s]] * rank
            m = self._masks[key] = mx.array(cols, dtype=dtype).reshape(len(self.slots), 1, width)
        return m


# ---------------------------------------------------------------------------
# The per-model registry


class _Registry:
    def __init__(self):
        self.lock = threading.RLock()
        self.adapters = {}  # name -> MountedAdapter
        self.originals = {}  # module path -> original module object
        self.wrappers = {}  # module path -> MultiLoRALinear
        self.n_slots = 0

    def slot_of(self, name):
        info = self.adapters.get(name)
        if info is None:
            raise UnknownAdapterError(name, self.adapters)
        return info.slot

    def free_slot(self):
        used = {a.slot for a in self.adapters.values()}
        return next(i for i in itertools.count() if i not in used)


_REGISTRY_ATTR = "_optiq_adapter_registry"
_GLOBAL_LOCK = threading.Lock()


def _registry(model, create=False):
    registry = getattr(model, _REGISTRY_ATTR, None)
    if registry is None and create:
        with _GLOBAL_LOCK:
            registry = getattr(model, _REGISTRY_ATTR, None)
            if registry is None:
                registry = _Registry()
                object.__setattr__(model, _REGISTRY_ATTR, registry)
    return registry


def _set_module(model, path, module):
    model.update_modules(tree_unflatten([(path, module)]))


def _check_name(name):
    if not isinstance(name, str) or not name or name != name.strip():
        raise AdapterError(f"adapter name {name!r}: expected a non-empty string without surrounding spaces")


def mount_adapter(model, name, path):
    """Mount the adapter at `path` (directory, HF repo id, or AdapterWeights) under `name`.

    Everything is validated before the model is touched: a malformed adapter
    raises AdapterError and leaves the adapters already mounted as they were.
    """
    _check_name(name)
    weights = path if isinstance(path, AdapterWeights) else read_adapter(path)
    modules = dict(model.named_modules())
    registry = _registry(model, create=True)
    with registry.lock:
        if name in registry.adapters:
            raise AdapterError(f"adapter {name!r} is already mounted (from {registry.adapters[name].source}); unmount it first")
        errors = []
        for module_path, (a, b, _) in weights.layers.items():
            module = modules.get(module_path)
            dims = _linear_dims(module) if module is not None else None
            if module is None:
                errors.append(f"  {module_path}: no such module in the model")
            elif dims is None:
                errors.append(f"  {module_path}: is a {type(module).__name__}, only linear layers can take a LoRA adapter")
            elif (a.shape[0], b.shape[1]) != dims:
                errors.append(
                    f"  {module_path}: adapter maps {a.shape[0]} -> {b.shape[1]} features, the layer maps {dims[0]} -> {dims[1]}"
                )
        if errors:
            raise AdapterError(f"adapter {name!r} ({weights.source}) does not fit the model:\n" + "\n".join(errors))

        slot = registry.free_slot()
        for module_path, (a, b, scale) in weights.layers.items():
            wrapper = registry.wrappers.get(module_path)
            if wrapper is None:
                original = modules[module_path]
                wrapper = MultiLoRALinear(original, *_linear_dims(original), registry)
                registry.originals[module_path] = original
                registry.wrappers[module_path] = wrapper
                _set_module(model, module_path, wrapper)
            mx.eval(a, b)
            entries = dict(wrapper._bank.entries)
            entries[slot] = (a, b, scale)
            wrapper._bank.entries = entries
            wrapper._bank.stacked = None
        registry.n_slots = max(registry.n_slots, slot + 1)
        info = MountedAdapter(name, slot, next(_SERIALS), weights.source, weights.format, weights.nbytes, weights.ranks)
        registry.adapters[name] = info
    return info


def unmount_adapter(model, name):
    """Remove adapter `name`; layers left with no adapter get their original module back."""
    registry = _registry(model)
    if registry is None or name not in registry.adapters:
        raise UnknownAdapterError(name, registry.adapters if registry else {})
    with registry.lock:
        info = registry.adapters.pop(name)
        for module_path in list(registry.wrappers):
            wrapper = registry.wrappers[module_path]
            if info.slot not in wrapper._bank.entries:
                continue
            entries = dict(wrapper._bank.entries)
            del entries[info.slot]
            wrapper._bank.entries = entries
            wrapper._bank.stacked = None
            if not entries:
                _set_module(model, module_path, registry.originals.pop(module_path))
                del registry.wrappers[module_path]
        if not registry.adapters:
            registry.n_slots = 0
            object.__delattr__(model, _REGISTRY_ATTR)
    return info


def mounted_adapters(model):
    """{name: MountedAdapter} for the adapters mounted on `model` (empty when none)."""
    registry = _registry(model)
    return dict(registry.adapters) if registry is not None else {}


def adapter_cache_key(model, name):
    """A hashable identity of (adapter name, this mount) for keying prompt caches."""
    if name is None:
        return None
    registry = _registry(model)
    if registry is None or name not in registry.adapters:
        raise UnknownAdapterError(name, registry.adapters if registry else {})
    return ("optiq-adapter", name, registry.adapters[name].serial)


@contextlib.contextmanager
def use_adapter(name, model=None):
    """Run the block with adapter `name` active (None: the base).

    With `model`, an adapter that is not mounted on it raises UnknownAdapterError
    here rather than at the first forward pass.
    """
    if name is not None:
        _check_name(name)
        if model is not None:
            registry = _registry(model)
            if registry is None or name not in registry.adapters:
                raise UnknownAdapterError(name, registry.adapters if registry else {})
    token = ACTIVE_ADAPTER.set(name)
    try:
        yield
    finally:
        ACTIVE_ADAPTER.reset(token)


@contextlib.contextmanager
def adapter_rows(model, names):
    """Run the block with one adapter per batch row (`names[i]` for row i, None = base)."""
    registry = _registry(model)
    if registry is None:
        if any(n is not None for n in names):
            bad = next(n for n in names if n is not None)
            raise UnknownAdapterError(bad, {})
        yield
        return
    slots = tuple(None if n is None else registry.slot_of(n) for n in names)
    token = _BATCH_ROWS.set(_Rows(registry, slots))
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


def write_random_adapter(model_path, adapter_path, *, seed, rank=8, scale=20.0, num_layers=-1, keys=None, b_std=0.02):
    """Write a real mlx-lm LoRA adapter with random (seeded) A and non-zero B.

    For tests and benchmarks: it is made by mlx-lm's own `linear_to_lora_layers`
    and loads with stock `mlx_lm.load(..., adapter_path=...)`. `b_std` sets how
    strongly it changes the outputs (a freshly initialised LoRA has B = 0).
    """
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from .io_utils import atomic_output_dir

    model, _ = load(str(model_path), lazy=True)
    model.freeze()
    lora_parameters = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        lora_parameters["keys"] = list(keys)
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora_parameters)
    params = dict(tree_flatten(model.trainable_parameters()))
    for key in params:
        if key.endswith(".lora_b"):
            params[key] = b_std * mx.random.normal(params[key].shape)
    with atomic_output_dir(adapter_path) as staging:
        mx.save_safetensors(str(staging / "adapters.safetensors"), params)
        config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(adapter_path)
