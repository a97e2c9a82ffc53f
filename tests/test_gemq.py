"""GEMQ: coefficients are the gradient-weighted output change of quantizing one expert, the integer program
spends the bits where they lower the summed coefficient most (globally, across layers), and the experts end up
at their widths."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.alloc import AtLeast, Budget, allocate
from bitsmith.methods.moe.experts import MoEFeedForward, moe_layers
from bitsmith.methods.moe.gemq import expert_coefficients
from conftest import make_llama, token_batches


def factorized(steps: int = 20) -> tuple[torch.nn.Module, list[dict]]:
    model = make_llama()
    calib = token_batches(count=4, batch=2, length=16)
    compress(model, [build_method({"name": "factorllm", "router_steps": steps})], calib)
    return model, calib


def test_coefficients_are_the_gradient_weighted_change_of_the_block_output() -> None:
    """Against a direct computation: quantize expert 1 in the block itself and compare whole outputs."""
    mlp = make_llama().model.layers[0].mlp
    moe = MoEFeedForward.from_dense(mlp, 4, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 64, generator=g)
    g2 = torch.rand(12, 64, generator=g)
    coefficients = expert_coefficients(moe, "m", [x], [g2], [1, 2, 3], 32)
    for bits in (1, 2, 3):
        quantized = copy.deepcopy(moe)
        quantized.experts[1] = build_expert_rtn(moe, 1, bits)
        with torch.no_grad():
            direct = float((g2 * (moe(x) - quantized(x)).reshape(12, 64).pow(2)).sum())
        assert coefficients["m.experts.1"][bits] == pytest.approx(direct, rel=1e-4)
    assert coefficients["m.experts.1"][1] > coefficients["m.experts.1"][2] > coefficients["m.experts.1"][3]


def build_expert_rtn(moe: MoEFeedForward, e: int, bits: int) -> torch.nn.Module:
    from bitsmith.methods.moe.gemq import rtn_expert

    return rtn_expert(moe.experts[e], bits, 32, "x")


def test_global_allocation_gives_the_bits_to_the_sensitive_layer() -> None:
    """Layer b's experts are 100x more sensitive than layer a's: the global program moves bits from a to b; the
    per-layer program cannot (each layer must average 2 bits); both meet the budget."""
    from bitsmith.methods.moe.gemq import GEMQ

    cost = {}
    for layer, weight in (("a", 1.0), ("b", 100.0)):
        for e in range(4):
            cost[f"{layer}.experts.{e}"] = {1: 4.0 * weight, 2: 1.0 * weight, 3: 0.25 * weight}

    class Fake:
        def __init__(self) -> None:
            self.num_experts = 4
            self.experts = [torch.nn.Linear(10, 10, bias=False) for _ in range(4)]

    moes = {"a": Fake(), "b": Fake()}
    global_ = GEMQ(bits=2.0, allocation="global", c2c3=False).solve(cost, moes)  # type: ignore[arg-type]
    per_layer = GEMQ(bits=2.0, allocation="layer", c2c3=False).solve(cost, moes)  # type: ignore[arg-type]
    assert sum(global_.values()) <= 16 and sum(per_layer.values()) <= 16
    assert all(global_[f"b.experts.{e}"] == 3 for e in range(4)) and all(
        global_[f"a.experts.{e}"] == 1 for e in range(4)
    )
    assert all(b == 2 for b in per_layer.values())

    def total(assigned: dict) -> float:
        return sum(cost[u][b] for u, b in assigned.items())

    assert total(global_) < total(per_layer)
    c2c3 = GEMQ(bits=2.0, allocation="global").solve(cost, moes)  # type: ignore[arg-type]  (c2c3: the default)
    assert any(c2c3[f"a.experts.{e}"] == 3 for e in range(4)) and any(c2c3[f"a.experts.{e}"] == 2 for e in range(4))
    for allocation in ("global", "layer"):  # c2c3 (the default) holds per layer in both programs
        solved = GEMQ(bits=2.0, allocation=allocation).solve(cost, moes)  # type: ignore[arg-type]
        for layer in ("a", "b"):
            widths = {solved[f"{layer}.experts.{e}"] for e in range(4)}
            assert {2, 3} <= widths


def test_one_bit_experts_are_sign_times_mean_magnitude() -> None:
    """The official 1-bit quantizer: each group of a row becomes sign(w) * mean|w| (relative error 1 - 2/pi for
    Gaussian weights), in the coefficient pass (RTN) and in GPTQ; min-max {0, range} would zero most weights."""
    from bitsmith.methods.llm.gptq import gptq_quantize
    from bitsmith.methods.moe.experts import Expert
    from bitsmith.methods.moe.gemq import rtn_expert

    torch.manual_seed(0)
    expert = Expert(64, 128, torch.nn.SiLU())
    quantized = rtn_expert(expert, 1, 32, "x")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w, q = getattr(expert, proj).weight, getattr(quantized, proj).weight
        groups, qgroups = w.reshape(-1, 32), q.reshape(-1, 32)
        assert torch.allclose(qgroups, torch.sign(groups) * groups.abs().mean(1, keepdim=True), atol=1e-6)
        assert float((q - w).pow(2).sum() / w.pow(2).sum()) < 0.4
    w = torch.randn(16, 64)
    values, _ = gptq_quantize(w, torch.eye(64), 1, 32, True, 0.01, False, 128)  # identity Hessian: no feedback
    assert torch.allclose(values, torch.sign(w) * w.reshape(16, 2, 32).abs().mean(2).repeat_interleave(32, 1))


def test_at_least_conditions_and_budgets_hold_together() -> None:
    cost = {"x": {1: 5.0, 2: 1.0}, "y": {1: 5.0, 2: 1.0}}
    use = {"x": {1: 1, 2: 2}, "y": {1: 1, 2: 2}}
    assert allocate(cost, [Budget("bits", use, 3)], [AtLeast("x low", [("x", 1)], 1)]) == {"x": 1, "y": 2}
    with pytest.raises(ValueError, match="x low"):
        allocate(cost, [Budget("bits", use, 2)], [AtLeast("x low", [("x", 2), ("y", 2)], 1)])


def test_gemq_quantizes_each_expert_at_its_width_within_the_budget() -> None:
    model, calib = factorized()
    method = build_method({"name": "gemq", "bits": 2.0, "group_size": 32, "gradient_windows": 4, "router_epochs": 1,
                           "router_lr": 1e-2})  # fmt: skip
    routers = {n: m.router.weight.detach().clone() for n, m in moe_layers(model).items()}
    compress(model, [method], calib)
    assert method.average_bits <= 2.0 + 1e-9
    assert len(set(method.assigned.values())) > 1  # mixed, not uniform
    for unit, bits in method.assigned.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert model.get_submodule(f"{unit}.{proj}").weight_q.bits == bits
    moved = [not torch.equal(routers[n], m.router.weight) for n, m in moe_layers(model).items()]
    assert all(moved) and len(method.router_history) == 8


@pytest.mark.parametrize(("entry", "message"), [
    ({"bits": 4.0}, r"within the candidates' range 1\.\.3"),
    ({"bits": 2.5, "allocation": "uniform"}, "uniform allocation needs bits among the candidates"),
    ({"candidates": [0, 2]}, r"bit-widths in 1\.\.8"),
])  # fmt: skip
def test_bad_budgets_name_the_allowed_range(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_method({"name": "gemq", **entry})


def test_gemq_needs_a_mixture_of_experts() -> None:
    with pytest.raises(ValueError, match="run factorllm before it"):
        compress(make_llama(), [build_method({"name": "gemq", "group_size": 32})], token_batches())


def test_output_gradients_are_the_loss_gradients_at_each_moe_output() -> None:
    from bitsmith.methods.moe.gemq import output_gradients

    model, calib = factorized(steps=5)
    ids = calib[0]["input_ids"][:1]
    moes = moe_layers(model)
    squares = output_gradients(model, moes, [ids])
    kept = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: kept.__setitem__(n, out)) for n, m in moes.items()]
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [kept[n] for n in moes])
    for handle in handles:
        handle.remove()
    for (name, _), grad in zip(moes.items(), grads, strict=True):
        assert torch.allclose(squares[name][0], grad.reshape(-1, 64).pow(2), rtol=1e-4, atol=1e-12)
