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


def resign(source: Path, target: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """A self-consistent crafted file: edited metadata, recomputed digest."""
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(metadata)
    metadata["sha256"] = _digest(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)


def with_header(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    size = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + size])
    edit(head)
    text = json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def checkpoints() -> None:
    torch.manual_seed(0)
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 4, "a_bits": 8}), [torch.randn(8, 1, 12, 12)])
    good = save(model, HERE / "good.tmp.safetensors")
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


if __name__ == "__main__":
    checkpoints()
    recipes()
    print(f"wrote {len(list(HERE.glob('*.safetensors')))} checkpoints and {len(list(HERE.glob('*.yaml')))} recipes")
