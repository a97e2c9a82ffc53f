"""Q-Diffusion (Li et al., ICCV 2023): post-training quantization of a diffusion model's noise predictor.

Spec: ``shared/methods/q-diffusion.md``; official code ``Xiuyu-Li/q-diffusion``. Three parts:

- *Timestep-aware calibration* is the calibration data: inputs ``(x_t, t)`` of the float sampler's trajectories
  at time steps spread uniformly over the sampler (``bitsmith.qdiffusion.trajectory_batches``; a recipe's
  ``generation`` task draws them, ``generation.calib_uniform: false`` gives the single-step baseline at t = 800).
- *Split shortcut quantization* (``split``): every layer that reads a decoder's ``cat(h, skip)`` directly (the
  1x1 shortcut convolutions of the up blocks' ResNets) quantizes the two channel groups of its input, and the
  matching input-channel groups of its weight, each on its own grid (``SplitQuantizer``).
- *Block reconstruction* (``reconstruct``): BRECQ with AdaRound and LSQ activation steps (``brecq``), each
  ResNet block (``blocks``) a unit, other layers one by one.

Weights per output channel, asymmetric min-max before the rounding is learned; activations per tensor.
Deviations, stated: those of ``brecq`` (by default one pass of ``iters`` iterations for rounding and steps
together; the official code runs two passes of 20,000 and 5,000, which ``a_iters`` selects); the attention's matrix products and softmax stay in float (only Linear / Conv2d layers are quantized; the zoo
DDPM has one attention layer, in its middle block).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bitsmith.method import register_method
from bitsmith.methods.ptq.brecq import BRECQ
from bitsmith.qdiffusion import concat_splits
from bitsmith.quant.base import build_quantizer
from bitsmith.quant.layers import observe_inputs
from bitsmith.quant.split import SplitQuantizer
from bitsmith.quant.uniform import Bits
from bitsmith.reconstruct import float_layers


def split_layer(layer: nn.Module, channel: int) -> None:
    """Give ``layer``'s input and weight quantizers one grid per side of ``channel`` (input channels)."""
    if layer.weight_q is not None:
        parts = [build_quantizer(layer.weight_q.config()) for _ in range(2)]
        weight = layer.masked_weight().detach()
        parts[0].calibrate_(weight[:, :channel])
        parts[1].calibrate_(weight[:, channel:])
        layer.weight_q = SplitQuantizer(parts[0], parts[1], channel, dim=1)
    if layer.input_q is not None and not getattr(layer.input_q, "dynamic", False):
        config = layer.input_q.config()
        layer.input_q = SplitQuantizer(build_quantizer(config), build_quantizer(config), channel, dim=1)


@register_method("q-diffusion")
@dataclass
class QDiffusion(BRECQ):
    """Split shortcut quantization + block reconstruction for a noise predictor, calibrated over time steps."""

    description = "Q-Diffusion: split quantization of skip concatenations + block reconstruction (diffusion models)"

    w_bits: Bits | None = 4
    a_bits: Bits | None = 8
    blocks: list[str] = field(default_factory=lambda: ["*.resnets.*"])
    split: bool = True
    reconstruct: bool = True

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        with float_layers(model):  # the input quantizers are not calibrated yet
            self._splits = concat_splits(model, batches[0]) if self.split else {}
        for name, channel in self._splits.items():
            if name in self._layers:
                split_layer(model.get_submodule(name), channel)
        observe_inputs(model, self._layers, batches)
        if self.reconstruct:
            self.reconstruct_units(model, batches)
