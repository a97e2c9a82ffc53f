"""Mixture-of-experts feed-forward blocks made from a dense LLM's FFN (FactorLLM's factorization), and the
losses that train their routers. GEMQ quantizes such blocks expert by expert.

A dense gated FFN ``down(act(gate(x)) * up(x))`` with intermediate size ``I`` is split into ``E`` experts, each
owning ``I / E`` of the intermediate neurons (contiguous slices, as FactorLLM's code): the sum of all experts
is the dense FFN exactly. A linear router picks ``top_k`` experts per token, and the output is
``(E / k) * sum of the chosen experts`` (rescaled so k experts stand in for all E). Only the chosen experts
run on a token: the FFN's FLOPs per token fall to ``k / E``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.nn import register_compressed
from bitsmith.select import Selection

ROUTINGS = ("learned", "random")


class Expert(nn.Module):
    """One slice of a gated FFN: ``down(act(gate(x)) * up(x))`` over its own intermediate neurons."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Router logits ``W x`` (``tokens, E``). Not an ``nn.Linear``, so quantizer selections pass it by."""

    def __init__(self, hidden: int, experts: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = hidden**-0.5  # nn.Linear's initialisation, drawn from ``seed`` so a factorization is repeatable
        self.weight = nn.Parameter(torch.empty(experts, hidden).uniform_(-bound, bound, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def check_moe_shape(intermediate: int, experts: int, top_k: int) -> None:
    """One clear line for an expert count or top-k that the FFN cannot take."""
    divisors = [e for e in range(2, intermediate + 1) if intermediate % e == 0][:8]
    if experts < 2 or intermediate % experts:
        raise ValueError(f"experts must divide the FFN width {intermediate} and be >= 2 (e.g. {divisors}); "
                         f"got {experts}")  # fmt: skip
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in 1..{experts} (the number of experts); got {top_k}")


@register_compressed
class MoEFeedForward(nn.Module):
    """A dense gated FFN factorized into ``experts`` with a top-``top_k`` router (a compressed module: its spec
    rebuilds it from the dense FFN, and ``to_float`` merges the experts back into one dense FFN)."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module, experts: int, top_k: int,
                 routing: str = "learned", seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        check_moe_shape(intermediate, experts, top_k)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}; got {routing!r}")
        self.hidden, self.intermediate, self.top_k, self.routing, self.seed = hidden, intermediate, top_k, routing, seed
        self.experts = nn.ModuleList(Expert(hidden, intermediate // experts, act) for _ in range(experts))
        self.router = TopKRouter(hidden, experts, torch.Generator().manual_seed(seed))
        self.straight_through = False  # training: router gradients through the hard top-k (set by trainers)
        self.keep = False  # training: keep the last input and router logits for the router losses
        self.last: tuple[Tensor, Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._tokens = torch.zeros(experts, dtype=torch.long)  # tokens each expert ran on since reset_counts

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, mlp: nn.Module, experts: int, top_k: int, routing: str = "learned", seed: int = 0):
        """Split ``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) into contiguous neuron slices."""
        missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} is not a gated FFN (missing {missing}); FactorLLM needs "
                             "gate_proj / up_proj / down_proj / act_fn")  # fmt: skip
        biased = [n for n in ("gate_proj", "up_proj", "down_proj") if getattr(mlp, n).bias is not None]
        if biased:
            raise ValueError(f"{type(mlp).__name__} has biases in {biased}; FactorLLM's experts hold none, so the "
                             "model would change: only bias-free gated FFNs (Llama, Gemma, Qwen) are factorized")  # fmt: skip
        hidden, intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        moe = cls(hidden, intermediate, mlp.act_fn, experts, top_k, routing, seed).to(mlp.gate_proj.weight.dtype)
        size = intermediate // experts
        for e, expert in enumerate(moe.experts):
            rows = slice(e * size, (e + 1) * size)
            expert.gate_proj.weight.copy_(mlp.gate_proj.weight[rows])
            expert.up_proj.weight.copy_(mlp.up_proj.weight[rows])
            expert.down_proj.weight.copy_(mlp.down_proj.weight[:, rows])
        return moe

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "experts": self.num_experts, "top_k": self.top_k,
                "routing": self.routing, "seed": self.seed}  # fmt: skip

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> MoEFeedForward:
        return cls.from_dense(module, int(spec["experts"]), int(spec["top_k"]), str(spec.get("routing", "learned")),
                              int(spec.get("seed", 0)))  # fmt: skip

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """One dense FFN (an ``Expert`` over all the neurons): what all experts on computes."""
        weights = [e.gate_proj.weight for e in self.experts]
        dense = Expert(self.hidden, sum(w.shape[0] for w in weights), self.experts[0].act_fn)
        dense.gate_proj.weight.copy_(torch.cat(weights))
        dense.up_proj.weight.copy_(torch.cat([e.up_proj.weight for e in self.experts]))
        dense.down_proj.weight.copy_(torch.cat([e.down_proj.weight for e in self.experts], 1))
        return dense.to(self.router.weight.dtype)

    def choose(self, x: Tensor, logits: Tensor) -> Tensor:
        """The chosen experts per token (``tokens, top_k``): the router's top-k, or uniformly random ones."""
        if self.routing == "random":
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            return torch.rand(logits.shape, generator=self._generator).topk(self.top_k, -1).indices
        return logits.topk(self.top_k, -1).indices

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (tokens, hidden)
        logits = self.router(flat)  # (tokens, E)
        if self.keep:
            self.last = flat, logits
        chosen = self.choose(flat, logits)
        mask = torch.zeros_like(logits).scatter_(-1, chosen, 1.0)  # (tokens, E)
        gates = None
        if self.straight_through and torch.is_grad_enabled():
            probs = logits.softmax(-1)
            gates = mask - probs.detach() + probs  # value 1 on chosen experts, gradient of the softmax
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = mask[:, e].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            self._tokens[e] += rows.numel()
            y = expert(flat[rows])
            out = out.index_add(0, rows, y if gates is None else y * gates[rows, e : e + 1].to(y.dtype))
        return (out * (self.num_experts / self.top_k)).reshape(shape)

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert on every token (``tokens, E, hidden``); their sum is the dense FFN's output."""
        flat = x.reshape(-1, x.shape[-1])
        return torch.stack([expert(flat) for expert in self.experts], 1)

    def reset_counts(self) -> None:
        self._tokens.zero_()

    def load_fractions(self) -> Tensor:
        """Share of routed token slots each expert took since ``reset_counts``."""
        return self._tokens.float() / self._tokens.sum().clamp(min=1)

    @contextlib.contextmanager
    def all_experts(self) -> Iterator[None]:
        """Every expert on every token: the dense FFN (FactorLLM's teacher) without a second copy."""
        saved, saved_routing = self.top_k, self.routing
        self.top_k, self.routing = self.num_experts, "learned"
        try:
            yield
        finally:
            self.top_k, self.routing = saved, saved_routing


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}


def selected_moe_layers(model: nn.Module, where: Selection, method: str) -> dict[str, MoEFeedForward]:
    """The MoE blocks whose names ``where``'s include / exclude patterns keep (its type filter is for Linears)."""
    found = moe_layers(model)
    if not found:
        raise ValueError(f"{method} needs a mixture-of-experts model: run factorllm before it in `methods`")
    chosen = Selection(include=where.include, exclude=where.exclude, types=["MoEFeedForward"]).resolve(model)
    return {name: moe for name, moe in found.items() if name in chosen}


@contextlib.contextmanager
def dense_teacher(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every MoE block running all its experts (the dense model it was factorized from)."""
    with contextlib.ExitStack() as stack:
        for moe in moe_layers(model).values():
            stack.enter_context(moe.all_experts())
        yield model


def prior_labels(expert_out: Tensor, top_k: int) -> Tensor:
    """FactorLLM's pseudo-labels (``tokens, E``, k-hot): per token, the k experts whose own output is closest
    (MSE) to the dense output divided by ``E / k``."""
    experts = expert_out.shape[1]
    target = expert_out.sum(1, keepdim=True) / (experts / top_k)  # (tokens, 1, hidden)
    mse = (expert_out - target).pow(2).mean(-1)  # (tokens, E)
    return torch.zeros_like(mse).scatter_(-1, (-mse).topk(top_k, -1).indices, 1.0)


def prior_approximate_loss(logits: Tensor, labels: Tensor, eps: float = 1e-7) -> Tensor:
    """FactorLLM's route loss: ``KL(softmax(logits) || softmax(labels))`` per token, averaged (the official
    ``DistillLoss``, with its clipping)."""
    p = logits.float().softmax(-1).clamp(eps, 1 - eps)
    q = labels.float().softmax(-1).clamp(eps, 1 - eps)
    return (p * (p / q).log()).sum(-1).mean()


def balance_loss(logits: Tensor, top_k: int) -> Tensor:
    """FactorLLM's balance term ``mean(topk_mask * softmax(logits))``."""
    probs = logits.float().softmax(-1)
    mask = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, -1).indices, 1.0)
    return (mask * probs).mean()


def active_ffn_fraction(model: nn.Module) -> float | None:
    """Mean ``top_k / E`` over the MoE blocks (the share of FFN FLOPs a token uses), None without any."""
    layers = list(moe_layers(model).values())
    return sum(m.top_k / m.num_experts for m in layers) / len(layers) if layers else None
