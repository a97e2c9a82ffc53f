"""Padding never enters calibration statistics of token models: PTQ observers, SmoothQuant, NoisyQuant and
mixed precision give the same result on a padded batch as on the same sentences without padding (the
padding token here has huge activations, so any leak changes the result)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            self.emb.weight[0] = torch.linspace(-40, 40, 8)  # the padding token: far outside the real range

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(input_ids))))


SENTENCES = [torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 6, 5]), torch.tensor([7, 8, 9, 3])]


def padded() -> list[dict[str, torch.Tensor]]:
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for row, sentence in enumerate(SENTENCES):
        ids[row, : len(sentence)], mask[row, : len(sentence)] = sentence, 1
    return [{"input_ids": ids, "attention_mask": mask}]


def unpadded() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in SENTENCES]


def calibrated(methods: list[dict], batches: list[dict[str, torch.Tensor]]) -> TokenModel:
    model = TokenModel().eval()
    compress(model, [build_method(m) for m in methods], batches)
    return model


def test_ptq_observers_ignore_padding() -> None:
    ptq = {"name": "ptq", "a_observer": "minmax", "where": {"include": ["fc", "out"]}}
    a, b = calibrated([ptq], padded()), calibrated([ptq], unpadded())
    for name in ("fc", "out"):
        qa, qb = a.get_submodule(name).input_q, b.get_submodule(name).input_q
        assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point), name


def test_smoothquant_ignores_padding() -> None:
    smooth = {"name": "smoothquant", "layers": "all", "where": {"include": ["fc"]}}
    a, b = calibrated([smooth], padded()), calibrated([smooth], unpadded())
    assert torch.allclose(a.fc.smooth, b.fc.smooth) and torch.allclose(a.fc.weight, b.fc.weight)


def test_noisyquant_ignores_padding() -> None:
    methods = [{"name": "ptq", "w_bits": 8, "a_bits": 6, "where": {"include": ["fc", "out"]}},
               {"name": "noisyquant", "where": {"include": ["fc", "out"]}, "rows": 16}]  # fmt: skip
    model_a, model_b = TokenModel().eval(), TokenModel().eval()
    noisy_a, noisy_b = [build_method(m) for m in methods], [build_method(m) for m in methods]
    compress(model_a, noisy_a, padded(), finalize=False)
    compress(model_b, noisy_b, unpadded(), finalize=False)
    assert noisy_a[1].report == noisy_b[1].report


def test_noisyquant_clip_candidates_span_all_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsmith.methods.ptq.noisyquant import NoisyQuant

    ranges: list[tuple[float, float]] = []
    real = NoisyQuant._clip
    monkeypatch.setattr(NoisyQuant, "_clip", lambda self, q, r, e: ranges.append(r) or real(self, q, r, e))
    batch = padded()
    model = TokenModel().eval()
    x = model.emb(batch[0]["input_ids"])[batch[0]["attention_mask"].bool()].detach()
    methods = [{"name": "ptq", "a_bits": 6, "where": {"include": ["fc"]}},
               {"name": "noisyquant", "where": {"include": ["fc"]}, "rows": 16}]  # fmt: skip
    compress(model, [build_method(m) for m in methods], batch * 3)  # 39 real rows, 16 sampled
    assert ranges == [pytest.approx((float(x.min()), float(x.max())))]


def test_noisyquant_refuses_dynamic_or_per_token_activation_quantizers() -> None:
    methods = [{"name": "ptq", "a_bits": 8, "a_granularity": "token", "where": {"include": ["fc"]}},
               {"name": "noisyquant", "where": {"include": ["fc"]}}]  # fmt: skip
    with pytest.raises(
        ValueError, match="needs a static per-tensor activation quantizer.*'fc' has a dynamic per-token"
    ):
        compress(TokenModel().eval(), [build_method(m) for m in methods], padded())


def test_mixed_precision_activation_candidates_ignore_padding() -> None:
    mixed = build_method({"name": "mixed", "sensitivity": "error", "candidates": [4, 8], "a_candidates": [4, 8],
                          "where": {"include": ["fc"]}})  # fmt: skip
    model = TokenModel().eval()
    mixed.prepare(model)
    a = mixed._input_quantizers(model, padded()[0])
    inputs_a = mixed._inputs["fc"]
    b = mixed._input_quantizers(model, {"input_ids": SENTENCES[0][None], "attention_mask": torch.ones(1, 6)})
    assert inputs_a.shape[0] == sum(len(s) for s in SENTENCES)  # real tokens only
    assert float(inputs_a.abs().max()) < 40 and a["fc"][8].scale.numel() == b["fc"][8].scale.numel()


# -- decoder LLMs: the sequential runner -------------------------------------------------------------


def decoder_batches(pad: int = 0, left: bool = False) -> list[dict[str, torch.Tensor]]:
    """An unpadded batch, then a right- (or left-) padded batch of the same shape whose padding positions hold
    token ``pad`` (tokens 0 and 1 have huge embeddings of opposite sign; real tokens are 2..95). A runner that
    keys block inputs by shape alone hands the first batch's mask-free inputs to the padded one."""
    g = torch.Generator().manual_seed(3)
    full = {
        "input_ids": torch.randint(2, 96, (3, 12), generator=g),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
    }
    ids, mask = torch.full((3, 12), pad, dtype=torch.long), torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate((12, 7, 9)):
        where = slice(12 - n, 12) if left else slice(0, n)
        ids[i, where], mask[i, where] = torch.randint(2, 96, (n,), generator=g), 1
    return [full, {"input_ids": ids, "attention_mask": mask}]


def loud_padding_llama() -> nn.Module:
    from conftest import make_llama

    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 30.0  # the padding tokens: far outside the real range
        model.model.embed_tokens.weight[1] = -30.0
    return model


def test_sequential_blocks_get_each_batchs_own_mask() -> None:
    from bitsmith.sequential import capture_inputs, run_block
    from bitsmith.topology import topology_of

    pytest.importorskip("transformers")
    model = loud_padding_llama()
    padded_batches = decoder_batches(left=True)  # real tokens after the padding: only the mask hides it
    blocks = topology_of(model).blocks(model)
    inputs = capture_inputs(model, blocks, padded_batches)
    outputs = run_block(blocks[0][1], inputs[0])
    with torch.no_grad():
        expected = model(**padded_batches[1], output_hidden_states=True).hidden_states[1]
    real = padded_batches[1]["attention_mask"].bool()
    assert torch.allclose(outputs[1][real], expected[real], atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_decoder_calibration_ignores_padding(method: str) -> None:
    """GPTQ's Hessians, AWQ's activation means and errors, SmoothQuant's maxima on the decoder path are those of
    the real tokens: what the padding positions hold does not change a single weight."""
    pytest.importorskip("transformers")
    specs = {"gptq": {"name": "gptq", "bits": 4, "group_size": 32},
             "awq": {"name": "awq", "bits": 4, "group_size": 32, "search_batches": 4},
             "smoothquant": {"name": "smoothquant", "alpha": 0.5, "layers": "all"}}  # fmt: skip
    weights = []
    for batches in (decoder_batches(pad=0), decoder_batches(pad=1)):
        model = loud_padding_llama()
        compress(model, build_method(specs[method]), batches)
        q_proj = model.model.layers[1].self_attn.q_proj
        weights.append(getattr(q_proj, "effective_weight", lambda q=q_proj: q.weight)().detach())
    changed = (weights[0] != weights[1]).float().mean()
    assert changed == 0, f"{100 * float(changed):.1f} % of q_proj's weights depend on the padding"
