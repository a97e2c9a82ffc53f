"""Split quantization (Q-Diffusion's split shortcut): a concatenation of two parts with very different ranges is
quantized with less error part by part than as one tensor, and the split quantizer round-trips its codes."""

from __future__ import annotations

import pytest
import torch

from bitsmith.quant import SplitQuantizer, UniformQuantizer, build_quantizer


def bimodal(seed: int = 0) -> torch.Tensor:
    """Features of 8 channels (range ~0.05) concatenated with skip features of 8 channels (range ~5)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([0.05 * torch.randn(16, 8, 6, 6, generator=gen), 5 * torch.randn(16, 8, 6, 6, generator=gen)], 1)


def activation(bits: int) -> UniformQuantizer:
    return UniformQuantizer(bits, symmetric=False, granularity="tensor")


@pytest.mark.parametrize("bits", [8, 4])
def test_split_has_lower_error_than_joint_on_a_bimodal_concat(bits: int) -> None:
    x = bimodal()
    joint = activation(bits).calibrate_(x)
    split = SplitQuantizer(activation(bits), activation(bits), split=8).calibrate_(x)
    joint_error = (joint(x) - x)[:, :8].pow(2).mean()
    split_error = (split(x) - x)[:, :8].pow(2).mean()
    assert split_error < 0.1 * joint_error  # the small part no longer sits on the large part's grid


def test_split_codes_decode_to_the_fake_quantized_tensor_and_config_rebuilds_it() -> None:
    x = bimodal(1)
    split = SplitQuantizer(activation(4), activation(4), split=8).calibrate_(x)
    assert torch.allclose(split.decode(split.encode(x)), split(x), atol=1e-6)
    rebuilt = build_quantizer(split.config())
    assert isinstance(rebuilt, SplitQuantizer) and rebuilt.split == 8 and rebuilt.bits == 4


def test_bad_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="split 0"):
        SplitQuantizer(activation(4), activation(4), split=0)
    with pytest.raises(ValueError, match="one width"):
        SplitQuantizer(activation(4), activation(8), split=2)
    with pytest.raises(ValueError, match="cannot split at 16"):
        SplitQuantizer(activation(4), activation(4), split=16).calibrate_(bimodal())
