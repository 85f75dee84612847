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
     matmul elsewhere); `adapters.rows` says how.
  2. `use_adapter(name)`: one adapter for the whole batch (a ContextVar).
When every row uses one adapter the layer computes exactly what mlx-lm's LoRALinear
computes (`y + (scale * ((x @ a) @ b)).astype(x.dtype)`), so a solo run matches stock.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_lm_optiq.adapters import rows
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.lora.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD_FILE
from mlx_lm_optiq.lora.peft import load_peft_adapter

ACTIVE_ADAPTER = contextvars.ContextVar("mlx_lm_optiq_active_adapter", default=None)
_BATCH_ROWS = contextvars.ContextVar("mlx_lm_optiq_adapter_rows", default=None)

# Mount serials make prompt-cache keys unique per mount, so re-mounting another
# adapter under an old name never reuses the old adapter's KV caches.
_SERIALS = itertools.count(1)


class AdapterError(ValueError):
    """An adapter file/directory is missing or malformed, or does not fit the model."""


class UnknownAdapterError(AdapterError):
    """An adapter name that is not mounted; the message lists the mounted names."""

    def __init__(self, name: str, mounted: Iterable[str]) -> None:
        self.name = name
        self.mounted = sorted(mounted)
        super().__init__(f"unknown adapter {name!r}; mounted adapters: {self.mounted}")


# What a mounted adapter may hold. Its rows share every forward with other requests'
# rows, so values that are not finite floats, or a scale that overflows what it
# multiplies, would turn a request into NaNs (and, before the rows were isolated,
# everyone else's too). LoRA scales in practice: mlx-lm's default 20, PEFT's
# lora_alpha / r mostly 0.5-64; beyond 1e4 it is a unit mistake or an attack.
ADAPTER_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MAX_LORA_SCALE = 1e4


@dataclass
class AdapterWeights:
    """LoRA pairs read from disk: module path -> (a (in, r), b (r, out), scale).

    Checked when made (`check_adapter_values`): every tensor a finite float16/bfloat16/
    float32 matrix, every scale finite and at most MAX_LORA_SCALE in magnitude, so an
    AdapterWeights can always be mounted next to other users' adapters.
    """

    source: str
    format: str  # "mlx-lm" | "optiq" | "peft"
    layers: dict

    def __post_init__(self) -> None:
        check_adapter_values(self.layers, self.source, self.format)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {path: a.shape[1] for path, (a, _, _) in self.layers.items()}


@dataclass
class MountedAdapter:
    """One adapter mounted on a model: its bank slot and the mount serial that keys prompt caches."""

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
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and ".." not in parts and "\\" not in spec


def resolve_adapter_path(spec: str | Path) -> Path:
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
    except (ValueError, RecursionError) as e:  # bad syntax, not UTF-8, nested too deep, over-long integers
        raise AdapterError(f"{file}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:  # a directory of that name, no permission, ...
        raise AdapterError(f"{file}: cannot be read ({e.strerror or type(e).__name__})") from None
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


def check_adapter_values(layers: dict, source: str, fmt: str = "mlx-lm") -> None:
    """Raise AdapterError naming the adapter and tensor unless every LoRA value can be served.

    Each a/b must be a float16, bfloat16 or float32 array with only finite values (an
    int or bool tensor, a NaN or an inf is refused), each scale a finite number with
    |scale| <= MAX_LORA_SCALE. `fmt` picks how tensors are named (PEFT: lora_A/lora_B).
    """
    file, names = (
        ("adapter_model.safetensors", ("lora_A", "lora_B"))
        if fmt == "peft"
        else (ADAPTER_WEIGHTS, ("lora_a", "lora_b"))
    )
    allowed = ", ".join(str(d).removeprefix("mlx.core.") for d in ADAPTER_DTYPES)
    for path, (a, b, scale) in layers.items():
        for leaf, t in zip(names, (a, b)):
            where = f"adapter {source} ({file}): tensor {path}.{leaf}"
            if not isinstance(t, mx.array) or t.dtype not in ADAPTER_DTYPES:
                got = t.dtype if isinstance(t, mx.array) else type(t).__name__
                raise AdapterError(f"{where} has dtype {str(got).removeprefix('mlx.core.')}, expected {allowed}")
            bad = int(mx.sum(~mx.isfinite(t)).item()) if t.size else 0
            if bad:
                raise AdapterError(f"{where} has {bad} non-finite value(s) (NaN or inf); expected finite values")
        if (
            not isinstance(scale, (int, float))
            or isinstance(scale, bool)
            or not math.isfinite(scale)
            or abs(scale) > MAX_LORA_SCALE
        ):
            raise AdapterError(
                f"adapter {source}: layer {path} has LoRA scale {scale!r}; expected a finite number"
                f" with |scale| <= {MAX_LORA_SCALE:g}"
            )


def _pairs(tensors, file, suffix_a, suffix_b, prefix=""):
    """Group tensors into {module path: (a, b)}; errors name the file and key."""
    groups = {}
    for key, value in tensors.items():
        for suffix, slot in ((suffix_a, 0), (suffix_b, 1)):
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                if prefix and path.startswith(prefix):
                    path = path[len(prefix) :]
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
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise AdapterError(
            f"{file}: field 'lora_parameters.scale' is {scale!r}; expected a finite number with"
            f" |scale| <= {MAX_LORA_SCALE:g}"
        )
    return float(scale)


def _read_mlx_lm(path, config):
    file = path / ADAPTER_CONFIG
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "lora":
        raise AdapterError(
            f"{file}: field 'fine_tune_type' is {fine_tune_type!r}; only 'lora' adapters can be mounted"
            " (fuse DoRA/full fine-tunes with mlx_lm.fuse instead)"
        )
    scale = _scale_of(config, file)
    tensors_file = path / ADAPTER_WEIGHTS
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


def _read_peft(path):
    """PEFT LoRA (adapter_config.json with peft_type LORA + adapter_model.safetensors).

    Read by the one PEFT reader (lora.peft.load_peft_adapter: PEFT's own pattern rules
    for rank_pattern/alpha_pattern); per-module scales arrive folded into lora_b.
    """
    try:
        config, weights = load_peft_adapter(path)
    except OptiqFileError as e:
        raise AdapterError(str(e)) from None
    scale = config["scale"]
    return {p: (weights[f"{p}.lora_a"], weights[f"{p}.lora_b"], scale) for p in config["ranks"]}


def read_adapter(spec: str | Path) -> AdapterWeights:
    """Read an adapter directory (or HF repo id) into AdapterWeights, whatever its format."""
    path = resolve_adapter_path(spec)
    if (path / RECORD_FILE).is_file() and not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(
            f"{path}: has optiq_lora_config.json but no adapters.safetensors; expected an mlx-lm-compatible"
            " per-layer-rank adapter written by mlx_lm.lora with mlx-lm-optiq's rank allocation"
        )
    config = _read_config(path, ADAPTER_CONFIG)
    if "peft_type" in config:
        return AdapterWeights(str(spec), "peft", _read_peft(path))
    layers = _read_mlx_lm(path, config)
    ranks = {a.shape[1] for a, _, _ in layers.values()}
    fmt = "optiq" if (path / RECORD_FILE).is_file() or len(ranks) > 1 else "mlx-lm"
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


class MultiLoRALinear(nn.Module):
    """A linear layer plus any number of LoRA adapters, picked per forward or per batch row."""

    def __init__(self, linear: nn.Module, input_dims: int, output_dims: int, registry: object) -> None:
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
        """This layer's adapters stacked for mixed rows (rows.stack_pairs), kept until the bank changes."""
        layout = rows.stack_layout(method)
        stacked = self._bank.stacked
        if stacked is not None and stacked[:2] == (n_slots, layout):
            return stacked[2:]
        arrays = rows.stack_pairs(self._bank.entries, n_slots, method, self.input_dims, self.output_dims)
        self._bank.stacked = (n_slots, layout) + arrays
        return arrays

    def __call__(self, x: mx.array) -> mx.array:
        y = self._linear(x)
        selection = _BATCH_ROWS.get()
        if selection is not None and selection.owner is self._registry:
            slot = selection.uniform
            if slot is rows.MIXED:
                return rows.apply_mixed_rows(y, x, self._stacked(selection.n_slots, selection.method), selection)
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


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int] | str]:
    """{module path: (input_dims, output_dims)} of every linear-like module, the class name of every other one.

    All an adapter is checked against (`check_fits`), so a server can check adapters
    before its model has loaded: from a lazily loaded copy (no weights read), whose
    shapes are then all it keeps.
    """
    shapes = {}
    for path, module in model.named_modules():
        dims = _linear_dims(module)
        shapes[path] = dims if dims is not None else type(module).__name__
    return shapes


def check_fits(shapes: dict[str, tuple[int, int] | str], name: str, weights: AdapterWeights) -> None:
    """Raise AdapterError listing every layer of `weights` that does not fit a model of these `layer_shapes`."""
    errors = []
    for module_path, (a, b, _) in weights.layers.items():
        dims = shapes.get(module_path)
        if dims is None:
            errors.append(f"  {module_path}: no such module in the model")
        elif isinstance(dims, str):
            errors.append(f"  {module_path}: is a {dims}, only linear layers can take a LoRA adapter")
        elif (a.shape[0], b.shape[1]) != dims:
            errors.append(
                f"  {module_path}: adapter maps {a.shape[0]} -> {b.shape[1]} features,"
                f" the layer maps {dims[0]} -> {dims[1]}"
            )
    if errors:
        raise AdapterError(f"adapter {name!r} ({weights.source}) does not fit the model:\n" + "\n".join(errors))


def mount_adapter(model: nn.Module, name: str, path: str | Path | AdapterWeights) -> MountedAdapter:
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
            raise AdapterError(
                f"adapter {name!r} is already mounted (from {registry.adapters[name].source}); unmount it first"
            )
        check_fits(layer_shapes(model), name, weights)

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


def unmount_adapter(model: nn.Module, name: str) -> MountedAdapter:
    """Remove adapter `name`; layers left with no adapter get their original module back."""
    registry = _registry(model)
    if registry is None:
        raise UnknownAdapterError(name, {})
    with registry.lock:
        if name not in registry.adapters:
            raise UnknownAdapterError(name, registry.adapters)
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


def mounted_adapters(model: nn.Module) -> dict[str, MountedAdapter]:
    """{name: MountedAdapter} for the adapters mounted on `model` (empty when none)."""
    registry = _registry(model)
    return dict(registry.adapters) if registry is not None else {}


def adapter_cache_key(model: nn.Module, name: str | None) -> tuple | None:
    """A hashable identity of (adapter name, this mount) for keying prompt caches."""
    if name is None:
        return None
    registry = _registry(model)
    if registry is None or name not in registry.adapters:
        raise UnknownAdapterError(name, registry.adapters if registry else {})
    return ("optiq-adapter", name, registry.adapters[name].serial)


@contextlib.contextmanager
def use_adapter(name: str | None, model: nn.Module | None = None) -> Iterator[None]:
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
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run the block with one adapter per batch row (`names[i]` for row i, None = base)."""
    registry = _registry(model)
    if registry is None:
        if any(n is not None for n in names):
            bad = next(n for n in names if n is not None)
            raise UnknownAdapterError(bad, {})
        yield
        return
    with registry.lock:
        slots = tuple(None if n is None else registry.slot_of(n) for n in names)
        selection = rows.RowSlots(registry, registry.n_slots, slots)
    token = _BATCH_ROWS.set(selection)
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


@contextlib.contextmanager
def mounted_rows(model: nn.Module, mounts: Sequence[MountedAdapter | None]) -> Iterator[list[int]]:
    """`adapter_rows` for rows that each recorded the mount they started with (None: a base row).

    A row whose mount is no longer the one under its name (unmounted, or unmounted and
    another adapter mounted under the name) does not raise and never picks up the other
    adapter: it runs as a base row, and the block receives the indices of such rows so the
    caller can fail their requests. The server's generation thread selects rows this way,
    so one request's vanished adapter never stops the batch it shares with others.
    """
    registry = _registry(model)
    if registry is None:
        yield [i for i, m in enumerate(mounts) if m is not None]
        return
    gone, slots = [], []
    with registry.lock:
        for i, m in enumerate(mounts):
            if m is not None and registry.adapters.get(m.name) is m:
                slots.append(m.slot)
            else:
                slots.append(None)
                if m is not None:
                    gone.append(i)
        selection = rows.RowSlots(registry, registry.n_slots, tuple(slots))
    token = _BATCH_ROWS.set(selection)
    try:
        yield gone
    finally:
        _BATCH_ROWS.reset(token)
