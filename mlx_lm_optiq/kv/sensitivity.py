"""Per-layer KV-cache sensitivity and its allocation into a KV plan.

Measure: for every full-attention cache slot and every candidate (k_bits, v_bits,
group_size), the KL divergence of the next-token distributions over `scored`
continuation tokens when only that slot's cache is quantized, against the model
with every cache in float. The quantized cache is *simulated* in the model's float
dtype: keys and values are quantized and dequantized as they enter the cache, which
is exactly what quantized SDPA computes (q . dequant(K)), and fast on CPU in fp32.

Reuse: the layers below the probed slot cannot see its cache, so their reference
outputs are replayed instead of recomputed. Probe "exact" (default) runs the window
with the slot quantized from the first token, as the runtime does; probe "fast"
prefills the prefix once in float and runs only the scored tokens (a slot's own prefix
K/V are exact, but the layers above keep float-derived prefix K/V, so compounding
errors are underestimated).

Allocate: one option per slot (float or a measured candidate) minimising summed KL
under an average-bits budget, weighted by the bytes each slot really holds (KV heads x
head_dim, window-capped for sliding layers), with the exact knapsack of core.allocate.

The table (kind optiq-kv-sensitivity) has its one writer, reader and validator here:
`write_kv_table`, `read_kv_table` (which also reads the table a kv_config.json holds).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from tqdm import tqdm

from mlx_lm_optiq.core import allocate
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_header, read_json, write_json
from mlx_lm_optiq.kv.candidates import DEFAULT_KV_CANDIDATES, KVCandidate
from mlx_lm_optiq.kv.geometry import (
    FLOAT_BITS,
    SlotGeometry,
    average_bits,
    bits_per_token,
    cache_geometry,
    elements_per_token,
    token_weight,
)
from mlx_lm_optiq.kv.plan_file import FILENAME, KVPlan, SlotPlan, plan_from_file_data
from mlx_lm_optiq.kv.plan_file import KIND as PLAN_KIND

TABLE_KIND = "optiq-kv-sensitivity"
PROBES = ("exact", "fast")


def fake_quantize(x: mx.array, bits: int, group_size: int) -> mx.array:
    """Quantize then dequantize along the last axis (affine, mlx's own kernels)."""
    return mx.dequantize(*mx.quantize(x, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


class _FakeQuantizedEntries:
    """Keys and values go through affine quantization (separate widths) as they enter the cache."""

    def _init_simulation(self, k_bits, v_bits, group_size):
        self.k_bits, self.v_bits, self.group_size = k_bits, v_bits, group_size

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return super().update_and_fetch(
            fake_quantize(keys, self.k_bits, self.group_size),
            fake_quantize(values, self.v_bits, self.group_size),
        )


class SimulatedQuantizedKVCache(_FakeQuantizedEntries, KVCache):
    """A float KVCache whose entries went through affine quantization (keys and values
    at separate widths): same attention result as a real quantized cache, float speed."""

    def __init__(self, k_bits: int, v_bits: int, group_size: int) -> None:
        KVCache.__init__(self)
        self._init_simulation(k_bits, v_bits, group_size)

    @classmethod
    def from_float(cls, cache: KVCache, k_bits: int, v_bits: int, group_size: int) -> SimulatedQuantizedKVCache:
        sim = cls(k_bits, v_bits, group_size)
        if cache.keys is not None and cache.offset:
            sim.update_and_fetch(cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :])
        return sim


class SimulatedQuantizedRotatingKVCache(_FakeQuantizedEntries, RotatingKVCache):
    """The sliding-window twin of SimulatedQuantizedKVCache."""

    def __init__(self, max_size: int, keep: int, k_bits: int, v_bits: int, group_size: int) -> None:
        RotatingKVCache.__init__(self, max_size, keep)
        self._init_simulation(k_bits, v_bits, group_size)

    @classmethod
    def from_float(
        cls, cache: RotatingKVCache, k_bits: int, v_bits: int, group_size: int
    ) -> SimulatedQuantizedRotatingKVCache:
        sim = cls(cache.max_size, cache.keep, k_bits, v_bits, group_size)
        if cache.keys is not None:  # positions are independent: quantize the buffer as it lies
            sim.keys = fake_quantize(cache.keys, k_bits, group_size)
            sim.values = fake_quantize(cache.values, v_bits, group_size)
        sim.offset, sim._idx = cache.offset, cache._idx
        return sim


def simulated_slot_cache(like: Any, k_bits: int, v_bits: int, group_size: int) -> KVCache:
    """An empty simulated quantized cache of the same kind as the float cache `like`."""
    if isinstance(like, RotatingKVCache):
        return SimulatedQuantizedRotatingKVCache(like.max_size, like.keep, k_bits, v_bits, group_size)
    return SimulatedQuantizedKVCache(k_bits, v_bits, group_size)


def simulated_copy(cache: Any, k_bits: int, v_bits: int, group_size: int) -> KVCache:
    """A simulated quantized cache holding what the float cache `cache` holds, same kind."""
    cls = SimulatedQuantizedRotatingKVCache if isinstance(cache, RotatingKVCache) else SimulatedQuantizedKVCache
    return cls.from_float(cache, k_bits, v_bits, group_size)


def simulated_plan_cache(model: Any, plan: KVPlan) -> list:
    """Float caches that simulate `plan` (affine slots only), for quality measurements on CPU."""
    caches = make_prompt_cache(model)
    for s in plan.slots:
        if s.scheme == "affine":
            caches[s.slot] = simulated_slot_cache(caches[s.slot], s.k_bits, s.v_bits, s.group_size)
        elif s.scheme != "none":
            raise ValueError(f"slot {s.slot}: scheme {s.scheme!r} cannot be simulated here")
    return caches


def _copy_caches(caches):
    """Fresh caches holding the prefix. KVCache only appends past `offset`, so sharing its
    arrays is safe and free; other caches (rotating, recurrent state) are deep-copied."""
    out = []
    for c in caches:
        if type(c) is KVCache:
            n = KVCache()
            n.keys, n.values, n.offset = c.keys, c.values, c.offset
            out.append(n)
        else:
            out.append(copy.deepcopy(c))
    return out


def _prefill(model, tokens, caches, step=512):
    for i in range(0, tokens.size, step):
        model(tokens[None, i : i + step], cache=caches)
        mx.eval([c.state for c in caches])


def _log_probs(model, tokens, caches):
    logits = model(tokens[None], cache=caches)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class _Recorder:
    """Wraps a layer and keeps its last output; models read layer attributes
    (e.g. `use_sliding`, `is_linear`), so those pass through."""

    def __init__(self, layer, output=None):
        self.layer, self.output = layer, output

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def __call__(self, *args, **kwargs):
        self.output = self.layer(*args, **kwargs)
        return self.output


class _Replay(_Recorder):
    """Stands in for a layer below the probed one: returns that layer's recorded
    reference output (its input and cache are untouched by the probe)."""

    def __call__(self, *args, **kwargs):
        return self.output


def _layer_list(model, geometry):
    """model.layers when it is one stable list indexed like the cache slots, else None."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or getattr(model, "layers", None) is not layers:
        return None
    if len(layers) != len(geometry) or any(g.layer != g.slot for g in geometry):
        return None
    return layers


def _kl(ref_logp, logp):
    """Mean over positions of KL(ref || probe)."""
    return mx.mean(mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1))


def measure_kv_sensitivity(
    model: Any,
    windows: Sequence[mx.array],
    prefix_tokens: int,
    candidates: Sequence[KVCandidate | tuple] = DEFAULT_KV_CANDIDATES,
    progress: bool = True,
    model_name: str | None = None,
    geometry: list[SlotGeometry] | None = None,
    reuse_layers: bool = True,
    probe: str = "exact",
    on_start: Callable[[int, float], None] | None = None,
) -> dict:
    """The sensitivity table for `model` (use a float model, ideally fp32 on CPU).

    windows: list of 1-D token arrays, each `prefix_tokens` + scored tokens long.
    candidates: KVCandidates (or (k_bits, v_bits, group_size) triples); a candidate whose group size
    does not divide a slot's head_dim is recorded as not applicable (absent key).
    probe: "exact" runs the whole window with the probed slot quantized from the
    first token, as the runtime cache does (its error reaches the later layers'
    caches through the prefix too); "fast" reuses the float prefill and runs only the
    scored tokens (prefix K/V of the layers above stay float: it underestimates
    layers whose error compounds, e.g. 2-bit values; ~prefix/scored times cheaper).
    reuse_layers: replay the reference outputs of the layers below the probed slot
    instead of recomputing them (exact either way; off = a plain full forward).
    on_start: called once, after the first window's reference run and before any probe, with
    (number of probes, estimated seconds per probe), so a caller can say up front how long the
    measurement will take (`estimate_probe_seconds`).
    """
    if probe not in PROBES:
        raise ValueError(f"probe is {probe!r}, expected one of {list(PROBES)}")
    if not windows:
        raise ValueError("measure_kv_sensitivity: no token windows given")
    lengths = {int(w.size) for w in windows}
    if len(lengths) != 1 or min(lengths) <= prefix_tokens:
        raise ValueError(f"every window needs the same length > prefix_tokens={prefix_tokens}, got {sorted(lengths)}")
    candidates = [KVCandidate(*c) for c in candidates]
    geometry = geometry or cache_geometry(model)
    probes = [
        (g, c)
        for g in geometry
        if g.quantizable
        for c in candidates
        if g.k_head_dim % c.group_size == 0 and g.v_head_dim % c.group_size == 0
    ]
    layers = _layer_list(model, geometry) if reuse_layers else None
    originals = list(layers) if layers is not None else None

    def run_with(fn, replay_below=0, recorded=None, record=False):
        try:
            if record and layers is not None:
                layers[:] = [_Recorder(m) for m in originals]
            elif layers is not None and replay_below:  # layers below the probed slot cannot see its cache
                layers[:replay_below] = [_Replay(m, o) for m, o in zip(originals, recorded[:replay_below])]
            out = fn()
            mx.eval(out)
            return out, ([r.output for r in layers] if record and layers is not None else None)
        finally:
            if layers is not None:
                layers[:] = originals

    sums = {}
    bar = None  # made after the first reference run, so that on_start's line comes before it
    for w in windows:
        prefix, scored = w[:prefix_tokens], w[prefix_tokens:]
        if probe == "fast":
            caches = make_prompt_cache(model)
            _prefill(model, prefix, caches)
            reference = lambda: _log_probs(model, scored, _copy_caches(caches))  # noqa: E731
        else:
            reference = lambda: _log_probs(model, w, make_prompt_cache(model))[prefix_tokens:]  # noqa: E731
        t0 = time.perf_counter()
        ref, recorded = run_with(reference, record=True)
        if bar is None:
            if on_start is not None:
                reference_seconds = fixed_seconds = time.perf_counter() - t0
                if layers is not None and probes:  # the part no probe skips: every layer replayed
                    t0 = time.perf_counter()
                    _kl(ref, run_with(reference, replay_below=len(layers), recorded=recorded)[0]).item()
                    fixed_seconds = time.perf_counter() - t0
                on_start(
                    len(probes) * len(windows),
                    estimate_probe_seconds(
                        reference_seconds, fixed_seconds, [g.slot for g, _ in probes], len(geometry)
                    ),
                )
            bar = tqdm(
                total=len(probes) * len(windows), desc=f"KV sensitivity ({probe})", unit="probe", disable=not progress
            )
        for g, cand in probes:
            kb, vb, gs = cand
            if probe == "fast":
                run = _copy_caches(caches)
                run[g.slot] = simulated_copy(caches[g.slot], kb, vb, gs)
                fn = lambda run=run: _log_probs(model, scored, run)  # noqa: E731
            else:
                run = make_prompt_cache(model)
                run[g.slot] = simulated_slot_cache(run[g.slot], kb, vb, gs)
                fn = lambda run=run: _log_probs(model, w, run)[prefix_tokens:]  # noqa: E731
            logp, _ = run_with(fn, replay_below=g.slot, recorded=recorded)
            key = (g.slot, cand.key)
            sums[key] = sums.get(key, 0.0) + _kl(ref, logp).item()
            bar.update(1)
    bar.close()
    slots = []
    for g in geometry:
        entry = _geometry_dict(g)
        entry["kl"] = {k: max(0.0, v / len(windows)) for (slot, k), v in sums.items() if slot == g.slot}
        slots.append(entry)
    return {
        "model": model_name,
        "probe": probe,
        "prefix_tokens": int(prefix_tokens),
        "scored_tokens": int(next(iter(lengths)) - prefix_tokens),
        "num_windows": len(windows),
        "candidates": [c.key for c in candidates],
        "slots": slots,
    }


def estimate_probe_seconds(
    reference_seconds: float, fixed_seconds: float, probed_slots: Sequence[int], num_slots: int
) -> float:
    """Mean seconds per probe, from two timed runs of what a probe repeats.

    A probe repeats the reference run (whole window, or the scored tokens only) with one slot
    quantized; with layer replay the layers below that slot are skipped, the rest (the layers
    from the slot up, embedding, head, KL) runs. `fixed_seconds` is that run with every layer
    replayed (= `reference_seconds` without replay), so a probe of slot s costs about
    fixed + (reference - fixed) x (num_slots - s) / num_slots. On the 30-layer SmolLM2 the head
    and KL over a 49k vocabulary are ~1/4 of a probe (counting them as one layer's worth said
    0.31 s for a measured 0.53 s per probe). An estimate for the start-up line, not a promise:
    a busy machine is slower.
    """
    if not probed_slots:
        return 0.0
    layer_seconds = max(0.0, reference_seconds - fixed_seconds)
    return fixed_seconds + layer_seconds * sum((num_slots - s) / num_slots for s in probed_slots) / len(probed_slots)


def _geometry_dict(g):
    return {
        "slot": g.slot,
        "layer": g.layer,
        "cache": g.kind,
        "n_kv_heads": g.n_kv_heads,
        "k_head_dim": g.k_head_dim,
        "v_head_dim": g.v_head_dim,
        "window": g.window,
    }


def table_geometry(table: dict) -> list[SlotGeometry]:
    """The per-slot geometry a sensitivity table records."""
    return [
        SlotGeometry(
            slot=e["slot"],
            layer=e.get("layer"),
            kind=e["cache"],
            n_kv_heads=e.get("n_kv_heads"),
            k_head_dim=e.get("k_head_dim"),
            v_head_dim=e.get("v_head_dim"),
            window=e.get("window"),
        )
        for e in table["slots"]
    ]


def write_kv_table(table: dict, path: str | Path) -> Path:
    """Write a KV sensitivity table (kind optiq-kv-sensitivity), atomically."""
    return write_json(path, table, kind=TABLE_KIND)


def read_kv_table(path: str | Path) -> dict:
    """Read a KV sensitivity table, or the table a kv_config.json holds; errors name the file and field.

    A kv_config.json records every slot's geometry and measured KLs (`layers[i].kl`), so a
    written plan re-plans another budget without measuring; it is read by its own reader
    (kv.plan_file, from the same read of the file) and turned into a table by `table_from_plan`. A folder
    means the kv_config.json inside it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    data = read_json(path)  # once: which kind it is decides how it is checked
    kind = data.get("kind")
    if kind == PLAN_KIND:
        return _check_slots(table_from_plan(plan_from_file_data(data, path)), path, "layers")
    if kind != TABLE_KIND:
        raise OptiqFileError(
            f"{path}: field 'kind' is {kind!r}, expected {TABLE_KIND!r} (a saved KV sensitivity table) "
            f"or {PLAN_KIND!r} (a kv_config.json)"
        )
    check_header(data, path, TABLE_KIND, required=["slots", "candidates"])
    if not isinstance(data["slots"], list) or not data["slots"]:
        raise OptiqFileError(f"{path}: field 'slots' must be a non-empty list of per-slot entries")
    for i, e in enumerate(data["slots"]):
        for f in ("slot", "cache", "kl"):
            if not isinstance(e, dict) or f not in e:
                raise OptiqFileError(f"{path}: slots[{i}] is missing field {f!r}")
    return _check_slots(data, path, "slots")


def _check_slots(table: dict, path: Path, entries: str) -> dict:
    """Every KL key is a KV candidate and every KL a finite number >= 0 (`entries`: the file's list)."""
    for i, e in enumerate(table["slots"]):
        if not isinstance(e["kl"], dict):
            raise OptiqFileError(f"{path}: field '{entries}[{i}].kl' must be an object of candidate -> KL")
        for key, v in e["kl"].items():
            try:
                KVCandidate.parse(key)
            except ValueError as err:
                raise OptiqFileError(f"{path}: field '{entries}[{i}].kl': {err}") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise OptiqFileError(f"{path}: field '{entries}[{i}].kl.{key}' must be a finite number >= 0, got {v!r}")
    return table


def table_from_plan(plan: KVPlan) -> dict:
    """The sensitivity table a parsed kv_config.json holds: each slot's recorded geometry and KLs.

    Plans written by `python -m mlx_lm_optiq.kv` or convert record both; a hand-written plan
    without them cannot be re-planned (OptiqFileError naming the field).
    """
    slots = []
    for s in plan.slots:
        if "cache" not in s.declared:
            raise OptiqFileError(
                f"{plan.source}: layers[{s.slot}] has no field 'cache': re-planning needs the geometry and "
                "KLs that a measured plan (python -m mlx_lm_optiq.kv, convert) records"
            )
        entry = {"slot": s.slot, "layer": s.layer, "cache": s.declared["cache"]}
        entry.update({k: s.declared.get(k) for k in ("n_kv_heads", "k_head_dim", "v_head_dim", "window")})
        entry["kl"] = dict(s.kl)
        slots.append(entry)
    keys = sorted({k for e in slots for k in e["kl"]})
    if not keys:
        raise OptiqFileError(
            f"{plan.source}: no layer holds measured KLs (field 'layers[i].kl'), so it cannot be re-planned; "
            "measure the model instead"
        )
    measured = plan.extra.get("sensitivity") if isinstance(plan.extra.get("sensitivity"), dict) else {}
    return {
        "model": plan.model,
        **{k: measured.get(k) for k in ("probe", "prefix_tokens", "scored_tokens", "num_windows")},
        "candidates": keys,
        "slots": slots,
    }


def unmeasured_candidates(table: dict, candidates: Sequence[KVCandidate]) -> dict[int, list[str]]:
    """{slot: keys of `candidates` that apply to the slot (its group size divides the head dims) but
    have no KL in the table}; empty when the table covers them all."""
    missing = {}
    for e, g in zip(table["slots"], table_geometry(table)):
        if not g.quantizable:
            continue
        keys = [
            c.key
            for c in candidates
            if g.k_head_dim % c.group_size == 0 and g.v_head_dim % c.group_size == 0 and c.key not in e["kl"]
        ]
        if keys:
            missing[g.slot] = keys
    return missing


def restrict_table(table: dict, candidates: Sequence[KVCandidate]) -> dict:
    """A copy of `table` whose slots keep only the KLs of `candidates` (the allocation's choices)."""
    keep = {c.key for c in candidates}
    out = dict(table, candidates=[c.key for c in candidates])
    out["slots"] = [dict(e, kl={k: v for k, v in e["kl"].items() if k in keep}) for e in table["slots"]]
    return out


def allocate_kv(
    table: dict,
    target_bits: float,
    context_length: int = 8192,
    quantized_kv_start: int = 0,
    model_name: str | None = None,
) -> KVPlan:
    """The KVPlan minimising summed KL with average bits <= target_bits.

    Every KV-holding slot counts in the average with its real size (heads x head_dim x
    tokens it holds at `context_length`, window-capped for sliding layers); slots that
    cannot be quantized (recurrent state) stay float and are charged as such.
    """
    if not (0 < target_bits <= FLOAT_BITS):
        raise ValueError(f"target_bits is {target_bits}, expected a number in (0, {FLOAT_BITS}]")
    geometry = table_geometry(table)
    items, fixed_cost, total_elems = [], 0, 0
    for e, g in zip(table["slots"], geometry):
        if not g.holds_kv:
            continue
        w = token_weight(g, context_length)
        total_elems += elements_per_token(g) * w
        if not g.quantizable or not e["kl"]:
            fixed_cost += bits_per_token(g, "none") * w
            continue
        options = [("none", None, None, None, 0.0)]
        for key, kl in e["kl"].items():
            try:
                kb, vb, gs = KVCandidate.parse(key)
            except ValueError as err:
                raise ValueError(f"slot {g.slot} kl key: {err}") from None
            options.append(("affine", kb, vb, gs, kl))
        costs = [bits_per_token(g, o[0], o[1], o[2], o[3]) * w for o in options]
        items.append((g, options, costs))
    capacity = math.floor(target_bits * total_elems) - fixed_cost
    try:
        picks = allocate.solve([[o[4] for o in opts] for _, opts, _ in items], [c for _, _, c in items], capacity)
    except allocate.InfeasibleBudget:
        cheapest = fixed_cost + sum(min(c) for _, _, c in items)
        raise allocate.InfeasibleBudget(
            f"target_bits {target_bits} is below the cheapest plan the candidates allow "
            f"({cheapest / total_elems:.3f} average bits); add lower-bit candidates or raise the target"
        ) from None
    chosen = {g.slot: opts[j] for (g, opts, _), j in zip(items, picks)}
    slots = []
    for e, g in zip(table["slots"], geometry):
        scheme, kb, vb, gs, _ = chosen.get(g.slot, ("none", None, None, None, 0.0))
        slots.append(
            SlotPlan(
                slot=g.slot,
                layer=g.layer,
                scheme=scheme,
                k_bits=kb,
                v_bits=vb,
                group_size=gs,
                kl=dict(e["kl"]),
                geometry=g,
            )
        )
    plan = KVPlan(
        slots=slots,
        quantized_kv_start=quantized_kv_start,
        model=model_name or table.get("model"),
        target_bits=target_bits,
        context_length=context_length,
    )
    plan.achieved_bits = round(average_bits(slots, geometry, context_length), 4)
    plan.extra["sensitivity"] = {k: table.get(k) for k in ("probe", "prefix_tokens", "scored_tokens", "num_windows")}
    return plan


def evaluate_plan_kl(model: Any, windows: Sequence[mx.array], prefix_tokens: int, plan: KVPlan) -> float:
    """Measured KL (mean over the scored tokens of every window) of the model with the
    whole plan simulated from the first token on, against all-float caches: the joint
    effect the per-layer allocation only approximates by summing."""
    total = 0.0
    for w in windows:
        prefix, scored = w[:prefix_tokens], w[prefix_tokens:]
        ref_caches, caches = make_prompt_cache(model), simulated_plan_cache(model, plan)
        _prefill(model, prefix, ref_caches)
        _prefill(model, prefix, caches)
        total += _kl(_log_probs(model, scored, ref_caches), _log_probs(model, scored, caches)).item()
    return total / len(windows)


def uniform_plan(geometry: Sequence[SlotGeometry], k_bits: int, v_bits: int, group_size: int) -> KVPlan:
    """Every KV slot at one candidate (stock --kv-bits, which cannot quantize sliding-window slots, for comparisons)."""
    return KVPlan(
        slots=[
            SlotPlan(
                slot=g.slot,
                layer=g.layer,
                scheme="affine" if g.quantizable else "none",
                k_bits=k_bits if g.quantizable else None,
                v_bits=v_bits if g.quantizable else None,
                group_size=group_size if g.quantizable else None,
                geometry=g,
            )
            for g in geometry
        ]
    )


def plan_kl(plan: KVPlan) -> float:
    """Summed measured KL of a plan's choices (the knapsack objective)."""
    total = 0.0
    for s in plan.slots:
        if s.scheme == "affine":
            total += s.kl[KVCandidate(s.k_bits, s.v_bits, s.group_size).key]
    return total
