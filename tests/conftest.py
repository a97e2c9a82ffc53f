"""Tiny models and data shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.deploy import int8_pairs_saturate

# the widest weights the int8 kernels here sum exactly (without VNNI, 8-bit weights saturate oneDNN's int16 pair sums)
EXACT_W_BITS = 7 if int8_pairs_saturate() else 8

torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> pool -> Linear -> Linear: the layer kinds methods meet."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def make_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def make_ensemble(seed: int = 0, members: int = 2) -> nn.Module:
    """Tiny CNNs (different seeds) averaged as one :class:`bitsmith.Ensemble`."""
    from bitsmith import Ensemble

    return Ensemble([make_cnn(seed + i) for i in range(members)], torch.zeros(1, 1, 12, 12)).eval()


def make_split_ensemble(seed: int = 0) -> nn.Module:
    """A shared conv trunk and two branches (classes 0-4 and 5-9, each with an OOD class) for 12x12 images."""
    from bitsmith import SplitEnsemble

    torch.manual_seed(seed)
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    branches = [
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(576, 6)) for _ in groups
    ]
    return SplitEnsemble(trunk, branches, groups).eval()


def make_vit(seed: int = 0) -> nn.Module:
    """A two-block ViT for the 12x12 test images."""
    from bitsmith.zoo.vision import ViT

    torch.manual_seed(seed)
    return ViT(patch=4, dim=16, depth=2, heads=2, mlp_dim=32, image=12).eval()


def make_restorer(seed: int = 0) -> nn.Module:
    """The zoo's U-Net-style restorer, narrow (its bottleneck holds two FeedForward blocks; 12x12 images fit)."""
    from bitsmith.zoo.restorer import Restorer

    torch.manual_seed(seed)
    return Restorer(width=8, blocks=2).eval()


def make_ddpm(seed: int = 0) -> nn.Module:
    """A two-resolution diffusers U-Net noise predictor (8 / 16 channels) for 28x28 images."""
    from bitsmith.zoo.diffusion import UNetConfig, build_ddpm

    torch.manual_seed(seed)
    return build_ddpm(UNetConfig(channels=(8, 16), norm_groups=4)).eval()


def noisy_batches(count: int = 2, batch: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Calibration batches ``{"sample": x_t, "timestep": t}`` for ``make_ddpm``."""
    gen = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(batch, 1, 28, 28, generator=gen), "timestep": torch.randint(0, 1000, (batch,), generator=gen)}
            for _ in range(count)]  # fmt: skip


@pytest.fixture
def cnn() -> TinyCNN:
    return make_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 1, 12, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]


def make_llama(seed: int = 0, model_type: str = "llama") -> nn.Module:
    """A tiny random decoder LM (2 blocks, hidden 64, grouped-query attention): Llama or Gemma 3."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    if model_type == "gemma3_text":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=16, sliding_window=8))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():  # norms away from their init (1, or 0 for Gemma) so that folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.rand_like(p))
    model.config.use_cache = False
    return model.eval()


def token_batches(count: int = 2, batch: int = 2, length: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (batch, length), generator=g)} for _ in range(count)]


def make_bert(layers: int = 2, vocab: int = 60, seed: int | None = 0) -> nn.Module:
    """A tiny Hugging Face BERT encoder (hidden 32, 2 heads, FFN 64) in eval mode (seed None: the global RNG's
    state); the caller has checked that transformers is installed."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64)  # fmt: skip
    return transformers.BertModel(config).eval()


def bert_batch(size: int, length: int, seed: int, vocab: int = 60) -> dict[str, torch.Tensor]:
    """Token ids in ``[1, vocab)`` with a full attention mask."""
    ids = torch.randint(1, vocab, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
