"""MoFME: mixture of feature-modulated experts with an uncertainty-aware router (Zhang, Luo, Liu, H. Yang, Dong,
Gudovskiy, Okuno, Nakata, Keutzer, Du, S. Zhang, "Efficient Deweather Mixture-of-Experts with Uncertainty-aware
Feature-wise Linear Modulation", AAAI 2024).

Each selected feed-forward block ``fc2(act(fc1(x)))`` becomes ``experts`` experts that share its weights and differ
only by a feature-wise linear modulation of the hidden activation: expert ``k`` computes
``fc2(act(gamma_k * fc1(x) + beta_k))``. A token's output mixes its ``top_k`` experts with the router's weights
``g``; ``fc2`` is linear, so the mixture is ``fc2(sum_k g_k act(gamma_k * h + beta_k))`` with ``h = fc1(x)``: one
``fc1`` and one ``fc2`` per token whatever the number of experts, and ``2 * hidden`` parameters per expert
(``gamma`` starts at 1 and ``beta`` at 0, so the block starts as the FFN it was made from).

The uncertainty-aware router: the routing distribution is the mean of ``router_samples`` softmaxes of a linear
router over Monte Carlo dropout masks of its input (``router_dropout``), so uncertain tokens get flatter, better
calibrated weights; then top-k, renormalised. In evaluation the masks are drawn from a fixed seed (repeatable).

``kind: parallel`` is the conventional MoE baseline (``experts`` copies of the FFN, each with its own weights, the
same router); ``router: linear`` the plain linear router (one softmax, no dropout).

Deviations (stated on the method page): the paper's full text and code were not available here, so where the
modulation sits (the hidden activation, before the non-linearity) and the router's uncertainty estimate (MC
dropout) are our reading of its abstract; no load-balancing loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.nn import register_compressed
from bitsmith.select import DEFAULT_TYPES
from bitsmith.swap import swap


class UncertaintyRouter(nn.Module):
    """Top-k routing weights (``tokens x E``, zero outside the top k, rows sum to 1) from the mean softmax over
    ``samples`` MC-dropout masks of the input (``samples`` 1 or ``dropout`` 0: a plain linear router)."""

    def __init__(self, dim: int, experts: int, top_k: int, samples: int = 4, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(dim, experts)
        self.top_k, self.samples, self.dropout, self.seed = top_k, samples, dropout, seed

    def probabilities(self, x: Tensor) -> Tensor:
        if self.samples <= 1 or self.dropout == 0:
            return F.softmax(self.linear(x), -1)
        generator = None if self.training else torch.Generator().manual_seed(self.seed)
        keep = 1 - self.dropout
        draws = [F.softmax(self.linear(x * (torch.rand(x.shape, generator=generator) < keep) / keep), -1)
                 for _ in range(self.samples)]  # fmt: skip
        return torch.stack(draws).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        probs = self.probabilities(x)
        top = probs.topk(self.top_k, -1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        return weights / weights.sum(-1, keepdim=True)


def _router(
    dim: int, experts: int, top_k: int, kind: str, samples: int, dropout: float, seed: int
) -> UncertaintyRouter:
    with torch.random.fork_rng():  # seeded weights; the caller's random stream is left as it was
        torch.manual_seed(seed)
        return UncertaintyRouter(dim, experts, top_k, samples if kind == "uncertainty" else 1, dropout, seed)


class _Mixture(nn.Module):
    """What both mixtures record in a checkpoint: their configuration (rebuilt from the original block)."""

    config: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **self.config}

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
        return cls(module, **{k: v for k, v in spec.items() if k != "type"})

    def to_float(self) -> nn.Module:
        """Already float torch modules (no quantizer, no mask): ``strip`` keeps the mixture as it is."""
        return self


@register_compressed
class ModulatedExperts(_Mixture):
    """A feed-forward block shared by ``experts`` feature-modulated experts (MoFME's FME layer)."""

    def __init__(self, ffn: nn.Module, experts: int, top_k: int, router: str = "uncertainty", samples: int = 4,
                 dropout: float = 0.1, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        check_experts(experts, top_k)
        self.fc1, self.act, self.fc2 = copy.deepcopy(ffn.fc1), copy.deepcopy(ffn.act), copy.deepcopy(ffn.fc2)
        hidden = self.fc1.out_features
        self.gamma = nn.Parameter(torch.ones(experts, hidden))
        self.beta = nn.Parameter(torch.zeros(experts, hidden))
        self.router = _router(self.fc1.in_features, experts, top_k, router, samples, dropout, seed)
        self.config = {"experts": experts, "top_k": top_k, "router": router, "samples": samples, "dropout": dropout,
                       "seed": seed}  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights = self.router(flat)  # tokens x E
        chosen = weights.topk(self.router.top_k, -1).indices  # tokens x k
        h = self.fc1(flat)  # tokens x hidden, once for all experts
        modulated = self.act(self.gamma[chosen] * h[:, None, :] + self.beta[chosen])  # tokens x k x hidden
        mixed = (weights.gather(-1, chosen)[..., None] * modulated).sum(1)
        return self.fc2(mixed).reshape(*x.shape[:-1], -1)


@register_compressed
class ParallelExperts(_Mixture):
    """The conventional MoE: ``experts`` copies of a feed-forward block with their own weights, top-k routed."""

    def __init__(self, ffn: nn.Module, experts: int, top_k: int, router: str = "linear", samples: int = 4,
                 dropout: float = 0.1, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        check_experts(experts, top_k)
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(experts))
        self.router = _router(ffn.fc1.in_features, experts, top_k, router, samples, dropout, seed)
        self.config = {"experts": experts, "top_k": top_k, "router": router, "samples": samples, "dropout": dropout,
                       "seed": seed}  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights = self.router(flat)
        out = flat.new_zeros(flat.shape[0], self.experts[0].fc2.out_features)
        for e, expert in enumerate(self.experts):
            rows = weights[:, e].nonzero().squeeze(-1)  # only the tokens routed to this expert run it
            if rows.numel():
                out = out.index_add(0, rows, weights[rows, e, None] * expert(flat[rows]))
        return out.reshape(*x.shape[:-1], -1)


def check_experts(experts: int, top_k: int) -> None:
    if experts < 2:
        raise ValueError(f"mofme: experts {experts}: a mixture has at least 2 experts")
    if not 1 <= top_k <= experts:
        raise ValueError(f"mofme: top_k {top_k} must be in 1..{experts} (the number of experts)")


@register_method("mofme")
@dataclass
class MoFME(Method):
    """Replace feed-forward blocks (``fc1``, ``act``, ``fc2``) by feature-modulated experts (or parallel ones)."""

    description = "MoFME: feature-modulated experts sharing one FFN, uncertainty-aware router (or the parallel MoE)"

    experts: Annotated[int, Field(ge=2)] = 8
    top_k: Annotated[int, Field(ge=1)] = 2
    kind: Literal["modulated", "parallel"] = "modulated"
    router: Literal["uncertainty", "linear"] = "uncertainty"
    router_samples: Annotated[int, Field(ge=1)] = 4
    router_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_experts(self.experts, self.top_k)
        if list(self.where.types) == list(DEFAULT_TYPES):  # by default: every feed-forward block
            self.where.types = ["FeedForward"]

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        layer = ModulatedExperts if self.kind == "modulated" else ParallelExperts

        def replace(name: str, module: nn.Module, overrides: dict[str, Any]) -> nn.Module:
            missing = [n for n in ("fc1", "act", "fc2") if not hasattr(module, n)]
            if missing:
                raise ValueError(f"mofme: {name} ({type(module).__name__}) is not a feed-forward block fc2(act(fc1(x))) "
                                 f"(missing {missing}); select FeedForward modules with `where`")  # fmt: skip
            return layer(module, self.experts, self.top_k, self.router, self.router_samples, self.router_dropout,
                         self.seed)  # fmt: skip

        return swap(model, self.where, replace)
