"""A compressed decoder LLM as a GGUF file that llama.cpp (and transformers) read: the architecture, hyper-
parameters and tokenizer copied from the GGUF file the model came from (the zoo's), every Linear whose grid a
GGUF block type holds written in that type from bitsmith's codes (``gguf_blocks``), everything else float32.

Llama's ``q_proj`` / ``k_proj`` rows are stored permuted in GGUF (llama.cpp's rotary layout, as llama.cpp's
``convert_hf_to_gguf.py`` writes them and transformers undoes on load); the permutation moves whole rows, so
the blocks (along the inputs) move intact. The written file is read back and every tensor compared with
bitsmith's weight (``gguf_blocks.check_round_trip``) before it is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitsmith.export.gguf_blocks import GgufTensor, check_round_trip, pack, unpack
from bitsmith.files import atomic_write
from bitsmith.nn import QLinear
from bitsmith.quant.layers import weight_only_uniform

SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def permute_rows(rows: np.ndarray | Tensor, heads: int) -> Any:
    """llama.cpp's order of a q / k projection's output rows (each head's two rotary halves interleaved)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _heads(config: Any, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


FLOAT_TYPES = ("f32", "f16", "q8_0")  # the unquantized matrices (the embedding); q8_0: llama.cpp's own rounding


def gguf_tensors(model: nn.Module, float_type: str = "f32") -> dict[str, tuple[str, GgufTensor | np.ndarray]]:
    """``{GGUF name: (HF name, blocks or float array)}`` of a Llama-family ``model`` (tied LM head omitted); float
    matrices (the embedding) in ``float_type``: ``f32``, ``f16``, or ``q8_0`` rounded by the ``gguf`` package's
    Q8_0 quantizer (llama.cpp's, which its quantize tool applies to a tied embedding); vectors (norms) in float32,
    as llama.cpp keeps them."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ValueError(f"gguf: float type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.get_input_embeddings().weight
    out: dict[str, tuple[str, GgufTensor | np.ndarray]] = {}
    modules = dict(model.named_modules())
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = hf_name.rpartition(".")
        if leaf not in ("weight", "bias") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"gguf: {hf_name!r} has no GGUF tensor name for the llama architecture")
        module, heads = modules.get(owner), _heads(config, hf_name)
        if isinstance(module, QLinear) and leaf == "weight":
            q = weight_only_uniform(module)
            if q is None:
                raise ValueError(f"gguf: layer {owner!r} is compressed in a way GGUF cannot hold (quantized inputs, "
                                 "smoothing, a mask or a non-uniform weight grid); GGUF holds weight-only grouped "
                                 "uniform grids")  # fmt: skip
            blocks = pack(owner, q, module.weight)
            check_round_trip(owner, q, module.weight, blocks)
            data = blocks.data if heads is None else permute_rows(blocks.data, heads)
            out[name] = (hf_name, GgufTensor(blocks.qtype, np.ascontiguousarray(data), blocks.shape))
        else:
            array = tensor.detach().float().numpy()
            array = np.ascontiguousarray(array if heads is None else permute_rows(array, heads))
            if array.ndim > 1 and float_type == "q8_0" and array.shape[1] % 32 == 0:
                q8 = gguf.GGMLQuantizationType.Q8_0
                out[name] = (hf_name, GgufTensor(q8, gguf.quants.quantize(array, q8), array.shape))
                continue
            out[name] = (hf_name, array.astype(np.float16) if array.ndim > 1 and float_type == "f16" else array)
    return out


def write_gguf(model: nn.Module, source: str | Path, out: str | Path, float_type: str = "f32") -> Path:
    """Write ``model`` (compressed by bitsmith) to ``out`` with ``source``'s metadata and tokenizer, float matrices in
    ``float_type``; read it back and check every tensor before publishing it."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"].contents()
    if architecture != "llama":
        raise ValueError(f"gguf: export supports the llama architecture; {source} is {architecture!r}")
    tensors = gguf_tensors(model, float_type)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        for key, field in reader.fields.items():
            if not key.startswith(SKIPPED_KEYS):
                writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1
                                     else None)  # fmt: skip
        for name, (_, value) in tensors.items():
            if isinstance(value, GgufTensor):
                writer.add_tensor(name, value.data, raw_dtype=value.qtype)
            else:
                writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_file(tmp, tensors)

    return atomic_write(out, write, sum(v.data.nbytes if isinstance(v, GgufTensor) else v.nbytes
                                        for _, v in tensors.values()))  # fmt: skip


def check_file(path: str | Path, tensors: dict[str, tuple[str, GgufTensor | np.ndarray]]) -> None:
    """Every tensor of the written file equals what was meant to be written (block bytes and floats alike)."""
    import gguf

    read = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    if set(read) != set(tensors):
        raise ValueError(f"gguf: {path} holds {sorted(set(read) ^ set(tensors))[:4]} unlike what was written")
    for name, (_, value) in tensors.items():
        stored = np.asarray(read[name].data)
        expected = value.data if isinstance(value, GgufTensor) else value
        if stored.tobytes() != np.ascontiguousarray(expected).tobytes():
            raise ValueError(f"gguf: tensor {name} of {path} differs from what was written")


def read_weight(tensor: GgufTensor | np.ndarray, heads: int | None) -> Tensor:
    """A tensor of ``gguf_tensors`` back as the float weight in Hugging Face's row order."""
    weight = unpack(tensor) if isinstance(tensor, GgufTensor) else torch.from_numpy(tensor)
    if heads is None:
        return weight
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
