"""T-REX (Zhang et al., 2024, "T-REX: Mixture-of-Rank-One-Experts with Semantic-aware Intuition for
Multi-task Large Language Model Finetuning"): a LoRA adapter whose rank-one experts are mixed per token.

Spec: ``shared/methods/t-rex.md``; official code ``RoyZry98/T-REX-Pytorch`` (modified peft ``lora.py``,
``component/embedder.py``). On a frozen linear, ``A`` (``r1 x d_in``, Kaiming) and ``B`` (``d_out x r2``,
zeros) span ``r1 * r2`` rank-one experts ``b_j a_i^T`` from only ``r1 + r2`` vectors, and a routing matrix mixes
them per token: ``dy = sigmoid(100 g) * B R(x)^T (A x)`` with
``R(x) = reshape(32 w softmax(W_router x) + 4 (1 - w) pi(x), r1 x r2)``, ``w = sigmoid(100 w_omega)`` learned,
router initialised to zeros. ``pi(x)`` is the "semantic-aware intuition": the similarity of the sample's
sentence embedding to ``r1 * r2`` cluster centroids of the training set's embeddings (softmax over clusters),
set per batch with ``semantic_prior`` (``intuition_prior`` builds it); without one the prior is uniform.

Deviations: the centroids come from k-means (scikit-learn) on the frozen base model's mean-pooled embeddings
of the training texts (the official embedder uses a separate sentence encoder); merging (``to_float``) folds the
adapter at its *average* routing matrix over the last batch it saw, an approximation (the routing varies per
token), so keep the adapter where exactness matters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.nn import register_compressed
from bitsmith.swap import swap

PRIOR: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("trex_prior", default=None)


@contextlib.contextmanager
def semantic_prior(prior: Tensor | None) -> Iterator[None]:
    """Inside this block every T-REX layer uses ``prior`` (``batch, r1 * r2``, rows summing to 1)."""
    token = PRIOR.set(prior)
    try:
        yield
    finally:
        PRIOR.reset(token)


@register_compressed
class TRexLinear(nn.Module):
    """A frozen linear plus a mixture-of-rank-one-experts adapter."""

    def __init__(self, base: nn.Linear, r1: int, r2: int) -> None:
        super().__init__()
        self.base, self.r1, self.r2 = base, r1, r2
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.A = nn.Parameter(torch.empty(r1, d_in, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(d_out, r2, dtype=base.weight.dtype))
        self.router = nn.Parameter(torch.zeros(r1 * r2, d_in, dtype=base.weight.dtype))
        self.omega = nn.Parameter(torch.zeros(()))
        self.gate = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean_routing", torch.full((r1, r2), 32.0 / (r1 * r2) + 4.0 / (r1 * r2)), persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def adapter_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def routing(self, x: Tensor) -> Tensor:
        """``R(x)`` per token (``..., r1, r2``)."""
        w = torch.sigmoid(100 * self.omega)
        experts = self.r1 * self.r2
        mix = 32 * w * torch.softmax(x @ self.router.T, -1)  # (..., r1 r2)
        prior = PRIOR.get()
        if prior is None:
            prior_term = torch.full_like(mix, 1.0 / experts)
        else:
            if prior.shape[-1] != experts:
                raise ValueError(f"T-REX prior has {prior.shape[-1]} entries; this layer has {experts} experts")
            prior_term = prior.reshape(prior.shape[0], *([1] * (mix.dim() - 2)), experts).to(mix.dtype)
        return (mix + 4 * (1 - w) * prior_term).reshape(*x.shape[:-1], self.r1, self.r2)

    def forward(self, x: Tensor) -> Tensor:
        routing = self.routing(x)
        if not self.training:
            self.mean_routing = routing.detach().reshape(-1, self.r1, self.r2).mean(0)
        mixed = torch.einsum("...i,...ij->...j", x @ self.A.T, routing)  # (..., r2)
        return self.base(x) + torch.sigmoid(100 * self.gate) * (mixed @ self.B.T)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "r1": self.r1, "r2": self.r2}

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> TRexLinear:
        return cls(module, int(spec["r1"]), int(spec["r2"]))

    @torch.no_grad()
    def to_float(self) -> nn.Linear:
        """The base linear with the adapter folded in at the average routing matrix (an approximation)."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           dtype=self.base.weight.dtype)  # fmt: skip
        delta = torch.sigmoid(100 * self.gate) * self.B @ self.mean_routing.T @ self.A
        merged.weight.copy_(self.base.weight + delta)
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged


def trex_layers(model: nn.Module) -> list[TRexLinear]:
    return [m for m in model.modules() if isinstance(m, TRexLinear)]


@torch.no_grad()
def intuition_prior(embeddings: Tensor, experts: int, seed: int = 0) -> tuple[Tensor, Any]:
    """k-means centroids (``experts`` clusters) of training embeddings; returns them and a function mapping a
    batch of embeddings to its prior (softmax of cosine similarity to the centroids)."""
    from sklearn.cluster import KMeans

    if embeddings.shape[0] < experts:
        raise ValueError(f"T-REX intuition needs at least {experts} training embeddings; got {embeddings.shape[0]}")
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    km = KMeans(n_clusters=experts, n_init=4, random_state=seed).fit(unit.numpy())
    centroids = torch.nn.functional.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)

    def prior(batch: Tensor) -> Tensor:
        return torch.softmax(torch.nn.functional.normalize(batch.float(), dim=-1) @ centroids.T, -1)

    return centroids, prior


@register_method("t-rex")
@dataclass
class TRex(Method):
    """Mixture-of-rank-one-experts adapters (T-REX) on the selected Linears; the base weights are frozen."""

    description = "T-REX: LoRA with r1*r2 rank-one experts mixed per token by a router (+ semantic prior)"
    doc_page = "t-rex"

    r1: Annotated[int, Field(ge=1)] = 4
    r2: Annotated[int, Field(ge=1)] = 4
    freeze_base: bool = True  # every parameter outside the adapters (and a task head the caller adds) frozen

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r1", "r2"):
            if getattr(self, name) < 1:
                raise ValueError(f"t-rex: {name} (an adapter rank) must be >= 1; got {getattr(self, name)}")

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if self.freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)

        def wrap(name: str, layer: nn.Module, overrides: dict[str, Any]) -> nn.Module:
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"t-rex adapts nn.Linear layers; {name!r} is a {type(layer).__name__}")
            c = self.layer_config(overrides)
            return TRexLinear(layer, c["r1"], c["r2"])

        return swap(model, self.where, wrap)
