"""Checkpoints: safetensors state + JSON map of compressed layers + format version.

``save(model, path)`` packs every quantized weight to its integer codes at its storage width (so a
4-bit model is about 1/8 of FP32 plus scales) and masks to one bit per weight. ``load(path, model)``
re-swaps the plain ``model`` from the layer map, unpacks and decodes the weights, and loads the
rest: outputs are identical to the saved model's. Writes are atomic; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitsmith.export.pack import pack, unpack
from bitsmith.files import atomic_write
from bitsmith.hidden import pruned_hidden_size, shrink_hidden_to
from bitsmith.nn import QuantizedMixin, compressed_layers, rebuild
from bitsmith.quant.attention import enable_int8_attention, uses_int8_attention
from bitsmith.quant.base import Encoded
from bitsmith.structure import is_vit, shrink_to, structure_counts

FORMAT = "bitsmith"
FORMAT_VERSION = 2  # 2: the digest covers the metadata and the shapes
CODES = ".codes"
PARAM = ".codes_param."
KEPT = ".kept"  # the unpruned entries of a masked float weight
MIN_ZEROS = 16  # all-zero tensors at least this large are stored as their shape and dtype
MAX_CODES_PER_WEIGHT = 16  # a layer stores at most this many codes per weight (LiftQuant: n sign bits per m)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and the problem."""


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself:
    a change of any byte of the file, header included, changes it."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != "sha256":
            h.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous().reshape(-1)
        h.update(json.dumps([key, str(t.dtype), list(tensors[key].shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shape(path: Path, what: str, shape: Any, limit: int) -> list[int]:
    """``shape`` read from a file, checked before anything is allocated: a list of at most 8 non-negative
    ints whose product is at most ``limit`` (the largest tensor of the model it is loaded into)."""
    ok = isinstance(shape, list) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)
    if not ok:
        raise CheckpointError(f"{path}: {what} has a malformed shape {str(shape)[:80]}")
    if math.prod(shape) > limit:
        raise CheckpointError(
            f"{path}: {what} claims {math.prod(shape)} elements, more than this model's largest tensor ({limit})"
        )
    return shape


def _packed_layers(model: nn.Module) -> dict[str, QuantizedMixin]:
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, QuantizedMixin) and m.weight_q is not None and m.weight_q.ready
    }  # fmt: skip


def _masked_float_layers(model: nn.Module, packed: dict[str, QuantizedMixin]) -> dict[str, QuantizedMixin]:
    """Pruned layers whose float weight is stored as its kept entries (the rest are in ``packed``)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, QuantizedMixin) and m.mask is not None and name not in packed
    }  # fmt: skip


@torch.no_grad()
def pack_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict with quantized weights replaced by packed codes, and the packing table (whose ``__aliases__``
    names each tied tensor, e.g. an LM head sharing the embedding table, stored once under its first name)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    storage = {k: (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
               for k, v in state.items() if v.numel()}  # fmt: skip
    table: dict[str, Any] = {}
    packed = _packed_layers(model)
    for name, layer in packed.items():
        wq = layer.weight_q
        enc = wq.encode(layer.masked_weight())  # type: ignore[union-attr]
        del state[f"{name}.weight"]
        for key in wq.packed_exclude:  # type: ignore[union-attr]
            del state[f"{name}.weight_q.{key}"]
        codes = enc.codes - enc.code_min
        if layer.mask is not None:  # pruned entries are not stored: the mask says where the codes go
            codes = codes[layer.mask.cpu()]
        state[f"{name}.weight{CODES}"] = pack(codes, enc.code_bits)
        shared = []  # parameters the quantizer's own state already holds are written once
        for key, value in enc.params.items():
            own = state.get(f"{name}.weight_q.{key}")
            if own is not None and own.shape == value.shape and torch.equal(own, value.detach().cpu()):
                shared.append(key)
            else:
                state[f"{name}.weight{PARAM}{key}"] = value.detach().cpu().clone()
        table[name] = {"bits": enc.code_bits, "min": enc.code_min, "shape": list(enc.codes.shape),
                       "sparse": layer.mask is not None, "shared": shared}  # fmt: skip
    for name, layer in _masked_float_layers(model, packed).items():
        state[f"{name}.weight{KEPT}"] = state.pop(f"{name}.weight")[layer.mask.cpu()]
        table.setdefault("__sparse__", {})[name] = list(layer.weight.shape)
    for key, value in list(state.items()):
        if value.dtype == torch.bool:
            state[key] = pack(value.to(torch.int32), 1)
            table.setdefault("__bool__", {})[key] = list(value.shape)
        elif value.numel() >= MIN_ZEROS and not value.any():  # e.g. symmetric zero points: a shape is enough
            del state[key]
            table.setdefault("__zeros__", {})[key] = [list(value.shape), str(value.dtype).removeprefix("torch.")]
    first: dict[Any, str] = {}
    for key in list(state):  # a tied tensor is written once; the others name it (safetensors refuses sharing)
        where = storage.get(key)
        if where is not None and where in first:
            table.setdefault("__aliases__", {})[key] = first[where]
            del state[key]
        elif where is not None:
            first[where] = key
    return {k: v.contiguous().clone() for k, v in state.items()}, table


def save(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (compressed or not) to ``path`` atomically; returns the path."""
    path = Path(path)
    tensors, table = pack_state(model)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(compressed_layers(model)),
        "packed": json.dumps(table),
        "meta": json.dumps(meta or {}),
    }
    if is_vit(model):  # structured pruning changes widths: the counts rebuild the shapes on load
        metadata["structure"] = json.dumps(structure_counts(model))
    hidden = pruned_hidden_size(model)
    if hidden is not None:  # PAT / hidden-prune: the decoder's residual width, rebuilt on load
        metadata["hidden_size"] = str(hidden)
    if uses_int8_attention(model):  # PTQ's int8_attention: switched on again on load
        metadata["attention"] = "int8"
    metadata["sha256"] = _digest(tensors, metadata)
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, metadata.values()))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), needed)


def _read_file(path: Path, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Open a checkpoint, check its format and version; read the tensors only when asked."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = f.keys() if with_tensors else []
            tensors = {key: f.get_tensor(key) for key in keys}
    except Exception as exc:  # safetensors raises its own error types for truncation and bad headers
        raise CheckpointError(
            f"{path}: not a readable safetensors file, it may be truncated or corrupt ({exc})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bitsmith checkpoint (no 'format: {FORMAT}' in its metadata)")
    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        older = (
            " (an older bitsmith's, whose digest does not cover the header: re-create the file)"
            if version == "1"
            else ""
        )
        raise CheckpointError(
            f"{path}: checkpoint format version {version[:20]}{older}; this bitsmith reads version {FORMAT_VERSION}"
        )
    return tensors, metadata


META_TYPES = {"model": str, "source": str, "task": str, "recipe": dict, "structure": dict}
RECIPE_SECTIONS = ("model", "data", "generation", "train", "eval", "export", "attack")


def read_meta(path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The checkpoint's ``meta`` entry (what made it: model, task, resolved recipe), its fields' types checked:
    a damaged field is a ``CheckpointError`` naming it, never an ``AttributeError`` later."""
    path = Path(path)
    metadata = read_metadata(path) if metadata is None else metadata
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: damaged metadata (meta is not JSON)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged metadata (meta must be an object, found {type(meta).__name__})")
    for key, kind in META_TYPES.items():
        if key in meta and meta[key] is not None and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: damaged metadata (meta.{key} must be a {kind.__name__})")
    for section in RECIPE_SECTIONS:
        value = meta.get("recipe", {}).get(section)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{path}: damaged metadata (meta.recipe.{section} must be an object)")
    data = meta.get("recipe", {}).get("data") or {}
    for key in ("seed", "eval_size"):
        if data.get(key) is not None and type(data[key]) is not int:
            raise CheckpointError(f"{path}: damaged metadata (meta.recipe.data.{key} must be an integer)")
    return meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a bitsmith checkpoint (format checked, tensors not read)."""
    return _read_file(Path(path), with_tensors=False)[1]


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a bitsmith checkpoint, verified; raises ``CheckpointError``."""
    path = Path(path)
    tensors, metadata = _read_file(path, with_tensors=True)
    if metadata.get("sha256") != _digest(tensors, metadata):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; re-create or re-download it")
    return tensors, metadata


@torch.no_grad()
def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Rebuild the compressed layers on the plain ``model`` and load the checkpoint into it. Every problem
    with the file raises ``CheckpointError`` naming the file and the problem."""
    path = Path(path)
    tensors, metadata = read(path)
    read_meta(path, metadata)
    limit = max((t.numel() for t in model.state_dict().values()), default=0)
    try:
        return _load_into(path, model, tensors, metadata, limit)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: does not fit this model or is malformed: {str(exc)[:200]}") from None


def _load_into(
    path: Path, model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str], limit: int
) -> nn.Module:
    try:
        layers = json.loads(metadata["layers"])
        table = json.loads(metadata["packed"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged metadata ({exc})") from None
    if not isinstance(layers, dict) or not isinstance(table, dict):
        raise CheckpointError(f"{path}: damaged metadata (the layer map and packing table must be objects)")
    try:
        if "structure" in metadata:
            shrink_to(model, json.loads(metadata["structure"]))
        if "hidden_size" in metadata:
            shrink_hidden_to(model, int(metadata["hidden_size"]))
        rebuild(model, layers)
        if metadata.get("attention") == "int8":
            enable_int8_attention(model)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: does not fit this model: {exc}") from None
    state, decoded = _unpack_state(path, model, tensors, table, limit)
    check_finite_quantizers(path, state, decoded)
    excluded = {f"{n}.weight_q.{k}" for n in decoded for k in model.get_submodule(n).weight_q.packed_exclude}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit this model: {exc}") from None
    missing = set(result.missing_keys) - excluded
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit this model; missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    for name, (weight, enc) in decoded.items():
        model.get_submodule(name).weight_q.restore(weight, enc)
    return model


QUANTIZER_KEYS = ("_q.", ".smooth", PARAM)  # weight_q / input_q / output quantizer state, smoothing, packed params


def check_finite_quantizers(
    path: Path, state: dict[str, torch.Tensor], decoded: dict[str, tuple[torch.Tensor, Encoded]]
) -> None:
    """Scales, zero points and other quantizer parameters must be finite: a NaN or infinite step would load and
    evaluate silently (as noise)."""
    named = [(k, v) for k, v in state.items() if any(part in k for part in QUANTIZER_KEYS)]
    named += [(f"{n}.weight {key}", v) for n, (_, enc) in decoded.items() for key, v in enc.params.items()]
    for key, value in named:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: quantizer parameter {key!r} is not finite (NaN or infinite); the file is "
                                  "damaged: re-create it")  # fmt: skip


def _codes(path: Path, state: dict[str, torch.Tensor], name: str, info: dict[str, Any], limit: int) -> torch.Tensor:
    """A layer's unpacked codes in its weight's shape (pruned entries of a sparse layer get code 0)."""
    shape = _shape(path, f"layer {name!r}", info["shape"], limit * MAX_CODES_PER_WEIGHT)
    bits = info["bits"]
    if type(bits) is not int or not 1 <= bits <= 32 or type(info["min"]) is not int:
        raise CheckpointError(f"{path}: layer {name!r} has bad code bits {str(bits)[:20]} or minimum")
    packed = state.pop(f"{name}.weight{CODES}")
    if not info.get("sparse"):
        return unpack(packed, bits, math.prod(shape)).reshape(shape)
    mask = state[f"{name}.mask"]
    codes = torch.full(shape, -info["min"], dtype=torch.int32).clamp(0, 2**bits - 1)
    codes[mask] = unpack(packed, bits, int(mask.sum()))
    return codes


def _unpack_state(
    path: Path, model: nn.Module, tensors: dict[str, torch.Tensor], table: dict[str, Any], limit: int
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, Encoded]]]:
    state = dict(tensors)
    aliases = table.pop("__aliases__", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise CheckpointError(f"{path}: damaged metadata (a tied tensor names a tensor the file does not hold)")
    for alias, target in aliases.items():  # tied tensors: stored once, loaded under every name
        state[str(alias)] = state[target]
    for key, (shape, dtype) in table.pop("__zeros__", {}).items():
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(f"{path}: zero tensor {key!r} has an unknown dtype {dtype!r}")
        state[key] = torch.zeros(_shape(path, f"zero tensor {key!r}", shape, limit), dtype=getattr(torch, dtype))
    for key, shape in table.pop("__bool__", {}).items():
        shape = _shape(path, f"mask {key!r}", shape, limit)
        state[key] = unpack(state[key], 1, math.prod(shape)).reshape(shape).to(torch.bool)
    for name, shape in table.pop("__sparse__", {}).items():
        try:
            weight = torch.zeros(_shape(path, f"sparse weight {name!r}", shape, limit),
                                 dtype=state[f"{name}.weight{KEPT}"].dtype)  # fmt: skip
            weight[state[f"{name}.mask"]] = state.pop(f"{name}.weight{KEPT}")
        except (KeyError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{path}: sparse weight of layer {name!r} cannot be restored: {exc}") from None
        state[f"{name}.weight"] = weight
    decoded: dict[str, tuple[torch.Tensor, Encoded]] = {}
    for name, info in table.items():
        try:
            layer = model.get_submodule(name)
            codes = _codes(path, state, name, info, limit)
            prefix = f"{name}.weight{PARAM}"
            params = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
            params |= {key: state[f"{name}.weight_q.{key}"] for key in info.get("shared", [])}
            enc = Encoded(codes + info["min"], params, info["bits"], info["min"])
            weight = layer.weight_q.decode(enc)
        except (AttributeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: packed weight of layer {name!r} cannot be decoded: {exc}") from None
        state[f"{name}.weight"] = weight.to(layer.weight.dtype)
        decoded[name] = weight, enc
    return state, decoded
