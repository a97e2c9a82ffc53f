"""A local Hugging Face model directory, checked before transformers reads its weights, and loaded safely.

transformers runs a directory's own Python files when one of its configs names them (``auto_map``) and the
user answers "y" to its prompt, or a pipe answers for them. bitsmith never runs code from a model directory:
a directory that asks for code is refused in one line naming the file, before transformers sees it, and every
transformers loader gets ``trust_remote_code=False`` besides. The same check bounds every size the config
declares (against the weights actually in the directory) and reads only safetensors, never a pickle; a
directory with missing, unexpected or misshapen tensors is an error, not a model with random weights.
Every problem is one ``ModelDirectoryError`` line that names the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Kind = Literal["causal-lm", "encoder"]

# every JSON file through which transformers may import a directory's code (``auto_map``)
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json",
                "preprocessor_config.json", "image_processor_config.json", "feature_extractor_config.json")  # fmt: skip
MAX_CONFIG_BYTES = 16 << 20  # tokenizer configs with many added tokens reach a few MB
MAX_INT = 1 << 24  # any integer a config declares (token ids, positions, sizes)
SIZE_LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 512,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1 << 12,
               "vocab_size": 1 << 21, "max_position_embeddings": 1 << 21}  # fmt: skip
PICKLES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "tf_model.h5", "flax_model.msgpack")
MAX_CODES_PER_PARAMETER = 8  # packed 1-bit codes: eight weights per stored byte
LAYER_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class ModelDirectoryError(ValueError):
    """A Hugging Face model directory bitsmith will not load; the message names the file and the problem."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, bounded in size."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelDirectoryError(f"{path}: {size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ModelDirectoryError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise ModelDirectoryError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def refuse_remote_code(directory: Path) -> None:
    """One line naming the first config that asks transformers to import the directory's own code."""
    for name in CODE_CONFIGS:
        path = directory / name
        if path.is_file():
            config = read_json_object(path)
            for section in (config, *(v for v in config.values() if isinstance(v, dict))):
                if "auto_map" in section:
                    modules = sorted({str(v).split(".")[0] for v in _flat(section["auto_map"])})[:3]
                    raise ModelDirectoryError(
                        f"{path}: asks to run the directory's own code (auto_map -> {', '.join(modules)}); bitsmith "
                        "never runs code from a model directory: use an architecture transformers ships"
                    )


def _flat(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def check_sizes(path: Path, config: dict[str, Any]) -> None:
    """Every integer of the config (and of its nested sections) non-negative and bounded; model sizes tighter."""
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):
        for key, value in section.items():
            if type(value) is not int:
                continue
            limit = SIZE_LIMITS.get(key, MAX_INT)
            if not -1 <= value <= limit or (key in SIZE_LIMITS and value < 1):
                raise ModelDirectoryError(f"{path}: {key} = {value} is outside 1..{limit}")


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors files (one, or the shards its index names); pickles are refused."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirectoryError(f"{index}: no 'weight_map' object naming the shards")
        shards = sorted({str(v) for v in weight_map.values()})
        for shard in shards:
            if Path(shard).name != shard or not (directory / shard).is_file():
                raise ModelDirectoryError(f"{index}: shard {shard[:80]!r} is not a file in {directory}")
        return [directory / shard for shard in shards]
    pickles = [name for name in PICKLES if (directory / name).is_file()]
    if pickles:
        raise ModelDirectoryError(
            f"{directory / pickles[0]}: bitsmith reads weights only from safetensors files (a pickle can run code); "
            "convert it once where you trust it: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelDirectoryError(f"{directory}: no model.safetensors (or model.safetensors.index.json) in the directory")


def stored_elements(files: list[Path]) -> int:
    """The number of elements the safetensors headers declare (headers only; a bad header is one line)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
        except Exception as exc:  # safetensors has its own error types for truncated and malformed files
            raise ModelDirectoryError(
                f"{path}: not a readable safetensors file, it may be truncated or corrupt ({str(exc)[:120]})"
            ) from None
    return total


def check_quantization(path: Path, config: dict[str, Any], model: nn.Module) -> None:
    """A ``quantization_config`` must be bitsmith's own, naming real Linear layers with their real shapes."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsmith":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ModelDirectoryError(
            f"{path}: quantization_config names {str(method)[:40]!r}; bitsmith loads float directories and its own "
            "(quant_method: bitsmith) only"
        )
    layers = quantization.get("layers")
    if not isinstance(layers, dict):
        raise ModelDirectoryError(f"{path}: quantization_config.layers must be an object of layer specs")
    for name, spec in layers.items():
        _check_layer(path, name, spec, model)


def _check_layer(path: Path, name: str, spec: Any, model: nn.Module) -> None:
    where = f"{path}: quantization_config layer {str(name)[:80]!r}"
    if not LAYER_NAME.fullmatch(name) or any(part.startswith("_") for part in name.split(".")):
        raise ModelDirectoryError(f"{where} is not a layer name")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ModelDirectoryError(f"{where}: the model has no such layer") from None
    if not isinstance(layer, nn.Linear) or not isinstance(spec, dict):
        raise ModelDirectoryError(f"{where}: not a Linear layer, or its spec is not an object")
    bits, group = spec.get("bits"), spec.get("group_size")
    shape = [layer.out_features, layer.in_features]
    ok = spec.get("shape") == shape and type(bits) is int and 1 <= bits <= 8 and type(group) is int
    if not ok or group < 0 or (group and shape[1] % group) or not isinstance(spec.get("bias"), bool):
        raise ModelDirectoryError(
            f"{where}: spec {json.dumps(spec)[:120]} does not fit the layer (shape {shape}, bits 1..8, a group size "
            "dividing the columns, bias true/false)"
        )


def is_causal_lm(directory: Path) -> bool:
    """Whether the directory's config names a causal LM (``…ForCausalLM``); a config without an
    ``architectures`` list is an error (an LLM would otherwise be scored as a sentence encoder)."""
    config_path = directory / "config.json"
    return names_causal_lm(config_path, read_json_object(config_path))


def names_causal_lm(config_path: Path, config: dict[str, Any]) -> bool:
    """``is_causal_lm`` of a config already read from ``config_path``."""
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures):
        raise ModelDirectoryError(
            f"{config_path}: no 'architectures' list, so bitsmith cannot tell a causal LM from an encoder; "
            'add e.g. "architectures": ["LlamaForCausalLM"]'
        )
    return any(a.endswith("ForCausalLM") for a in architectures)


def check_directory(directory: Path, kind: Kind) -> None:
    """Everything checkable before any weight is read: code, config, sizes, weight files, quantization."""
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory}: not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirectoryError(f"{directory}: not a Hugging Face model directory (no config.json)")
    refuse_remote_code(directory)
    config = read_json_object(config_path)
    check_sizes(config_path, config)
    if names_causal_lm(config_path, config) != (kind == "causal-lm"):
        wanted = "a causal LM (…ForCausalLM)" if kind == "causal-lm" else "an encoder"
        raise ModelDirectoryError(f"{config_path}: architectures {config['architectures'][:3]} is not {wanted}")
    stored = stored_elements(weight_files(directory))
    model = _meta_model(config_path, kind)
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_CODES_PER_PARAMETER * stored:
        raise ModelDirectoryError(
            f"{config_path}: the config declares a model of {parameters} parameters but the weights hold {stored} "
            "values; the config does not belong to these weights"
        )
    check_quantization(config_path, config, model)


def _meta_model(config_path: Path, kind: Kind) -> nn.Module:
    """The config's model on the meta device: shapes and parameter counts, nothing allocated."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
            return auto.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError) as exc:
        raise ModelDirectoryError(
            f"{config_path}: transformers cannot build this config ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_checked(directory: Path, load: Callable[..., Any], what: str = "model") -> Any:
    """``load(directory, trust_remote_code=False, ...)`` with transformers' errors as one line naming the
    directory; a model load must match its weights exactly (no missing, unexpected or misshapen tensor)."""
    # mismatched shapes are reported in the loading info (with names and shapes), then refused below
    extra = {"use_safetensors": True, "output_loading_info": True, "ignore_mismatched_sizes": True}
    extra = extra if what == "model" else {}
    try:
        result = load(directory, trust_remote_code=False, local_files_only=True, **extra)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError, EOFError) as exc:
        raise ModelDirectoryError(f"{directory}: transformers cannot load the {what} ({_first_line(exc)})") from None
    if what != "model":
        return result
    model, info = result
    problems = {k: info.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    bad = {k: v for k, v in problems.items() if v}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in bad.items())
        raise ModelDirectoryError(f"{directory}: the weights do not match the config ({detail})"[:600])
    return model
