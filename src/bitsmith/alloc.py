"""Bit allocation as an integer program: one choice per layer, minimum total cost under a budget.

A multiple-choice knapsack solved with ``scipy.optimize.milp`` (HiGHS): binary ``x[l, b]``, exactly one
``b`` per layer, ``sum size[l][b] x[l, b] <= budget``, minimising ``sum cost[l][b] x[l, b]``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def allocate(cost: dict[str, dict[int, float]], size: dict[str, dict[int, float]], budget: float) -> dict[str, int]:
    """``{layer: bits}`` minimising ``sum cost`` with ``sum size <= budget``.

    Raises ``ValueError`` naming the smallest feasible budget when even the smallest choices exceed it.
    """
    layers = list(cost)
    choices = [(layer, bits) for layer in layers for bits in sorted(cost[layer])]
    smallest = sum(min(size[layer].values()) for layer in layers)
    if budget < smallest - 1e-9:
        raise ValueError(
            f"budget {budget:,.0f} is infeasible: the smallest feasible budget is {smallest:,.0f} "
            "(every layer at its fewest candidate bits); raise the budget or add smaller candidates"
        )
    c = np.array([cost[layer][bits] for layer, bits in choices], dtype=float)
    one_per_layer = np.array([[1.0 if layer == name else 0.0 for layer, _ in choices] for name in layers])
    sizes = np.array([[size[layer][bits] for layer, bits in choices]])
    constraints = [LinearConstraint(one_per_layer, 1, 1), LinearConstraint(sizes, -np.inf, budget)]
    result = milp(c, constraints=constraints, integrality=np.ones(len(choices)), bounds=Bounds(0, 1))
    if result.x is None:
        raise ValueError(f"the bit-allocation program has no solution ({result.message})")
    picked = [choices[i] for i in np.flatnonzero(result.x > 0.5)]
    return {layer: bits for layer, bits in picked}
