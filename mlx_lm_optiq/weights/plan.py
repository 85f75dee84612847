"""Choose one quantization (bits, group size) per module under a bits-per-weight budget.

The budget is counted exactly as `mlx_lm.utils.compute_bits_per_weight` counts it on
the converted model: every array's bytes (packed weights, scales, biases, norms, float
layers) divided by `get_total_parameters`. The choice minimising the summed measured KL
divergence is found exactly with `allocate.solve`.

`solve_plan` is the knapsack over numbers; `plan_for_model` measures those numbers on a
float model as stock convert will cast and quantize it. Errors about what was asked
name config fields (`ConfigError`: `target_bpw`, `protect`, `dtype`); errors about the
data (a table that does not fit the model, a converted model that does not match the
plan) are `PlanError`s naming the source.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.allocate import InfeasibleBudget, solve
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.errors import OptiqError
from mlx_lm_optiq.core.formats import Candidate, candidate_key, quantized_bits
from mlx_lm_optiq.core.model_tree import conversion_dtype, quantizable_modules

PROTECTIONS = ("embeddings", "lm-head", "first-block", "last-block")

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PlanError(OptiqError):
    """A table that does not fit the model, or a converted model that does not match its plan."""


class InfeasibleTarget(ConfigError, InfeasibleBudget):
    """`target_bpw` is below the cheapest choice of the candidates (field `target_bpw`)."""


def _dtype_bits(dtype: Any) -> int:
    return dtype.size * 8


def budget_inputs(
    model: Any, module_paths: Iterable[str], cast_dtype: Any = None, cast_predicate: Callable[[str], bool] | None = None
) -> tuple[int, int, dict[str, int]]:
    """(total_params, fixed_bits, float_weight_bits) of `model` as it will be quantized.

    total_params: `get_total_parameters` (unchanged by quantization).
    fixed_bits: bits of every array that is not the weight of a module in
    `module_paths` (norms, biases, modules never quantized), after the dtype cast
    that stock convert applies (`cast_dtype`, `cast_predicate` as in mlx_lm.convert).
    float_weight_bits: {path: bits of that module's weight if kept in float}.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    cast_predicate = cast_predicate or (lambda _: True)

    def bits_of(name, arr):
        if cast_dtype is not None and cast_predicate(name) and mx.issubdtype(arr.dtype, mx.floating):
            return arr.size * _dtype_bits(cast_dtype)
        return arr.nbytes * 8

    all_bits = sum(bits_of(k, v) for k, v in tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    float_weight_bits = {}
    for path in module_paths:
        if path not in modules:
            raise PlanError(f"module {path!r} of the sensitivity table is not in the model")
        float_weight_bits[path] = bits_of(f"{path}.weight", modules[path].weight)
    fixed = all_bits - sum(float_weight_bits.values())
    return get_total_parameters(model), fixed, float_weight_bits


def check_protections(protect: Iterable[str]) -> None:
    """Raise ConfigError (field `protect`) unless every name is one of PROTECTIONS."""
    unknown = [p for p in protect if p not in PROTECTIONS]
    if unknown:
        raise ConfigError("protect", f"unknown protection(s) {unknown}; expected some of {list(PROTECTIONS)}")


def protected_modules(paths: Sequence[str], protect: Iterable[str], tied_embeddings: bool = False) -> dict[str, str]:
    """{path: protection name} for the requested protections; each must match something."""
    protect = list(protect)
    check_protections(protect)
    blocks = {p: int(m.group(1)) for p in paths if (m := _BLOCK.search(p))}
    out = {}
    for name in protect:
        if name == "embeddings":
            hit = [p for p in paths if "embed" in p.rsplit(".", 1)[-1]]
        elif name == "lm-head":
            hit = [p for p in paths if p.rsplit(".", 1)[-1] == "lm_head"]
            if not hit and tied_embeddings:
                # Tied models compute the output projection with the embedding matrix.
                hit = [p for p in paths if "embed" in p.rsplit(".", 1)[-1]]
        elif name in ("first-block", "last-block"):
            if not blocks:
                hit = []
            else:
                edge = min(blocks.values()) if name == "first-block" else max(blocks.values())
                hit = [p for p, b in blocks.items() if b == edge]
        if not hit:
            raise ConfigError("protect", f"{name}: no quantizable module matches it in this model")
        for p in hit:
            out.setdefault(p, name)
    return out


def solve_plan(
    table: Mapping[str, Any],
    candidates: Sequence[Candidate],
    target_bpw: float,
    total_params: int,
    fixed_bits: int,
    float_weight_bits: Mapping[str, int],
    scale_bits: int,
    protect: Mapping[str, str] | None = None,
    source: str = "sensitivity table",
    measured: bool = True,
) -> dict[str, Any]:
    """Exact per-module choice from the numbers of the budget; returns a dict describing the plan.

    table: sensitivity table (`modules[path] = {"num_params", "shape", "kl": {key: float}}`).
    candidates: candidate dicts allowed for this conversion (subset of the table's).
    protect: {path: reason}; those modules get their most precise candidate: the costliest
      (the lowest-KL one where several cost the same), so what they cost is known before measuring.
    measured=False: the table has shapes only (no `kl`): check that the target is feasible
    (InfeasibleTarget naming the cheapest BPW) and return {"min_bpw"} without planning; the
    minimum is exactly the one the measured plan will have.
    Returns {"layers": {path: {"bits","group_size","mode"} or {"bits": float bits}},
             "predicted_bits": int, "capacity_bits": int, "achieved_bpw": float, "min_bpw": float}.
    """
    protect = protect or {}
    modules = table["modules"]
    target = Fraction(float(target_bpw))  # the exact binary value: result <= float(target) after division
    capacity_total = math.floor(target * total_params)
    capacity = capacity_total - fixed_bits
    paths, values, costs, options = [], [], [], []
    float_layers = {}
    for path, entry in modules.items():
        in_dim = int(entry["shape"][-1])
        n = int(entry["num_params"])
        kl = entry.get("kl", {})
        opts = [c for c in candidates if in_dim % c["group_size"] == 0]
        if not opts:
            # mlx cannot quantize this input width with any requested group size
            float_layers[path] = float_weight_bits[path]
            continue
        opt_costs = [quantized_bits(n, c["bits"], c["group_size"], c["mode"], scale_bits) for c in opts]
        if path in protect:  # the most precise choice is the costliest (its storage is its precision)
            top = [j for j, cost in enumerate(opt_costs) if cost == max(opt_costs)]
            opts, opt_costs = [opts[j] for j in top], [opt_costs[j] for j in top]
        if not measured:
            costs.append(opt_costs)
            continue
        missing = [candidate_key(**c) for c in opts if candidate_key(**c) not in kl]
        if missing:
            raise PlanError(
                f"{source}: module {path!r} has no measurement for candidate(s) {missing} "
                f"(it has {sorted(kl)}); measure again with these candidates or choose from the measured ones"
            )
        vals = []
        for c in opts:
            v = kl[candidate_key(**c)]
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PlanError(
                    f"{source}: module {path!r} candidate {candidate_key(**c)}: kl must be a finite number, got {v!r}"
                )
            vals.append(float(v))
        if path in protect:  # of equally costly candidates, the one the measurement says hurts least
            best = min(range(len(opts)), key=lambda j: (vals[j], -opts[j]["bits"], opts[j]["group_size"]))
            opts, vals, opt_costs = [opts[best]], [vals[best]], [opt_costs[best]]
        paths.append(path)
        options.append(opts)
        values.append(vals)
        costs.append(opt_costs)
    capacity -= sum(float_layers.values())
    cheapest = fixed_bits + sum(float_layers.values()) + sum(min(cs) for cs in costs)
    min_bpw = cheapest / total_params
    if cheapest > capacity_total:
        raise InfeasibleTarget(
            "target_bpw",
            f"{target_bpw} is infeasible: the cheapest choice of the candidates "
            f"{[candidate_key(**c) for c in candidates]}"
            + (f" with protections {sorted(set(protect.values()))}" if protect else "")
            + f" already needs {min_bpw:.4f} bits per weight",
        )
    if not measured:
        return {"min_bpw": min_bpw}
    picks = solve(values, costs, capacity)
    layers = {}
    used = fixed_bits + sum(float_layers.values())
    for path, opts, cs, j in zip(paths, options, costs, picks):
        layers[path] = dict(opts[j])
        used += cs[j]
    for path, bits in float_layers.items():
        n = int(modules[path]["num_params"])
        layers[path] = {"bits": bits // n}
    assert used <= capacity_total, "solver exceeded the budget"
    return {
        "layers": layers,
        "predicted_bits": int(used),
        "capacity_bits": int(capacity_total),
        "total_params": int(total_params),
        "achieved_bpw": used / total_params,
        "min_bpw": min_bpw,
        "float_layers": sorted(float_layers),
        "protected": dict(protect),
    }


def plan_for_model(
    model: Any,
    config: Mapping[str, Any],
    table: Mapping[str, Any],
    candidates: Sequence[Candidate],
    target_bpw: float,
    dtype: str | None = None,
    protect: Iterable[str] = (),
    source: str = "sensitivity table",
) -> dict[str, Any]:
    """Plan for the float `model` as stock convert will cast and quantize it.

    config: the model's config.json dict; dtype: stock convert's `dtype` argument (None:
    the checkpoint's own); protect: protection names (PROTECTIONS).
    """
    return solve_plan(
        table, candidates, target_bpw, source=source, **_budget(model, config, table, dtype, protect, source)
    )


def _budget(
    model: Any,
    config: Mapping[str, Any],
    table: Mapping[str, Any],
    dtype: str | None,
    protect: Iterable[str],
    source: str,
) -> dict[str, Any]:
    """The budget numbers of `solve_plan` for the float `model` as stock convert will cast it."""
    cast_dtype = conversion_dtype(config, dtype)
    cast_predicate = getattr(model, "cast_predicate", None)
    paths = list(table["modules"])
    total, fixed, float_weight_bits = budget_inputs(model, paths, cast_dtype, cast_predicate)
    for path, mod in table["modules"].items():
        if float_weight_bits[path] % int(mod["num_params"]):
            raise PlanError(
                f"{source}: module {path!r} has num_params {mod['num_params']} that does not match the model"
            )
    widths = {p: float_weight_bits[p] // int(table["modules"][p]["num_params"]) for p in paths}
    scale_bits = set(widths.values())
    if len(scale_bits) != 1:
        raise ConfigError(
            "dtype",
            f"the float weights of the planned modules have mixed widths {sorted(scale_bits)}: "
            "give one dtype to cast them to",
        )
    tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False)))
    protected = protected_modules(paths, list(protect or ()), tied_embeddings=tied)
    return {
        "total_params": total,
        "fixed_bits": fixed,
        "float_weight_bits": float_weight_bits,
        "scale_bits": scale_bits.pop(),
        "protect": protected,
    }


def shape_table(model: Any) -> dict[str, Any]:
    """{"modules": {path: {"num_params", "shape"}}} of every quantizable module of the float `model`:
    what a sensitivity table of it must cover, and all a plan's budget needs before any KL."""
    return {
        "modules": {
            p: {"num_params": int(m.weight.size), "shape": list(m.weight.shape)}
            for p, m in quantizable_modules(model).items()
        }
    }


def check_feasible(
    model: Any,
    config: Mapping[str, Any],
    candidates: Sequence[Candidate],
    target_bpw: float,
    dtype: str | None = None,
    protect: Iterable[str] = (),
) -> float:
    """Everything about a plan that needs no measurement, checked before the (long) sweep.

    The cheapest plan of `candidates` follows from the module shapes alone: a target below
    it is an InfeasibleTarget naming the minimum now rather than after measuring. Each
    protection must match a module (ConfigError `protect`), and not every module may be
    protected (nothing would be left for the target to choose). Returns the cheapest BPW.
    """
    table = shape_table(model)
    budget = _budget(model, config, table, dtype, protect, "the model")
    if budget["protect"] and set(budget["protect"]) >= set(table["modules"]):
        raise ConfigError(
            "protect",
            f"{','.join(sorted(set(budget['protect'].values())))} protect every quantizable module of this model, "
            "so nothing is left for `target_bpw` to choose: protect fewer, or quantize uniformly (stock -q)",
        )
    return solve_plan(table, candidates, target_bpw, measured=False, **budget)["min_bpw"]


def quant_predicate(layers: Mapping[str, Mapping[str, Any]], clip: Any = None) -> Callable[..., Any]:
    """A stock `quant_predicate` applying a plan: a dict for planned layers, False otherwise.

    clip: the table's clipping.Clipper (clipping.from_table), or None for stock ranges.
    """

    def predicate(path, module, config=None):
        choice = layers.get(path)
        if choice is None or "group_size" not in choice:
            return False
        if clip is not None:
            # Stock quantizes the module right after asking: handing it the clipped float
            # weight makes its own to_quantized write the clipped ranges the sweep measured.
            module.weight = clip(path, module.weight, choice)
        return dict(choice)

    return predicate


def check_quantized(model: Any, layers: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise PlanError unless every planned module carries exactly its planned bits."""
    modules = dict(model.named_modules())
    wrong = []
    for path, choice in layers.items():
        m = modules.get(path)
        if m is None:
            wrong.append(f"{path}: missing")
        elif "group_size" in choice:
            got = (getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", "affine"))
            if got != (choice["bits"], choice["group_size"], choice["mode"]):
                wrong.append(f"{path}: planned {choice}, got bits={got[0]} group_size={got[1]} mode={got[2]}")
        elif hasattr(m, "bits"):
            wrong.append(f"{path}: planned float, got {m.bits}-bit")
    if wrong:
        raise PlanError("converted model does not match the plan: " + "; ".join(wrong[:10]))


def check_table_matches(table: Mapping[str, Any], model: Any, source: str) -> None:
    """The table covers exactly the model's quantizable modules, each with the recorded shape.

    A quantizable module the table lacks would be left in float without a word (a far
    bigger model than planned) or make the target look infeasible: an error naming them.
    """
    missing = [p for p in quantizable_modules(model) if p not in table["modules"]]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise PlanError(
            f"{source}: has no entry for {len(missing)} quantizable module(s) of this model ({shown}); "
            "a table must cover every quantizable module: measure it on this model (all modules)"
        )
    modules = dict(model.named_modules())
    for path, entry in table["modules"].items():
        m = modules.get(path)
        if m is None or not hasattr(m, "weight"):
            raise PlanError(
                f"{source}: module {path!r} is not a weight module of this model; "
                "was the table measured on another model?"
            )
        if list(m.weight.shape) != list(entry["shape"]):
            raise PlanError(
                f"{source}: module {path!r} has shape {entry['shape']} in the table but "
                f"{list(m.weight.shape)} in the model"
            )


def verify_converted(
    out_dir: str | Path, layers: Mapping[str, Mapping[str, Any]], target_bpw: float, predicted_bits: int
) -> float:
    """Reload the written model with stock mlx-lm and check bits per layer and BPW; return BPW."""
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, load_model

    out_dir = Path(out_dir)
    with open(out_dir / "config.json") as f:
        qcfg = json.load(f).get("quantization", {})
    for path, choice in layers.items():
        if "group_size" in choice and qcfg.get(path) != choice:
            raise PlanError(
                f"{out_dir}/config.json: quantization entry for {path!r} is {qcfg.get(path)!r}, planned {choice}"
            )
    model, _ = load_model(out_dir, lazy=True)
    check_quantized(model, layers)
    bpw = compute_bits_per_weight(model)
    used = bpw * get_total_parameters(model)
    if bpw > float(target_bpw) or abs(used - predicted_bits) > 0.5:
        raise PlanError(
            f"converted model has {bpw:.6f} bits per weight ({used:.0f} bits); "
            f"the plan predicted {predicted_bits} bits within target {target_bpw}"
        )
    return bpw
