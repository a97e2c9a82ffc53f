"""Small vision models for 28x28 grey images: a ResNet-style CNN and a ViT. Inputs are in [0, 1];
normalisation is the model's first step, so attacks and quantizers see the same input range."""

from __future__ import annotations

import torch
from torch import Tensor, nn

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class Normalize(nn.Module):
    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Stem conv + three residual stages (28 -> 14 -> 7) + global pool + linear classifier."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` rows are ``[q | k | v]``, each head-major. ``qk_dim`` and
    ``v_dim`` (per head) default to ``dim // heads``; structured pruning may shrink them, and ``scale``
    stays the trained ``1 / sqrt(dim // heads)``."""

    def __init__(self, dim: int, heads: int, qk_dim: int | None = None, v_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.qk_dim = qk_dim or dim // heads
        self.v_dim = v_dim or dim // heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, heads * (2 * self.qk_dim + self.v_dim))
        self.proj = nn.Linear(heads * self.v_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qk_rows = self.heads * self.qk_dim
        q, k, v = self.qkv(x).split([qk_rows, qk_rows, self.heads * self.v_dim], dim=-1)
        q, k = (t.reshape(b, n, self.heads, self.qk_dim).transpose(1, 2) for t in (q, k))
        v = v.reshape(b, n, self.heads, self.v_dim).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (b, heads, n, v_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding (conv), class token, learned positions, pre-norm blocks, LN + linear head."""

    def __init__(
        self,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 128,
        classes: int = 10,
        image: int = 28,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.normalize = Normalize()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (b, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def split_cnn(groups: list[list[int]], widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Module:
    """The CNN as a :class:`bitsmith.split_ensemble.SplitEnsemble`: normalisation, stem and the first stage shared,
    one branch (stages 2 and 3, pool, a classifier over the group's classes + OOD) per class group. The branches'
    widths are the largest common fraction of ``widths[1:]`` that keeps the total MACs within the single CNN's."""
    from bitsmith.eval.cost import model_cost
    from bitsmith.split_ensemble import SplitEnsemble

    example = torch.zeros(1, 1, 28, 28)
    budget = model_cost(ResNetCNN(widths), example).totals["macs"]
    w1, w2, w3 = widths
    for percent in range(100, 0, -2):
        a, b = max(1, round(w2 * percent / 100)), max(1, round(w3 * percent / 100))
        trunk = nn.Sequential(Normalize(), nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
                              BasicBlock(w1, w1))  # fmt: skip
        branches = [nn.Sequential(BasicBlock(w1, a, stride=2), BasicBlock(a, b, stride=2), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(b, len(g) + 1)) for g in groups]  # fmt: skip
        model = SplitEnsemble(trunk, branches, groups)
        if model_cost(model, example).totals["macs"] <= budget:
            return model
    raise ValueError(f"no branch width keeps {len(groups)} branches within the single CNN's MACs")
