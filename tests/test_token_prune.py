"""token-prune: the merge of pruned tokens into kept ones (``bitsmith.nn.tokens``), the scorer distilled from the
unpruned model's attention importance, and the checks on its input."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress, load, save
from bitsmith.nn.tokens import merge_tokens
from bitsmith.recipe import validate_method
from conftest import make_cnn, make_vit


def test_merge_keeps_the_best_tokens_and_folds_the_rest_in_by_importance() -> None:
    """Tokens 0 and 2 score highest and stay (in order); token 1 is most like token 0 and joins it, token 3 is most
    like token 2: each kept token becomes the softmax(score)-weighted mean of its group."""
    patches = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.8]]])
    scores = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    merged = merge_tokens(patches, scores, keep=2)
    w = scores.softmax(1)[0]
    expected = torch.stack([(w[0] * patches[0, 0] + w[1] * patches[0, 1]) / (w[0] + w[1]),
                            (w[2] * patches[0, 2] + w[3] * patches[0, 3]) / (w[2] + w[3])])  # fmt: skip
    torch.testing.assert_close(merged[0], expected)
    torch.testing.assert_close(merge_tokens(patches, scores, keep=4), patches)  # nothing pruned: unchanged
    a, b, c, d = [1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]
    four, rank = torch.tensor([[a, b, c, d]]), torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    w = rank.softmax(1)[0]
    groups = merge_tokens(four, rank, keep=2)[0]  # A and B stay; C (like A) joins A, D (orthogonal to A) joins B
    torch.testing.assert_close(groups[0], (w[0] * four[0, 0] + w[2] * four[0, 2]) / (w[0] + w[2]))
    torch.testing.assert_close(groups[1], (w[1] * four[0, 1] + w[3] * four[0, 3]) / (w[1] + w[3]))


def overlap(method, model, batches, k: int) -> float:
    """Mean share of the teacher's k most important patches among the scorer's k best."""
    pruner = method.pruner(model)
    shares = []
    for patches, target in method.importance(batches):
        with torch.no_grad():
            mine = pruner.scores(patches).topk(k, dim=1).indices
        theirs = target.topk(k, dim=1).indices
        shares += [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(mine, theirs, strict=True)]
    return sum(shares) / len(shares)


def batches(count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 1, 12, 12, generator=g), None) for _ in range(count)]


def test_scorer_learns_the_attention_importance() -> None:
    """After calibration the scorer's top tokens are the unpruned model's most attended ones on new images (an
    untrained scorer's are not)."""
    teacher = make_vit()
    with torch.no_grad():  # a class token that attends selectively, so that importance differs between patches
        for block in teacher.blocks:
            rows = 2 * block.attn.qkv.out_features // 3
            block.attn.qkv.weight[:rows] *= 4.0
    untrained = copy.deepcopy(teacher)
    cold = build_method({"name": "token-prune", "keep": 0.5, "distill_steps": 0})
    compress(untrained, [cold], batches())
    model = copy.deepcopy(teacher)
    method = build_method({"name": "token-prune", "keep": 0.5, "distill_steps": 300, "lr": 3e-3})
    compress(model, [method], batches())
    held_out = batches(2, seed=5)
    assert overlap(method, model, held_out, 2) > overlap(cold, untrained, held_out, 2) + 0.2
    assert overlap(method, model, held_out, 2) > 0.6


def test_backbone_sees_the_kept_tokens_and_the_checkpoint_rebuilds(tmp_path) -> None:
    model = make_vit()  # 12x12 images, patch 4: 9 patch tokens
    compress(model, [build_method({"name": "token-prune", "keep": 0.5, "distill_steps": 2})], batches(1))
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = torch.rand(3, 1, 12, 12)
    out = model(x)
    hook.remove()
    assert seen == [1 + round(0.5 * 9)]
    reloaded = load(save(model, tmp_path / "pruned.safetensors"), make_vit())
    assert torch.equal(reloaded(x), out)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="methods.0.keep"):
        validate_method({"name": "token-prune", "keep": 0.0}, "methods.0")
    with pytest.raises(ValueError, match="methods.0.keep"):
        validate_method({"name": "token-prune", "keep": 1.5}, "methods.0")
    with pytest.raises(ValueError, match="token pruning needs a ViT"):
        build_method({"name": "token-prune"}).prepare(make_cnn())


def test_the_baselines_reduce_to_the_same_count() -> None:
    """EViT-style fusion keeps the most attended tokens plus one attention-weighted fusion of the rest; ToMe-style
    matching merges the most similar pairs (size-weighted) until the count is reached."""
    from bitsmith.nn.tokens import bipartite_merge, fuse_inattentive

    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    attention = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    fused = fuse_inattentive(patches, attention, keep=3)  # tokens 1 and 2 stay; 0 and 3 fuse equally
    torch.testing.assert_close(fused[0], torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 1.5]]))
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    torch.testing.assert_close(bipartite_merge(same, keep=2)[0].sort(dim=0).values,
                               torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # fmt: skip
    three_to_one = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    weighted = bipartite_merge(three_to_one, keep=1)  # round 1 makes a token of size 3 and one of size 1
    torch.testing.assert_close(weighted[0, 0], torch.tensor([0.75, 0.25]))  # sizes carried between rounds
    for mode in ("attention", "merge"):
        model = make_vit()
        compress(model, [build_method({"name": "token-prune", "keep": 0.5, "mode": mode})], batches(1))
        shapes: list[int] = []
        model.blocks[1].register_forward_pre_hook(lambda m, args, out=shapes: out.append(args[0].shape[1]))
        model(torch.rand(2, 1, 12, 12))
        assert shapes == [1 + round(0.5 * 9)], mode
