"""Dynamic precision routing: a KL-trained token router over two readings of one MoBiQuant model sends the
sensitive tokens high; it saves and reloads; bad settings are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bitsmith import build_method, compress, load, save
from bitsmith.methods.llm.precision_routing import token_router
from bitsmith.methods.llm.routing import average_bits, set_operating_point
from conftest import make_llama, token_batches
from test_llm import BLOCKS


def routed_model() -> torch.nn.Module:
    """A tiny Llama whose first 48 token embeddings are 6x larger: those tokens' errors weigh differently."""
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:48] *= 6
    return model


def kl_to(reference: torch.Tensor, model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits, -1)
    return float((reference.exp() * (reference - log_p)).sum(-1).mean())


def test_the_router_sends_the_tokens_that_change_the_output_most_to_high_precision(tmp_path: Path) -> None:
    model = routed_model()
    calib = token_batches(count=4, batch=4, length=32)
    ids = token_batches(count=1, batch=4, length=32, seed=9)[0]["input_ids"]
    quantized = copy.deepcopy(model)
    compress(quantized, [build_method({"name": "mobiquant", "group_size": 32, "router": False, "where": BLOCKS}),
                         build_method({"name": "precision_routing", "low_slices": 1, "high_slices": 2,
                                       "router_block": 0, "windows": 16, "high_fraction": 0.5})], calib)  # fmt: skip
    set_operating_point(quantized, slices=2)
    with torch.no_grad():
        high = torch.log_softmax(quantized(input_ids=ids).logits, -1)  # the target: everything high
    set_operating_point(quantized, threshold=0.5)
    router = token_router(quantized)
    router.set_high_fraction(0.5)
    routed = kl_to(high, quantized, ids)
    bits = average_bits(quantized)
    assert 2.5 < bits < 3.5
    trained = router.scores
    router.scores = lambda hidden: -trained(hidden)  # the same share of tokens, the opposite ones
    router.threshold.fill_(-float(router.threshold))
    assert routed < 0.8 * kl_to(high, quantized, ids)
    router.scores = trained
    router.threshold.fill_(-float(router.threshold))
    reloaded = load(save(quantized, tmp_path / "routed.safetensors"), make_llama(seed=4))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits)


def test_precision_routing_settings_are_checked() -> None:
    calib = token_batches()
    with pytest.raises(ValueError, match="list mobiquant before it"):
        compress(make_llama(), [build_method({"name": "precision_routing"})], calib)
    mobi = {"name": "mobiquant", "group_size": 32, "router": False, "where": BLOCKS}
    with pytest.raises(ValueError, match="the model stores 4: use 2..4"):
        compress(
            make_llama(), [build_method(mobi), build_method({"name": "precision_routing", "high_slices": 5})], calib
        )
    with pytest.raises(ValueError, match="must exceed low_slices"):
        compress(
            make_llama(), [build_method(mobi), build_method({"name": "precision_routing", "high_slices": 2})], calib
        )
