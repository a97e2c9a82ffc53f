"""Real 4-bit weight-only inference on CPU through PyTorch's packed int4 kernel
(``aten._weight_int4pack_mm_for_cpu``, the kernel torchao's CPU int4 layout used), fed with bitsmith's own
codes: a GPTQ or AWQ layer deploys with exactly the grid it was calibrated to.

The kernel computes ``w = (q - 8) * scale + zero`` per group of input channels; bitsmith's asymmetric
codes ``w = (c - z) * s`` map onto it with ``q = c`` and ``zero = (8 - z) * s``. It is fast with bfloat16
activations (about 4x a float32 GEMV on this machine's AVX-512 CPU, slower than float32 with float32
activations), so the deployed layer computes in bfloat16 and returns the caller's dtype; the rest of the
model is cast to bfloat16 too by ``deploy_int4`` (``keep_float32``: leave it in float32).

torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU layout any more (its packing formats need CUDA, bf16 on
CUDA, or other devices), which is why this small module calls the PyTorch kernel directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitsmith.nn import QLinear
from bitsmith.quant.layers import weight_only_uniform
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.swap import set_submodule

KERNEL_GROUPS = (32, 64, 128, 256)


def supported(layer: nn.Module) -> bool:
    """Whether ``layer`` is a 4-bit asymmetric per-group (or per-channel) weight-only QLinear the kernel takes."""
    q = weight_only_uniform(layer)
    return (
        q is not None
        and q.bits == 4
        and not q.symmetric
        and (q.granularity == "channel" or q.group_size in KERNEL_GROUPS)
    )


class Int4CPULinear(nn.Module):
    """A linear layer with packed 4-bit weights run by ``aten._weight_int4pack_mm_for_cpu`` in bfloat16."""

    def __init__(self, layer: QLinear) -> None:
        super().__init__()
        q: UniformQuantizer = layer.weight_q  # type: ignore[assignment]
        encoded = q.encode(layer.weight.detach())
        rows, columns = layer.weight.shape
        self.group_size = q.group_size if q.granularity == "group" else columns
        if self.group_size not in KERNEL_GROUPS and q.granularity == "group":
            raise ValueError(f"the int4 CPU kernel takes groups of {KERNEL_GROUPS}, not {self.group_size}")
        groups = columns // self.group_size
        scale = encoded.params["scale"].reshape(rows, groups).float()
        zero = encoded.params["zero_point"].reshape(rows, groups).float()
        codes = encoded.codes.reshape(rows, columns).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        pairs = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1)  # (groups, rows, 2)
        self.register_buffer("scales_and_zeros", pairs.to(torch.bfloat16).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = columns, rows

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def deploy_int4(model: nn.Module, keep_float32: bool = False) -> tuple[nn.Module, list[str]]:
    """Replace every supported 4-bit QLinear by an ``Int4CPULinear`` (in place); the other modules are cast to
    bfloat16 unless ``keep_float32``. Returns the model and the names of the replaced layers."""
    names = [name for name, module in model.named_modules() if supported(module)]
    if not names:
        raise ValueError("no 4-bit asymmetric weight-only layers to deploy (quantize with rtn, gptq or awq, bits 4)")
    for name in names:
        set_submodule(model, name, Int4CPULinear(model.get_submodule(name)))
    if not keep_float32:
        for module in model.modules():
            if not isinstance(module, Int4CPULinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(torch.bfloat16)
        if hasattr(model, "config"):
            model.config.dtype = torch.bfloat16
    return model, names
