"""Directories in the compressed-tensors format (the one vLLM and llm-compressor read):
``save_compressed_tensors(model, tokenizer, out)``.

Every quantized Linear becomes one scheme of the ``compressed-tensors`` library, and the library's own
compressors write its tensors: weight-only layers (W4A16, any 1-8 bits, per group or per channel) as
``pack-quantized`` (codes packed into int32, ``weight_scale``, ``weight_zero_point`` when asymmetric),
W8A8 layers (8-bit symmetric weights per channel, 8-bit dynamic per-token activations) as ``int-quantized``.
``config.json`` carries the ``quantization_config`` (``quant_method: compressed-tensors``) with one config
group per distinct scheme, targeting its layers by name, so mixed precision is kept layer by layer.

bitsmith's codes are unsigned (``0 .. 2^b - 1``); compressed-tensors' are signed (``-2^(b-1) ..``): the
zero points are shifted by ``2^(b-1)``, which leaves ``(q - z) * scale`` — the weights — unchanged.
Refused, with the reason: float zero points (GGUF-style min-offset grids), smoothing kept as a run-time
division, static or per-tensor activation scales, and activation widths other than 8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.export.hf import float_state, write_hf_folder
from bitsmith.nn import QLinear
from bitsmith.quant.uniform import UniformQuantizer


def _weight_args(name: str, q: Any) -> dict[str, Any]:
    if not isinstance(q, UniformQuantizer) or q.granularity not in ("group", "channel"):
        raise ValueError(f"layer {name!r}: compressed-tensors holds uniform weights per group or per channel")
    if q.float_zero:
        raise ValueError(f"layer {name!r}: a float zero point (GGUF-style grid) has no compressed-tensors "
                         "equivalent; quantize with integer zero points (float_zero: false)")  # fmt: skip
    args = {"num_bits": q.bits, "type": "int", "symmetric": q.symmetric, "strategy": q.granularity}
    return {**args, "group_size": q.group_size} if q.granularity == "group" else args


def _input_args(name: str, q: Any) -> dict[str, Any] | None:
    if q is None:
        return None
    if not (isinstance(q, UniformQuantizer) and q.dynamic and q.granularity == "token" and q.bits == 8):
        raise ValueError(f"layer {name!r}: compressed-tensors W8A8 needs 8-bit dynamic per-token activations "
                         "(ptq a_bits: 8, a_granularity: token, a_dynamic: true)")  # fmt: skip
    return {"num_bits": 8, "type": "int", "symmetric": q.symmetric, "strategy": "token", "dynamic": True}


def layer_scheme(name: str, layer: QLinear) -> dict[str, Any]:
    """The compressed-tensors scheme (weights, input activations, format) of one quantized Linear."""
    if getattr(layer, "smooth", None) is not None:
        raise ValueError(f"layer {name!r}: its smoothing is a run-time division; compressed-tensors expects it "
                         "folded (smoothquant folds into the norms of Llama / Gemma blocks)")  # fmt: skip
    weights = _weight_args(name, layer.weight_q)
    inputs = _input_args(name, layer.input_q)
    if inputs is not None and (weights["num_bits"] != 8 or not weights["symmetric"]):
        raise ValueError(f"layer {name!r}: compressed-tensors W8A8 needs 8-bit symmetric weights")
    return {"weights": weights, "input_activations": inputs,
            "format": "int-quantized" if inputs else "pack-quantized"}  # fmt: skip


def _compressed_layer(layer: QLinear, scheme: Any) -> dict[str, Tensor]:
    """The library's compressed tensors of one layer, from bitsmith's quantized weight, scales and zeros."""
    from compressed_tensors.compressors import BaseCompressor

    q: UniformQuantizer = layer.weight_q  # type: ignore[assignment]
    weight = q(layer.weight.detach()).float()
    rows = weight.shape[0]
    scale = q.scale.float().reshape(rows, -1)
    shift = 2 ** (q.bits - 1)  # unsigned bitsmith codes -> signed compressed-tensors codes
    state = {"weight": weight, "weight_scale": scale}
    if not q.symmetric:
        state["weight_zero_point"] = (q.zero_point.reshape(rows, -1) - shift).round().to(torch.int8)
    compressor = BaseCompressor.load_from_registry(scheme.format)
    out = compressor.compress(state, scheme)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float()
    return {k: v.contiguous() for k, v in out.items()}


def quantization_config(schemes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationConfig`` (as a dict): one config group per distinct scheme."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=names, **json.loads(key))
        for i, (key, names) in enumerate(groups.items())
    }
    formats = {scheme["format"] for scheme in schemes.values()}
    config = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=["lm_head"])  # fmt: skip
    return config.to_dict()


def compressed_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The compressed state dict (tied tensors once) and the scheme of every quantized Linear."""
    from compressed_tensors.quantization import QuantizationScheme

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and m.weight_q is not None}
    if not layers:
        raise ValueError("the model has no quantized Linear layers; save a float model with model.save_pretrained")
    schemes = {name: layer_scheme(name, layer) for name, layer in layers.items()}
    quantized_owners = set(layers) | {
        f"{n}.{child}" for n, m in layers.items() for child, _ in m.named_modules() if child
    }
    state = float_state(model, lambda key: key.rsplit(".", 1)[0] in quantized_owners)
    for name, layer in layers.items():
        scheme = QuantizationScheme(targets=[name], **schemes[name])
        state.update({f"{name}.{k}": v for k, v in _compressed_layer(layer, scheme).items()})
    return state, schemes


def save_compressed_tensors(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write ``model`` (a transformers causal LM with bitsmith-quantized Linears) and ``tokenizer`` as a
    compressed-tensors directory ``out``, whole or not at all."""
    state, schemes = compressed_state(model)
    return write_hf_folder(Path(out), model, tokenizer, state, quantization_config(schemes))


def _scheme_of(name: str, groups: dict[str, Any]) -> Any:
    """The config group that targets layer ``name``: by its name, a ``re:`` pattern, or ``Linear``."""
    import re

    for scheme in groups.values():
        for target in scheme.targets:
            if target in (name, "Linear") or (target.startswith("re:") and re.match(target[3:], name)):
                return scheme
    raise ValueError(f"compressed-tensors: layer {name!r} has quantized tensors but no config group targets it")


def read_compressed_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every quantized layer's float weight, decompressed by the compressed-tensors library from directory
    ``path`` (bitsmith's or another tool's: llm-compressor writes the same format)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    path = Path(path)
    raw = json.loads((path / "config.json").read_text()[:10_000_000]).get("quantization_config")
    if not raw or raw.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: config.json has no compressed-tensors quantization_config")
    config = QuantizationConfig.model_validate(raw)
    state: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    weights = {}
    for name in sorted({key.rsplit(".", 1)[0] for key in state if key.endswith(".weight_scale")}):
        scheme = _scheme_of(name, config.config_groups)
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        compressor = BaseCompressor.load_from_registry(scheme.format or config.format)
        weights[name] = compressor.decompress(local, scheme)["weight"]
    return weights
