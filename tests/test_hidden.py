"""Hidden-channel removal: a model whose residual writers leave some channels at zero computes exactly the same
logits after those channels are deleted (RMSNorm's averaging compensated), tied or untied LM head."""

from __future__ import annotations

import pytest
import torch

from bitsmith.hidden import channel_scores, keep_top, remove_hidden_channels
from conftest import make_llama


def zero_channels(model: torch.nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ~keep] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[~keep] = 0
            layer.mlp.down_proj.weight[~keep] = 0


@pytest.mark.parametrize("tied", [False, True])
def test_removing_zero_channels_is_exact(tied: bool) -> None:
    model = make_llama()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    keep = torch.ones(64, dtype=torch.bool)
    keep[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:16]] = False
    zero_channels(model, keep)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        params = sum(p.numel() for p in model.parameters())
        remove_hidden_channels(model, keep)
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert model.model.embed_tokens.weight.shape == (96, 48) and model.config.hidden_size == 48
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert sum(p.numel() for p in model.parameters()) < params


def test_rms_compensation_is_needed() -> None:
    """Without the gain and epsilon adjustment the pruned model differs: the norms average over fewer channels."""
    model = make_llama()
    keep = torch.arange(64) < 40
    zero_channels(model, keep)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        remove_hidden_channels(model, keep)
        for norm in [model.model.norm, *[n for layer in model.model.layers
                                         for n in (layer.input_layernorm, layer.post_attention_layernorm)]]:  # fmt: skip
            norm.weight /= (64 / 40) ** 0.5
        assert not torch.allclose(before, model(input_ids=ids).logits, atol=1e-3)


def test_scores_and_bad_targets() -> None:
    model = make_llama()
    keep = torch.arange(64) < 40
    zero_channels(model, keep)
    windows = [torch.randint(0, 96, (1, 8))]
    for how in ("magnitude", "activation"):
        scores = channel_scores(model, how, windows)
        assert keep_top(scores, 40).equal(keep)  # the zeroed channels score lowest
    with pytest.raises(ValueError, match=r"target hidden size must be in 1\.\.64"):
        keep_top(scores, 65)
    with pytest.raises(ValueError, match="supports"):
        remove_hidden_channels(make_llama(model_type="gemma3_text"), keep)
