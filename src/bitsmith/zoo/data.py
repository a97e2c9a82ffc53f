"""Fashion-MNIST from the idx files of Debian's ``dataset-fashion-mnist`` (or a directory you name)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _holding_data(folder: Path) -> Path | None:
    """``folder`` or its ``fashion-mnist`` subfolder, whichever holds the idx files (None: neither)."""
    return next((sub for sub in (folder, folder / "fashion-mnist") if _find(sub, FILES["test"][0])), None)


def fashion_mnist_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the idx files: ``root``, else ``$BITSMITH_DATA``, else Debian's. A ``root`` (or
    ``$BITSMITH_DATA``) that is given but holds no data is an error, never a silent fall back to another copy."""
    chosen = next((Path(p) for p in (root, os.environ.get("BITSMITH_DATA")) if p), None)
    if chosen is not None:
        found = _holding_data(chosen)
        if found is not None:
            return found
        what = "data.root" if root else "BITSMITH_DATA"
        raise FileNotFoundError(f"{what} {chosen}: no Fashion-MNIST idx files there (t10k-images-idx3-ubyte[.gz] and "
                                "friends); point it at the folder that holds them, or leave it unset for Debian's")  # fmt: skip
    found = _holding_data(DEBIAN_DIR)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {[str(DEBIAN_DIR)]}. Install them with "
        f"`{INSTALL_HINT}` (as root), or point BITSMITH_DATA (or the recipe's data.root) at a directory "
        "holding train-images-idx3-ubyte[.gz] and friends."
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported, got type 0x{dtype_code:02x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated, expected {int(np.prod(shape))} values and found {body.size}")
    return body.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, 28, 28)`` as float32 in [0, 1] and labels ``(N,)`` int64."""
    if split not in FILES:
        raise ValueError(f"split must be one of {list(FILES)}, got {split!r}")
    directory = fashion_mnist_dir(root)
    images_file, labels_file = (_find(directory, stem) for stem in FILES[split])
    if images_file is None or labels_file is None:
        raise FileNotFoundError(f"{directory}: the {split} split's idx files are missing")
    images = torch.from_numpy(read_idx(images_file).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels
