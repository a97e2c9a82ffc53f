"""Dynamic mix-precision routing (Li et al., 2026, "Dynamic Mix Precision Routing for Efficient Multi-step LLM
Interaction", seed abstract): a router picks, per token (per decoding step), a high- or a low-precision model.

Here both models are readings of one MoBiQuant model (``[mobiquant, precision_routing]``), so they share their
storage: ``high_slices`` and ``low_slices`` of the same codes. A ``TokenRoutedBlock`` wraps decoder block
``router_block``; from each token's hidden state there it predicts how sensitive the token is, and that block and
every later one read ``high_slices`` for sensitive tokens and ``low_slices`` for the rest (blocks before it read
``high_slices``: the router's features come from them). The router is trained the seed's first way: supervised
on the KL divergence between the high- and low-precision models' next-token distributions at each calibration
token (a regression of ``log KL``). ``high_fraction`` is the operating point: the share of tokens routed high,
turned into a score threshold from the calibration tokens' scores (``set_high_fraction`` changes it later).

Deviations: the seed routes per decision step of an agent between two separately quantized LLMs and refines the
router with GRPO on task success; bitsmith routes per token between two readings of one model, with the
supervised KL stage only (no reward to optimise on text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import token_windows
from bitsmith.method import Method, eval_mode, register_method
from bitsmith.methods.llm.routing import TOKEN_SLICES, routed_layers
from bitsmith.nn import register_compressed
from bitsmith.progress import log
from bitsmith.swap import set_submodule
from bitsmith.topology import topology_of

QUANTILES = 101


@register_compressed
class TokenRoutedBlock(nn.Module):
    """A decoder block that first routes each token to ``high`` or ``low`` slices for itself and later blocks."""

    def __init__(self, block: nn.Module, hidden_size: int, hidden: int, low: int, high: int) -> None:
        super().__init__()
        self.block, self.low, self.high, self.hidden = block, low, high, hidden
        self.scorer = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("quantiles", torch.zeros(QUANTILES))  # calibration scores, for set_high_fraction

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)  # model code may read the block's attributes (Gemma: attention_type)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "hidden_size": self.scorer[0].in_features, "hidden": self.hidden,
                "low": self.low, "high": self.high}  # fmt: skip

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> TokenRoutedBlock:
        return cls(module, int(spec["hidden_size"]), int(spec["hidden"]), int(spec["low"]), int(spec["high"]))

    def to_float(self) -> nn.Module:
        return self.block

    def scores(self, hidden_states: Tensor) -> Tensor:
        """Predicted ``log KL`` per token (``batch, seq``)."""
        return self.scorer(hidden_states.float()).squeeze(-1)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            high = self.scores(hidden_states) > self.threshold
        TOKEN_SLICES.set(torch.where(high, self.high, self.low))
        return self.block(hidden_states, *args, **kwargs)

    def set_high_fraction(self, fraction: float) -> None:
        """Route about ``fraction`` of tokens (as on the calibration text) to ``high``."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"high_fraction must be in [0, 1], got {fraction}")
        index = round((1 - fraction) * (QUANTILES - 1))
        self.threshold.fill_(float(self.quantiles[index]) if 0 < fraction < 1 else (-1e30 if fraction == 1 else 1e30))


def token_router(model: nn.Module) -> TokenRoutedBlock:
    found = [m for m in model.modules() if isinstance(m, TokenRoutedBlock)]
    if not found:
        raise ValueError("this model has no token precision router (run precision_routing after mobiquant)")
    return found[0]


def log_probs_at(model: nn.Module, ids: Tensor, slices: int) -> Tensor:
    """Next-token log-probabilities of ``model`` with every token-routed layer read at ``slices`` slices."""
    TOKEN_SLICES.set(None)
    for layer in routed_layers(model):
        if layer.follows_tokens:
            layer.weight_q.active, layer.routing = slices, False  # type: ignore[union-attr]
    return F.log_softmax(model(input_ids=ids).logits.float(), -1)


@register_method("precision_routing")
@dataclass
class PrecisionRouting(Method):
    """Per-token routing between two readings of a MoBiQuant model, trained on the KL between them."""

    description = "Dynamic precision routing: per token, high or low slices of a MoBiQuant model (KL-trained router)"

    low_slices: Annotated[int, Field(ge=1)] = 2
    high_slices: Annotated[int, Field(ge=1)] = 3
    router_block: Annotated[int, Field(ge=0)] = 1
    hidden: Annotated[int, Field(ge=1)] = 32
    steps: Annotated[int, Field(ge=0)] = 300
    lr: Annotated[float, Field(gt=0)] = 0.01
    windows: Annotated[int, Field(ge=1)] = 16  # calibration windows whose tokens train the router
    high_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if self.high_slices <= self.low_slices:
            raise ValueError(f"precision_routing: high_slices ({self.high_slices}) must exceed low_slices")
        blocks = topology_of(model).blocks(model)
        if not self.router_block < len(blocks):
            raise ValueError(f"precision_routing: router_block {self.router_block}; the model has {len(blocks)} blocks")
        layers = routed_layers(model)
        if not layers:
            raise ValueError("precision_routing needs a MoBiQuant model: list mobiquant before it in `methods`")
        stored = min(layer.weight_q.slices for layer in layers)  # type: ignore[union-attr]
        if self.high_slices > stored:
            raise ValueError(
                f"precision_routing: high_slices {self.high_slices}; the model stores {stored}: use 2..{stored}"
            )
        followers = {id(m) for _, block in blocks[self.router_block :] for m in block.modules()}
        for layer in layers:
            layer.follows_tokens = id(layer) in followers
            if not layer.follows_tokens:
                layer.weight_q.active, layer.routing = self.high_slices, False  # type: ignore[union-attr]
        name, block = blocks[self.router_block]
        hidden_size = int(model.config.hidden_size)
        routed = TokenRoutedBlock(block, hidden_size, self.hidden, self.low_slices, self.high_slices)
        set_submodule(model, name, routed)
        routed_ids = {id(m) for m in layers}
        return {name: routed.spec(), **{n: m.spec() for n, m in model.named_modules() if id(m) in routed_ids}}

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        router = token_router(model)
        ids = token_windows(list(batches))[: self.windows]
        features, targets = [], []
        handle = router.register_forward_pre_hook(lambda m, args: features.append(args[0].detach().float()[0]))
        try:
            with eval_mode(model), torch.no_grad():
                for row in ids:
                    high = log_probs_at(model, row, self.high_slices)
                    low = log_probs_at(model, row, self.low_slices)
                    features.pop()  # the low pass's copy (the same hidden states: earlier blocks read high)
                    targets.append(torch.log((high.exp() * (high - low)).sum(-1)[0].clamp(min=1e-8)))
        finally:
            handle.remove()
        x, y = torch.cat(features), torch.cat(targets)
        optimizer = torch.optim.Adam(router.scorer.parameters(), lr=self.lr)
        loss = torch.zeros(())
        for _ in range(self.steps):
            loss = (router.scores(x) - y).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        router.scorer.requires_grad_(False)
        with torch.no_grad():
            router.quantiles.copy_(torch.quantile(router.scores(x), torch.linspace(0, 1, QUANTILES)))
        router.set_high_fraction(self.high_fraction)
        for layer in routed_layers(model):
            layer.routing = layer.follows_tokens or layer.router is not None
        log.info(f"precision_routing: router fit on {len(y)} tokens, final MSE of log KL {float(loss):.3f} "
                 f"(variance {float(y.var()):.3f})")  # fmt: skip
