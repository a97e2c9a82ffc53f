"""Packing and checkpoints: exact round trips, packed size, clear errors, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from bitsmith import CheckpointError, LowRankLinear, build_method, compress, load, save
from bitsmith.export.pack import pack, packed_nbytes, unpack
from bitsmith.nn import QLinear
from bitsmith.quant import BitPlaneQuantizer, CodebookQuantizer
from conftest import make_cnn


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(0, 300), st.integers(0, 10_000))
def test_pack_unpack_exact(bits: int, numel: int, seed: int) -> None:
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes.to(torch.int32))


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 4]), 2)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _ptq(model: nn.Module, bits: int, calib: list) -> nn.Module:
    compress(model, build_method({"name": "ptq", "w_bits": bits, "a_bits": 8}), calib)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_round_trip_identical_outputs(tmp_path: Path, bits: int) -> None:
    calib = [torch.randn(16, 256) for _ in range(2)]
    model = _ptq(MLP(), bits, calib)
    path = save(model, tmp_path / "m.safetensors", meta={"model": "mlp"})
    reloaded = load(path, MLP())
    x = torch.randn(8, 256)
    assert torch.equal(reloaded(x), model(x))


def test_four_bit_file_is_at_most_16_percent_of_fp32(tmp_path: Path) -> None:
    fp32 = save(MLP(), tmp_path / "fp32.safetensors").stat().st_size
    q4 = save(_ptq(MLP(), 4, [torch.randn(16, 256)]), tmp_path / "q4.safetensors").stat().st_size
    assert q4 <= 0.16 * fp32, (q4, fp32)


def test_cnn_round_trip_with_masks_codebook_bitplane_and_low_rank(
    tmp_path: Path, images: torch.Tensor, calib: list
) -> None:
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 4, "where": {"include": ["stem", "conv"]}}), calib)
    model.conv.set_mask(model.conv.weight.abs() > 0.1)
    model.fc1 = QLinear.from_float(model.fc1, weight_q=CodebookQuantizer(num_levels=5).calibrate_(model.fc1.weight))
    model.fc2 = QLinear.from_float(model.fc2, weight_q=BitPlaneQuantizer(3))
    model(images)  # bit planes initialise from the weight on first use
    path = save(model, tmp_path / "mixed.safetensors")
    reloaded = load(path, make_cnn())
    assert torch.equal(reloaded(images), model(images))
    assert torch.equal(reloaded.conv.mask, model.conv.mask)
    assert torch.equal(reloaded.fc2.weight_q.pos, model.fc2.weight_q.pos)
    lr = make_cnn()
    lr.fc1 = LowRankLinear.from_float(lr.fc1, 8)
    assert torch.equal(load(save(lr, tmp_path / "lr.safetensors"), make_cnn())(images), lr(images))


def test_float_model_round_trip(tmp_path: Path, images: torch.Tensor) -> None:
    model = make_cnn()
    assert torch.equal(load(save(model, tmp_path / "f.safetensors"), make_cnn())(images), model(images))


@pytest.fixture
def saved(tmp_path: Path, calib: list) -> Path:
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 4}), calib)
    return save(model, tmp_path / "q.safetensors")


def test_truncated_file_error_names_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"q\.safetensors.*truncated or corrupt"):
        load(saved, make_cnn())


def test_flipped_byte_is_detected(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(saved, make_cnn())


def test_missing_file_and_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "nope.safetensors", make_cnn())
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a bitsmith checkpoint"):
        load(tmp_path / "foreign.safetensors", make_cnn())
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load(tmp_path / "garbage.safetensors", make_cnn())


def test_mismatched_architecture(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="does not fit this model.*'stem'"):
        load(saved, nn.Sequential(nn.Linear(2, 2)))

    class Wider(type(make_cnn())):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Linear(32, 12)

    with pytest.raises(CheckpointError, match="does not fit this model"):
        load(saved, Wider())


def test_future_format_version_is_refused(tmp_path: Path, saved: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        meta = {**f.metadata(), "format_version": "99"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="format version 99"):
        load(tmp_path / "v99.safetensors", make_cnn())


def test_write_is_atomic(tmp_path: Path, saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bitsmith.export.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(make_cnn(), saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_metadata_holds_layer_map_and_version(saved: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "2"
    assert set(json.loads(meta["layers"])) == {"stem", "conv", "fc1", "fc2"}
    assert os.path.getsize(saved) > 0


def test_quantized_embedding_packs_to_4_bits_and_reloads_exactly(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(1000, 32), nn.Flatten(), nn.Linear(32 * 4, 4))

    model, ids = build(), torch.randint(0, 1000, (8, 4))
    where = {"types": ["Embedding"]}
    compress(model, build_method({"name": "ptq", "w_bits": 4, "a_bits": None, "where": where}), [ids])
    path = save(model, tmp_path / "emb.safetensors")
    assert path.stat().st_size < 0.3 * 4 * 1000 * 32  # 4-bit rows + a scale per 32-value row, not FP32
    with torch.no_grad():
        assert torch.equal(load(path, build())(ids), model(ids))


def test_all_zero_tensors_are_stored_as_shapes(tmp_path: Path) -> None:
    """Symmetric quantizers' zero points are not written; they come back as zeros of the same dtype."""
    from safetensors import safe_open

    model = _ptq(MLP(), 4, [torch.randn(16, 256)])
    path = save(model, tmp_path / "q4.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = list(f.keys())
    assert "fc1.weight_q.zero_point" not in stored
    reloaded = load(path, MLP())
    assert torch.equal(reloaded.fc1.weight_q.zero_point, model.fc1.weight_q.zero_point)
    x = torch.randn(8, 256)
    assert torch.equal(reloaded(x), model(x))


def test_a_tied_lm_head_is_stored_once_and_reloads_tied(tmp_path: Path) -> None:
    """The file holds the shared embedding table once (its size is what the report counts) and the reloaded model
    computes the same logits."""
    pytest.importorskip("transformers")
    from conftest import make_llama

    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = save(model, tmp_path / "tied.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    table = 96 * 64 * 4
    untied = make_llama()
    assert path.stat().st_size < save(untied, tmp_path / "untied.safetensors").stat().st_size - table // 2
    fresh = make_llama(seed=1)
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    reloaded = load(path, fresh)
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
