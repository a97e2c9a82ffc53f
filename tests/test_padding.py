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
    from bitsmith.methods.noisyquant import NoisyQuant

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
