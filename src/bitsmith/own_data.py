"""The user's own models and data, named in a recipe: an image folder (torchvision's ``ImageFolder`` layout), text
(a ``.txt`` file, a folder of them, JSON lines, parquet, or a ``datasets`` dataset saved with ``save_to_disk``) and a
model built by a Python import path (``module:callable``) with its weights from a safetensors or state-dict file.

Nothing here executes code from a file the recipe points at: images and text are parsed as data, weights are read
with safetensors or ``torch.load(weights_only=True)``; the only code that runs is the callable the recipe names by
its import path (an explicit choice, like ``python -c``). Every error is one line naming the recipe field.
"""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_IMAGES = 200_000  # per split: a bound before anything is decoded
MAX_IMAGE_PIXELS = 8192 * 8192  # a larger image is refused before it is decoded (PIL's header gives the size)
MAX_TEXT_BYTES = 2**30  # a text file is read whole: bounded first
SPLIT_NAMES = (("train", "val"), ("train", "test"))  # ROOT/train/CLASS + ROOT/val/CLASS (or test)


class DataError(ValueError):
    """A user's data or model that cannot be used: the message names the recipe field and the fix."""


@dataclass
class ImageSplits:
    """An image folder read as tensors: ``(N, C, H, W)`` floats in [0, 1] and integer labels."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: list[str]


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    if len(files) > MAX_IMAGES:
        raise DataError(f"data.path: {root} holds {len(files)} images, more than {MAX_IMAGES}; use a subset folder")
    return files


def read_image(path: Path, size: int, channels: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(f"data.path: {path} is {image.width}x{image.height} pixels, more than allowed")
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"data.path: {path} is not a readable image ({str(exc)[:120]})") from None
    return data.view(size, size, channels).permute(2, 0, 1).float().div(255)


def read_images(root: Path, classes: list[str], size: int, channels: int) -> tuple[Tensor, Tensor]:
    files = image_files(root, classes)
    if not files:
        raise DataError(f"data.path: {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    images = torch.stack([read_image(path, size, channels) for path, _ in files])
    return images, torch.tensor([label for _, label in files])


def image_folder(root: str | Path, size: int, channels: int, eval_share: float, seed: int) -> ImageSplits:
    """``ROOT/CLASS/IMAGE`` (split ``eval_share`` off for evaluation, seeded) or ``ROOT/train/CLASS/IMAGE`` with
    ``ROOT/val`` (or ``test``) beside it, every image resized to ``size`` x ``size`` with ``channels`` channels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path: no such directory: {str(root)[:200]} (an image folder: ROOT/CLASS/IMAGE)")
    for train_name, test_name in SPLIT_NAMES:
        if (root / train_name).is_dir() and (root / test_name).is_dir():
            classes = class_folders(root / train_name)
            if class_folders(root / test_name) != classes:
                raise DataError(f"data.path: {root}/{train_name} and {root}/{test_name} name different classes")
            train = read_images(root / train_name, classes, size, channels)
            return ImageSplits(train, read_images(root / test_name, classes, size, channels), classes)
    classes = class_folders(root)
    if len(classes) < 2:
        raise DataError(f"data.path: {root} holds {len(classes)} class folder(s); an image folder is ROOT/CLASS/IMAGE "
                        "with at least two classes (torchvision's ImageFolder layout)")  # fmt: skip
    images, labels = read_images(root, classes, size, channels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(labels) * eval_share))
    test, train = order[:held], order[held:]
    return ImageSplits((images[train], labels[train]), (images[test], labels[test]), classes)


def _dataset_columns(path: Path) -> Any:
    """A ``datasets`` dataset saved to disk, or a parquet file, as column -> values."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path: {path} needs the `datasets` package (pip install 'bitsmith[data]')") from None
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    return datasets.Dataset.from_parquet(str(path))


def _column(records: Any, columns: list[str], column: str, field: str, path: Path) -> list[str]:
    if column not in columns:
        raise DataError(f"data.{field}: {column!r} is not a column of {path}; its columns: {', '.join(columns)}")
    values = list(records[column])  # a dict of columns or a `datasets` Dataset: both read a column whole
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"data.{field}: column {column!r} of {path} holds {type(bad).__name__} values, not text")
    return values


def read_text_records(path: str | Path, column: str, pair_column: str | None = None) -> list[tuple[str, str]]:
    """Text records (and the paired text of each, or ``""``) from ``path``: a ``.txt`` file (one record), a folder
    of ``.txt`` files (one each), JSON lines (``.jsonl``), parquet, or a ``datasets`` folder (``save_to_disk``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data.path: no such file or directory: {str(path)[:200]}")
    if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"data.path: {path} holds no .txt files and is not a saved `datasets` dataset")
        return [(read_text(f), "") for f in files]
    if path.suffix == ".txt":
        return [(read_text(path), "")]
    if path.suffix in (".jsonl", ".json"):
        records = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
        if not records or not all(isinstance(r, dict) for r in records):
            raise DataError(f"data.path: {path} is not JSON lines of objects (one {{...}} per line)")
        columns = sorted({k for r in records for k in r})
        table: Any = {k: [r.get(k) for r in records] for k in columns}
    elif path.is_dir() or path.suffix == ".parquet":
        table = _dataset_columns(path)
        columns = list(table.column_names)
    else:
        raise DataError(f"data.path: {path.name}: expected .txt, a folder of .txt, .jsonl, .parquet or a saved "
                        "`datasets` folder")  # fmt: skip
    texts = _column(table, columns, column, "column", path)
    pairs = _column(table, columns, pair_column, "pair_column", path) if pair_column else [""] * len(texts)
    return list(zip(texts, pairs, strict=True))


def read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise DataError(f"data.path: {path} is {size} bytes, more than {MAX_TEXT_BYTES}; split it")
    return path.read_text(encoding="utf-8", errors="replace")


def split_records(records: list[Any], eval_share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(calibration, evaluation) records, shuffled with ``seed``; at least one of each."""
    if len(records) < 2:
        raise DataError(f"data.path: {len(records)} record(s); calibration and evaluation need at least two")
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    held = min(len(shuffled) - 1, max(1, round(len(shuffled) * eval_share)))
    return shuffled[held:], shuffled[:held]


def build_model(factory: str, kwargs: dict[str, Any], weights: str | None) -> nn.Module:
    """``module:callable`` called with ``kwargs`` (the recipe names this code explicitly); ``weights`` (safetensors,
    or a state dict saved with ``torch.save``, read with ``weights_only=True``) loaded strictly."""
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise DataError(f"model.factory: {factory!r}: expected 'package.module:callable', e.g. 'mypkg.models:net'")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"model.factory: cannot import {factory!r} ({str(exc)[:120]}); it must be importable "
                        "(installed, or on PYTHONPATH)") from None  # fmt: skip
    model = target(**kwargs)
    if not isinstance(model, nn.Module):
        raise DataError(f"model.factory: {factory} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, Path(weights))
    return model.eval()


def load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise DataError(f"model.weights: no such file: {str(path)[:200]}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (an unpicklable or non-tensor file: one line)
            raise DataError(f"model.weights: {path} is not a state dict of tensors ({str(exc).splitlines()[0][:120]}); "
                            "bitsmith never unpickles whole modules (that would run code from the file)") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"model.weights: {path} holds a {type(state).__name__}, not a state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = next(iter(str(exc).splitlines()[1:]), str(exc))  # the first mismatch, below torch's heading
        raise DataError(f"model.weights: {path} does not fit the model ({detail[:160].strip()})") from None
