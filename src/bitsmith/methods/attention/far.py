"""FAR (Ren, Collins, Hu et al., "Is Attention Required for Transformer Inference? Explore Function-preserving
Attention Replacement"): the chosen self-attention blocks of a pretrained transformer become multi-head
bidirectional LSTMs (:class:`bitsmith.nn.LSTMAttention`), trained to preserve each block's function; then the
LSTMs' hidden units are pruned globally to a parameter target.

Official code (read, not copied): ``LstmBlock`` / ``MultiHeadLstmBlock`` (``pre_proj``, a BiLSTM masked
block-diagonal by head with ``head_dim`` units per head, ``proj``), ``train.py`` (loss ``combine``: cross-entropy
plus, per replaced block, ``CosineSimilarityLoss`` between the student's and the teacher's block outputs;
``compute_lstm_reg``: DeepHoyer's group Hoyer-square over each hidden unit's input rows, recurrent rows and
columns and output-projection column, ``--reg 3 --decay 1e-4``). Steps here:

1. ``prepare``: every chosen attention is replaced (``hidden`` units per head; default the head width, as
   official); a frozen copy of the original model is the teacher.
2. ``calibrate`` — block-wise distillation: replacement ``i``, in block order, learns the original attention's
   output on its own inputs (those the already replaced blocks before it produce; relative MSE over real
   tokens, ``distill_steps`` Adam steps per block); then ``joint_steps`` steps train every replacement together
   on the official similarity loss, the sum over replaced blocks of ``1 - cos`` between the student's and the
   teacher's block outputs, per token.
3. training (the recipe's ``train``), end to end: the task loss plus ``block_weight`` x that block loss
   (official ``combine``) plus, with ``keep`` < 1 and before pruning, ``decay`` x each LSTM's group
   Hoyer-square.
4. pruning, after training epoch ``prune_epoch`` (or at ``finalize`` if training never reached it): hidden units
   leave globally, smallest group L2 norm first, until the replacements hold at most ``keep`` of their
   parameters; training continues with the smaller LSTMs.

Deviations, stated: the block-wise step distils the attention output on the block's own input (official:
every replaced attention trained at once through the whole model on the ``combine`` loss; its later code
matches the attention outputs); pruning stops at a parameter target instead of zeroing weights below the
official ``sensitivity`` 1e-4; a unit's forward and backward directions leave together (``nn.LSTM`` needs equal
widths) and every head keeps at least one unit; in a Hugging Face encoder the LSTM replaces the self-attention
(queries, keys, values, softmax) and the encoder's own output projection stays after ``proj``; Adam at ``lr``
with no schedule in calibration (official: AdamW, cosine schedule, ImageNet epochs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import padding_mask
from bitsmith.distill import OutputRecorder, first, frozen_copy, teacher_outputs
from bitsmith.eval.attention import attention_sparsity
from bitsmith.method import Method, eval_mode, register_method, run_forward
from bitsmith.nn.encoder_tokens import PrunedEncoder
from bitsmith.nn.recurrent import LSTMAttention, lstm_attention_params, real_lengths
from bitsmith.nn.tokens import SELECTIONS
from bitsmith.swap import set_submodule
from bitsmith.topology.attention import AttentionSite, attention_sites


def cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over (real) tokens of ``1 - cos(student, teacher)`` along the channels."""
    loss = 1 - nn.functional.cosine_similarity(student, teacher, dim=-1)  # (batch, tokens)
    return loss.mean() if mask is None else (loss * mask).sum() / mask.sum().clamp(min=1)


def hoyer_square(groups: list[Tensor]) -> Tensor:
    """DeepHoyer's group Hoyer-square over hidden units: ``(sum_u ||w_u||)^2 / sum_u ||w_u||^2``."""
    norms = torch.cat([group.norm(dim=1) for group in groups])
    return norms.sum() ** 2 / (norms.pow(2).sum() + 1e-6)


@register_method("far")
@dataclass
class FAR(Method):
    """Attention blocks replaced by multi-head BiLSTMs, distilled block by block, optionally pruned."""

    description = "FAR: attention replaced by multi-head BiLSTMs (block-wise distillation, global unit pruning)"

    blocks: list[int] | Literal["all", "sparsest", "densest"] = "all"
    count: Annotated[int, Field(ge=1)] = 1
    hidden: Annotated[int, Field(ge=1)] | None = None
    distill_steps: Annotated[int, Field(ge=0)] = 300
    joint_steps: Annotated[int, Field(ge=0)] = 100
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    block_weight: Annotated[float, Field(ge=0.0)] = 1.0
    keep: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    decay: Annotated[float, Field(ge=0.0)] = 1e-4
    prune_epoch: Annotated[int, Field(ge=1)] = 1
    seed: int = 0

    # -- replacement ----------------------------------------------------------------------------
    def chosen_sites(self, model: nn.Module) -> list[AttentionSite]:
        """The sites named by ``blocks`` (none yet for ``sparsest`` / ``densest``: calibration measures them)."""
        sites = attention_sites(model)
        if self.blocks == "all":
            return sites
        if self.blocks in ("sparsest", "densest"):
            if self.count > len(sites):
                raise ValueError(f"far: count {self.count} — the model has {len(sites)} attention blocks; "
                                 f"choose 1..{len(sites)}")  # fmt: skip
            return []
        bad = [i for i in self.blocks if not 0 <= i < len(sites)]
        if bad or not self.blocks:
            raise ValueError(f"far: blocks {self.blocks} — the model has {len(sites)} attention blocks; "
                             f"choose indices in 0..{len(sites) - 1}, or 'all'")  # fmt: skip
        return [sites[i] for i in sorted(set(self.blocks))]

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._teacher = frozen_copy(model)
        self._pruned = False
        return self.replace(model, self.chosen_sites(model))

    def replace(self, model: nn.Module, sites: list[AttentionSite]) -> dict[str, dict[str, Any]]:
        """Put a fresh ``LSTMAttention`` in place of each of ``sites``."""
        if any(isinstance(m, PrunedEncoder) for m in model.modules()):
            raise ValueError("far: this text encoder drops tokens (sqap); distilling its layers behind the pruning is "
                             "not supported (the block loss masks by the full sentences): prune after FAR, or a ViT")  # fmt: skip
        for site in sites:
            pruner = getattr(model.get_submodule(site.block), "pruner", None)
            if pruner is not None and pruner.mode in ("attention", *SELECTIONS):
                raise ValueError(f"far: block {site.index}'s attention chooses the tokens its pruner keeps (mode "
                                 f"{pruner.mode!r}); replace blocks after it")  # fmt: skip
        self._sites, self._full_params = sites, 0
        specs = {}
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for site in self._sites:
                mixer = self.mixer(site, [self.hidden or site.dim // site.heads] * site.heads)
                set_submodule(model, site.site, mixer)
                self._full_params += sum(p.numel() for p in mixer.parameters())
                specs[site.site] = mixer.spec()
        self._hidden = {site.site: model.get_submodule(site.site).hidden for site in self._sites}
        self._student = OutputRecorder(model, [site.block for site in self._sites])
        return specs

    @staticmethod
    def mixer(site: AttentionSite, hidden: list[int]) -> LSTMAttention:
        """A fresh ``LSTMAttention`` for ``site`` with ``hidden`` units per head."""
        return LSTMAttention(site.dim, site.heads, hidden, site.out_dim, site.returns_tuple)

    def mixers(self, model: nn.Module) -> list[LSTMAttention]:
        return [model.get_submodule(site.site) for site in self._sites]  # type: ignore[misc]

    # -- the block loss -------------------------------------------------------------------------
    def block_loss(self, batch: Any) -> Tensor:
        """Sum over replaced blocks of the per-token ``1 - cos`` between the last training forward's block outputs
        and the teacher's on ``batch`` (zero when no training forward was recorded)."""
        student = self._student.take()
        if not student:
            return torch.zeros(())
        teacher, _ = teacher_outputs(self._teacher, list(student), batch)
        mask = padding_mask(batch)
        return sum((cosine_loss(student[name], teacher[name], mask) for name in student), torch.zeros(()))

    # -- calibration: block-wise distillation, then all replacements together --------------------
    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        if self.blocks in ("sparsest", "densest") and not self._sites:
            self.replace(model, self.by_sparsity(model, batches))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for site in self._sites:
                self.distill_block(model, site, batches)
            self.distill_jointly(model, batches)

    def by_sparsity(self, model: nn.Module, batches: list[Any]) -> list[AttentionSite]:
        """The ``count`` sites whose attention is sparsest (lowest normalised entropy on ``batches``; ``densest``:
        highest), in block order."""
        entropy = [layer["entropy"] for layer in attention_sparsity(model, batches).values()]
        ranked = sorted(range(len(entropy)), key=lambda i: entropy[i], reverse=self.blocks == "densest")
        self._entropy = entropy
        sites = attention_sites(model)
        return [sites[i] for i in sorted(ranked[: self.count])]

    def distill_block(self, model: nn.Module, site: AttentionSite, batches: list[Any]) -> None:
        mixer = model.get_submodule(site.site)
        original = self._teacher.get_submodule(site.site)
        samples: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]] = []

        def grab(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            x, mask = args[0].detach(), kwargs.get("attention_mask")
            target = first(original(x, attention_mask=mask) if site.returns_tuple else original(x))
            lengths = real_lengths(mask, x.shape[0], x.shape[1])
            real = None if lengths is None else torch.arange(x.shape[1]) < lengths[:, None]
            samples.append((x, mask, target.detach(), real))

        hook = mixer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad(), eval_mode(model):
                for batch in batches:
                    run_forward(model, batch)
        finally:
            hook.remove()
        optimizer = torch.optim.Adam(mixer.parameters(), lr=self.lr)
        for step in range(self.distill_steps if samples else 0):
            x, mask, target, real = samples[step % len(samples)]
            out = first(mixer(x, attention_mask=mask))
            error = (out - target).pow(2).sum(-1) / target.pow(2).sum(-1).mean().clamp(min=1e-12)
            loss = error.mean() if real is None else (error * real).sum() / real.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def distill_jointly(self, model: nn.Module, batches: list[Any]) -> None:
        if not self.joint_steps or not batches:
            return
        trainable = [p for mixer in self.mixers(model) for p in mixer.parameters()]
        ids = {id(p) for p in trainable}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(trainable, lr=self.lr)
        try:
            with eval_mode(model):
                for step in range(self.joint_steps):
                    batch = batches[step % len(batches)]
                    run_forward(model, batch)
                    loss = self.block_loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # -- training -----------------------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        loss = self.block_weight * self.block_loss(batch) if self.block_weight else torch.zeros(())
        if self.keep < 1 and not self._pruned and self.decay:
            loss = loss + self.decay * sum((hoyer_square(m.unit_groups()) for m in self.mixers(model)), torch.zeros(()))
        self._student.take()
        return loss

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if self.keep < 1 and not self._pruned and epoch >= self.prune_epoch:
            self.prune(model)
            return True
        return False

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        for site in self._sites:  # the widths the run had reached (weights load next)
            hidden = self._hidden[site.site]
            if model.get_submodule(site.site).hidden != hidden:
                set_submodule(model, site.site, self.mixer(site, hidden))

    def finalize(self, model: nn.Module) -> None:
        if self.keep < 1 and not self._pruned:
            self.prune(model)
        self._student.remove()

    # -- pruning ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model: nn.Module) -> None:
        """Remove the hidden units of smallest group norm, over every replacement at once, until the replacements
        hold at most ``keep`` of their original parameters (each head keeps one unit)."""
        mixers = dict(zip([s.site for s in self._sites], self.mixers(model), strict=True))
        units = sorted((float(norm), name, head, unit)
                       for name, mixer in mixers.items()
                       for head, group in enumerate(mixer.unit_groups())
                       for unit, norm in enumerate(group.norm(dim=1)))  # fmt: skip
        hidden = {name: list(mixer.hidden) for name, mixer in mixers.items()}
        keep = {name: [torch.ones(h, dtype=torch.bool) for h in mixer.hidden] for name, mixer in mixers.items()}

        def params() -> int:
            return sum(lstm_attention_params(m.dim, m.heads, hidden[n], m.out_dim) for n, m in mixers.items())

        for _, name, head, unit in units:
            if params() <= self.keep * self._full_params:
                break
            if hidden[name][head] > 1:
                hidden[name][head] -= 1
                keep[name][head][unit] = False
        for name, mixer in mixers.items():
            mixer.remove_units(keep[name])
        self._hidden = hidden
        self._pruned = True

    def state_dict(self) -> dict[str, Any]:
        skip = ("_teacher", "_student", "_sites")
        return {k: v for k, v in super().state_dict().items() if k not in skip}
