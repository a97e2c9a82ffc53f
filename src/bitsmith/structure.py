"""Structural units of a vision transformer and their physical removal (NViT's search space).

Units, per block ``i``: attention heads ``("heads", i)``, the per-head query/key dimensions
``("qk", i)`` and value dimensions ``("v", i)`` (shared by the block's heads), MLP neurons
``("mlp", i)``; and the embedding dimension ``("emb", None)``, shared by every block. A unit's
parameters are every row / column / entry that leaves the model with it, so per-unit sums of any
element-wise quantity (``w * grad`` for the Taylor saliency, ``w ** 2`` for magnitude) are
comparable across structures.

Adapter: models laid out like ``bitsmith.zoo.vision.ViT`` (``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks[i].{norm1, attn.{qkv, proj}, norm2, fc1, fc2}``, ``norm``, ``head``);
:func:`check_vit` says what is missing from another model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Key = tuple[str, int | None]
EMB: Key = ("emb", None)
BLOCK_KINDS = ("heads", "qk", "v", "mlp")
NEEDED = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head")
BLOCK_NEEDED = ("norm1", "attn.qkv", "attn.proj", "norm2", "fc1", "fc2")


def _missing(model: nn.Module) -> list[str]:
    missing = [n for n in NEEDED if not hasattr(model, n)]
    for i, block in enumerate(getattr(model, "blocks", [])):
        missing += [f"blocks.{i}.{n}" for n in BLOCK_NEEDED if _get(block, n) is None]
    return missing


def is_vit(model: nn.Module) -> bool:
    """Whether the adapter fits ``model``."""
    return not _missing(model)


def check_vit(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming what the model lacks for structured ViT pruning."""
    missing = _missing(model)
    if missing:
        raise ValueError(
            f"structured transformer pruning needs a ViT laid out like bitsmith.zoo.vision.ViT; missing: "
            f"{missing[:6]}. Other architectures need an adapter in bitsmith/structure.py"
        )


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def dims(model: nn.Module) -> dict[Key, int]:
    """The current count of every unit type."""
    out: dict[Key, int] = {EMB: int(model.cls_token.shape[-1])}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        out |= {
            ("heads", i): attn.heads,
            ("qk", i): attn.qk_dim,
            ("v", i): attn.v_dim,
            ("mlp", i): block.fc1.out_features,
        }
    return out


def macs(model: nn.Module, counts: dict[Key, int] | None = None) -> int:
    """Multiply-accumulates of one image's forward pass at the unit ``counts`` (default: the model's)."""
    counts = counts or dims(model)
    tokens = int(model.pos_embed.shape[1])
    emb = counts[EMB]
    kernel = model.patch_embed.weight[0].numel()
    total = (tokens - 1) * kernel * emb + emb * model.head.out_features
    for i in range(len(model.blocks)):
        heads, qk, v, mlp = (counts[(kind, i)] for kind in BLOCK_KINDS)
        total += tokens * emb * heads * (2 * qk + v) + tokens * heads * v * emb  # qkv, proj
        total += tokens * tokens * heads * (qk + v) + 2 * tokens * emb * mlp  # QK^T, AV, MLP
    return total


def unit_sums(model: nn.Module, value: Callable[[Tensor], Tensor]) -> dict[Key, Tensor]:
    """``sum_{s in S} value(w_s)`` for every unit ``S`` (``value`` maps a parameter to a same-shape tensor)."""

    def v(p: Tensor | None) -> Tensor:
        return torch.zeros(()) if p is None else value(p).detach()

    emb = v(model.patch_embed.weight).flatten(1).sum(1) + v(model.patch_embed.bias)
    emb = emb + v(model.cls_token).reshape(-1, emb.numel()).sum(0) + v(model.pos_embed).reshape(-1, emb.numel()).sum(0)
    out: dict[Key, Tensor] = {}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h, qk, dv = attn.heads, attn.qk_dim, attn.v_dim
        rows = v(attn.qkv.weight).sum(1) + v(attn.qkv.bias)  # (h * (2 qk + dv),)
        q, k, val = rows.split([h * qk, h * qk, h * dv])
        q, k, val = q.view(h, qk), k.view(h, qk), val.view(h, dv)
        cols = v(attn.proj.weight).sum(0).view(h, dv)
        out[("heads", i)] = q.sum(1) + k.sum(1) + val.sum(1) + cols.sum(1)
        out[("qk", i)] = (q + k).sum(0)
        out[("v", i)] = (val + cols).sum(0)
        out[("mlp", i)] = v(block.fc1.weight).sum(1) + v(block.fc1.bias) + v(block.fc2.weight).sum(0)
        for norm in (block.norm1, block.norm2):
            emb = emb + v(norm.weight) + v(norm.bias)
        emb = emb + v(attn.qkv.weight).sum(0) + v(attn.proj.weight).sum(1) + v(attn.proj.bias)
        emb = emb + v(block.fc1.weight).sum(0) + v(block.fc2.weight).sum(1) + v(block.fc2.bias)
    out[EMB] = emb + v(model.norm.weight) + v(model.norm.bias) + v(model.head.weight).sum(0)
    return out


def _linear(layer: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` (index tensors; None = all)."""
    weight = layer.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None).to(weight)
    new.weight.data.copy_(weight)
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    return new


def _norm(norm: nn.LayerNorm, keep: Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(int(keep.numel()), eps=norm.eps).to(norm.weight)
    new.weight.data.copy_(norm.weight.detach()[keep])
    new.bias.data.copy_(norm.bias.detach()[keep])
    return new


def _grid(outer: Tensor, inner: Tensor) -> Tensor:
    """Flat indices of the kept (outer, inner) pairs of a row-major ``(len(outer), len(inner))`` grid."""
    return (outer[:, None] & inner[None, :]).flatten().nonzero().flatten()


@torch.no_grad()
def remove_units(model: nn.Module, keep: dict[Key, Tensor]) -> None:
    """Physically remove every unit whose ``keep`` entry is False (in place; a missing key keeps all).

    The new parameters replace the old ones: an optimizer must be rebuilt afterwards.
    """
    full = dims(model)
    keep = {key: keep.get(key, torch.ones(n, dtype=torch.bool)) for key, n in full.items()}
    emb = keep[EMB].nonzero().flatten()
    pe = model.patch_embed
    new_pe = nn.Conv2d(pe.in_channels, len(emb), pe.kernel_size, pe.stride, pe.padding, bias=pe.bias is not None)
    new_pe = new_pe.to(pe.weight)
    new_pe.weight.data.copy_(pe.weight[emb])
    if pe.bias is not None:
        new_pe.bias.data.copy_(pe.bias[emb])
    model.patch_embed = new_pe
    model.cls_token = nn.Parameter(model.cls_token.detach()[..., emb].clone())
    model.pos_embed = nn.Parameter(model.pos_embed.detach()[..., emb].clone())
    for i, block in enumerate(model.blocks):
        attn = block.attn
        heads, qk, v = keep[("heads", i)], keep[("qk", i)], keep[("v", i)]
        q_rows = _grid(heads, qk)
        v_rows = _grid(heads, v)
        rows = torch.cat([q_rows, q_rows + attn.heads * attn.qk_dim, v_rows + 2 * attn.heads * attn.qk_dim])
        attn.qkv = _linear(attn.qkv, rows, emb)
        attn.proj = _linear(attn.proj, emb, v_rows)
        attn.heads, attn.qk_dim, attn.v_dim = int(heads.sum()), int(qk.sum()), int(v.sum())
        mlp = keep[("mlp", i)].nonzero().flatten()
        block.fc1 = _linear(block.fc1, mlp, emb)
        block.fc2 = _linear(block.fc2, emb, mlp)
        block.norm1, block.norm2 = _norm(block.norm1, emb), _norm(block.norm2, emb)
    model.norm = _norm(model.norm, emb)
    model.head = _linear(model.head, None, emb)


def shrink_to(model: nn.Module, counts: dict[str, int]) -> nn.Module:
    """Cut a freshly built model to saved unit ``counts`` (``{"emb": 48, "heads.0": 3, ...}``), keeping
    the first units; loading the pruned weights afterwards fills in their values."""
    current = dims(model)
    keep = {}
    for key, n in current.items():
        name = key[0] if key[1] is None else f"{key[0]}.{key[1]}"
        kept = counts.get(name, n)
        if not 1 <= kept <= n:
            raise ValueError(f"saved structure asks for {kept} {name} units; the model has {n}")
        keep[key] = torch.arange(n) < kept
    if any(not k.all() for k in keep.values()):
        remove_units(model, keep)
    return model


def structure_counts(model: nn.Module) -> dict[str, int]:
    """The unit counts :func:`shrink_to` takes, as JSON-friendly names."""
    return {(k if i is None else f"{k}.{i}"): n for (k, i), n in dims(model).items()}
