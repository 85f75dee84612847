"""Per-layer KV-cache plans: `kv_config.json`, its validation against a model, and cache building.

A plan holds one entry per *cache slot* (the position in the list returned by
`make_prompt_cache(model)`, which is what a model indexes its caches by) and
records the model layer index beside it. Each entry has a scheme:

  affine  keys at `k_bits`, values at `v_bits`, mlx affine groups of `group_size`
  turbo   TurboQuant (mlx_lm_optiq.turbo): keys at `k_bits`, values at `v_bits` per channel
  none    the model's own cache, left in its float dtype

Full-attention `KVCache` slots take any scheme; sliding-window `RotatingKVCache`
slots take `affine` (kv_cache.MixedQuantizedRotatingKVCache; mlx-lm itself cannot
quantize them: `RotatingKVCache.to_quantized` raises) or `none`; other caches
(linear-attention/SSM `ArraysCache`, `CacheList`) hold no KV and can only be `none`.

Scripts: `make_plan_cache(model, plan)` returns the per-slot cache list to pass
as `prompt_cache=`; with `mlx_lm_optiq.enable()`, `generate`/`stream_generate`
apply a plan by themselves, either the one in the loaded model's folder or the
one set with `use_kv_config(...)`.
"""

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .io_utils import OptiqFileError, read_json, write_json

KIND = "optiq-kv-config"
FILENAME = "kv_config.json"
SCHEMES = ("affine", "turbo", "none")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports in affine mode
GROUP_SIZES = (32, 64, 128)
# Cache classes a plan may replace, per scheme (turbo has no sliding-window cache).
QUANTIZABLE_KINDS = {"affine": ("KVCache", "RotatingKVCache"), "turbo": ("KVCache",)}
FLOAT_BITS = 16  # what a float cache costs per element (fp16/bf16 serving)


class KVConfigError(OptiqFileError):
    """A KV plan that does not fit the model or is malformed; the message names file and field."""


@dataclass
class SlotGeometry:
    """What one cache slot of a model holds (found by a shape-only probe)."""

    slot: int
    layer: Optional[int]
    kind: str  # the cache class name
    n_kv_heads: Optional[int] = None
    k_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    window: Optional[int] = None  # RotatingKVCache.max_size
    keep: int = 0  # RotatingKVCache.keep (tokens never evicted); not written to kv_config.json

    @property
    def holds_kv(self):
        return self.kind in ("KVCache", "RotatingKVCache") and self.n_kv_heads is not None

    @property
    def quantizable(self):
        """Whether some scheme can quantize this slot (affine can quantize every KV cache)."""
        return self.kind in QUANTIZABLE_KINDS["affine"] and self.n_kv_heads is not None


@dataclass
class SlotPlan:
    slot: int
    layer: Optional[int]
    scheme: str
    k_bits: Optional[int] = None
    v_bits: Optional[int] = None
    group_size: Optional[int] = None
    seed: Optional[int] = None  # turbo rotation seed
    kl: dict = field(default_factory=dict)
    # cache geometry the file records (checked against the model when present)
    declared: dict = field(default_factory=dict)
    # filled by validation against a model
    geometry: Optional[SlotGeometry] = None

    def describe(self):
        if self.scheme == "affine":
            return f"K{self.k_bits}/V{self.v_bits} g{self.group_size}"
        if self.scheme == "turbo":
            return f"turbo K{self.k_bits}/V{self.v_bits}"
        if self.geometry is not None and not self.geometry.holds_kv:
            return f"no KV ({self.geometry.kind})"
        return "float"


@dataclass
class KVPlan:
    """A validated (or at least parsed) per-slot KV plan. Not a dict/list on purpose:
    it is stored as a plain attribute on mlx Modules, which would otherwise treat it
    as part of the parameter tree."""

    slots: list
    quantized_kv_start: int = 0
    model: Optional[str] = None
    target_bits: Optional[float] = None
    achieved_bits: Optional[float] = None
    context_length: Optional[int] = None
    source: str = "<kv plan>"
    extra: dict = field(default_factory=dict)
    _validated_for: list = field(default_factory=list, repr=False)  # weakrefs to models

    def validated_for(self, model):
        return any(r() is model for r in self._validated_for)

    def summary(self):
        counts = {}
        for s in self.slots:
            counts[s.describe()] = counts.get(s.describe(), 0) + 1
        return ", ".join(f"{n}x {d}" for d, n in sorted(counts.items()))


# ----------------------------------------------------------------------------- geometry


def cache_geometry(model):
    """Per-slot geometry of `make_prompt_cache(model)`.

    Runs the model on one token lazily: the cache arrays get their shapes from the
    graph without any evaluation, so this costs nothing even for large models.
    """
    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    layers = getattr(model, "layers", None)
    same_count = layers is not None and len(layers) == len(caches)
    out = []
    for i, c in enumerate(caches):
        g = SlotGeometry(slot=i, layer=i if same_count else None, kind=type(c).__name__)
        keys = getattr(c, "keys", None)
        values = getattr(c, "values", None)
        if g.kind in ("KVCache", "RotatingKVCache") and keys is not None:
            g.n_kv_heads = int(keys.shape[1])
            g.k_head_dim = int(keys.shape[-1])
            g.v_head_dim = int(values.shape[-1])
        if g.kind == "RotatingKVCache":
            g.window = int(c.max_size)
            g.keep = int(c.keep)
        out.append(g)
    return out


def elements_per_token(geom):
    """Cache elements one token adds to a slot (keys + values over all KV heads)."""
    if not geom.holds_kv:
        return 0
    return geom.n_kv_heads * (geom.k_head_dim + geom.v_head_dim)


def bits_per_token(geom, scheme, k_bits=None, v_bits=None, group_size=None, float_bits=FLOAT_BITS):
    """Bits one token occupies in a slot's cache, scales and biases included.

    affine: each group of `group_size` channels adds a scale and a bias in the float
    dtype (16 bits each); turbo: one float norm per (head, vector) besides the codes.
    """
    if not geom.holds_kv:
        return 0
    h, dk, dv = geom.n_kv_heads, geom.k_head_dim, geom.v_head_dim
    if scheme == "none":
        return h * (dk + dv) * float_bits
    if scheme == "affine":
        overhead = 2 * float_bits * (dk // group_size + dv // group_size)
        return h * (dk * k_bits + dv * v_bits + overhead)
    if scheme == "turbo":
        return h * (dk * k_bits + dv * v_bits + 2 * float_bits)
    raise ValueError(f"unknown scheme {scheme!r}")


def token_weight(geom, context_length):
    """How many tokens a slot holds at `context_length` (sliding layers stop at their window)."""
    if geom.kind == "RotatingKVCache" and geom.window is not None:
        return min(geom.window, context_length)
    return context_length


def average_bits(plan_slots, geometry, context_length=8192):
    """Average bits per cached element over every KV-holding slot, weighted by what it holds."""
    total = elems = 0
    for s, g in zip(plan_slots, geometry):
        if not g.holds_kv:
            continue
        w = token_weight(g, context_length)
        total += bits_per_token(g, s.scheme, s.k_bits, s.v_bits, s.group_size) * w
        elems += elements_per_token(g) * w
    return total / elems if elems else float(FLOAT_BITS)


# ----------------------------------------------------------------------------- parse / write


def _turbo_module():
    try:
        from . import turbo
    except ImportError:
        return None
    return turbo if hasattr(turbo, "TurboQuantKVCache") else None


def _field_int(entry, name, where, optional=False):
    v = entry.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise KVConfigError(f"{where}: field {name!r} is {v!r}, expected an integer")
    return v


_DECLARED = {"cache": "kind", "n_kv_heads": "n_kv_heads", "k_head_dim": "k_head_dim",
             "v_head_dim": "v_head_dim", "window": "window"}


def plan_from_dict(data, source="<kv plan>"):
    """Parse a kv_config payload (already read) into a KVPlan; checks what needs no model."""
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise KVConfigError(f"{source}: field 'layers' must be a non-empty list of per-slot entries")
    start = data.get("quantized_kv_start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise KVConfigError(f"{source}: field 'quantized_kv_start' is {start!r}, expected an integer >= 0")
    slots = []
    for i, entry in enumerate(layers):
        where = f"{source}: layers[{i}]"
        if not isinstance(entry, dict):
            raise KVConfigError(f"{where}: expected an object, got {type(entry).__name__}")
        slot = _field_int(entry, "cache_slot", where)
        layer = _field_int(entry, "layer", where, optional=True)
        scheme = entry.get("scheme")
        if scheme not in SCHEMES:
            raise KVConfigError(f"{where}: field 'scheme' is {scheme!r}, expected one of {list(SCHEMES)}")
        sp = SlotPlan(slot=slot, layer=layer, scheme=scheme, kl=dict(entry.get("kl") or {}),
                      declared={k: entry[k] for k in _DECLARED if entry.get(k) is not None})
        if scheme == "affine":
            sp.k_bits = _field_int(entry, "k_bits", where)
            sp.v_bits = _field_int(entry, "v_bits", where)
            sp.group_size = _field_int(entry, "group_size", where)
            for name in ("k_bits", "v_bits"):
                if getattr(sp, name) not in AFFINE_BITS:
                    raise KVConfigError(
                        f"{where}: field {name!r} is {getattr(sp, name)}, expected one of {list(AFFINE_BITS)}"
                    )
            if sp.group_size not in GROUP_SIZES:
                raise KVConfigError(
                    f"{where}: field 'group_size' is {sp.group_size}, expected one of {list(GROUP_SIZES)}"
                )
        elif scheme == "turbo":
            sp.k_bits = _field_int(entry, "k_bits", where)
            sp.v_bits = _field_int(entry, "v_bits", where)
            sp.seed = _field_int(entry, "seed", where, optional=True)
            if sp.seed is None:
                sp.seed = 2 * slot  # distinct rotations per layer, reproducible
            turbo = _turbo_module()
            if turbo is None:
                raise KVConfigError(
                    f"{where}: scheme 'turbo' needs mlx_lm_optiq.turbo.TurboQuantKVCache, which is not available"
                )
            for name in ("k_bits", "v_bits"):
                if getattr(sp, name) not in turbo.SUPPORTED_BITS:
                    raise KVConfigError(
                        f"{where}: field {name!r} is {getattr(sp, name)}, expected one of "
                        f"{list(turbo.SUPPORTED_BITS)} for scheme 'turbo'"
                    )
        slots.append(sp)
    seen = [s.slot for s in slots]
    if sorted(seen) != list(range(len(slots))):
        raise KVConfigError(
            f"{source}: field 'layers' must have exactly one entry per cache slot 0..{len(slots) - 1}, "
            f"got cache_slot values {seen}"
        )
    slots.sort(key=lambda s: s.slot)
    n = data.get("num_cache_slots")
    if n is not None and n != len(slots):
        raise KVConfigError(f"{source}: field 'num_cache_slots' is {n} but 'layers' has {len(slots)} entries")
    known = {"format_version", "kind", "model", "target_bits", "achieved_bits", "quantized_kv_start",
             "num_cache_slots", "layers", "context_length"}
    return KVPlan(
        slots=slots, quantized_kv_start=start, model=data.get("model"),
        target_bits=data.get("target_bits"), achieved_bits=data.get("achieved_bits"),
        context_length=data.get("context_length"), source=source,
        extra={k: v for k, v in data.items() if k not in known},
    )


def plan_to_dict(plan):
    layers = []
    for s in plan.slots:
        e = {"layer": s.layer, "cache_slot": s.slot, "scheme": s.scheme}
        if s.scheme != "none":
            e.update(k_bits=s.k_bits, v_bits=s.v_bits)
        if s.scheme == "affine":
            e["group_size"] = s.group_size
        if s.scheme == "turbo":
            e["seed"] = s.seed
        g = s.geometry
        if g is not None:
            e["cache"] = g.kind
            if g.holds_kv:
                e.update(n_kv_heads=g.n_kv_heads, k_head_dim=g.k_head_dim, v_head_dim=g.v_head_dim)
            if g.window is not None:
                e["window"] = g.window
        if s.kl:
            e["kl"] = s.kl
        layers.append(e)
    payload = {
        "model": plan.model, "target_bits": plan.target_bits, "achieved_bits": plan.achieved_bits,
        "context_length": plan.context_length, "quantized_kv_start": plan.quantized_kv_start,
        "num_cache_slots": len(plan.slots), "layers": layers,
    }
    payload.update(plan.extra)
    return payload


def save_kv_config(plan, path):
    return write_json(path, plan_to_dict(plan), kind=KIND)


def read_kv_config(path):
    """Read and parse a kv_config.json (a folder means the file inside it), without a model."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    data = read_json(path, kind=KIND, required=["layers"])
    return plan_from_dict(data, source=str(path))


def load_kv_config(path, model):
    """Read a kv_config.json and validate it against `model`; returns the KVPlan."""
    plan = read_kv_config(path)
    validate_plan(plan, model)
    return plan


# ----------------------------------------------------------------------------- validation


def validate_plan(plan, model, geometry=None):
    """Check a plan against the caches `make_prompt_cache(model)` builds; errors name file and field."""
    if plan.validated_for(model):
        return plan
    geometry = geometry if geometry is not None else cache_geometry(model)
    src = plan.source
    if len(plan.slots) != len(geometry):
        raise KVConfigError(
            f"{src}: has {len(plan.slots)} cache slots but the model builds {len(geometry)} "
            f"(make_prompt_cache); the config was made for another model"
        )
    for s, g in zip(plan.slots, geometry):
        where = f"{src}: layers[{s.slot}] (cache slot {s.slot})"
        if s.layer is not None and g.layer is not None and s.layer != g.layer:
            raise KVConfigError(f"{where}: field 'layer' is {s.layer}, but slot {s.slot} is model layer {g.layer}")
        for name, attr in _DECLARED.items():
            if name in s.declared and s.declared[name] != getattr(g, attr):
                raise KVConfigError(
                    f"{where}: field {name!r} is {s.declared[name]!r} but the model's cache there has "
                    f"{getattr(g, attr)!r}; the config was made for another model"
                )
        if s.scheme != "none":
            kinds = QUANTIZABLE_KINDS[s.scheme]
            if g.kind not in kinds or g.n_kv_heads is None:
                raise KVConfigError(
                    f"{where}: scheme {s.scheme!r} needs a {' or '.join(kinds)}, but this slot is a "
                    f"{g.kind}, which it cannot quantize; use "
                    + ("scheme 'affine' or 'none'" if g.kind in QUANTIZABLE_KINDS["affine"] else "scheme 'none'")
                    + " for it"
                )
            if s.scheme == "affine":
                for name, dim in (("k_head_dim", g.k_head_dim), ("v_head_dim", g.v_head_dim)):
                    if dim % s.group_size:
                        raise KVConfigError(
                            f"{where}: field 'group_size' is {s.group_size}, which does not divide "
                            f"the model's {name} {dim}"
                        )
        s.geometry = g
    plan._validated_for.append(weakref.ref(model))
    return plan


# ----------------------------------------------------------------------------- caches


def new_slot_cache(s, quantized_kv_start=0, like=None):
    """An empty cache for a planned (non-`none`) slot of a validated plan.

    Affine slots get kv_cache.MixedQuantizedKVCache (K and V at their own widths,
    batch-capable), which applies quantized_kv_start by itself; turbo slots get
    turbo.TurboQuantKVCache (quantized from the first token; see PendingKVCache)."""
    if s.scheme == "affine":
        from .kv_cache import MixedQuantizedKVCache, MixedQuantizedRotatingKVCache

        # a sliding window comes from the cache being replaced (`like`: also what
        # --max-kv-size makes of every slot), else from the model's geometry
        window = keep = None
        if isinstance(like, RotatingKVCache):
            window, keep = like.max_size, like.keep
        elif s.geometry is not None and s.geometry.kind == "RotatingKVCache":
            window, keep = s.geometry.window, s.geometry.keep
        if window is not None:
            return MixedQuantizedRotatingKVCache(window, keep, s.k_bits, s.v_bits, s.group_size, quantized_kv_start)
        return MixedQuantizedKVCache(s.k_bits, s.v_bits, s.group_size, quantized_kv_start)
    if s.scheme == "turbo":
        g = s.geometry
        return _turbo_module().TurboQuantKVCache(
            head_dim=g.k_head_dim, value_head_dim=g.v_head_dim, bits=s.k_bits, key_bits=s.k_bits,
            value_bits=s.v_bits, seed=s.seed,
        )
    raise ValueError(f"slot {s.slot}: scheme {s.scheme!r} has no planned cache")


def convert_cache(c, s, quantized_kv_start=0):
    """The planned cache for slot plan `s`, holding everything the float KVCache `c` holds."""
    new = new_slot_cache(s, quantized_kv_start, like=c)
    if s.scheme == "affine":
        # MixedQuantized(Rotating)KVCache is a (Rotating)KVCache: it takes the float buffers
        # as they are and quantizes them itself once it holds quantized_kv_start tokens.
        new.keys, new.values, new.offset = c.keys, c.values, c.offset
        if isinstance(c, RotatingKVCache):
            new._idx = c._idx
    elif c.keys is not None and c.offset > 0:
        new.update_and_fetch(c.keys[..., : c.offset, :], c.values[..., : c.offset, :])
    return new


class PendingKVCache(KVCache):
    """A float KVCache that becomes its planned turbo cache once `offset >= start`
    (quantized_kv_start semantics: short contexts keep full precision)."""

    def __init__(self, slot_plan, start):
        super().__init__()
        self.slot_plan = slot_plan
        self.start = start

    def convert(self):
        return convert_cache(self, self.slot_plan)

    @property
    def merge(self):
        # KVCache.merge would turn this slot into a float BatchKVCache that never becomes
        # its turbo cache. Without `merge` (hasattr is False) mlx-lm's server sees the
        # prompt cache as not batchable and serves such plans one request at a time, as
        # it does for TurboQuantKVCache slots and for --kv-bits.
        raise AttributeError(f"{type(self).__name__}: a slot planned as {self.slot_plan.describe()} cannot be batched")


def apply_plan(caches, plan, model=None):
    """Apply a plan in place to a cache list (as `maybe_quantize_kv_cache` does).

    Plain float `KVCache` slots become their planned cache (keeping what they hold);
    slots already planned are left alone. Any other cache where the plan wants
    quantization is an error, never silently kept in float.
    """
    if model is not None:
        validate_plan(plan, model)
    if len(caches) < len(plan.slots):
        raise KVConfigError(
            f"{plan.source}: has {len(plan.slots)} cache slots but the prompt cache has {len(caches)}"
        )
    start = plan.quantized_kv_start
    for s in plan.slots:
        if s.scheme == "none":
            continue
        c = caches[s.slot]
        if isinstance(c, PendingKVCache):
            if c.offset >= c.start:
                caches[s.slot] = c.convert()
        elif type(c) is RotatingKVCache and s.scheme == "turbo":
            raise KVConfigError(
                f"{plan.source}: layers[{s.slot}] wants {s.describe()} but the prompt cache holds a sliding-window "
                f"RotatingKVCache there (e.g. --max-kv-size makes them), which TurboQuant cannot hold"
            )
        elif type(c) in (KVCache, RotatingKVCache):
            if s.scheme == "turbo" and c.offset < start:
                p = PendingKVCache(s, start)
                p.keys, p.values, p.offset = c.keys, c.values, c.offset
                caches[s.slot] = p
            else:
                caches[s.slot] = convert_cache(c, s, start)
        elif not _is_planned(c, s):
            raise KVConfigError(
                f"{plan.source}: layers[{s.slot}] wants {s.describe()} but the prompt cache holds a "
                f"{type(c).__name__} there, which cannot be quantized"
            )
    return caches


def _is_planned(c, s):
    if s.scheme == "affine":
        from . import kv_cache as kc

        kinds = (kc.MixedQuantizedKVCache, kc.BatchMixedQuantizedKVCache, kc.MixedQuantizedRotatingKVCache,
                 kc.BatchMixedQuantizedRotatingKVCache)
        return isinstance(c, kinds) and (c.k_bits, c.v_bits, c.group_size) == (s.k_bits, s.v_bits, s.group_size)
    if s.scheme == "turbo":
        turbo = _turbo_module()
        return turbo is not None and isinstance(c, turbo.TurboQuantKVCache)
    return False


def promote_pending(caches):
    """Turn pending slots that reached `quantized_kv_start` into their planned caches."""
    for i, c in enumerate(caches):
        if isinstance(c, PendingKVCache) and c.offset >= c.start:
            caches[i] = c.convert()


def make_plan_cache(model, plan, max_kv_size=None):
    """The prompt cache list for `model` under `plan` (pass it as `prompt_cache=`)."""
    validate_plan(plan, model)
    caches = make_prompt_cache(model, max_kv_size=max_kv_size)
    return apply_plan(caches, plan)


# ----------------------------------------------------------------------------- scripts API

_UNSET = object()
_ACTIVE = contextvars.ContextVar("mlx_lm_optiq_kv_plan", default=_UNSET)
_ATTR = "_optiq_kv_plan"


@contextlib.contextmanager
def use_kv_config(plan_or_path, model=None):
    """Apply a plan to every generate/stream_generate call made inside the block.

    `plan_or_path`: a KVPlan, a kv_config.json path (or a folder holding one), or
    None to switch off the plan found next to a loaded model. A path is read now;
    it is validated against the model now when `model` is given, else at first use.
    Needs `mlx_lm_optiq.enable()` for generate/stream_generate to see it.
    """
    plan = plan_or_path
    if plan is not None and not isinstance(plan, KVPlan):
        plan = read_kv_config(plan)
    if plan is not None and model is not None:
        validate_plan(plan, model)
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)


def attach_plan(model, plan, validate=True):
    """Make `plan` the default for `model` (what loading a folder with kv_config.json does);
    None detaches. Unvalidated plans are validated at first use."""
    if plan is not None and validate:
        validate_plan(plan, model)
    object.__setattr__(model, _ATTR, plan)


def attached_plan(model):
    return getattr(model, _ATTR, None)


def active_plan(model):
    """The plan generate should use for `model`: use_kv_config's, else the model's own."""
    plan = _ACTIVE.get()
    if plan is _UNSET:
        plan = attached_plan(model)
    return plan


def find_kv_config(model_path):
    """The kv_config.json beside a model (a local folder or a cached Hub repo), or None."""
    p = Path(model_path)
    if p.is_dir():
        f = p / FILENAME
        return f if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(str(model_path), FILENAME)
    except Exception:  # not a repo id: nothing to pick up
        return None
    return Path(f) if isinstance(f, str) else None


def check_no_kv_bits(kv_bits, plan):
    if kv_bits is not None:
        raise ValueError(
            f"kv_bits={kv_bits} cannot be combined with the per-layer KV plan {plan.source}; "
            "drop --kv-bits/kv_bits, or switch the plan off with use_kv_config(None)"
        )

