"""Where a transformer's self-attention sits (FAR and the other methods that replace or prune attention ask here):
per block, the block module, the attention module to replace, its width and heads, and how it is called.

Two families: the zoo ViT (``blocks.{i}.attn``, or ``blocks.{i}.block.attn`` behind a token pruner; called with the normed tokens, returns a tensor) and Hugging Face
BERT-style encoders (``encoder.layer.{i}.attention.self``, or ``encoder.encoder.layer`` behind a token pruner; called with the hidden states and the attention mask,
returns a tuple whose first item is the per-head context that ``attention.output`` projects)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet")


@dataclass(frozen=True)
class AttentionSite:
    """One block's self-attention: ``block`` is the module whose output FAR's distillation matches, ``site`` the
    module replaced; ``dim`` its input width, ``out_dim`` its output width, ``returns_tuple`` whether it returns
    ``(output, weights)`` as Hugging Face attention modules do."""

    index: int
    block: str
    site: str
    dim: int
    out_dim: int
    heads: int
    returns_tuple: bool


def _vit_sites(model: nn.Module) -> list[AttentionSite]:
    sites = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        inner = "block." if hasattr(block, "pruner") else ""  # a token pruner in front (PrunedBlock): its block
        attn = getattr(block.block if inner else block, "attn", None)
        if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "heads"):
            return []
        sites.append(AttentionSite(i, f"blocks.{i}", f"blocks.{i}.{inner}attn", attn.qkv.in_features,
                                   attn.proj.out_features, attn.heads, False))  # fmt: skip
    return sites


def _encoder_sites(model: nn.Module) -> list[AttentionSite]:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ENCODER_TYPES:
        return []
    layers = next(
        (
            p + e
            for p in ("", "bert.", "roberta.", "model.")
            for e in ("encoder.layer", "encoder.encoder.layer")
            if _has(model, p + e)
        ),
        None,
    )  # fmt: skip  (encoder.encoder: behind a token-pruning wrapper)
    if layers is None:
        return []
    sites = []
    for i, layer in enumerate(model.get_submodule(layers)):
        attn = layer.attention.self
        sites.append(AttentionSite(i, f"{layers}.{i}", f"{layers}.{i}.attention.self", attn.query.in_features,
                                   attn.all_head_size, attn.num_attention_heads, True))  # fmt: skip
    return sites


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention block of ``model`` in order; a ``ValueError`` naming the supported layouts if none."""
    sites = _vit_sites(model) or _encoder_sites(model)
    if not sites:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) has no self-attention blocks this adapter knows: "
            f"supported are the zoo ViT (blocks[i].attn) and Hugging Face encoders of types {list(ENCODER_TYPES)} "
            "(encoder.layer[i].attention.self)"
        )
    return sites


def vit_patch_tokens(model: nn.Module) -> int:
    """The number of patch tokens of a zoo ViT (its position table less the class token); a ``ValueError`` otherwise."""
    pos = getattr(model, "pos_embed", None)
    if not _vit_sites(model) or pos is None:
        raise ValueError(f"{type(model).__name__}: token pruning needs a ViT laid out like bitsmith.zoo.vision.ViT "
                         "(patch_embed, cls_token, pos_embed, blocks[i].attn)")  # fmt: skip
    return int(pos.shape[1]) - 1
