"""Write the hostile corpus replayed by tests/test_hostile_corpus.py: crafted and damaged checkpoints of the
tests' tiny CNN, and hostile recipes. Run from the repository root: python tests/hostile/make_corpus.py"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from bitsmith import build_method, compress, save  # noqa: E402
from bitsmith.export.checkpoint import _digest  # noqa: E402
from conftest import make_cnn  # noqa: E402


def resign(source: Path, target: Path, edit, tensors_edit=None) -> None:  # type: ignore[no-untyped-def]
    """A self-consistent crafted file: edited metadata (and tensors), recomputed digest."""
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(metadata)
    if tensors_edit is not None:
        tensors_edit(tensors)
    metadata["sha256"] = _digest(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)


def with_header(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    size = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + size])
    edit(head)
    text = json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def good_checkpoint() -> Path:
    torch.manual_seed(0)
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 4, "a_bits": 8}), [torch.randn(8, 1, 12, 12)])
    return save(model, HERE / "good.tmp.safetensors")


def metadata_checkpoints() -> None:
    """Fields of the wrong type and non-finite quantizer parameters, each in a self-consistent file."""
    good = good_checkpoint()
    resign(good, HERE / "meta-a-string.safetensors", lambda m: m.update(meta=json.dumps("just a string")))
    resign(good, HERE / "meta-recipe-a-number.safetensors",
           lambda m: m.update(meta=json.dumps({"model": "cnn", "recipe": 7})))  # fmt: skip

    def nan_scale(tensors: dict) -> None:
        key = next(k for k in sorted(tensors) if k.endswith("input_q.scale"))
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    resign(good, HERE / "scale-not-finite.safetensors", lambda m: None, nan_scale)
    good.unlink()


def checkpoints() -> None:
    good = good_checkpoint()
    data = good.read_bytes()
    (HERE / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (HERE / "header-size-huge.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    (HERE / "header-not-json.safetensors").write_bytes(struct.pack("<Q", 9) + b"{not json" + data[17:])

    def shift_min(head: dict) -> None:
        packed = json.loads(head["__metadata__"]["packed"])
        packed[next(k for k in packed if not k.startswith("__"))]["min"] -= 1
        head["__metadata__"]["packed"] = json.dumps(packed)

    (HERE / "metadata-edited.safetensors").write_bytes(with_header(data, shift_min))
    crafted = {
        "zeros-shape-bomb": lambda m: m.update(packed=json.dumps({"__zeros__": {"x": [[2**20, 2**20], "float32"]}})),
        "bool-count-bomb": lambda m: m.update(packed=json.dumps({"__bool__": {"x": [10**12]}})),
        "packed-shape-bomb": lambda m: m.update(packed=json.dumps({"stem": {"bits": 4, "min": 0, "shape": [10**6] * 2}})),
        "layers-deep-nesting": lambda m: m.update(layers="[" * 5000 + "]" * 5000),
        "layers-wrong-type": lambda m: m.update(layers=json.dumps({"stem": {"type": "QLinear"}})),
        "low-rank-rank-bomb": lambda m: m.update(layers=json.dumps({"conv": {"type": "LowRankConv2d", "rank": 10**7}})),
        "meta-names-a-path": lambda m: m.update(meta=json.dumps({"model": "/etc", "source": "/etc/passwd"}),
                                                layers=json.dumps({"nope": {"type": "QConv2d"}})),
    }  # fmt: skip
    for name, edit in crafted.items():
        resign(good, HERE / f"{name}.safetensors", edit)
    good.unlink()


RECIPES = {
    "alias-bomb": "\n".join(
        ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        + ["model: {name: cnn}"]
    ),
    "bool-bits": "model: {name: cnn}\nmethods: [{name: ptq, w_bits: true}]",
    "huge-number": "model: {name: cnn}\nmethods: [{name: ptq, w_bits: " + "9" * 5000 + "}]",
    "bad-regex": "model: {name: cnn}\nmethods: [{name: ptq, where: {include: ['re:(']}}]",
    "deep-nesting": "model: " + "[" * 5000 + "]" * 5000,
    "not-a-mapping": "- just\n- a list",
    "missing-data-root": "model: {name: cnn}\ndata: {root: /no/such/folder}",
    "batch-size-zero": "model: {name: cnn}\ntrain: {batch_size: 0}",
    "model-path-is-a-file": "model: {path: /etc/passwd}",
    "python-tag": "model: !!python/object/apply:os.system ['echo pwned']",
}


def recipes() -> None:
    for name, text in RECIPES.items():
        (HERE / f"{name}.yaml").write_text(text + "\n")


# a module that leaves a marker where the test says: it must never run
EVIL = """import os, pathlib
pathlib.Path(os.environ.get("BITSMITH_HOSTILE_MARKER", "/tmp/bitsmith-hostile-marker")).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evilllama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def edit_weights(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def hf_directories() -> None:
    """Hostile Hugging Face directories of a tiny Llama (hidden 16, one block): each one defect."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    root = HERE / "hf"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    good = root / "good.tmp"
    LlamaForCausalLM(config).save_pretrained(good)

    def case(name: str) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        return folder

    folder = case("auto-map-config")
    edit_config(folder, model_type="evilllama",
                auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})  # fmt: skip
    (folder / "evil.py").write_text(EVIL)
    folder = case("auto-map-tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    (folder / "evil.py").write_text(EVIL)
    (case("config-a-list") / "config.json").write_text("[1, 2, 3]")
    edit_config(case("config-huge-hidden"), hidden_size=2**20)
    edit_config(case("config-huge-vocab"), vocab_size=10**9)
    edit_config(case("config-more-layers-than-weights"), num_hidden_layers=400)
    edit_config(case("config-no-architectures"), architectures=None)
    folder = case("pickle-weights")
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, folder / "pytorch_model.bin")
    folder = case("safetensors-truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    folder = case("safetensors-flipped-header-byte")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8 + data[8:].index(b"F32")] ^= 0x20  # the first dtype: "F32" -> "f32"
    (folder / "model.safetensors").write_bytes(bytes(data))
    edit_weights(
        case("tensor-wrong-shape"), lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(16, 16)})
    )
    edit_weights(case("tensors-missing"), lambda t: [t.pop(k) for k in list(t) if ".mlp." in k])
    edit_weights(case("tensor-unexpected"), lambda t: t.update({"model.layers.7.extra.weight": torch.zeros(4)}))
    spec = {"bits": 4, "symmetric": True, "group_size": 0, "shape": [32, 16], "bias": False, "float_zero": False}
    edit_config(case("quantization-other-method"), quantization_config={"quant_method": "gptq", "bits": 4})
    edit_config(case("quantization-dunder-layer"),
                quantization_config={"quant_method": "bitsmith", "layers": {"__class__": spec}})  # fmt: skip
    huge = {**spec, "shape": [10**6, 10**6]}
    edit_config(case("quantization-huge-layer"), quantization_config={
        "quant_method": "bitsmith", "format": "packed-uniform-v1", "layers": {"model.layers.0.mlp.up_proj": huge}})  # fmt: skip
    shutil.rmtree(good)


if __name__ == "__main__":
    checkpoints()
    metadata_checkpoints()
    recipes()
    hf_directories()
    print(
        f"wrote {len(list(HERE.glob('*.safetensors')))} checkpoints, {len(list(HERE.glob('*.yaml')))} recipes and "
        f"{len(list((HERE / 'hf').iterdir()))} Hugging Face directories"
    )
