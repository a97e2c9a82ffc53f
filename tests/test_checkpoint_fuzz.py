"""Hostile checkpoints: any changed byte, header edit or crafted file ends in ``CheckpointError`` (or, for a
byte that changes nothing, the identical model), never another exception or a huge allocation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from bitsmith import CheckpointError, build_method, compress, load, save
from bitsmith.export.checkpoint import _digest
from conftest import make_cnn

X = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, torch.Tensor]:
    model = make_cnn()
    calib = [torch.randn(8, 1, 12, 12) for _ in range(2)]
    compress(model, build_method({"name": "ptq", "w_bits": 4, "a_bits": 8}), calib)
    path = save(model, tmp_path_factory.mktemp("ckpt") / "w4a8.safetensors")
    return path.read_bytes(), model(X).detach()


def header(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def with_header(head: dict, body: bytes) -> bytes:
    text = json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text + body


def loads_or_refuses(data: bytes, path: Path, expected: torch.Tensor) -> None:
    path.write_bytes(data)
    try:
        model = load(path, make_cnn())
    except CheckpointError as exc:
        assert path.name in str(exc)
        return
    assert torch.equal(model(X), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_is_refused_or_harmless(original, tmp_path: Path, position: int, flip: int) -> None:
    data, expected = original
    changed = bytearray(data)
    changed[position % len(data)] ^= flip
    loads_or_refuses(bytes(changed), tmp_path / "flipped.safetensors", expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0))
def test_any_truncation_is_refused(original, tmp_path: Path, cut: int) -> None:
    data, expected = original
    loads_or_refuses(data[: cut % len(data)], tmp_path / "cut.safetensors", expected)


def test_a_changed_metadata_number_is_refused(original, tmp_path: Path) -> None:
    head, body = header(original[0])
    packed = json.loads(head["__metadata__"]["packed"])
    name = next(k for k in packed if not k.startswith("__"))
    packed[name]["min"] -= 1  # the W4A8 CNN's accuracy fell from 92% to 59% with such an edit
    head["__metadata__"]["packed"] = json.dumps(packed)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(with_header(head, body))
    with pytest.raises(CheckpointError, match="edited.safetensors: checksum mismatch"):
        load(path, make_cnn())


def resigned(path: Path, metadata_edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite ``path`` with edited metadata and a recomputed digest (a crafted, self-consistent file)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    metadata_edit(metadata)
    metadata["sha256"] = _digest(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(packed=json.dumps({"__zeros__": {"x": [[2**20, 2**20], "float32"]}})),
        lambda m: m.update(packed=json.dumps({"__zeros__": {"x": [[-1], "float32"]}})),
        lambda m: m.update(packed=json.dumps({"__bool__": {"x": [10**12]}})),
        lambda m: m.update(packed=json.dumps({"stem": {"bits": 4, "min": 0, "shape": [10**6, 10**6]}})),
        lambda m: m.update(packed=json.dumps({"stem": {"bits": "4", "min": 0, "shape": [8, 1, 3, 3]}})),
        lambda m: m.update(packed=json.dumps([1, 2])),
        lambda m: m.update(layers=json.dumps({"stem": {"type": "QLinear"}})),
        lambda m: m.update(layers=json.dumps({"nope": {"type": "QConv2d"}})),
        lambda m: m.update(layers="[" * 5000 + "]" * 5000),
        lambda m: m.pop("layers"),
        lambda m: m.update(structure="{}"),
    ],
)
def test_crafted_files_with_a_valid_digest_are_refused(original, tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(original[0])
    resigned(path, edit)
    with pytest.raises(CheckpointError, match="crafted.safetensors"):
        load(path, make_cnn())
