"""FAR: the multi-head LSTM in place of attention (``bitsmith.nn.recurrent``) and the method (block-wise distillation,
the block-output loss, the group Hoyer-square, global unit pruning) on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress, load, save
from bitsmith.methods.attention.far import FAR, cosine_loss, hoyer_square
from bitsmith.nn.recurrent import LSTMAttention, lstm_attention_params, real_lengths
from bitsmith.recipe import validate_method
from bitsmith.topology.attention import attention_sites
from conftest import make_bert, make_cnn, make_vit


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def batches(count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images(16, seed=s), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(s)))
            for s in range(count)]  # fmt: skip


def mixer(seed: int = 0, hidden: tuple[int, ...] = (3, 3)) -> LSTMAttention:
    torch.manual_seed(seed)
    return LSTMAttention(8, 2, list(hidden), 8).eval()


def test_padding_is_invisible_to_real_tokens() -> None:
    """A right-padded sequence's real tokens get what the sequence alone gets: the backward LSTM starts at its last
    real token (running it over the padding would change every one of them)."""
    m = mixer()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    padded = m(x, attention_mask=mask)
    alone = m(x[:1, :4])
    torch.testing.assert_close(padded[0, :4], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[1], m(x[1:])[0], atol=1e-6, rtol=0)
    four_d = (mask[:, None, None, :].expand(2, 1, 6, 6)).bool()  # the boolean mask BERT's attention receives
    torch.testing.assert_close(m(x, attention_mask=four_d), padded)
    assert real_lengths(torch.ones(2, 6), 2, 6) is None
    with pytest.raises(ValueError, match="right-padded"):
        real_lengths(torch.tensor([[0, 1, 1]]), 1, 3)


def test_removing_silent_units_changes_nothing_and_shrinks() -> None:
    """Units whose recurrent columns and output columns are zero do not reach the output: removing them (rows of all
    four gates, both directions, their proj columns) leaves the function exactly as it was."""
    m = mixer(hidden=(4, 3))
    silent = {0: [1, 3], 1: [0]}
    with torch.no_grad():
        start = 0
        for head, lstm in enumerate(m.lstms):
            h = lstm.hidden_size
            for unit in silent.get(head, []):
                for suffix in ("_l0", "_l0_reverse"):
                    getattr(lstm, "weight_hh" + suffix)[:, unit] = 0
                m.proj.weight[:, start + unit] = 0
                m.proj.weight[:, start + h + unit] = 0
            start += 2 * h
    x = torch.randn(3, 5, 8)
    before = m(x)
    norms = [g.norm(dim=1) for g in m.unit_groups()]
    m.remove_units([torch.tensor([True, False, True, False]), torch.tensor([False, True, True])])
    assert m.hidden == [2, 2]
    torch.testing.assert_close(m(x), before, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in m.parameters()) == lstm_attention_params(8, 2, [2, 2], 8)
    assert all(n.shape == (h,) for n, h in zip(norms, (4, 3), strict=True))


def test_hoyer_square_is_the_group_measure() -> None:
    """``(sum ||w_u||)^2 / sum ||w_u||^2``: n equal groups give n, one non-zero group gives 1, a scale changes nothing."""
    equal = [torch.ones(4, 3)]
    one = [torch.cat([torch.ones(1, 3), torch.zeros(3, 3)])]
    assert hoyer_square(equal).item() == pytest.approx(4.0, rel=1e-5)
    assert hoyer_square(one).item() == pytest.approx(1.0, rel=1e-5)
    assert hoyer_square([5 * equal[0]]).item() == pytest.approx(4.0, rel=1e-5)


def test_cosine_loss_ignores_padding() -> None:
    s, t = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    t2 = t.clone()
    t2[0, 2] = -s[0, 2]  # only the padded token differs
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert cosine_loss(s, t, mask) == pytest.approx(cosine_loss(s, t2, mask).item())
    assert cosine_loss(s, s, None).item() == pytest.approx(0.0, abs=1e-6)


def block_error(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - teacher(x)).pow(2).mean() / teacher(x).pow(2).mean())


def test_block_wise_distillation_recovers_the_attention() -> None:
    """After calibration the replaced ViT's logits are far closer to the original's than with untrained LSTMs (the
    distillation is what makes the replacement function-preserving)."""
    teacher = make_vit()
    untrained = copy.deepcopy(teacher)
    build_method({"name": "far", "distill_steps": 0, "joint_steps": 0}).prepare(untrained)
    model = copy.deepcopy(teacher)
    compress(model, [build_method({"name": "far", "distill_steps": 200, "joint_steps": 0})], batches())
    x = images(32, seed=9)
    assert block_error(model, teacher, x) < 0.3 * block_error(untrained, teacher, x)


def test_block_loss_trains_the_replacements_towards_the_teacher() -> None:
    """The penalty's block loss falls when the replacements are trained on it alone (an inverted or detached loss
    would not), and is zero for the teacher against itself."""
    model = make_vit()
    far = build_method({"name": "far", "distill_steps": 0, "joint_steps": 0})
    far.prepare(model)
    data = batches(2)
    optimizer = torch.optim.Adam([p for m in far.mixers(model) for p in m.parameters()], lr=3e-3)

    def loss_now() -> float:
        model(data[0][0])
        return float(far.penalty(model, data[0]).detach())

    start = loss_now()
    for step in range(40):
        model(data[step % 2][0])
        loss = far.penalty(model, data[step % 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_now() < 0.5 * start


def test_pruning_removes_the_globally_weakest_units() -> None:
    """With the units of block 1's first head scaled down, pruning to a parameter target removes exactly those (across
    blocks: block 0 keeps all of its units), and the replacements end within the target."""
    model = make_vit()
    far = build_method({"name": "far", "distill_steps": 0, "joint_steps": 0, "keep": 0.8})
    far.prepare(model)
    weak = far.mixers(model)[1]
    with torch.no_grad():
        for lstm in weak.lstms[:1]:
            for p in lstm.parameters():
                p.mul_(1e-3)
        weak.proj.weight[:, : 2 * weak.lstms[0].hidden_size].mul_(1e-3)
    full = [list(m.hidden) for m in far.mixers(model)]
    far.finalize(model)
    after = [m.hidden for m in far.mixers(model)]
    assert after[0] == full[0]
    assert after[1][1] == full[1][1] and after[1][0] < full[1][0]
    total = sum(sum(p.numel() for p in m.parameters()) for m in far.mixers(model))
    assert total <= 0.8 * far._full_params


def test_training_prunes_at_its_epoch_and_resumes_at_the_pruned_width(tmp_path) -> None:
    from bitsmith.train import TrainConfig, fit

    model = make_vit()
    far = build_method({"name": "far", "distill_steps": 2, "joint_steps": 1, "keep": 0.6, "prune_epoch": 1})
    compress(model, [far], batches(1), finalize=False)
    x, y = images(32), torch.randint(0, 10, (32,))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-3)
    fit(model, x, y, TrainConfig(epochs=1, batch_size=16, lr=1e-3), [far], checkpoint=tmp_path / "state.pt")
    pruned = [m.hidden for m in far.mixers(model)]
    assert far._pruned and sum(map(sum, pruned)) < sum(map(sum, [[8] * 2] * 2))
    fresh = make_vit()
    again = build_method(far.config())
    compress(fresh, [again], batches(1), finalize=False)
    fit(fresh, x, y, cfg, [again], checkpoint=tmp_path / "state.pt")  # resumes after epoch 1 at the pruned width
    assert [m.hidden for m in again.mixers(fresh)] == pruned


def test_checkpoint_round_trip_and_encoder_padding(tmp_path) -> None:
    """A FAR'd BERT encoder saves and loads into a fresh one (the LSTMs rebuilt from the layer map); its padded
    batch's real tokens match the unpadded run."""
    transformers = pytest.importorskip("transformers")
    del transformers
    model = make_bert()
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    compress(model, [build_method({"name": "far", "distill_steps": 5, "joint_steps": 2, "blocks": [1]})], calib)
    assert isinstance(model.encoder.layer[1].attention.self, LSTMAttention)
    assert not isinstance(model.encoder.layer[0].attention.self, LSTMAttention)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[:1, :5]).last_hidden_state
        reloaded = load(save(model, tmp_path / "far.safetensors"), make_bert())
        again = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(padded[0, :5], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(again, padded)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"blocks \[5\].*0\.\.1"):
        FAR(blocks=[5]).prepare(make_vit())
    with pytest.raises(ValueError, match="no self-attention blocks"):
        FAR().prepare(make_cnn())
    with pytest.raises(ValueError, match=r"methods\.0\.keep"):
        validate_method({"name": "far", "keep": 1.5}, "methods.0")
    assert [s.index for s in attention_sites(make_vit())] == [0, 1]


def sharpened(block: int) -> torch.nn.Module:
    """The tiny ViT with one block's queries and keys scaled up: its attention is far sparser than the other's."""
    model = make_vit()
    with torch.no_grad():
        qkv = model.blocks[block].attn.qkv
        rows = 2 * qkv.out_features // 3
        qkv.weight[:rows] *= 8.0
        qkv.bias[:rows] *= 8.0
    return model


@pytest.mark.parametrize("sharp", [0, 1])
def test_sparse_attention_replace_picks_the_sparsest_layer(sharp: int) -> None:
    """Calibration measures each layer's attention entropy and replaces the sparsest (``densest``: the other)."""
    for order, expected in (("sparsest", sharp), ("densest", 1 - sharp)):
        model = sharpened(sharp)
        method = build_method({"name": "sparse-attention-replace", "blocks": order, "count": 1, "distill_steps": 1,
                               "joint_steps": 0})  # fmt: skip
        compress(model, [method], batches(2))
        replaced = [i for i, b in enumerate(model.blocks) if isinstance(b.attn, LSTMAttention)]
        assert replaced == [expected], (order, method._entropy)
    with pytest.raises(ValueError, match="count 3"):
        build_method({"name": "sparse-attention-replace", "count": 3}).prepare(make_vit())
