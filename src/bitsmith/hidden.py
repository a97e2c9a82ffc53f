"""Physical removal of hidden (residual-stream) channels of a decoder LLM: PAT's merge step and the post-hoc
channel-pruning baselines.

A channel that every residual writer (the embedding, each block's attention output and FFN output projection)
leaves at zero is zero everywhere in the residual stream, so it can be deleted: the embedding's column, the
writers' output rows, the readers' input columns (q / k / v, gate / up, the LM head) and the norms' entries.
RMSNorm averages over the hidden size, so the kept norms' gains are multiplied by ``sqrt(d / d')`` and their
epsilon by ``d / d'``: the smaller model computes exactly what the masked one did.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bitsmith.swap import set_submodule
from bitsmith.topology import DecoderTopology, Group, has_topology, topology_of


def hidden_topology(model: nn.Module) -> DecoderTopology:
    topology = topology_of(model)
    if not topology.writers:
        raise ValueError(f"hidden-dimension pruning supports {['llama', 'mistral', 'qwen2', 'qwen3']} models; "
                         f"{topology.family} has norms between its residual writers and the stream")  # fmt: skip
    return topology


def _norm_groups(block: nn.Module, topology: DecoderTopology) -> list[Group]:
    """The block's groups fed by a norm of the residual stream (not by another linear)."""
    return [g for g in topology.groups if not isinstance(block.get_submodule(g.prev), nn.Linear)]


def reader_names(block: nn.Module, topology: DecoderTopology) -> list[str]:
    """The block's linears that read a norm of the residual stream (their input columns are hidden channels)."""
    return [name for group in _norm_groups(block, topology) for name in group.linears]


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    layer.weight.data = weight.contiguous()
    if bias is not None:
        layer.bias.data = bias.contiguous()
    return layer


@torch.no_grad()
def remove_hidden_channels(model: nn.Module, keep: Tensor) -> nn.Module:
    """Delete the hidden channels where ``keep`` (bool, ``hidden``) is False, in place. Exact when those channels
    are zero in the residual stream (every writer's rows there are zero)."""
    topology = hidden_topology(model)
    embed = model.get_input_embeddings()
    hidden = embed.weight.shape[1]
    if keep.shape != (hidden,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask of the {hidden} hidden channels; got {tuple(keep.shape)}")
    kept = int(keep.sum())
    if not 1 <= kept <= hidden:
        raise ValueError(f"at least one hidden channel must stay (the model has {hidden})")
    index = keep.nonzero().squeeze(1)
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight[:, index].contiguous())
    embed.embedding_dim = kept
    gain = math.sqrt(hidden / kept)
    all_norms = []
    for _, block in topology.blocks(model):
        for writer_name in topology.writers:
            w = block.get_submodule(writer_name)
            set_submodule(block, writer_name, _linear(w.weight[index], None if w.bias is None else w.bias[index]))
        for reader_name in reader_names(block, topology):
            r = block.get_submodule(reader_name)
            set_submodule(block, reader_name, _linear(r.weight[:, index], r.bias))
        all_norms += [block.get_submodule(g.prev) for g in _norm_groups(block, topology)]
    for norm in {id(n): n for n in [*all_norms, model.get_submodule(topology.final_norm)]}.values():
        offset = topology.norm_offset
        norm.weight = nn.Parameter(((norm.weight[index] + offset) * gain - offset).contiguous())
        for attribute in ("variance_epsilon", "eps"):
            if hasattr(norm, attribute):
                setattr(norm, attribute, getattr(norm, attribute) * hidden / kept)
    head = getattr(model, "lm_head", None)
    if head is not None:
        head.weight = embed.weight if tied else nn.Parameter(head.weight[:, index].contiguous())
        head.in_features = kept
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "head_dim", None) is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        config.rms_norm_eps = config.rms_norm_eps * hidden / kept
        config.hidden_size = kept
        config.pruned_hidden = True
    return model


@torch.no_grad()
def channel_scores(model: nn.Module, how: str, windows: list[Tensor] | None = None) -> Tensor:
    """Importance of every hidden channel for post-hoc pruning: ``magnitude`` (L2 norm of every weight that
    leaves with the channel) or ``activation`` (RMS of the residual stream over all layers and tokens)."""
    topology = hidden_topology(model)
    embed = model.get_input_embeddings()
    if how == "magnitude":
        total = embed.weight.pow(2).sum(0)
        for _, block in topology.blocks(model):
            total += sum(block.get_submodule(w).weight.pow(2).sum(1) for w in topology.writers)
            total += sum(block.get_submodule(r).weight.pow(2).sum(0) for r in reader_names(block, topology))
        head = getattr(model, "lm_head", None)
        if head is not None and head.weight is not embed.weight:
            total += head.weight.pow(2).sum(0)
        return total.sqrt()
    if how == "activation":
        if not windows:
            raise ValueError("activation scores need calibration windows")
        total, count = torch.zeros(embed.weight.shape[1]), 0
        for ids in windows:
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            for h in states:
                total += h.float().pow(2).reshape(-1, h.shape[-1]).sum(0)
                count += h.shape[0] * h.shape[1]
        return (total / count).sqrt()
    raise ValueError(f"unknown channel score {how!r}; use 'magnitude' or 'activation'")


def keep_top(scores: Tensor, target: int) -> Tensor:
    """The ``target`` highest-scoring channels as a bool mask."""
    if not 1 <= target <= scores.numel():
        raise ValueError(f"target hidden size must be in 1..{scores.numel()}; got {target}")
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(target).indices] = True
    return keep


def pruned_hidden_size(model: nn.Module) -> int | None:
    """The residual width of a decoder whose hidden channels were removed (None for any other model)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size") or not has_topology(model):
        return None
    width = model.get_input_embeddings().weight.shape[1]
    return width if getattr(config, "pruned_hidden", False) else None


def shrink_hidden_to(model: nn.Module, hidden: int) -> nn.Module:
    """Cut a freshly built decoder to a saved residual width (the first channels; the checkpoint's weights
    fill them in)."""
    width = model.get_input_embeddings().weight.shape[1]
    if not 1 <= hidden <= width:
        raise ValueError(f"the checkpoint's hidden size {hidden} does not fit this model's {width}")
    if hidden < width:
        remove_hidden_channels(model, torch.arange(width) < hidden)
    return model
