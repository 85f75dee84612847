"""`kv_config.json`: the per-layer KV plan file, its one reader, validator and writer.

A plan holds one entry per *cache slot* (the position in the list returned by
`make_prompt_cache(model)`, which is what a model indexes its caches by) and
records the model layer index beside it. Each entry has a scheme:

  affine  keys at `k_bits`, values at `v_bits`, mlx affine groups of `group_size`
  turbo   TurboQuant (mlx_lm_optiq.kv.turbo): keys at `k_bits`, values at `v_bits` per channel
  none    the model's own cache, left in its float dtype

Full-attention `KVCache` slots take any scheme; sliding-window `RotatingKVCache`
slots take `affine` (caches.MixedQuantizedRotatingKVCache; mlx-lm itself cannot
quantize them: `RotatingKVCache.to_quantized` raises) or `none`; other caches
(linear-attention/SSM `ArraysCache`, `CacheList`) hold no KV and can only be `none`.

`plan_from_dict` checks what needs no model; `validate_plan` checks a plan against
the caches a model builds. Applying a plan to a model's caches is kv/apply.py's.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.errors import brief
from mlx_lm_optiq.core.formats import AFFINE_BITS, AFFINE_GROUPS
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_header, check_keys, read_json, write_json
from mlx_lm_optiq.kv import turbo
from mlx_lm_optiq.kv.candidates import KVCandidate
from mlx_lm_optiq.kv.geometry import QUANTIZABLE_KINDS, SlotGeometry, cache_geometry

KIND = "optiq-kv-config"
FILENAME = "kv_config.json"
SCHEMES = ("affine", "turbo", "none")


class KVConfigError(OptiqFileError):
    """A KV plan that does not fit the model or is malformed; the message names file and field."""


@dataclass
class SlotPlan:
    """One cache slot's entry of a plan."""

    slot: int
    layer: int | None
    scheme: str
    k_bits: int | None = None
    v_bits: int | None = None
    group_size: int | None = None
    seed: int | None = None  # turbo rotation seed
    kl: dict = field(default_factory=dict)
    # cache geometry the file records (checked against the model when present)
    declared: dict = field(default_factory=dict)
    # filled by validation against a model
    geometry: SlotGeometry | None = None

    def describe(self) -> str:
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

    slots: list[SlotPlan]
    quantized_kv_start: int = 0
    model: str | None = None
    target_bits: float | None = None
    achieved_bits: float | None = None
    context_length: int | None = None
    source: str = "<kv plan>"
    extra: dict = field(default_factory=dict)
    _validated_for: list = field(default_factory=list, repr=False)  # weakrefs to models

    def validated_for(self, model: Any) -> bool:
        return any(r() is model for r in self._validated_for)

    def summary(self) -> str:
        counts = {}
        for s in self.slots:
            counts[s.describe()] = counts.get(s.describe(), 0) + 1
        return ", ".join(f"{n}x {d}" for d, n in sorted(counts.items()))


# ----------------------------------------------------------------------------- parse / write


def _field_int(entry, name, where, optional=False, minimum=None):
    v = entry.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise KVConfigError(f"{where}: field {name!r} is {brief(v)}, expected {expected}")
    return v


def _field_number(data, name, where):
    v = data.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise KVConfigError(f"{where}: field {name!r} is {brief(v)}, expected a finite number")
    return v


_DECLARED = {
    "cache": "kind",
    "n_kv_heads": "n_kv_heads",
    "k_head_dim": "k_head_dim",
    "v_head_dim": "v_head_dim",
    "window": "window",
}
# Every key a kv_config.json may hold (every version our writer produced); any other key is
# a typo (`k_bitz`) that would otherwise be ignored silently, so it is an error naming it.
TOP_KEYS = (
    "format_version",
    "kind",
    "model",
    "target_bits",
    "achieved_bits",
    "context_length",
    "quantized_kv_start",
    "num_cache_slots",
    "layers",
    "sensitivity",
)
SLOT_KEYS = ("layer", "cache_slot", "scheme", "k_bits", "v_bits", "group_size", "seed", "kl", *_DECLARED)
# The keys each scheme takes beyond the common ones (a `none` slot has no bits).
_SCHEME_KEYS = {"affine": ("k_bits", "v_bits", "group_size"), "turbo": ("k_bits", "v_bits", "seed"), "none": ()}
SENSITIVITY_KEYS = ("probe", "prefix_tokens", "scored_tokens", "num_windows")


def _check_kl(kl, source, i):
    field = f"layers[{i}].kl"
    if not isinstance(kl, dict):
        raise KVConfigError(f"{source}: field '{field}' must be an object of candidate -> KL, got {brief(kl)}")
    for key, v in kl.items():
        try:
            KVCandidate.parse(key)
        except ValueError as e:
            raise KVConfigError(f"{source}: field '{field}': {e}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise KVConfigError(f"{source}: field '{field}.{key}' must be a finite number >= 0, got {brief(v)}")
    return dict(kl)


def _check_declared(entry, where):
    declared = {}
    for name in _DECLARED:
        v = entry.get(name)
        if v is None:
            continue
        if name == "cache":
            if not isinstance(v, str):
                raise KVConfigError(f"{where}: field 'cache' is {brief(v)}, expected a cache class name")
        else:
            _field_int(entry, name, where, minimum=1)
        declared[name] = v
    return declared


def plan_from_dict(data: dict, source: str = "<kv plan>") -> KVPlan:
    """Parse a kv_config payload (already read) into a KVPlan; checks what needs no model.

    Every field is type-checked and unknown keys are errors (a misspelt `k_bits` must not
    leave a slot at some default), each naming the file and the field.
    """
    check_keys(data, TOP_KEYS, source, error=KVConfigError)
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise KVConfigError(f"{source}: field 'layers' must be a non-empty list of per-slot entries")
    start = data.get("quantized_kv_start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise KVConfigError(f"{source}: field 'quantized_kv_start' is {brief(start)}, expected an integer >= 0")
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise KVConfigError(f"{source}: field 'model' is {brief(data['model'])}, expected a string")
    for name in ("target_bits", "achieved_bits"):
        _field_number(data, name, source)
    _field_int(data, "context_length", source, optional=True, minimum=1)
    sensitivity = data.get("sensitivity")
    if sensitivity is not None:
        if not isinstance(sensitivity, dict):
            raise KVConfigError(f"{source}: field 'sensitivity' is {brief(sensitivity)}, expected an object")
        check_keys(sensitivity, SENSITIVITY_KEYS, source, "sensitivity", error=KVConfigError)
        if sensitivity.get("probe") is not None and not isinstance(sensitivity["probe"], str):
            raise KVConfigError(
                f"{source}: field 'sensitivity.probe' is {brief(sensitivity['probe'])}, expected a string"
            )
        for name in SENSITIVITY_KEYS[1:]:
            _field_int(sensitivity, name, f"{source}: sensitivity", optional=True, minimum=0)
    slots = []
    for i, entry in enumerate(layers):
        where = f"{source}: layers[{i}]"
        if not isinstance(entry, dict):
            raise KVConfigError(f"{where}: expected an object, got {type(entry).__name__}")
        check_keys(entry, SLOT_KEYS, source, f"layers[{i}]", error=KVConfigError)
        slot = _field_int(entry, "cache_slot", where, minimum=0)
        layer = _field_int(entry, "layer", where, optional=True, minimum=0)
        scheme = entry.get("scheme")
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise KVConfigError(f"{where}: field 'scheme' is {brief(scheme)}, expected one of {list(SCHEMES)}")
        stray = [k for k in ("k_bits", "v_bits", "group_size", "seed") if k in entry and k not in _SCHEME_KEYS[scheme]]
        if stray:
            what = "keeps the model's float cache" if scheme == "none" else "does not use them"
            raise KVConfigError(f"{where}: field(s) {stray} do not apply to scheme {scheme!r}, which {what}")
        sp = SlotPlan(
            slot=slot,
            layer=layer,
            scheme=scheme,
            kl=_check_kl(entry["kl"], source, i) if "kl" in entry else {},
            declared=_check_declared(entry, where),
        )
        if scheme == "affine":
            sp.k_bits = _field_int(entry, "k_bits", where)
            sp.v_bits = _field_int(entry, "v_bits", where)
            sp.group_size = _field_int(entry, "group_size", where)
            for name in ("k_bits", "v_bits"):
                if getattr(sp, name) not in AFFINE_BITS:
                    raise KVConfigError(
                        f"{where}: field {name!r} is {getattr(sp, name)}, expected one of {list(AFFINE_BITS)}"
                    )
            if sp.group_size not in AFFINE_GROUPS:
                raise KVConfigError(
                    f"{where}: field 'group_size' is {sp.group_size}, expected one of {list(AFFINE_GROUPS)}"
                )
        elif scheme == "turbo":
            sp.k_bits = _field_int(entry, "k_bits", where)
            sp.v_bits = _field_int(entry, "v_bits", where)
            sp.seed = _field_int(entry, "seed", where, optional=True, minimum=0)
            if sp.seed is None:
                sp.seed = 2 * slot  # distinct rotations per layer, reproducible
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
            f"got cache_slot values {brief(seen, 200)}"
        )
    slots.sort(key=lambda s: s.slot)
    n = data.get("num_cache_slots")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != len(slots)):
        raise KVConfigError(
            f"{source}: field 'num_cache_slots' is {brief(n)} but 'layers' has {len(slots)} entries "
            "(expected that integer)"
        )
    known = {"format_version", "kind", *(k for k in TOP_KEYS if k != "sensitivity")}
    return KVPlan(
        slots=slots,
        quantized_kv_start=start,
        model=data.get("model"),
        target_bits=data.get("target_bits"),
        achieved_bits=data.get("achieved_bits"),
        context_length=data.get("context_length"),
        source=source,
        extra={k: v for k, v in data.items() if k not in known},
    )


def plan_to_dict(plan: KVPlan) -> dict:
    """The kv_config.json payload of a plan (geometry recorded where validation filled it in)."""
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
        "model": plan.model,
        "target_bits": plan.target_bits,
        "achieved_bits": plan.achieved_bits,
        "context_length": plan.context_length,
        "quantized_kv_start": plan.quantized_kv_start,
        "num_cache_slots": len(plan.slots),
        "layers": layers,
    }
    payload.update(plan.extra)
    return payload


def write_kv_config(plan: KVPlan, path: str | Path) -> Path:
    """Write `plan` as kv_config.json at `path` (atomically, with kind/format_version)."""
    return write_json(path, plan_to_dict(plan), kind=KIND)


def read_kv_config(path: str | Path) -> KVPlan:
    """Read and parse a kv_config.json (a folder means the file inside it), without a model."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    return plan_from_file_data(read_json(path), path)


def plan_from_file_data(data: dict[str, Any], path: str | Path) -> KVPlan:
    """The plan in an object already read from `path` (header and fields checked, then parsed)."""
    return plan_from_dict(check_header(data, path, KIND, required=["layers"]), source=str(path))


def load_kv_config(path: str | Path, model: Any) -> KVPlan:
    """Read a kv_config.json and validate it against `model`; returns the KVPlan."""
    plan = read_kv_config(path)
    validate_plan(plan, model)
    return plan


# ----------------------------------------------------------------------------- validation


def validate_plan(plan: KVPlan, model: Any, geometry: list[SlotGeometry] | None = None) -> KVPlan:
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
