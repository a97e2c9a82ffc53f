"""Sensitivities against closed forms, the integer program, and the mixed method end to end."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from bitsmith import compress, model_cost
from bitsmith.alloc import allocate
from bitsmith.methods.mixed import MixedPrecision
from bitsmith.sensitivity import fisher_traces, hutchinson_traces, top_eigenvalues
from conftest import make_cnn


def quadratic() -> tuple[nn.Module, torch.Tensor]:
    """loss = 0.5 mean((w . x)^2): the Hessian of w is E[x x^T]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1, bias=False))
    x = torch.randn(4096, 6) * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    return model, x


def test_hutchinson_trace_and_power_iteration_match_the_exact_hessian() -> None:
    model, x = quadratic()
    hessian = x.T @ x / x.shape[0]

    def loss(m: nn.Module) -> torch.Tensor:
        return 0.5 * m(x).pow(2).mean()

    trace = hutchinson_traces(model, loss, ["0"], max_probes=400, rel_se=0.01)["0"]
    assert trace == pytest.approx(float(hessian.trace()) / 6, rel=0.05)
    assert top_eigenvalues(model, loss, ["0"], iterations=100, tol=1e-6)["0"] == pytest.approx(
        float(torch.linalg.eigvalsh(hessian).max()), rel=1e-3
    )


def test_fisher_trace_is_the_mean_squared_per_example_gradient() -> None:
    model, x = quadratic()
    x = x[:16]
    fisher = fisher_traces(model, lambda m: 0.5 * m(x).pow(2).squeeze(1), ["0"])["0"]
    w = model[0].weight.detach()
    per_example = (x @ w.T) * x  # d/dw 0.5 (w.x)^2 = (w.x) x
    assert fisher == pytest.approx(float(per_example.pow(2).sum(1).mean()) / 6, rel=1e-5)


def test_integer_program_respects_the_budget_and_names_the_smallest_feasible_one() -> None:
    cost = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}}
    size = {"a": {2: 20.0, 4: 40.0, 8: 80.0}, "b": {2: 20.0, 4: 40.0, 8: 80.0}}
    assert allocate(cost, size, 60.0) == {"a": 4, "b": 2}  # the sensitive layer gets the bits
    assert allocate(cost, size, 160.0) == {"a": 8, "b": 8}
    with pytest.raises(ValueError, match="smallest feasible budget is 40"):
        allocate(cost, size, 30.0)
    layers = {f"l{i}": {b: float((i % 7 + 1) * (9 - b) ** 2) for b in (2, 3, 4, 6, 8)} for i in range(100)}
    sizes = {name: {b: 1000.0 * b for b in (2, 3, 4, 6, 8)} for name in layers}
    start = time.perf_counter()
    picked = allocate(layers, sizes, 100 * 1000 * 4)
    assert time.perf_counter() - start < 1.0  # 100 layers x 5 candidates
    assert sum(sizes[n][b] for n, b in picked.items()) <= 400_000


@pytest.mark.parametrize("sensitivity", ["hessian", "eigen", "fisher", "error"])
def test_mixed_method_meets_the_budget_and_records_its_allocation(sensitivity: str, calib: list) -> None:
    model = make_cnn()
    method = MixedPrecision(sensitivity=sensitivity, avg_bits=3.0, a_bits=None, max_probes=8)
    compress(model, method, calib)
    assert method.allocation is not None and set(method.allocation.values()) <= {2, 3, 4, 6, 8}
    assert model_cost(model).totals["avg_weight_bits"] <= 3.0 + 1e-9
    rerun = MixedPrecision(**{k: v for k, v in method.config().items() if k != "name"})
    model2 = make_cnn()
    compress(model2, rerun, calib)  # re-runs from the stored allocation without re-solving
    assert not hasattr(rerun, "sensitivities")
    assert torch.equal(model2(calib[0][0]), model(calib[0][0]))
