"""What every compressed module shares: the registry that rebuilds them from a checkpoint's layer specs, and
the constructor arguments of the torch layers they wrap."""

from __future__ import annotations

from typing import Any

from torch import nn

COMPRESSED: dict[str, type[nn.Module]] = {}


def register_compressed(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: ``build_compressed`` can rebuild ``cls`` from the ``spec()`` a checkpoint records."""
    COMPRESSED[cls.__name__] = cls
    return cls


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2 style ``Conv1D``: a linear layer with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an ``nn.Linear``, or an equivalent ``nn.Linear`` for an HF ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module
    if is_hf_conv1d(module):
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous())
        linear.bias = module.bias
        return linear
    raise TypeError(f"expected nn.Linear or a Hugging Face Conv1D, got {type(module).__name__}")


def embedding_args(embedding: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": embedding.num_embeddings, "embedding_dim": embedding.embedding_dim,
        "padding_idx": embedding.padding_idx, "max_norm": embedding.max_norm, "norm_type": embedding.norm_type,
        "scale_grad_by_freq": embedding.scale_grad_by_freq, "sparse": embedding.sparse,
    }  # fmt: skip


def conv_args(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
        "dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }  # fmt: skip
