"""Bit allocation as an integer program: one choice per layer, minimum total cost under budgets.

A multiple-choice knapsack solved with ``scipy.optimize.milp`` (HiGHS): binary ``x[l, c]``, exactly one
choice ``c`` per layer, ``sum use[l][c] x[l, c] <= limit`` for every budget (model size, BOPs),
minimising ``sum cost[l][c] x[l, c]``. A choice is any hashable, e.g. a weight bit-width or a
``(weight bits, activation bits)`` pair.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

Choice = TypeVar("Choice", bound=Hashable)


@dataclass
class Budget:
    """``sum_l use[l][choice_l] <= limit``; ``name`` ("model size", "BOPs") appears in errors."""

    name: str
    use: dict[str, dict]
    limit: float

    def smallest(self) -> float:
        return sum(min(choices.values()) for choices in self.use.values())


@dataclass
class AtLeast:
    """At least ``count`` of the ``(layer, choice)`` pairs in ``pairs`` are chosen (e.g. GEMQ's "c2c3": one
    expert of every MoE layer at the highest width)."""

    name: str
    pairs: list[tuple[str, Hashable]]
    count: int


def allocate(
    cost: dict[str, dict[Choice, float]], budgets: list[Budget], at_least: list[AtLeast] | None = None
) -> dict[str, Choice]:
    """``{layer: choice}`` minimising ``sum cost`` within every budget (and every ``at_least`` side condition).

    Raises ``ValueError`` naming the smallest feasible limit when a budget is below it (every layer at
    its cheapest choice for that budget), or the solver's message when the budgets together conflict.
    """
    for budget in budgets:
        if budget.limit < budget.smallest() - 1e-9:
            raise ValueError(
                f"{budget.name} budget {budget.limit:,.0f} is infeasible: the smallest feasible {budget.name} "
                f"budget is {budget.smallest():,.0f} (every layer at its cheapest candidate); raise the "
                "budget or add smaller candidates"
            )
    layers = list(cost)
    choices = [(layer, choice) for layer in layers for choice in cost[layer]]
    c = np.array([cost[layer][choice] for layer, choice in choices], dtype=float)
    one_per_layer = np.array([[1.0 if layer == name else 0.0 for layer, _ in choices] for name in layers])
    constraints = [LinearConstraint(one_per_layer, 1, 1)]
    for budget in budgets:
        row = np.array([[budget.use[layer][choice] for layer, choice in choices]])
        constraints.append(LinearConstraint(row, -np.inf, budget.limit))
    for condition in at_least or []:
        wanted = set(condition.pairs)
        row = np.array([[1.0 if pair in wanted else 0.0 for pair in choices]])
        constraints.append(LinearConstraint(row, condition.count, np.inf))
    result = milp(c, constraints=constraints, integrality=np.ones(len(choices)), bounds=Bounds(0, 1))
    if result.x is None:
        names = " and ".join([b.name for b in budgets] + [a.name for a in at_least or []])
        raise ValueError(f"no allocation meets the {names} budgets together ({result.message}); relax one of them")
    return {layer: choice for layer, choice in (choices[i] for i in np.flatnonzero(result.x > 0.5))}
