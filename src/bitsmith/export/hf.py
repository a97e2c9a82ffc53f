"""Hugging Face directories a transformers user can open: ``save_hf(model, tokenizer, out)`` writes
``config.json`` with a ``quantization_config`` (``quant_method: bitsmith``), ``model.safetensors`` with every
weight-only quantized Linear as packed integer codes plus its scales and zero points, and the tokenizer files.

Importing this module registers the ``bitsmith`` quantization config and quantizer with transformers, so
``AutoModelForCausalLM.from_pretrained(out)`` (with bitsmith installed and imported) rebuilds those layers:
before the weights load they are placeholders of the packed shapes, afterwards they are decoded into
bitsmith ``QLinear`` layers that compute exactly what the saved model computed (identical logits).

Layout per quantized layer ``L``: ``L.qweight`` (uint8, codes minus the code minimum, ``bits`` per code,
little-endian bit stream), ``L.scales`` (float32, one per row and group), ``L.zeros`` (uint8 or int8 zero
points; integers by construction), ``L.bias`` when the layer has one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from bitsmith.export.pack import pack, packed_nbytes, unpack
from bitsmith.files import atomic_folder
from bitsmith.nn import QLinear
from bitsmith.quant.base import Encoded
from bitsmith.quant.layers import weight_only_uniform
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.swap import set_submodule

QUANT_METHOD = "bitsmith"
FORMAT = "packed-uniform-v1"


def _layer_spec(name: str, layer: QLinear) -> dict[str, Any]:
    q = weight_only_uniform(layer)
    if q is None:
        raise ValueError(f"layer {name!r}: the Hugging Face export holds weight-only uniform layers (per channel or "
                         "group); this one has activation quantization, a mask or smoothing. Use bitsmith.save")  # fmt: skip
    return {"bits": q.bits, "symmetric": q.symmetric, "group_size": q.group_size if q.granularity == "group" else 0,
            "shape": list(layer.weight.shape), "bias": layer.bias is not None, "float_zero": q.float_zero}  # fmt: skip


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: spec}`` of the model's quantized Linear layers (others than weight-only uniform are refused)."""
    return {name: _layer_spec(name, m) for name, m in model.named_modules() if isinstance(m, QLinear) and m.weight_q}


def float_state(model: nn.Module, skip: Callable[[str], bool]) -> dict[str, Tensor]:
    """The model's state dict but the keys ``skip`` names, copied to CPU; a tensor shared by several names (tied
    embeddings) is kept once, under the first name."""
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if skip(key) or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().cpu().contiguous().clone()
    return state


def write_hf_folder(
    out: Path, model: nn.Module, tokenizer: Any, state: dict[str, Tensor], quantization_config: dict[str, Any]
) -> Path:
    """A Hugging Face directory ``out``, whole or not at all: ``state`` as ``model.safetensors``, the model's
    config with ``quantization_config``, its generation config and the tokenizer files."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config

    def write(folder: Path) -> None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return atomic_folder(out, write, needed=sum(t.numel() * t.element_size() for t in state.values()))


def packed_state(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """The state dict with each quantized layer's weight as packed codes, scales and zero points; tensors
    shared by several names (tied embeddings) written once, under the first name."""
    state = float_state(model, lambda key: any(key.startswith(f"{name}.weight") for name in layers))
    for name, spec in layers.items():
        layer: QLinear = model.get_submodule(name)  # type: ignore[assignment]
        encoded = layer.weight_q.encode(layer.weight)  # type: ignore[union-attr]
        state[f"{name}.qweight"] = pack(encoded.codes - encoded.code_min, encoded.code_bits)
        state[f"{name}.scales"] = encoded.params["scale"].float().reshape(-1).contiguous()
        state[f"{name}.zeros"] = encoded.params["zero_point"].reshape(-1).to(_zero_dtype(spec)).contiguous()
    return state


def save_hf(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write ``model`` (a transformers causal LM with bitsmith-quantized Linears) and ``tokenizer`` as a
    Hugging Face directory ``out``, whole or not at all."""
    out = Path(out)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized Linear layers; save a float model with model.save_pretrained")
    config = {"quant_method": QUANT_METHOD, "format": FORMAT, "layers": layers}
    return write_hf_folder(out, model, tokenizer, packed_state(model, layers), config)


def _zero_dtype(spec: dict[str, Any]) -> torch.dtype:
    """Zero points are integers (stored in 8 bits) unless the grid has a float zero (float32)."""
    return torch.float32 if spec.get("float_zero") else torch.int8 if spec["symmetric"] else torch.uint8


class PackedLinear(nn.Module):
    """Placeholder with the packed tensors' shapes, filled by the loader, then decoded into a ``QLinear``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        rows, columns = spec["shape"]
        groups = columns // spec["group_size"] if spec["group_size"] else 1
        self.spec = spec
        self.register_buffer("qweight", torch.zeros(packed_nbytes(rows * columns, spec["bits"]), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows * groups))
        self.register_buffer("zeros", torch.zeros(rows * groups, dtype=_zero_dtype(spec)))
        self.bias = nn.Parameter(torch.zeros(rows)) if spec["bias"] else None

    def decoded(self) -> QLinear:
        spec = self.spec
        rows, columns = spec["shape"]
        granularity = "group" if spec["group_size"] else "channel"
        q = UniformQuantizer(spec["bits"], spec["symmetric"], granularity, ch_axis=0,
                             group_size=spec["group_size"] or None, float_zero=bool(spec.get("float_zero")))  # fmt: skip
        q.scale, q.zero_point = self.scales.float().clone(), self.zeros.float().clone()
        codes = unpack(self.qweight, spec["bits"], rows * columns).reshape(rows, columns) + q.code_min
        weight = q.decode(Encoded(codes, {"scale": q.scale, "zero_point": q.zero_point}, q.bits, q.code_min))
        linear = nn.Linear(columns, rows, bias=spec["bias"])
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return QLinear.from_float(linear, weight_q=q)


def _register() -> None:
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class BitsmithConfig(QuantizationConfigMixin):
        def __init__(self, layers: dict[str, Any] | None = None, format: str = FORMAT, **kwargs: Any) -> None:
            if format != FORMAT:
                raise ValueError(f"bitsmith quantization format {format!r} is not supported (expected {FORMAT!r})")
            self.quant_method, self.format, self.layers = QUANT_METHOD, format, dict(layers or {})

    @register_quantizer(QUANT_METHOD)
    class BitsmithQuantizer(HfQuantizer):
        requires_calibration = True  # only pre-quantized directories load

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            for name, spec in self.quantization_config.layers.items():
                set_submodule(model, name, PackedLinear(spec))

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            for name, module in list(model.named_modules()):
                if isinstance(module, PackedLinear):
                    set_submodule(model, name, module.decoded())

        def is_serializable(self) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False


_register()
