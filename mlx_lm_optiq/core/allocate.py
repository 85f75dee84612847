"""Exact budgeted choice of one option per item (multiple-choice knapsack).

Used for weight bits (one (bits, group_size) per module under a bits-per-weight
budget) and for KV-cache bits (one (k_bits, v_bits, group) per layer under an
average-bits budget). Costs are integers (bits), values are measured losses
(e.g. KL divergence); the solver minimises the summed value exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mlx_lm_optiq.core.errors import OptiqError

# Above this many DP cells (items x capacity units) the exact DP would need too
# much memory; the MILP solver (HiGHS, also exact) is used instead.
_MAX_DP_CELLS = 200_000_000


class InfeasibleBudget(OptiqError):
    pass


def solve(values: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """Pick one option per item minimising sum(values) with sum(costs) <= capacity.

    values, costs: lists (one per item) of equal-length lists of option values
    (float) and costs (int). Returns the list of chosen option indices.
    Raises InfeasibleBudget when even the cheapest options exceed `capacity`.
    """
    if len(values) != len(costs):
        raise ValueError("values and costs must have one entry per item")
    costs = [[int(c) for c in cs] for cs in costs]
    for i, (vs, cs) in enumerate(zip(values, costs)):
        if not cs or len(vs) != len(cs):
            raise ValueError(f"item {i}: needs at least one option, with a value and a cost each")
    cheapest = sum(min(cs) for cs in costs)
    if cheapest > capacity:
        raise InfeasibleBudget(f"budget of {capacity} bits is below the cheapest possible choice ({cheapest} bits)")
    extras = [[c - min(cs) for c in cs] for cs in costs]
    residual = capacity - cheapest
    steps = [e for es in extras for e in es if e]
    if not steps:
        return [int(np.argmin(vs)) for vs in values]
    unit = math.gcd(*steps)
    units = min(residual // unit, sum(max(es) for es in extras) // unit)
    if len(values) * (units + 1) <= _MAX_DP_CELLS:
        return _solve_dp(values, [[e // unit for e in es] for es in extras], units)
    return _solve_milp(values, costs, capacity)


def _solve_dp(values, extras, units):
    """Exact DP over integer capacity units; best[c] = min value with extra cost <= c."""
    n = len(values)
    best = np.zeros(units + 1)
    choice = np.zeros((n, units + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(units + 1, np.inf)
        for j, (v, e) in enumerate(zip(values[i], extras[i])):
            if e > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[e:] = best[: units + 1 - e] + v
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    picks = [0] * n
    c = units
    for i in range(n - 1, -1, -1):
        j = int(choice[i, c])
        picks[i] = j
        c -= extras[i][j]
    return picks


def _solve_milp(values, costs, capacity):
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(v) for v in values]
    n = sum(sizes)
    c = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    flat_costs = np.concatenate([np.asarray(cs, dtype=np.float64) for cs in costs])
    one_hot = np.zeros((len(values), n))
    start = 0
    for i, k in enumerate(sizes):
        one_hot[i, start : start + k] = 1
        start += k
    cap = float(capacity)
    for _ in range(5):
        res = milp(
            c,
            constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(flat_costs[None], -np.inf, cap)],
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0},
        )
        if res.x is None:
            raise InfeasibleBudget(f"no assignment fits the budget of {capacity} bits")
        picks, start = [], 0
        for k in sizes:
            picks.append(int(np.argmax(res.x[start : start + k])))
            start += k
        used = sum(costs[i][j] for i, j in enumerate(picks))
        if used <= capacity:
            return picks
        cap -= used - capacity  # solver tolerance let it overshoot: tighten and solve again
    raise InfeasibleBudget(f"solver could not meet the budget of {capacity} bits exactly")
