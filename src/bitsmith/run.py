"""Run one recipe end to end: model, data, baseline metrics, methods, optional training, report."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from bitsmith.data import batches, subset
from bitsmith.eval.cost import model_cost
from bitsmith.eval.latency import measure_latency
from bitsmith.eval.report import atomic_write_text, write_run_report
from bitsmith.export.checkpoint import save
from bitsmith.method import compress
from bitsmith.recipe import Recipe, RecipeError
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import checkpoint_path, get_zoo_model, pretrained
from bitsmith.zoo.data import load_fashion_mnist

SMOKE = {"eval_size": 200, "calib_size": 32, "latency_runs": 2, "latency_batch": 16, "train_examples": 256}


def load_model(recipe: Recipe, smoke: bool) -> nn.Module:
    """The recipe's model. A smoke run without a cached checkpoint trains one tiny epoch instead."""
    if recipe.model.path is not None:
        raise RecipeError(
            "model.path: `bitsmith run` evaluates zoo classifiers for now; use the Python API for HF models"
        )
    name = recipe.model.name
    entry = get_zoo_model(name)  # type: ignore[arg-type]
    if checkpoint_path(name).is_file() or not smoke:  # type: ignore[arg-type]
        return pretrained(name, recipe.data.root)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = entry.build()
    images, labels = subset(*load_fashion_mnist("train", recipe.data.root), 1000, seed=0)
    fit(model, images, labels, TrainConfig(epochs=1, batch_size=64, optimizer="adamw", lr=2e-3))
    return model.eval()


def measure(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], recipe: Recipe, smoke: bool) -> dict[str, Any]:
    example = test[0][: SMOKE["latency_batch"] if smoke else recipe.eval.latency_batch]
    cost = model_cost(model, example[:1])
    metrics: dict[str, Any] = {
        "accuracy": accuracy(model, *test),
        "size_bytes": cost.totals["size_bytes"],
        "avg_weight_bits": cost.totals["avg_weight_bits"],
        "bops": cost.totals["bops"],
        "latency_ms": None,
    }
    if recipe.eval.latency:
        runs = SMOKE["latency_runs"] if smoke else recipe.eval.latency_runs
        metrics["latency_ms"] = measure_latency(model, example, runs=runs, num_threads=recipe.eval.threads)
    return {"metrics": metrics, "layers": cost.to_dict()["layers"]}


def run_recipe(
    recipe: Recipe, resolved: dict[str, Any], out: Path, smoke: bool = False, name: str | None = None
) -> dict[str, Any]:
    """Run ``recipe`` and write report.json, report.md, plots, the resolved recipe and the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    data = recipe.data
    test = load_fashion_mnist("test", data.root)
    test = subset(*test, SMOKE["eval_size"] if smoke else data.eval_size, seed=data.seed)
    train_images, train_labels = load_fashion_mnist("train", data.root)
    calib_size = SMOKE["calib_size"] if smoke else data.calib_size
    calib_images, calib_labels = subset(train_images, train_labels, calib_size, seed=data.seed + 1)
    calib = [x for x, _ in batches(calib_images, calib_labels, data.calib_batch_size)]

    model = load_model(recipe, smoke)
    baseline = measure(model, test, recipe, smoke)
    methods = recipe.build_methods()
    start = time.perf_counter()
    layer_map = compress(model, methods, calib) if methods else {}
    train_cfg = recipe.train_config()
    if train_cfg is not None:
        images, labels = train_images, train_labels
        if smoke:
            images, labels = subset(images, labels, SMOKE["train_examples"], seed=data.seed)
            train_cfg = TrainConfig(**{**train_cfg.__dict__, "epochs": 1})
        fit(model, images, labels, train_cfg, methods)
        for method in methods:
            method.finalize(model)
    compress_seconds = time.perf_counter() - start
    compressed = measure(model, test, recipe, smoke)
    compressed["metrics"]["compress_seconds"] = round(compress_seconds, 3)

    resolved = copy.deepcopy(resolved)
    resolved["methods"] = [m.config() for m in methods]  # solved allocations re-run without re-solving
    report = {
        "name": name or out.name,
        "model": recipe.model.name,
        "smoke": smoke,
        "data": {"eval_examples": int(test[0].shape[0]), "calib_examples": int(calib_images.shape[0])},
        "baseline": baseline,
        "compressed": compressed,
        "compressed_layers": layer_map,
        "recipe": resolved,
    }
    atomic_write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_run_report(out, report)
    if recipe.export.checkpoint:
        save(model, out / "model.safetensors", meta={"model": recipe.model.name, "recipe": resolved})
    return report
