"""Sensitivities against closed forms, the integer program, and the mixed method end to end."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from bitsmith import compress, model_cost
from bitsmith.alloc import Budget, allocate
from bitsmith.critical import critical_loss, critical_targets, merge_noncritical
from bitsmith.eval.tasks import ClassificationTask
from bitsmith.methods.ptq.mixed import MixedPrecision
from bitsmith.methods.qat.fisher_reg import FisherTraceRegularizer
from bitsmith.methods.qat.qat import QAT
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
    assert allocate(cost, [Budget("size", size, 60.0)]) == {"a": 4, "b": 2}  # the sensitive layer gets the bits
    assert allocate(cost, [Budget("size", size, 160.0)]) == {"a": 8, "b": 8}
    with pytest.raises(ValueError, match="smallest feasible size budget is 40"):
        allocate(cost, [Budget("size", size, 30.0)])
    layers = {f"l{i}": {b: float((i % 7 + 1) * (9 - b) ** 2) for b in (2, 3, 4, 6, 8)} for i in range(100)}
    sizes = {name: {b: 1000.0 * b for b in (2, 3, 4, 6, 8)} for name in layers}
    start = time.perf_counter()
    picked = allocate(layers, [Budget("size", sizes, 100 * 1000 * 4)])
    assert time.perf_counter() - start < 1.0  # 100 layers x 5 candidates
    assert sum(sizes[n][b] for n, b in picked.items()) <= 400_000


def test_integer_program_with_a_second_budget_on_weight_activation_pairs() -> None:
    pairs = [(w, a) for w in (4, 8) for a in (4, 8)]
    cost = {
        "a": {(w, a): (8 - w) * 3.0 + (8 - a) for w, a in pairs},
        "b": {(w, a): (8 - w) + (8 - a) * 3.0 for w, a in pairs},
    }
    size = {n: {(w, a): 10.0 * w for w, a in pairs} for n in cost}
    bops = {n: {(w, a): float(w * a) for w, a in pairs} for n in cost}
    assert allocate(cost, [Budget("size", size, 160.0), Budget("BOPs", bops, 64.0)]) == {"a": (8, 4), "b": (4, 8)}
    with pytest.raises(ValueError, match="smallest feasible BOPs budget is 32"):
        allocate(cost, [Budget("size", size, 160.0), Budget("BOPs", bops, 20.0)])
    either = {"a": {"x": 1.0, "y": 2.0}}  # each budget alone is met, not both at once
    other = {"a": {"x": 2.0, "y": 1.0}}
    with pytest.raises(ValueError, match="size and BOPs budgets together"):
        allocate({"a": {"x": 0.0, "y": 0.0}}, [Budget("size", either, 1.0), Budget("BOPs", other, 1.0)])


@pytest.mark.parametrize("sensitivity", ["hessian", "eigen", "fisher", "error", "loss"])
def test_mixed_method_meets_the_budget_and_records_its_allocation(sensitivity: str, calib: list) -> None:
    model = make_cnn()
    method = MixedPrecision(sensitivity=sensitivity, avg_bits=3.0, a_bits=None, max_probes=8)
    compress(model, method, calib)
    assert method.allocation is not None
    assert {entry["w_bits"] for entry in method.allocation.values()} <= {2, 3, 4, 6, 8}
    assert model_cost(model).totals["avg_weight_bits"] <= 3.0 + 1e-9
    rerun = MixedPrecision(**{k: v for k, v in method.config().items() if k != "name"})
    model2 = make_cnn()
    compress(model2, rerun, calib)  # re-runs from the stored allocation without re-solving
    assert not hasattr(rerun, "sensitivities")
    assert torch.equal(model2(calib[0][0]), model(calib[0][0]))


def test_input_sensitivities_match_the_closed_form() -> None:
    """loss = 0.5 mean((w . x)^2): the Hessian in the batch's inputs is w w^T / N per example, so the
    per-element trace is ||w||^2 / (N * d); the Fisher of the mean loss has the same scale."""
    model, x = quadratic()
    x = x[:64]
    w = model[0].weight.detach()
    expected = float(w.pow(2).sum()) / (x.shape[0] * x.shape[1])

    def loss(m: nn.Module) -> torch.Tensor:
        return 0.5 * m(x).pow(2).mean()

    assert hutchinson_traces(model, loss, ["0"], max_probes=400, rel_se=0.01, target="input")["0"] == pytest.approx(
        expected, rel=0.05
    )
    per_example = (x @ w.T) * w  # d/dx 0.5 (w.x)^2 = (w.x) w
    fisher = fisher_traces(model, lambda m: 0.5 * m(x).pow(2).squeeze(1), ["0"], target="input")["0"]
    assert fisher == pytest.approx(float(per_example.pow(2).sum()) / x.shape[0] / x.numel(), rel=1e-5)


def test_critical_loss_merges_the_other_classes() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.5, 3.0, 0.0, 0.0]])
    merged = merge_noncritical(logits, [2, 0])
    assert torch.allclose(merged[:, :2], logits[:, [2, 0]])
    assert torch.allclose(merged[:, 2], logits[:, [1, 3]].logsumexp(-1))
    labels = torch.tensor([0, 3])
    assert critical_targets(labels, [2, 0], 4).tolist() == [1, 2]
    assert float(critical_loss(logits, labels, [2, 0])) == pytest.approx(
        float(nn.functional.cross_entropy(merged, torch.tensor([1, 2])))
    )
    with pytest.raises(ValueError, match="subset of 0..3"):
        critical_loss(logits, labels, [7])


@pytest.mark.parametrize("sensitivity", ["hessian", "fisher", "loss"])
def test_mixed_allocates_activation_bits_under_a_bops_budget(sensitivity: str, calib: list) -> None:
    model = make_cnn()
    method = MixedPrecision(
        sensitivity=sensitivity, max_probes=8, avg_bits=None, bops=0.375, a_candidates=[4, 8], critical=[1, 3]
    )
    compress(model, method, calib)
    assert method.allocation is not None and all(set(e) == {"w_bits", "a_bits"} for e in method.allocation.values())
    cost = model_cost(model, calib[0][0][:1])
    assert cost.totals["bops"] <= 0.375 * 64 * cost.totals["macs"] + 1e-6
    assert {e["a_bits"] for e in method.allocation.values()} <= {4, 8}


def test_mixed_rejects_a_missing_budget() -> None:
    with pytest.raises(ValueError, match="set a budget"):
        MixedPrecision(avg_bits=None)
    with pytest.raises(ValueError, match="BOPs budget needs quantized activations"):
        MixedPrecision(bops=0.5, a_bits=None)


def test_fisher_regulariser_is_the_squared_critical_gradient_and_training_on_it_lowers_it(calib: list) -> None:
    model = make_cnn()
    reg = FisherTraceRegularizer(critical=[1, 3], lam=100.0)
    compress(model, [QAT(w_bits=4, a_bits=8), reg], calib)
    batch = calib[0]
    weights = [model.get_submodule(n).weight for n in reg._layers]
    grads = torch.autograd.grad(critical_loss(model(batch[0]), batch[1], [1, 3]), weights)
    first = reg.penalty(model, batch)
    assert float(first.detach()) == pytest.approx(100 * sum(float(g.pow(2).sum()) for g in grads), rel=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):  # descend the penalty alone: the double backward reaches the weights through QAT
        optimizer.zero_grad()
        reg.penalty(model, batch).backward()
        optimizer.step()
    assert float(reg.penalty(model, batch).detach()) < 0.5 * float(first.detach())


def test_classification_task_reports_critical_accuracy(cnn: nn.Module) -> None:
    images = torch.randn(40, 1, 12, 12)
    labels = torch.arange(40) % 10
    task = ClassificationTask(test=(images, labels), train=(images, labels), calibration=[images], critical=[2, 5])
    predictions = cnn(images).argmax(1)
    mask = (labels == 2) | (labels == 5)
    metrics = task.evaluate(cnn)
    assert metrics["critical_accuracy"] == pytest.approx(float((predictions == labels)[mask].float().mean()))


def test_the_sensitive_layer_gets_the_bits(calib: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocation follows the sensitivities: a layer gets more bits when it is the sensitive one than
    when another layer is."""

    def allocate_for(sensitive: str) -> dict[str, int]:
        method = MixedPrecision(sensitivity="hessian", avg_bits=3.0, a_bits=None)
        monkeypatch.setattr(method, "measure", lambda m, b, target="weight": {
            n: (1e6 if n == sensitive else 1e-6) for n in method._layers})  # fmt: skip
        compress(make_cnn(), method, calib)
        return {name: entry["w_bits"] for name, entry in method.allocation.items()}

    for_fc1, for_conv = allocate_for("fc1"), allocate_for("conv")
    assert for_fc1["fc1"] > for_conv["fc1"] and for_conv["conv"] > for_fc1["conv"], (for_fc1, for_conv)
    assert for_conv["conv"] == max(for_conv.values()) and for_fc1["fc1"] == max(for_fc1.values())


def test_a_users_bit_override_is_a_fixed_choice_and_negative_traces_count_as_zero(
    calib: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_cnn()
    method = MixedPrecision(
        sensitivity="hessian", avg_bits=3.0, a_bits=None, where={"overrides": {"fc2": {"w_bits": 8}}}
    )
    traces = {"stem": 5.0, "conv": -50.0, "fc1": 1.0, "fc2": 1.0}  # conv: a negative estimate
    monkeypatch.setattr(method, "measure", lambda m, b, target="weight": dict(traces))
    with pytest.warns(UserWarning, match=r"negative hessian weight sensitivity for conv \(-50\)"):
        compress(model, method, calib)
    bits = {name: entry["w_bits"] for name, entry in method.allocation.items()}
    assert bits["fc2"] == 8  # the user's choice, although 8 bits cost budget
    assert bits["conv"] == 2  # taken as insensitive (abs() would have made it the most sensitive)
    assert method.sensitivities["conv"] == -50.0
    assert model_cost(model).totals["avg_weight_bits"] <= 3.0 + 1e-9


def test_the_critical_objective_adds_the_merged_class_loss() -> None:
    logits, labels = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    method = MixedPrecision(critical=[1, 3], critical_weight=2.0)
    expected = nn.functional.cross_entropy(logits, labels) + 2.0 * critical_loss(logits, labels, [1, 3])
    assert torch.allclose(method.calibration_loss(logits, labels), expected)
    assert not torch.allclose(MixedPrecision().calibration_loss(logits, labels), expected)
