"""sqap (quantization-aware token pruning) and hadamard (its quantizer change): which tokens the selection keeps,
that the pruner reads the (quantized) block's own class attention, that the rotation leaves the float function alone
while cutting the 4-bit error of an outlier column, the checkpoints, and the checks on the input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress, load, save
from bitsmith.eval.attention import vit_attention_probs
from bitsmith.nn import strip
from bitsmith.nn.tokens import sqap_index, top_index
from bitsmith.quant.functional import fake_quant
from bitsmith.recipe import validate_method
from conftest import make_cnn, make_vit


def test_selection_preserves_the_top_and_spreads_the_rest_evenly() -> None:
    """16 patches, 4 kept. All by sampling: ranks 2, 6, 10, 14 whatever the attention. Half preserved: the two most
    attended (0, 1), then two of the 14 others at ranks 3 and 10 (patches 5 and 12). All preserved: the top four."""
    attention = torch.tensor([[16.0, 15.0, *range(14, 0, -1)]]).softmax(-1)
    assert sqap_index(attention, 4, preserve=0.0).tolist() == [[2, 6, 10, 14]]
    assert sqap_index(attention, 4, preserve=0.5).tolist() == [[0, 1, 5, 12]]
    assert sqap_index(attention, 4, preserve=1.0).tolist() == top_index(attention, 4).tolist() == [[0, 1, 2, 3]]
    flipped = attention.flip(-1)  # the most attended last: preservation follows the attention, sampling does not
    assert sqap_index(flipped, 4, preserve=0.5).tolist() == [[3, 10, 14, 15]]


def test_protected_patches_stay_whatever_their_attention() -> None:
    attention = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]])
    kept = sqap_index(attention, 3, preserve=1.0, protect=(7,))
    assert kept.tolist() == [[0, 1, 7]]  # 7 (no attention) stays; the two most attended fill the rest
    batch = torch.rand(5, 8)
    assert all(7 in row for row in sqap_index(batch, 4, preserve=0.5, protect=(7,)).tolist())


def batches(count: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 1, 12, 12, generator=g), None) for _ in range(count)]


def test_the_pruner_reads_its_own_blocks_class_attention_and_drops_the_rest() -> None:
    """criterion top at block 1: the kept patches are the top of block 1's class attention on block 1's input, and
    block 1 computes on exactly those token vectors (dropped, not merged)."""
    model = make_vit()
    compress(model, [build_method({"name": "sqap", "keep": 0.5, "at": 1, "criterion": "top"})], batches(1))
    x = torch.rand(4, 1, 12, 12)
    seen: dict[str, torch.Tensor] = {}
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))
    model.blocks[1].block.register_forward_pre_hook(lambda m, args: seen.__setitem__("kept", args[0]))
    with torch.no_grad():
        model(x)
        block = model.blocks[1].block
        probs = vit_attention_probs(block.attn, block.norm1(seen["in"]))  # batch x heads x tokens x tokens
        expected = probs[:, :, 0, 1:].mean(1).topk(4, dim=1).indices.sort(dim=1).values  # round(4.5) = 4 kept
    assert torch.equal(model.blocks[1].pruner.last_index, expected)
    gathered = seen["in"][:, 1:].gather(1, expected[..., None].expand(-1, -1, seen["in"].shape[-1]))
    assert torch.equal(seen["kept"], torch.cat([seen["in"][:, :1], gathered], 1))


def outlier_layer() -> nn.Linear:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
        layer.weight[:, 5] *= 40.0  # one outlier input column: every row's 4-bit step is set by it
    return layer


def test_the_rotation_keeps_the_function_and_spreads_an_outlier_column() -> None:
    """hadamard: the same outputs in float; the rotated weight's per-row 4-bit error (mapped back) is far below the
    plain weight's, because the outlier column no longer sets every row's step."""
    plain = nn.Sequential(outlier_layer())
    rotated = copy.deepcopy(plain)
    compress(rotated, [build_method({"name": "hadamard"})], [(torch.randn(8, 64), None)])
    x = torch.randn(8, 64)
    torch.testing.assert_close(rotated(x), plain(x), atol=1e-5, rtol=1e-5)
    layer = rotated[0]
    assert layer.block == 64

    def error(weight: torch.Tensor) -> torch.Tensor:
        scale = weight.abs().amax(1, keepdim=True) / 7
        return fake_quant(weight, scale, torch.zeros_like(scale), -8, 7) - weight

    direct = error(plain[0].weight).pow(2).sum()
    back = strip(copy.deepcopy(rotated))[0].weight  # R^T folded back: the layer's own weight again
    torch.testing.assert_close(back, plain[0].weight, atol=1e-5, rtol=1e-5)
    through = error(layer.linear.weight).pow(2).sum()  # R is orthonormal: mapping back keeps the error's norm
    assert through < 0.3 * direct


def test_rotated_quantized_pruned_model_round_trips(tmp_path) -> None:
    model = make_vit()
    methods = [{"name": "hadamard"}, {"name": "ptq", "w_bits": 4, "a_bits": 8}, {"name": "sqap", "keep": 0.5}]
    compress(model, [build_method(m) for m in methods], batches())
    x = torch.rand(3, 1, 12, 12)
    reloaded = load(save(model, tmp_path / "sqap.safetensors"), make_vit())
    assert torch.equal(reloaded(x), model(x))
    assert type(reloaded.blocks[0].attn.qkv).__name__ == "RotatedLinear"
    assert type(reloaded.blocks[0].attn.qkv.linear).__name__ == "QLinear"


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="methods.0.keep"):
        validate_method({"name": "sqap", "keep": 0.0}, "methods.0")
    with pytest.raises(ValueError, match="methods.0.preserve"):
        validate_method({"name": "sqap", "preserve": 1.5}, "methods.0")
    with pytest.raises(ValueError, match="TinyCNN .* has no self-attention blocks"):
        build_method({"name": "sqap"}).prepare(make_cnn())
    with pytest.raises(ValueError, match="at 5 — the model has 2 blocks"):
        build_method({"name": "sqap", "at": 5}).prepare(make_vit())
    with pytest.raises(ValueError, match=r"protect \[9\] — give distinct patch indices in 0..8"):
        build_method({"name": "sqap", "protect": [9]}).prepare(make_vit())
    with pytest.raises(ValueError, match="block 48: a Hadamard block is a power of two"):
        build_method({"name": "hadamard", "block": 48}).prepare(make_vit())
    with pytest.raises(ValueError, match="block 32 does not divide layer 'blocks.0.attn.qkv'"):
        build_method({"name": "hadamard", "block": 32}).prepare(make_vit())
    quantized = make_vit()
    compress(quantized, [build_method({"name": "ptq", "w_bits": 8})], batches(1))
    with pytest.raises(ValueError, match="list hadamard before the quantizing method"):
        build_method({"name": "hadamard"}).prepare(quantized)


def test_far_replaces_blocks_behind_a_pruner_but_not_the_one_whose_attention_chooses() -> None:
    """A sparser teacher (tokens dropped before block 0 by block 0's attention): FAR replaces block 1, which sees the
    retained tokens only; replacing block 0 would remove the attention that chooses them, and is refused."""
    x = torch.rand(8, 1, 12, 12)
    model = make_vit()
    compress(model, [build_method({"name": "sqap", "criterion": "top", "at": 0, "keep": 0.5})], [(x, None)])
    compress(model, [build_method({"name": "far", "blocks": [1], "distill_steps": 2, "joint_steps": 1})], [(x, None)])
    assert type(model.blocks[1].attn).__name__ == "LSTMAttention"
    seen: list[int] = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(x)
    assert seen == [1 + 4]
    chooser = make_vit()
    compress(chooser, [build_method({"name": "sqap", "criterion": "top", "at": 0, "keep": 0.5})], [(x, None)])
    with pytest.raises(ValueError, match="far: block 0's attention chooses the tokens its pruner keeps"):
        compress(chooser, [build_method({"name": "far", "blocks": [0], "distill_steps": 1})], [(x, None)])


def test_the_criterion_can_be_read_from_another_block() -> None:
    """kept_overlap: the same block as reference keeps the same patches (overlap 1); a block whose class token
    attends the other way (query weights negated) keeps other patches, and the model's own block is restored."""
    from bitsmith.methods.attention.sqap import kept_overlap

    model = make_vit()
    compress(model, [build_method({"name": "sqap", "keep": 0.5, "at": 1, "criterion": "top"})], batches(1))
    x = torch.rand(16, 1, 12, 12)
    own = copy.deepcopy(model.blocks[1].block)
    assert kept_overlap(model, own, x) == 1.0
    flipped = copy.deepcopy(own)
    with torch.no_grad():
        flipped.attn.qkv.weight[:16] *= -1  # q rows negated: q.k flips sign, the most attended become the least
        flipped.attn.qkv.bias[:16] *= -1
    assert kept_overlap(model, flipped, x) < 0.5
    before = model(x)
    assert torch.equal(model(x), before) and not list(model.blocks[1]._criterion)


def test_a_text_encoder_drops_tokens_and_pools_only_the_kept_ones(tmp_path) -> None:
    """MiniLM-style encoder (tiny BERT): the layers after ``at`` run on [CLS] plus the kept tokens (chosen among the
    real ones, padding last); the masked mean over the returned sequence is the mean over the kept real tokens; the
    checkpoint rebuilds the wrapper. With ``keep: 1`` the encoder computes exactly what it did unwrapped."""
    pytest.importorskip("transformers")
    from conftest import bert_batch, make_bert

    batch = bert_batch(3, 12, seed=0)
    batch["attention_mask"][1, 5:] = 0  # a padded sequence: 4 real tokens after [CLS], fewer than the 6 kept
    full = make_bert(layers=3)
    reference = full(**batch).last_hidden_state
    same = make_bert(layers=3)
    compress(same, [build_method({"name": "sqap", "keep": 1.0, "at": 1})], [batch])
    torch.testing.assert_close(same(**batch).last_hidden_state, reference, atol=1e-5, rtol=1e-5)

    model = make_bert(layers=3)
    compress(model, [build_method({"name": "sqap", "keep": 0.5, "at": 1, "criterion": "top"})], [batch])
    lengths: list[int] = []
    model.encoder.encoder.layer[2].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    out = model(**batch).last_hidden_state
    assert lengths == [1 + round(0.5 * 11)] and out.shape == reference.shape
    index = model.encoder.last_index
    assert (index[:, 0] == 0).all() and index[1, 1:].tolist() == [1, 2, 3, 4, 5, 6]  # the 4 real ones, then padding
    assert len(set(index[0].tolist())) == 7  # unpadded: [CLS] and 6 of the 11 others; the other 5 hold the mean
    torch.testing.assert_close(out[0].mean(0), out[0][index[0]].mean(0))
    assert not torch.allclose(out[0][index[0]].mean(0), reference[0].mean(0), atol=1e-3)  # pruning changed it
    reloaded = load(save(model, tmp_path / "bert.safetensors"), make_bert(layers=3))
    assert torch.equal(reloaded(**batch).last_hidden_state, out)


def test_the_encoder_criterion_is_the_cls_querys_attention() -> None:
    """criterion top keeps the tokens the [CLS] query of layer ``at`` attends most (computed here independently)."""
    pytest.importorskip("transformers")
    from conftest import bert_batch, make_bert

    batch = bert_batch(2, 10, seed=3)
    model = make_bert(layers=2)
    seen: dict[str, torch.Tensor] = {}
    model.encoder.layer[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    model(**batch)
    attn = model.encoder.layer[1].attention.self
    q = attn.query(seen["x"][:, :1]).view(2, 1, 2, 16).transpose(1, 2)
    k = attn.key(seen["x"]).view(2, 10, 2, 16).transpose(1, 2)
    weights = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1).mean(1)[:, 0, 1:]  # (2, 9) after [CLS]
    expected = weights.topk(4, dim=1).indices.sort(dim=1).values + 1
    compress(model, [build_method({"name": "sqap", "keep": 0.5, "at": 1, "criterion": "top"})], [batch])
    model(**batch)
    assert torch.equal(model.encoder.last_index[:, 1:], expected)


def test_far_refuses_a_token_pruned_text_encoder() -> None:
    """The encoder's layers are found behind the pruning wrapper, and FAR refuses them by name."""
    pytest.importorskip("transformers")
    from bitsmith.topology.attention import attention_sites
    from conftest import bert_batch, make_bert

    batch = bert_batch(2, 10, seed=1)
    model = make_bert(layers=3)
    compress(model, [build_method({"name": "sqap", "keep": 0.5, "at": 1, "criterion": "top"})], [batch])
    assert [s.site for s in attention_sites(model)][2] == "encoder.encoder.layer.2.attention.self"
    with pytest.raises(ValueError, match="far: this text encoder drops tokens"):
        compress(model, [build_method({"name": "far", "blocks": [2], "distill_steps": 1})], [batch])
