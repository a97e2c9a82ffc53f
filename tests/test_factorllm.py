"""FactorLLM: the experts are the dense FFN split exactly, the router learns the pseudo-labels of the
prior-approximate loss, and only the chosen experts run."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress, load, save
from bitsmith.methods.moe.experts import MoEFeedForward, moe_layers, prior_approximate_loss, prior_labels
from conftest import make_llama, token_batches


def test_all_experts_on_is_the_dense_ffn_and_to_float_merges_back() -> None:
    model = make_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, 64)
    moe = MoEFeedForward.from_dense(mlp, experts=4, top_k=4)
    assert torch.allclose(moe(x), mlp(x), atol=1e-6)
    half = MoEFeedForward.from_dense(mlp, experts=4, top_k=2)
    with half.all_experts():
        assert torch.allclose(half(x), mlp(x), atol=1e-6)
    assert not torch.allclose(half(x), mlp(x), atol=1e-3)  # top-2 of 4 drops half the neurons
    assert torch.allclose(half.to_float()(x), mlp(x), atol=1e-6)


def test_top_k_output_is_the_rescaled_sum_of_the_chosen_experts_and_only_they_run() -> None:
    mlp = make_llama().model.layers[0].mlp
    moe = MoEFeedForward.from_dense(mlp, experts=4, top_k=2)
    x = torch.randn(10, 64)
    chosen = moe.router(x).topk(2, -1).indices
    outputs = moe.expert_outputs(x)  # (tokens, E, hidden)
    expected = 2 * torch.stack([outputs[t, chosen[t]].sum(0) for t in range(10)])
    moe.reset_counts()
    assert torch.allclose(moe(x), expected, atol=1e-5)
    assert int(moe._tokens.sum()) == 10 * 2  # each token ran on exactly two experts


def test_prior_labels_pick_the_experts_closest_to_the_scaled_dense_output() -> None:
    outs = torch.stack([torch.full((4,), v) for v in (0.5, 0.1, 0.9, 0.5)]).unsqueeze(0)  # sum 2.0 per dim
    labels = prior_labels(outs, top_k=2)  # dense / 2 = 1.0: closest are 0.9 and then 0.5 (first of the tie)
    assert labels[0, 2] == 1 and labels.sum() == 2 and labels[0, 1] == 0
    logits = torch.tensor([[0.0, -5.0, 5.0, 0.0]])
    assert prior_approximate_loss(logits, labels) < prior_approximate_loss(-logits, labels)


class PairFFN(torch.nn.Module):
    """A gated FFN whose 4 neuron slices (experts) each fire on one direction ``u_e`` and give the same output
    vector when they fire: a token ``u_a + u_b`` is computed by experts a and b alone, in equal halves, so its
    prior-approximate pseudo-label is exactly {a, b}."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.directions = torch.linalg.qr(torch.randn(16, 4, generator=g))[0].T  # (4, 16) orthonormal
        self.gate_proj = torch.nn.Linear(16, 8, bias=False)
        self.up_proj = torch.nn.Linear(16, 8, bias=False)
        self.down_proj = torch.nn.Linear(8, 16, bias=False)
        self.act_fn = torch.nn.ReLU()
        with torch.no_grad():
            self.gate_proj.weight.copy_(4 * self.directions.repeat_interleave(2, 0) - 1.5 * self.directions.sum(0))
            self.up_proj.weight.copy_(self.directions.sum(0).expand(8, 16))
            self.down_proj.weight.copy_(torch.randn(16, 1, generator=g).expand(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tokens(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` tokens near ``u_a + u_b`` and their pairs as a k-hot (``count, 4``)."""
        g = torch.Generator().manual_seed(1)
        pairs = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(count)])
        x = self.directions[pairs].sum(1) + 0.02 * torch.randn(count, 16, generator=g)
        return x, torch.zeros(count, 4).scatter_(-1, pairs, 1.0)


def test_the_prior_approximate_stage_routes_each_token_to_the_experts_that_compute_it() -> None:
    """Trained on the PA pseudo-labels, the router's top-2 is each token's true pair of experts; the untrained
    router and random routing are mostly wrong."""
    from bitsmith.methods.moe.factorllm import train_router

    dense = PairFFN()
    x, truth = dense.tokens(512)

    def hits(moe: MoEFeedForward) -> float:
        with torch.no_grad():
            chosen = moe.choose(x, moe.router(x))
        return float(torch.zeros_like(truth).scatter_(-1, chosen, 1.0).mul(truth).sum() / truth.sum())

    moe = MoEFeedForward.from_dense(dense, 4, 2)
    untrained, random = hits(moe), hits(MoEFeedForward.from_dense(dense, 4, 2, routing="random"))
    agreement = train_router(moe, x, 300, 0.05, 0.05, 0.01, torch.Generator().manual_seed(0))
    assert agreement > 0.95 and hits(moe) > 0.95
    assert max(untrained, random) < 0.7, (untrained, random)


def test_end_to_end_stage_lowers_the_kd_loss_and_touches_only_routers() -> None:
    model = make_llama()
    calib = token_batches(count=2, batch=2, length=16)
    method = build_method({"name": "factorllm", "router_steps": 0, "steps": 30, "lr": 0.05})
    before = copy.deepcopy(model)
    compress(model, [method], calib)
    assert sum(method.history[-5:]) < sum(method.history[:5])
    moes = moe_layers(model)
    assert len(moes) == 2
    reference = MoEFeedForward.from_dense(before.model.layers[0].mlp, 4, 2)
    for a, b in zip(reference.experts.parameters(), moes["model.layers.0.mlp"].experts.parameters(), strict=True):
        assert torch.equal(a, b)  # experts frozen unless train_experts


def test_a_factorized_model_saves_reloads_and_quantizes(tmp_path) -> None:
    model = make_llama()
    calib = token_batches()
    compress(model, [build_method({"name": "factorllm", "router_steps": 5}),
                     build_method({"name": "rtn", "bits": 4, "group_size": 32, "where": {"include": ["*experts*"]}})],
             calib)  # fmt: skip
    ids = calib[0]["input_ids"]
    reloaded = load(save(model, tmp_path / "moe.safetensors"), make_llama())
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert type(reloaded.model.layers[1].mlp.experts[3].down_proj).__name__ == "QLinear"


@pytest.mark.parametrize(("entry", "message"), [
    ({"experts": 3}, "experts must divide the FFN width 128"),
    ({"experts": 4, "top_k": 5}, r"top_k must be in 1\.\.4"),
])  # fmt: skip
def test_bad_expert_counts_name_the_allowed_range(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compress(make_llama(), [build_method({"name": "factorllm", **entry})], token_batches())


def test_trained_experts_learn_from_a_frozen_dense_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """With train_experts the teacher's logits at every step are the original dense model's: the experts that
    train are not the teacher."""
    from bitsmith.methods.moe import factorllm

    model = make_llama()
    before = copy.deepcopy(model)
    calib = token_batches(count=2, batch=1, length=16)
    with torch.no_grad():
        dense = {i: model(input_ids=b["input_ids"]).logits for i, b in enumerate(calib)}
    seen: list[torch.Tensor] = []
    real = factorllm.kd_loss
    monkeypatch.setattr(factorllm, "kd_loss", lambda s, t: seen.append(t) or real(s, t))
    method = build_method({"name": "factorllm", "router_steps": 0, "steps": 6, "lr": 0.05, "train_experts": True})
    compress(model, [method], calib)
    assert len(seen) == 6
    for step, teacher in enumerate(seen):
        assert torch.allclose(teacher, dense[step % 2], atol=1e-5)
    moe = moe_layers(model)["model.layers.0.mlp"]
    assert not torch.equal(moe.experts[0].up_proj.weight, before.model.layers[0].mlp.up_proj.weight[:32])  # trained


def test_ffns_with_biases_are_refused() -> None:
    model = make_llama()
    model.config.mlp_bias = True
    mlp = model.model.layers[0].mlp
    mlp.up_proj.bias = torch.nn.Parameter(torch.ones(mlp.up_proj.out_features))
    with pytest.raises(ValueError, match=r"has biases in \['up_proj'\]"):
        compress(model, [build_method({"name": "factorllm"})], token_batches())


def test_the_kd_loss_reaches_the_routers_through_the_hard_top_k() -> None:
    """Without the PA and balance terms the routers learn from the KD loss alone, which passes the hard top-k
    only through the straight-through softmax."""
    model = make_llama()
    method = build_method({"name": "factorllm", "router_steps": 0, "steps": 3, "lr": 0.05, "prior_loss": False,
                           "balance_weight": 0.0})  # fmt: skip
    method.prepare(model)
    before = {n: m.router.weight.detach().clone() for n, m in moe_layers(model).items()}
    method.calibrate(model, token_batches(count=2, batch=2, length=16))
    for name, moe in moe_layers(model).items():  # AdamW's weight decay alone would move them by ~1e-6
        assert float((moe.router.weight - before[name]).norm() / before[name].norm()) > 1e-3
