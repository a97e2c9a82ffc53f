"""distill-qat: QD-BEV-style distillation for QAT (features, representation, logits of the FP32 teacher)."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.distill import relative_mse, soft_kl
from bitsmith.recipe import validate_method
from conftest import make_cnn, make_vit


def batch(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def perturbed(model: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().nan_to_num() * torch.randn_like(p))


def distances(method, model, x) -> tuple[float, float]:
    """The student's feature distance (relative MSE at the first feature site) and logit KL to the teacher."""
    teacher = method._teacher
    grab = {}
    hooks = [m.get_submodule(method._features[0]).register_forward_hook(lambda mod, a, out, m=m: grab.__setitem__(id(m), out))
             for m in (model, teacher)]  # fmt: skip
    with torch.no_grad():
        s, t = model(x), teacher(x)
    for h in hooks:
        h.remove()
    return float(relative_mse(grab[id(model)], grab[id(teacher)])), float(soft_kl(s, t, 4.0))


@pytest.mark.parametrize("weights", [{"feature_weight": 1.0, "representation_weight": 0.0, "logit_weight": 0.0},
                                     {"feature_weight": 0.0, "representation_weight": 0.0, "logit_weight": 1.0}])  # fmt: skip
def test_each_term_pulls_the_student_to_the_teacher(weights: dict) -> None:
    """Trained on one term alone, a perturbed student's distance in that term falls (an inverted, detached or
    teacher-to-teacher term would not move it)."""
    torch.manual_seed(0)
    model = make_cnn()
    method = build_method({"name": "distill-qat", "features": ["conv"], "representation": "fc1", **weights})
    method.prepare(model)
    perturbed(model)
    x, y = batch()
    before = distances(method, model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        xb, yb = batch(seed=step % 4 + 2)
        model(xb)
        loss = method.penalty(model, (xb, yb))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = distances(method, model, x)
    term = 0 if weights["feature_weight"] else 1
    assert after[term] < 0.5 * before[term]


def test_teacher_is_the_frozen_fp32_model() -> None:
    model = make_cnn()
    method = build_method({"name": "distill-qat", "features": ["conv"], "representation": "fc1"})
    method.prepare(model)
    reference = copy.deepcopy(model.state_dict())
    perturbed(model)
    x, y = batch()
    model(x)
    method.penalty(model, (x, y)).backward()
    assert all(torch.equal(method._teacher.state_dict()[k], v) for k, v in reference.items())
    assert not any(p.requires_grad for p in method._teacher.parameters())
    with pytest.raises(ValueError, match="before the quantization method"):
        quantized = make_cnn()
        compress(quantized, [build_method({"name": "qat", "w_bits": 4, "a_bits": 4})], [batch()], finalize=False)
        build_method({"name": "distill-qat"}).prepare(quantized)


def test_logit_term_is_hintons_loss_and_the_baseline_has_only_it() -> None:
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    expected = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(
        -1
    ).mean() * 4
    assert soft_kl(s, t, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert soft_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert relative_mse(3 * s, 3 * t).item() == pytest.approx(relative_mse(s, t).item(), rel=1e-5)
    model = make_cnn()
    logits_only = build_method({"name": "distill-qat", "features": ["conv"], "representation": "fc1",
                                "feature_weight": 0.0, "representation_weight": 0.0})  # fmt: skip
    logits_only.prepare(model)
    perturbed(model)
    x, y = batch()
    out = model(x)
    with torch.no_grad():
        teacher = logits_only._teacher(x)
    assert logits_only.penalty(model, (x, y)).item() == pytest.approx(soft_kl(out, teacher, 4.0).item(), rel=1e-5)


def test_default_sites_and_bad_input() -> None:
    from bitsmith.methods.qat.distill_qat import default_sites
    from bitsmith.zoo.vision import ResNetCNN

    assert default_sites(make_vit()) == (["blocks.0"], "norm")
    assert default_sites(ResNetCNN()) == (["layer2"], "pool")
    with pytest.raises(ValueError, match="no default feature sites"):
        build_method({"name": "distill-qat"}).prepare(make_cnn())
    with pytest.raises(ValueError, match=r"\['nope'\] are not modules"):
        build_method({"name": "distill-qat", "features": ["nope"]}).prepare(make_cnn())
    with pytest.raises(ValueError, match="temperature"):
        validate_method({"name": "distill-qat", "temperature": 0}, "methods.0")
