"""Evaluation: cost accounting (size, MACs, BOPs)."""

from bitsmith.eval.cost import CostReport, LayerCost, model_cost

__all__ = ["CostReport", "LayerCost", "model_cost"]
