"""MSQ: round-clamp LSB extraction, lossless LSB drops, fewer trainable parameters than BSQ."""

from __future__ import annotations

from pathlib import Path

import torch

from bitsmith import compress, load, model_cost, save
from bitsmith.methods.qat.bsq import BSQ
from bitsmith.methods.qat.msq import MSQ
from bitsmith.quant.roundclamp import RoundClampQuantizer
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


def test_lsb_is_the_parity_of_the_code_and_its_gradient_points_to_an_even_code() -> None:
    q = RoundClampQuantizer(4)
    q.calibrate_(torch.tensor([15.0]))  # step 1
    w = torch.tensor([0.0, 1.0, 2.0, -3.0, 6.0, 7.2, -15.0], requires_grad=True)
    lsb = q.lsb(w)
    assert lsb.tolist() == [float(abs(int(round(abs(v)))) % 2) for v in w.tolist()]
    lsb.sum().backward()
    assert w.grad[1] > 0 and w.grad[3] > 0  # |1| -> 0 and |-3| -> 4: toward the nearest even (ties to even)
    assert w.grad[0] == 0 and w.grad[2] == 0 and w.grad[4] == 0


def test_dropping_an_empty_lsb_and_an_unused_msb_keeps_the_weight() -> None:
    q = RoundClampQuantizer(8)
    w = torch.randn(32, 16)
    q.calibrate_(w)
    even = q.integers(w)
    even = torch.round(even / 2) * 2  # every code even, the largest below 2^6
    even = even.clamp(-62, 62)
    weight = even * q.step.detach()
    before = q(weight).detach()
    q.drop_lsb_()
    q.drop_msb_()
    assert q.bits == 6 and torch.equal(q(weight).detach(), before)


def test_msq_lowers_bits_with_far_fewer_trainable_parameters_than_bsq(tmp_path: Path) -> None:
    x, y = toy_data(512)
    base = make_cnn()
    fit(base, x, y, TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0))
    model = base
    method = MSQ(alpha=0.005, start_bits=8, a_bits=8, finetune_epochs=1, adjust_steps=8)
    compress(model, method, [x[:64]], finalize=False)
    bsq_model, bsq = make_cnn(), BSQ(start_bits=8)
    compress(bsq_model, bsq, [x[:64]])
    trainable = sum(p.numel() for n, p in bsq_model.named_parameters() if p.requires_grad and "weight_q" in n)
    assert trainable / method.trainable_parameters(model) > 15  # 2 x 8 planes per weight vs the weight itself
    fit(model, x, y, TrainConfig(epochs=5, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=0), [method])
    method.finalize(model)
    bits = method.precision(model)
    assert model_cost(model).totals["avg_weight_bits"] < 4, bits
    assert accuracy(model, x, y) > 0.9
    reloaded = load(save(model, tmp_path / "msq.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:8]), model.eval()(x[:8]))


def test_the_least_hessian_sensitive_layers_drop_several_lsbs_at_once(calib: list, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import bitsmith.methods.qat.msq as msq_module

    traces = {"stem": 3.0, "conv": 1.0, "fc1": 2.0, "fc2": 4.0}  # per weight: conv and fc1 are the flattest
    monkeypatch.setattr(
        msq_module, "hutchinson_traces", lambda model, loss, names, *a, **k: {n: traces[n] for n in names}
    )
    model, method = make_cnn(), MSQ(start_bits=8, threshold=0.99, max_drop=3, min_bits=2, hessian_fraction=0.5)
    compress(model, method, calib, finalize=False)
    method.penalty(model, calib[0])  # the batch the traces are measured on
    assert method._least_sensitive(model, list(traces)) == {"conv", "fc1"}
    before = method.precision(model)
    method._adjust_layers(model)
    dropped = {name: before[name] - bits for name, bits in method.precision(model).items()}
    assert dropped == {"stem": 1, "conv": 3, "fc1": 3, "fc2": 1}, dropped  # max_drop LSBs vs one
