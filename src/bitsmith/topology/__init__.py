"""Topology adapters: the only place that knows a model family — where its decoder blocks are, which
norm or linear feeds which linears, and how a per-channel scale is folded into that feeder. Methods ask
``topology_of(model)``; they never test model classes themselves. One small file per family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Group:
    """Linears fed by one tensor: the output of ``prev`` (a norm or a linear in the block). ``inspect`` is the
    block module whose output AWQ compares (the attention or the MLP; the linears themselves when empty)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str = ""


@dataclass(frozen=True)
class DecoderTopology:
    """A decoder-only transformer family. ``groups`` are in execution order within a block; a group whose
    ``prev`` is a linear applies only when the shapes chain (``v_proj -> o_proj`` without grouped-query
    attention). ``norm_offset`` is 1 where a norm's gain is ``1 + weight`` (Gemma)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    groups: tuple[Group, ...]
    norm_offset: float = 0.0
    ffn: str = "mlp"  # the block's feed-forward module (FactorLLM splits it into experts)
    writers: tuple[str, ...] = ()  # the linears whose outputs are added to the residual stream (PAT's HSM sites)
    final_norm: str = "model.norm"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, block)`` of every decoder block, in order."""
        prefix = self._prefix(model)
        layers = model.get_submodule(prefix + self.layers)
        return [(f"{prefix}{self.layers}.{i}", block) for i, block in enumerate(layers)]

    def _prefix(self, model: nn.Module) -> str:
        names = dict(model.named_modules())
        for prefix in ("", "model.", "base_model.model.", "base_model.model.model."):
            if prefix + self.layers in names:
                return prefix
        raise ValueError(f"{type(model).__name__}: no '{self.layers}' module list; not a {self.family} model")

    def block_groups(self, block: nn.Module) -> list[Group]:
        """The groups that apply to ``block`` (a linear feeder only when its outputs are the linears' inputs)."""
        out = []
        for group in self.groups:
            prev = block.get_submodule(group.prev)
            first = block.get_submodule(group.linears[0])
            if isinstance(prev, nn.Linear) and prev.weight.shape[0] != first.weight.shape[1]:
                continue  # grouped-query attention: v_proj's outputs are not o_proj's inputs one to one
            out.append(group)
        return out

    def sequential_order(self, block: nn.Module) -> list[tuple[str, ...]]:
        """The block's linears in groups that run one after another (GPTQ's true-sequential order)."""
        return [group.linears for group in self.groups]

    @torch.no_grad()
    def divide_feeder(self, block: nn.Module, group: Group, scales: Tensor) -> None:
        """Divide the feeder's output channels by ``scales``: a norm's gain, or a linear's output rows."""
        prev = block.get_submodule(group.prev)
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scales.view(-1, 1))
            if prev.bias is not None:
                prev.bias.div_(scales)
            return
        offset = self.norm_offset
        prev.weight.copy_((prev.weight + offset) / scales - offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)


_ATTENTION = Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
_OUTPUT = Group("self_attn.v_proj", ("self_attn.o_proj",))
_DOWN = Group("mlp.up_proj", ("mlp.down_proj",))

TOPOLOGIES = {
    "llama": DecoderTopology(
        "llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers",
        (_ATTENTION, _OUTPUT, Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), _DOWN),
        writers=("self_attn.o_proj", "mlp.down_proj"),
    ),
    "gemma": DecoderTopology(
        "gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers",
        (_ATTENTION, _OUTPUT, Group("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), _DOWN),
        norm_offset=1.0,  # no ``writers``: Gemma's post-norms sit between the writers and the residual stream
    ),
}  # fmt: skip


def _adapter(model: nn.Module) -> DecoderTopology | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((t for t in TOPOLOGIES.values() if model_type in t.model_types), None)


def has_topology(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder family with an adapter (its methods then calibrate block by block)."""
    return _adapter(model) is not None


def topology_of(model: nn.Module) -> DecoderTopology:
    """The adapter of ``model``'s family, from its Hugging Face ``config.model_type``."""
    topology = _adapter(model)
    if topology is not None:
        return topology
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = sorted(t for topology in TOPOLOGIES.values() for t in topology.model_types)
    raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no topology adapter; "
                     f"supported model types: {known}")  # fmt: skip
