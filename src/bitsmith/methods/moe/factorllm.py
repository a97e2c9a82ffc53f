"""FactorLLM (Zhao et al., 2024, "FactorLLM: Factorizing Knowledge via Mixture of Experts for Large Language
Models"): a dense LLM's FFNs split into experts with a top-k router, trained against the dense teacher.

Spec: ``shared/methods/factorllm.md``; official code ``zhenwuweihe/FactorLLM`` (``new_model_KD.py``,
``loss.py``, ``train.py``). Each decoder block's FFN becomes a ``bitsmith.methods.moe.experts.MoEFeedForward``: ``experts``
contiguous slices of its intermediate neurons (no new weights; all experts on = the dense FFN exactly), a
linear router, the top ``top_k`` experts per token (default ``experts / 2``), output ``(E / k) * sum`` of the
chosen experts. The Prior-Approximate (PA) loss: per token, the k experts whose own output is closest (MSE) to
the dense output divided by ``E / k`` are the pseudo-label, and the route loss is the official ``DistillLoss``
``KL(softmax(logits) || softmax(label))``, weight ``route_weight`` 0.05; the balance loss
``mean(topk_mask * softmax(logits))``, weight ``balance_weight`` 0.01.

Training, in two stages, both on the calibration windows:
1. ``router_steps`` (PA stage): block by block (the sequential runner; each block's inputs come from the
   already-factorized blocks before it), the router is trained on that block's FFN inputs with the PA and
   balance losses. The experts are frozen here, so the pseudo-labels are fixed per token.
2. ``steps`` (end-to-end): the logits' KL to the dense teacher (the model with all experts on: the same model
   while only routers train; with ``train_experts`` a frozen copy made before the stage, so the teacher never
   drifts) plus the PA and balance losses of every block; routers get gradients through the hard top-k by a
   straight-through softmax; the experts too with ``train_experts``. FFNs with biases are refused (the
   experts hold none).
``prior_loss: false`` drops the PA stage and the PA term (the ablation); ``routing: random`` picks k experts
uniformly at random per token (the baseline; nothing is trained).

Deviations: the official code trains end to end with the LM loss (its KD and PA terms are wired in
``validation_step``; the router there gets no gradient through its hard top-k) for epochs of SlimPajama on
TinyLlama; bitsmith adds the layer-local PA stage, uses the dense teacher's logits (KD) instead of the LM
loss in stage 2, and the student's own FFN inputs (not the teacher's) for the pseudo-labels, all within a
CPU budget of a few hundred steps. Contiguous slices only (the constrained k-means of the code's comments is
not used there either).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import token_windows
from bitsmith.finetune import only_trainable
from bitsmith.method import Method, register_method
from bitsmith.methods.moe.experts import (
    MoEFeedForward,
    balance_loss,
    check_moe_shape,
    dense_teacher,
    moe_layers,
    prior_approximate_loss,
    prior_labels,
)
from bitsmith.progress import log
from bitsmith.select import Selection
from bitsmith.sequential import BlockInputs, module_inputs, sequential
from bitsmith.swap import set_submodule
from bitsmith.topology import DecoderTopology, topology_of

ROUTER_BATCH = 1024  # tokens per PA-stage step


def ffn_names(model: nn.Module, where: Selection) -> list[str]:
    """The decoder blocks' FFN modules that ``where``'s include / exclude patterns keep."""
    topology = topology_of(model)
    names = [f"{name}.{topology.ffn}" for name, _ in topology.blocks(model)]
    chosen = Selection(include=where.include, exclude=where.exclude, types=["Module"]).resolve(model)
    kept = [n for n in names if n in chosen]
    if not kept:
        raise ValueError(f"factorllm: `where` keeps none of the FFN modules {names[:3]}...")
    return kept


def kd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(teacher || student)`` of the next-token distributions, per token."""
    t = teacher.float().log_softmax(-1)
    return F.kl_div(student.float().log_softmax(-1).flatten(0, -2), t.flatten(0, -2), log_target=True,
                    reduction="batchmean")  # fmt: skip


def train_router(moe: MoEFeedForward, x: Tensor, steps: int, lr: float, route_weight: float, balance_weight: float,
                 generator: torch.Generator) -> float:  # fmt: skip
    """PA stage on FFN inputs ``x`` (``tokens, hidden``): pseudo-labels from the frozen experts, then the router
    alone (Adam). Returns the share of pseudo-label experts the trained router's top-k picks."""
    k = moe.top_k
    with torch.no_grad():
        labels = torch.cat([prior_labels(moe.expert_outputs(c), k) for c in x.split(ROUTER_BATCH)])
    optimizer = torch.optim.Adam(moe.router.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (min(ROUTER_BATCH, x.shape[0]),), generator=generator)
        logits = moe.router(x[rows])
        loss = route_weight * prior_approximate_loss(logits, labels[rows]) + balance_weight * balance_loss(logits, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hit = torch.zeros_like(labels).scatter_(-1, moe.router(x).topk(k, -1).indices, 1.0)
    return float((hit * labels).sum() / labels.sum())


@register_method("factorllm")
@dataclass
class FactorLLM(Method):
    """Dense FFNs split into experts with a top-k router trained by the Prior-Approximate loss (+ KD)."""

    description = "FactorLLM: dense FFN -> top-k mixture of experts, router trained with the prior-approximate loss"

    experts: Annotated[int, Field(ge=2)] = 4
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: experts / 2
    routing: Literal["learned", "random"] = "learned"
    prior_loss: bool = True
    router_steps: Annotated[int, Field(ge=0)] = 200  # PA stage, per block
    router_lr: Annotated[float, Field(gt=0)] = 1e-2
    router_tokens: Annotated[int, Field(ge=1)] = 8192  # calibration tokens per block in the PA stage
    steps: Annotated[int, Field(ge=0)] = 0  # end-to-end stage
    lr: Annotated[float, Field(gt=0)] = 1e-3
    train_experts: bool = False
    route_weight: Annotated[float, Field(ge=0)] = 0.05
    balance_weight: Annotated[float, Field(ge=0)] = 0.01
    seed: int = 0

    @property
    def k(self) -> int:
        return self.top_k or max(1, self.experts // 2)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = {}
        for name in ffn_names(model, self.where):
            ffn = model.get_submodule(name)
            check_moe_shape(ffn.gate_proj.out_features, self.experts, self.k)
            moe = MoEFeedForward.from_dense(ffn, self.experts, self.k, self.routing, self.seed)
            set_submodule(model, name, moe)
            specs[name] = moe.spec()
        return specs

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        if self.routing == "random":
            return
        batches = list(batches)
        if self.prior_loss and self.router_steps:
            self._stats = sequential(model, batches, self._train_router, "factorllm").__dict__
        if self.steps:
            windows = token_windows(batches)
            if not windows:
                raise ValueError("factorllm: the end-to-end stage needs token windows to train on")
            self.history = self.finetune(model, windows)

    def _train_router(self, name: str, block: nn.Module, inputs: BlockInputs, topology: DecoderTopology) -> None:
        """PA stage for one block: fixed pseudo-labels from the frozen experts, then the router alone."""
        moe = block.get_submodule(topology.ffn)
        if not isinstance(moe, MoEFeedForward):
            return
        x = torch.cat([h.reshape(-1, h.shape[-1]) for h in module_inputs(block, inputs, moe)]).float()
        generator = torch.Generator().manual_seed(self.seed)
        if x.shape[0] > self.router_tokens:
            x = x[torch.randperm(x.shape[0], generator=generator)[: self.router_tokens]]
        agreement = train_router(moe, x, self.router_steps, self.router_lr, self.route_weight, self.balance_weight,
                                 generator)  # fmt: skip
        log.info(f"factorllm: {name} router matches {100 * agreement:.1f} % of the pseudo-label experts")

    def finetune(self, model: nn.Module, windows: list[Tensor]) -> list[float]:
        """End-to-end stage: KD to the dense teacher + PA + balance; routers (and experts) trained."""
        layers = list(moe_layers(model).values())
        trainable = [p for m in layers for p in (m.parameters() if self.train_experts else m.router.parameters())]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=1e-5)
        # the dense teacher is the model with all experts on; trained experts would move it, so it is a frozen copy
        teacher_model = copy.deepcopy(model).eval() if self.train_experts else model
        history: list[float] = []
        try:
            for moe in layers:
                moe.straight_through, moe.keep = True, True
            model.eval()  # no dropout; the teacher and the student see the same network
            with only_trainable(model, trainable):
                for step in range(self.steps):
                    ids = windows[step % len(windows)]
                    with torch.no_grad(), dense_teacher(teacher_model):
                        teacher = teacher_model(input_ids=ids).logits
                    loss = kd_loss(model(input_ids=ids).logits, teacher) + self._router_terms(layers)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    history.append(float(loss.detach()))
                    if (step + 1) % 10 == 0 or step + 1 == self.steps:
                        recent = history[-10:]
                        log.info(f"factorllm: step {step + 1}/{self.steps}, loss {sum(recent) / len(recent):.4f}")
        finally:
            for moe in layers:
                moe.straight_through, moe.keep, moe.last = False, False, None
        return history

    def _router_terms(self, layers: list[MoEFeedForward]) -> Tensor:
        total = torch.zeros(())
        for moe in layers:
            if moe.last is None:
                continue
            x, logits = moe.last
            total = total + self.balance_weight * balance_loss(logits, self.k)
            if self.prior_loss:
                with torch.no_grad():
                    labels = prior_labels(moe.expert_outputs(x.detach()), self.k)
                total = total + self.route_weight * prior_approximate_loss(logits, labels)
        return total / max(len(layers), 1)
