"""A GGUF file checked before anything reads it for real: the header, every metadata entry and every tensor's
description are parsed with each count and length bounded by the file's size, and each tensor's bytes must lie
inside the file. A file that is truncated, is not GGUF, names an unknown tensor type or describes tensors beyond
its end is one line naming the file and the problem (``ValueError``), before llama.cpp or the ``gguf`` reader
maps it. Format: ``gguf-py/gguf/constants.py`` (magic ``GGUF``, version 2 or 3, little-endian).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4
MAX_COUNT = 1 << 20  # tensors or metadata entries: far beyond any model, far below an allocation to fear


class _Reader:
    def __init__(self, handle: BinaryIO, size: int, name: str) -> None:
        self.handle, self.size, self.name = handle, size, name

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.name}: not a readable GGUF file: {problem}")

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.handle.tell() + count > self.size:
            raise self.fail(f"{what} runs past the end of the file ({self.size} bytes): truncated or damaged")
        return self.handle.read(count)

    def unsigned(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "little")

    def string(self, what: str) -> str:
        length = self.unsigned(8, what)
        return self.take(length, what).decode("utf-8", errors="replace")

    def skip_value(self, kind: int, what: str, depth: int = 0) -> int | str | None:
        """Skip one metadata value (returning a scalar integer or a string, for the alignment)."""
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            if depth:
                raise self.fail(f"{what} is an array of arrays")
            inner, count = self.unsigned(4, what), self.unsigned(8, what)
            if inner in SCALAR_SIZES:
                self.take(count * SCALAR_SIZES[inner], what)  # bounded by the file's size before reading
                return None
            if count > self.size:
                raise self.fail(f"{what} claims {count} entries, more than the file has bytes")
            for _ in range(count):
                self.skip_value(inner, what, depth + 1)
            return None
        if kind not in SCALAR_SIZES:
            raise self.fail(f"{what} has the unknown value type {kind}")
        return self.unsigned(SCALAR_SIZES[kind], what)


def validate_gguf(path: str | Path) -> None:
    """Raise one line (``ValueError``) unless ``path`` is a well-formed GGUF file whose tensors lie inside it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        r = _Reader(handle, size, str(path))
        if r.take(4, "the magic number") != MAGIC:
            raise r.fail("it does not start with 'GGUF' (wrong magic)")
        version = r.unsigned(4, "the version")
        if version not in (2, 3):
            raise r.fail(f"version {version}; llama.cpp reads versions 2 and 3")
        tensors, entries = r.unsigned(8, "the tensor count"), r.unsigned(8, "the metadata count")
        if tensors > MAX_COUNT or entries > MAX_COUNT:
            raise r.fail(f"it claims {tensors} tensors and {entries} metadata entries (at most {MAX_COUNT} each)")
        alignment = 32
        for index in range(entries):
            key = r.string(f"metadata key {index}")
            value = r.skip_value(r.unsigned(4, f"metadata {key!r}"), f"metadata {key!r}")
            if key == "general.alignment":
                if not isinstance(value, int) or value < 1 or value & (value - 1) or value > 1 << 16:
                    raise r.fail(f"general.alignment {value!r} is not a power of two up to 65536")
                alignment = value
        described = []
        for index in range(tensors):
            name = r.string(f"tensor {index}'s name")
            dims = r.unsigned(4, f"tensor {name!r}")
            if not 1 <= dims <= MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {dims} dimensions (1..{MAX_DIMS})")
            shape = [r.unsigned(8, f"tensor {name!r}'s shape") for _ in range(dims)]
            kind, offset = r.unsigned(4, f"tensor {name!r}'s type"), r.unsigned(8, f"tensor {name!r}'s offset")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise r.fail(f"tensor {name!r} has the unknown tensor type {kind}") from None
            elements = math.prod(shape)
            if shape[0] % block:
                raise r.fail(f"tensor {name!r}: {shape[0]} columns do not fill blocks of {block}")
            described.append((name, offset, elements // block * block_bytes))
        start = -(-handle.tell() // alignment) * alignment
        for name, offset, nbytes in described:
            if start + offset + nbytes > size:
                raise r.fail(f"tensor {name!r} needs bytes up to {start + offset + nbytes}, beyond the file's "
                             f"{size}: truncated or damaged")  # fmt: skip
