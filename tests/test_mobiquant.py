"""MoBiQuant: one stored code read at any number of slices by dropping LSBs, a per-token router that spends
bits where they buy the most, checkpoints read at several precisions without re-quantizing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress, load, save
from bitsmith.methods.llm.routing import RoutedQLinear, SliceRouter, average_bits, set_operating_point
from bitsmith.quant.slices import SliceQuantizer
from conftest import make_llama, token_batches
from test_llm import BLOCKS


def sliced(weight: torch.Tensor, group: int = 16) -> SliceQuantizer:
    q = SliceQuantizer(4, 2, group)
    q.set_range(weight)
    return q


def test_fewer_slices_are_the_full_code_with_its_low_bits_dropped() -> None:
    """Reading k slices decodes exactly the 8-bit code shifted right by 8 - 2k bits (at the middle of the bins
    it covers); the error falls strictly with every slice and stays below half the coarse step, zero-mean."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q = sliced(weight)
    codes = q.codes(weight)  # (groups, 16) in 0..255
    errors = []
    for k in (1, 2, 3, 4):
        shift = 8 - 2 * k
        truncated = (codes >> shift).float()
        expected = q.lo[:, None] + q.step[:, None] * (truncated * 2**shift + (2**shift - 1) / 2)
        read = q.read(weight, k)
        assert torch.allclose(read, expected.reshape(weight.shape), atol=1e-6)
        coarse = (q.step * 2**shift)[:, None]
        error = (read - weight).reshape(codes.shape)
        assert (error.abs() <= coarse / 2 + q.step[:, None] / 2 + 1e-6).all()
        errors.append(float(error.pow(2).mean()))
        if k == 1:
            assert abs(float(error.mean())) < 0.02 * float(coarse.mean())
    assert errors[0] > errors[1] > errors[2] > errors[3]


@pytest.mark.parametrize("router_seed", range(5))
def test_the_router_spends_bits_on_the_tokens_that_need_them(router_seed: int) -> None:
    """One outlier weight column makes its group's grid coarse, so tokens that live on that group's other inputs
    lose much more at few slices than the rest. At the same slice counts, the trained router's output error is
    well below that of the same counts dealt to random tokens (fails if the router is trained on inverted gains
    or ignores its input). Five router initialisations: an untrained (random) router can split the two kinds of
    tokens the right way by chance, but not five times."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight[:, 0] *= 30
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(100 + router_seed)  # the router's initial weights

    def tokens(count: int) -> torch.Tensor:
        x = torch.randn(count, 64, generator=g)
        x[:, 0] = 0
        x[::2, 16:] = 0  # every second token lives on inputs 1..15, in the coarse groups
        x[1::2, :16] = 0
        return x

    model = nn.Sequential(layer)
    train = tokens(2048)
    reference = layer.weight.detach().clone()
    method = build_method({"name": "mobiquant", "group_size": 16, "router_tokens": 2048, "router_steps": 300})
    compress(model, [method], [(train[i : i + 256], torch.zeros(256, dtype=torch.long)) for i in range(0, 2048, 256)])
    routed: RoutedQLinear = model[0]  # type: ignore[assignment]
    test = tokens(1024)
    target = test @ reference.T
    q = routed.weight_q
    readings = torch.stack([test @ q.read(routed.weight, k).T for k in (1, 2, 3, 4)]).detach()

    def error(out: torch.Tensor) -> float:
        return float(((out - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean())

    # the gate logits predict each held-out token's log gain per slice, also within the coarse-group tokens
    # (an untrained router: |r| <= 0.35 over all gates, <= 0.06 within; trained: 0.95 and 0.55)
    errors = (readings - target).pow(2).sum(-1) / target.pow(2).sum(-1)  # (slices, tokens)
    goal = torch.log((errors[:-1] - errors[1:]).clamp(min=1e-12)).T
    with torch.no_grad():
        predicted = routed.router.net(test)
    assert torch.corrcoef(torch.stack([predicted.flatten(), goal.flatten()]))[0, 1] > 0.8
    assert torch.corrcoef(torch.stack([predicted[::2, 0], goal[::2, 0]]))[0, 1] > 0.3

    for threshold in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        set_operating_point(model, threshold=threshold)
        with torch.no_grad():
            used = routed.router.slices_used(test)
            routed_error = error(routed(test))
        if len(used.unique()) > 1:
            shuffled = used[torch.randperm(len(used), generator=g)]
            random_error = error(readings[shuffled - 1, torch.arange(len(used))])
            assert routed_error < 0.7 * random_error, threshold
            return
    pytest.fail("no threshold gave a mix of precisions")


def test_one_checkpoint_is_read_at_every_precision_without_requantizing(tmp_path: Path) -> None:
    model = make_llama()
    calib = token_batches(count=4, batch=4, length=32)
    ids = calib[0]["input_ids"]
    compress(model, [build_method({"name": "mobiquant", "group_size": 32, "router_steps": 20, "where": BLOCKS})], calib)
    path = save(model, tmp_path / "mobi.safetensors")
    reloaded = load(path, make_llama(seed=3))
    outputs = []
    for k in (1, 2, 3, 4):
        set_operating_point(model, slices=k)
        set_operating_point(reloaded, slices=k)
        with torch.no_grad():
            outputs.append(reloaded(input_ids=ids).logits)
            assert torch.equal(outputs[-1], model(input_ids=ids).logits)
        assert average_bits(reloaded) == 2 * k
    set_operating_point(reloaded, threshold=0.5)
    with torch.no_grad():
        reloaded(input_ids=ids)
    assert 2 <= average_bits(reloaded) <= 8
    with pytest.raises(ValueError, match="this model stores 4: use 1..4"):
        set_operating_point(reloaded, slices=5)
    with pytest.raises(ValueError, match="no MoBiQuant slice layers"):
        set_operating_point(make_llama(), slices=2)


def test_mobiquant_on_a_decoder_matches_rtn_at_each_width() -> None:
    """Read at 2 slices (4 bits), the any-precision model is about as good as RTN calibrated for 4 bits alone."""
    model = make_llama()
    calib = token_batches(count=4, batch=4, length=32)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(input_ids=ids).logits - reference).pow(2).mean())

    mobi = copy.deepcopy(model)
    compress(mobi, [build_method({"name": "mobiquant", "group_size": 32, "router": False, "where": BLOCKS})], calib)
    set_operating_point(mobi, slices=2)
    rtn = copy.deepcopy(model)
    compress(rtn, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "where": BLOCKS})], calib)
    assert error(mobi) < 1.3 * error(rtn)


def test_the_cost_of_a_sliced_layer_counts_its_parameters_as_stored() -> None:
    """model_cost's overhead of a slice quantizer is the bytes of the group parameters the checkpoint holds."""
    q = sliced(torch.randn(8, 64))
    assert q.overhead_bits() == 8 * sum(t.numel() * t.element_size() for t in (q.lo, q.step)) == 2 * 32 * 32


def test_a_token_reads_slices_up_to_its_first_closed_gate() -> None:
    """The router's gates are nested: slice k + 1 is read only when gates 1..k are all open, so a closed gate stops
    the stack even where a later gate is open (open, closed, open -> 2 slices, not 3)."""
    router = SliceRouter(in_features=2, slices=4, hidden=2)
    with torch.no_grad():
        for layer in (router.net[0], router.net[2]):
            layer.weight.zero_()
        router.net[2].bias.copy_(torch.tensor([5.0, -5.0, 5.0]))
    assert router.slices_used(torch.zeros(3, 2)).tolist() == [2, 2, 2]
    router.net[2].bias.data[1] = 5.0  # all gates open: the whole stack
    assert router.slices_used(torch.zeros(1, 2)).tolist() == [4]
