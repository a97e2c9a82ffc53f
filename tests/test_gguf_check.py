"""Hostile or damaged GGUF files are one line naming the file and the problem, before llama.cpp or the gguf
reader maps them, and without allocating what the file claims."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitsmith.export.gguf_check import validate_gguf  # noqa: E402
from bitsmith.sequential import peak_rss, reset_peak_rss  # noqa: E402


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((4, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def header(tensors: int, entries: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, entries)


def test_a_well_formed_file_passes(good: Path) -> None:
    validate_gguf(good)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b: b[: len(b) - 100], "beyond the file's"),
        (lambda b: b"GGML" + b[4:], "wrong magic"),
        (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "version 9"),
        (lambda b: header(1 << 40, 0), "claims 1099511627776 tensors"),
        (lambda b: header(0, 1) + struct.pack("<Q", 1 << 50) + b"k", "metadata key 0 runs past the end"),
        (
            lambda b: header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 60),
            "claims 1152921504606846976 entries",
        ),  # fmt: skip
        (
            lambda b: header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 1 << 40, 6, 0),
            "needs bytes up to",
        ),  # fmt: skip
        (
            lambda b: header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 250, 0),
            "unknown tensor type 250",
        ),  # fmt: skip
        (lambda b: header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 7), "has 7 dimensions"),
    ],
)
def test_a_damaged_or_hostile_file_is_one_line_without_a_large_allocation(
    good: Path,
    tmp_path: Path,
    damage,
    problem: str,  # noqa: ANN001
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good.read_bytes()))
    reset_peak_rss()
    before, began = peak_rss(), time.perf_counter()
    with pytest.raises(ValueError, match=rf"bad.gguf: not a readable GGUF file: .*{problem}") as error:
        validate_gguf(bad)
    assert "\n" not in str(error.value)
    assert time.perf_counter() - began < 5 and peak_rss() - before < 64 << 20
