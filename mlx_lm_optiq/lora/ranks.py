"""Per-module LoRA ranks that move adapter capacity toward sensitive layers.

Stock mlx-lm gives every adapted linear layer the same rank r. Here each module
gets its own rank from a per-module weight (its quantization bits, or its
measured sensitivity: `allocate_ranks`) or from per-step gains (the sensitivity-weighted
singular values of its quantization residual, `allocate_by_gain`; lora/residual.py), under the constraint that the total number of trainable
LoRA parameters equals what constant rank r would use, within one rank step:
capacity is moved, not added.

A LoRA module with input dims i and output dims o costs r * (i + o) parameters
(lora_a is (i, r), lora_b is (r, o)); DoRA's magnitude vector does not depend on
the rank and is left out of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.formats import nominal_bits
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.lora.config import RANK_SCALING_MODES

Dims = tuple[int, int]  # (input_dims, output_dims) of one LoRA module
# No module may take more than this many times the base rank: with by_kl the
# measured KLs span orders of magnitude and one layer would otherwise take most
# of the budget.
DEFAULT_MAX_RANK_FACTOR = 4


def rank_cost(dims: Dims) -> int:
    """Trainable parameters per unit of rank for a module with (input_dims, output_dims)."""
    input_dims, output_dims = dims
    return input_dims + output_dims


def budget_params(dims_by_module: Mapping[str, Dims], base_rank: int) -> int:
    """Trainable LoRA parameters constant rank `base_rank` uses on these modules."""
    return base_rank * sum(rank_cost(d) for d in dims_by_module.values())


def lora_params(dims_by_module: Mapping[str, Dims], ranks: Mapping[str, int]) -> int:
    """Trainable LoRA parameters of these modules at these ranks."""
    return sum(ranks[name] * rank_cost(d) for name, d in dims_by_module.items())


def _checked_budget(
    dims_by_module: Mapping[str, Dims],
    per_module: Mapping[str, object],
    base_rank: int,
    max_rank: int | None,
    what: str,
) -> tuple[int, list[str]]:
    """(max rank, module names) after the checks every allocation shares: a base rank >= 1, a cap
    that lets the budget be spent (default DEFAULT_MAX_RANK_FACTOR x the base rank), and `what`
    (weights or gains) given for every module."""
    if base_rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {base_rank}")
    max_rank = max_rank or DEFAULT_MAX_RANK_FACTOR * base_rank
    if max_rank < base_rank:
        raise ConfigError("max_rank", f"{max_rank} is below the base rank {base_rank}: the budget cannot be spent")
    names = list(dims_by_module)
    missing = [n for n in names if n not in per_module]
    if missing:
        raise ValueError(f"no {what} for LoRA modules {missing[:5]}")
    return max_rank, names


def allocate_ranks(
    dims_by_module: Mapping[str, Dims],
    weights: Mapping[str, float],
    base_rank: int,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Integer ranks proportional to `weights`, at the parameter budget of constant `base_rank`.

    dims_by_module: {module path: (input_dims, output_dims)}
    weights: {module path: positive float}, e.g. quantization bits or KL.
    Ranks are clipped to [min_rank, max_rank] (water-filling: the proportionality
    constant is solved so the clipped continuous ranks spend the budget exactly),
    then rounded down and topped up greedily (largest shortfall first) while the
    budget allows. Result: total <= budget and budget - total < the cost of one
    rank step of any module that could still grow.
    """
    max_rank, names = _checked_budget(dims_by_module, weights, base_rank, max_rank, "rank weight")
    for n in names:
        w = weights[n]
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"rank weight for {n} must be a positive number, got {w!r}")
    cost = {n: rank_cost(dims_by_module[n]) for n in names}
    budget = base_rank * sum(cost.values())

    def spend(scale):
        return sum(min(max(scale * weights[n], min_rank), max_rank) * cost[n] for n in names)

    # Bisection on the proportionality constant: spend() is monotone in it.
    lo, hi = 0.0, 1.0
    while spend(hi) < budget and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if spend(mid) < budget:
            lo = mid
        else:
            hi = mid
    target = {n: min(max(hi * weights[n], min_rank), max_rank) for n in names}
    ranks = {n: max(min_rank, int(math.floor(target[n] + 1e-9))) for n in names}
    left = budget - sum(ranks[n] * cost[n] for n in names)
    # Top up: the module furthest below its continuous target first; stop when
    # no module's one-rank step fits in what is left.
    while True:
        growable = [n for n in names if ranks[n] < max_rank and cost[n] <= left]
        if not growable:
            break
        n = max(growable, key=lambda k: (target[k] - ranks[k], -names.index(k)))
        ranks[n] += 1
        left -= cost[n]
    return ranks


def allocate_by_gain(
    dims_by_module: Mapping[str, Dims],
    gains: Mapping[str, Sequence[float]],
    base_rank: int,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Integer ranks that maximise the summed gain at the parameter budget of constant `base_rank`.

    gains: {module path: g} where g[r] is what raising that module's rank from r to r+1 gains
    (non-increasing in r, e.g. weighted squared singular values of its quantization residual,
    `lora.residual.residual_gains`); len(g) >= max_rank. Every module starts at `min_rank` (a
    LoRA layer cannot have rank 0); then the step with the best gain per parameter is taken
    while it fits, a module whose next step no longer fits drops out. With non-increasing gains
    this greedy is the optimum of the fractional problem and within one step of the integer
    one. Same budget contract as `allocate_ranks`: total <= budget, and budget - total < the
    cost of one rank step of any module that could still grow (ties: larger gain, then order).
    """
    import heapq

    max_rank, names = _checked_budget(dims_by_module, gains, base_rank, max_rank, "rank gains")
    cost = {n: rank_cost(dims_by_module[n]) for n in names}
    ranks = {n: min_rank for n in names}
    left = base_rank * sum(cost.values()) - min_rank * sum(cost.values())

    def entry(i, n):
        g = float(gains[n][ranks[n]]) if ranks[n] < len(gains[n]) else 0.0
        if not (math.isfinite(g) and g >= 0):
            raise ValueError(f"rank gain of {n} at rank {ranks[n]} must be a finite number >= 0, got {g!r}")
        return (-g / cost[n], -g, i, n)

    heap = [entry(i, n) for i, n in enumerate(names) if ranks[n] < max_rank]
    heapq.heapify(heap)
    while heap:
        _, _, i, n = heapq.heappop(heap)
        if cost[n] > left:
            continue  # its next step no longer fits; it never will (left only shrinks)
        ranks[n] += 1
        left -= cost[n]
        if ranks[n] < max_rank:
            heapq.heappush(heap, entry(i, n))
    return ranks


def layer_sensitivity(entry: Mapping) -> float | None:
    """The measured sensitivity of one sidecar layer: its KL at the lowest-bit candidate.

    That is the damage quantizing this layer alone does to the model's output
    distribution, the quantity the mixed-precision allocation ranked it by.
    """
    kl = entry.get("kl")
    if not isinstance(kl, dict) or not kl:
        return None
    key = min(kl, key=nominal_bits)  # "nvfp4:16" is a 4-bit candidate
    return kl[key]


def rank_weights(
    mode: str, module_names: Iterable[str], metadata: Mapping | None, metadata_path: str | Path = "optiq_metadata.json"
) -> dict[str, float]:
    """Per-module rank weights for `mode`, read from the sidecar; errors name file and field.

    metadata: the sidecar as `weights.metadata.read_metadata` returns it (only `layers` is read).
    """
    if mode not in RANK_SCALING_MODES:
        raise ConfigError("rank_scaling", f"unknown mode {mode!r}; expected one of {list(RANK_SCALING_MODES)}")
    module_names = list(module_names)
    if mode == "constant":
        return {n: 1.0 for n in module_names}
    if metadata is None:
        raise ConfigError("metadata", f"`rank_scaling` {mode} needs an optiq_metadata.json sidecar")
    layers = metadata["layers"]
    missing = [n for n in module_names if n not in layers]
    if missing:
        raise OptiqFileError(
            f"{metadata_path}: field 'layers' has no entry for LoRA target(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the sidecar must cover every adapted module"
        )
    if mode == "by_residual":
        raise ConfigError(
            "rank_scaling", "by_residual ranks come from the quantization residuals (`pipeline.plan_ranks`)"
        )
    if mode == "by_bits":
        return {n: float(layers[n]["bits"]) for n in module_names}
    weights = {}
    for n in module_names:
        kl = layer_sensitivity(layers[n])
        if not isinstance(kl, (int, float)) or isinstance(kl, bool) or not math.isfinite(kl):
            raise OptiqFileError(
                f"{metadata_path}: field 'layers.{n}.kl' must map candidates like '4:64' to measured KLs "
                f"(needed by rank scaling by_kl), got {layers[n].get('kl')!r}"
            )
        # A KL can measure as exactly 0 (or a hair below from rounding): keep it
        # positive so the module still gets min_rank, never a zero weight.
        weights[n] = max(float(kl), 1e-12)
    return weights


def mode_ranks(
    mode: str,
    dims_by_module: Mapping[str, Dims],
    base_rank: int,
    metadata: Mapping | None = None,
    metadata_path: str | Path = "optiq_metadata.json",
    max_rank: int | None = None,
) -> dict[str, int]:
    """{module path: rank} for rank-scaling `mode` at the budget of constant `base_rank`."""
    names = list(dims_by_module)
    if mode == "constant":
        return {n: base_rank for n in names}
    weights = rank_weights(mode, names, metadata, metadata_path)
    return allocate_ranks(dims_by_module, weights, base_rank, max_rank=max_rank)
