"""Run one recipe end to end: model, data, baseline metrics, methods, optional training, report."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from bitsmith import distributed
from bitsmith.data import subset
from bitsmith.eval.cost import model_cost
from bitsmith.eval.latency import time_forward
from bitsmith.eval.report import run_report_writers
from bitsmith.eval.tasks import Task
from bitsmith.export.checkpoint import save
from bitsmith.files import MANIFEST, atomic_write_text, publish_run, run_lock, writable_folder
from bitsmith.method import compress
from bitsmith.progress import duration, log
from bitsmith.recipe import Recipe
from bitsmith.tasks import SMOKE, SavedRun, load_task, saved_run_kind, task_kind
from bitsmith.train import TrainConfig, fit, remove_training_states
from bitsmith.zoo import (
    structure_of,
)


def model_source(recipe: Recipe) -> str:
    """The zoo name, HF directory or import path the recipe's model comes from (its task kind's ``source``)."""
    return task_kind(recipe).source(recipe)


def load_checkpoint(
    path: str, model_name: str | None, data_root: str | None, windows: int | None = None, window: int = 512
) -> tuple[nn.Module, nn.Module, Task]:
    """(compressed model, its FP32 original (timing; the reference of cosine or KL), task) of a checkpoint
    written by ``bitsmith run``; ``model_name`` (zoo name or HF directory) overrides the one the checkpoint
    names. An LLM is scored on ``windows`` text windows of ``window`` tokens (default: its recipe's ``eval_size``)."""
    from bitsmith.export.checkpoint import read_meta

    meta = read_meta(path)
    name = model_name or meta.get("model")
    if name is None:
        raise ValueError(f"{path}: the checkpoint does not name its model; pass --model NAME")
    saved = SavedRun(path, meta, str(name), model_name is not None, data_root, windows, window)
    return saved_run_kind(saved).reload(saved)


def measure_deployed(
    model: nn.Module, task: Task, backend: str, example: Any, runs: int, threads: int | None, out: str | None = None
) -> dict[str, Any]:
    """Deploy ``model`` on ``backend``: its task metrics, latency, agreement with the fake-quant model."""
    from bitsmith.deploy import agreement, deploy

    deployment = deploy(model, example, backend, out, num_threads=threads)
    timing = time_forward(deployment.model, example, runs=runs, num_threads=threads)
    return {
        **task.evaluate(deployment.model),
        "latency_ms": timing.median_ms,
        "timing": timing.to_dict(),
        "integer_layers": deployment.integer_layers,
        "backend": deployment.backend,
        "agreement": agreement(deployment.model, model, example),
        "export_seconds": round(deployment.seconds, 3),
        "fallbacks": deployment.fallbacks,
        "path": deployment.path,
        "timings": deployment.timings,
    }


def measure(model: nn.Module, task: Task, recipe: Recipe, smoke: bool) -> dict[str, Any]:
    example = task.example(SMOKE["latency_batch"] if smoke else recipe.eval.latency_batch)
    cost = model_cost(model, task.first(example))
    metrics: dict[str, Any] = {
        **task.evaluate(model),
        "size_bytes": cost.totals["size_bytes"],
        "avg_weight_bits": cost.totals["avg_weight_bits"],
        "sparsity": cost.totals["sparsity"],
        "bops": cost.totals["bops"],
        "latency_ms": None,
    }
    timing = None
    if recipe.eval.latency:
        runs = SMOKE["latency_runs"] if smoke else recipe.eval.latency_runs
        timing = time_forward(model, example, runs=runs, num_threads=recipe.eval.threads)
        metrics["latency_ms"] = timing.median_ms
    return {"metrics": metrics, "layers": cost.to_dict()["layers"], "timing": timing and timing.to_dict()}


def robust_section(recipe: Recipe, fp32: nn.Module, model: nn.Module, task: Task, smoke: bool) -> dict[str, Any]:
    """The recipe's attacks on the FP32 and the compressed model (white-box; the compressed one also under the
    transfer attack from its own weights in float), and a RobustBench-style entry for the compressed one."""
    from bitsmith.robust import robust_evaluate

    assert recipe.attack is not None and task_kind(recipe).labelled
    size = (
        min(recipe.attack.subset or SMOKE["attack_examples"], SMOKE["attack_examples"])
        if smoke
        else recipe.attack.subset
    )
    images, labels = subset(*task.test, size, seed=recipe.data.seed)
    specs = recipe.attack.specs()
    log.info(f"attacking the FP32 and the compressed model on {len(labels)} test images: "
             + ", ".join(s.label() for s in specs))  # fmt: skip
    base = robust_evaluate(fp32, images, labels, specs, sanity=recipe.attack.sanity)
    source = float_twin(model) if recipe.attack.transfer else None  # same training: masking shows, robustness not
    comp = robust_evaluate(model, images, labels, specs, source=source, sanity=recipe.attack.sanity)
    return {"baseline": base.to_dict(), "compressed": comp.to_dict(),
            "robustbench": comp.robustbench_entry(str(recipe.model.name), recipe.model_dump(mode="json"))}  # fmt: skip


def crossbar_section(recipe: Recipe, fp32: nn.Module, model: nn.Module, task: Task, smoke: bool) -> dict[str, Any]:
    """Top-1 of the FP32 and the compressed model on the recipe's crossbars, per noise level: mean, spread and
    every draw (``bitsmith.crossbar.accuracy_under_noise``)."""
    from bitsmith.crossbar import accuracy_under_noise, draw_summary, input_ranges

    section = recipe.crossbar
    assert section is not None
    size = min(section.subset or SMOKE["attack_examples"], SMOKE["attack_examples"]) if smoke else section.subset
    images, labels = subset(*task.test, size, seed=recipe.data.seed)
    draws = min(section.draws, 2) if smoke else section.draws
    nets = {"fp32": fp32, "compressed": model}
    calib = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in task.calibration]
    limits = {key: input_ranges(net, calib) if section.adc_bits is not None else None for key, net in nets.items()}
    out: dict[str, Any] = {"examples": len(labels), "draws": draws, "design": section.model_dump(), "levels": []}
    for crossbar in section.crossbars():
        log.info(f"crossbar noise {crossbar.noise:g}: {draws} draws on {len(labels)} test images")
        level: dict[str, Any] = {"noise": crossbar.noise}
        for key, net in nets.items():
            level[key] = draw_summary(accuracy_under_noise(net, images, labels, crossbar, draws, recipe.data.seed,
                                                           limits[key]))  # fmt: skip
        out["levels"].append(level)
    return out


def float_twin(model: nn.Module) -> nn.Module:
    """``model``'s own (quantized, masked) weights as a plain float model: the transfer source of the same
    training, whose gradients no fake quantizer or input rounding hides."""
    from bitsmith.nn import strip

    return strip(copy.deepcopy(model)).eval()


def run_fingerprint(resolved: dict[str, Any], source: str, smoke: bool) -> str:
    """Digest of what a run computes (resolved recipe, model source, smoke): a training state in ``--out``
    resumes only into the run that started it."""
    blob = json.dumps({"recipe": resolved, "source": source, "smoke": smoke}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_recipe(
    recipe: Recipe,
    resolved: dict[str, Any],
    out: Path,
    smoke: bool = False,
    name: str | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Run ``recipe`` and write report.json, report.md, plots, the resolved recipe and the checkpoint into
    ``out``, published together (``files.publish_run``). A training state left in ``out`` by a killed run of
    the same recipe is resumed (``restart``: discarded)."""
    writable_folder(out)
    at = distributed.world()  # under torchrun: every rank trains, rank 0 alone measures and writes
    with run_lock(out) if at.main else contextlib.nullcontext():
        if at.main and (out / MANIFEST).is_file():
            log.warning(f"--out {out} holds a finished run; its outputs are replaced by this run's")
        return _run_recipe(recipe, resolved, out, smoke, name, restart, at)


def _run_recipe(
    recipe: Recipe, resolved: dict[str, Any], out: Path, smoke: bool, name: str | None, restart: bool, at: Any
) -> dict[str, Any]:
    source = model_source(recipe)  # once: for a zoo LLM it hashes the GGUF file and the converted cache
    fingerprint = run_fingerprint(resolved, source, smoke)  # what was asked (before solving)
    model, task = load_task(recipe, smoke, source)
    log.info(f"measuring the FP32 baseline on {task.eval_examples} examples")
    baseline = measure(model, task, recipe, smoke) if at.main else {}
    methods = recipe.build_methods()
    fp32 = copy.deepcopy(model) if recipe.attack is not None or recipe.crossbar is not None else None
    start = time.perf_counter()
    train_cfg = recipe.train_config()
    trains = train_cfg is not None and task_kind(recipe).labelled
    if methods:
        names = ", ".join(m.registered_name for m in methods)
        log.info(f"compressing with {names} ({task.calib_examples} calibration examples)")
    layer_map = compress(model, methods, task.calibration, finalize=not trains) if methods else {}
    history: list[dict[str, Any]] = []
    if trains:
        images, labels = task.train
        if smoke:
            images, labels = subset(images, labels, SMOKE["train_examples"], seed=recipe.data.seed)
            train_cfg = TrainConfig(**{**train_cfg.__dict__, "epochs": 1})
        state = out / "train_state.pt"  # a killed run resumes from its last finished epoch
        if restart:
            remove_training_states(state)
        log.info(f"training {train_cfg.epochs} epoch(s) on {images.shape[0]} examples (resumable: {state})")
        history = fit(
            model,
            images,
            labels,
            train_cfg,
            methods,
            checkpoint=state,
            fingerprint=fingerprint,
            loss_fn=getattr(task, "loss", None),
        )
        if not at.main:
            return {}
        remove_training_states(state)
        for method in methods:
            method.finalize(model)
    compress_seconds = time.perf_counter() - start
    log.info(f"compressed in {duration(compress_seconds)}; measuring it")
    compressed = measure(model, task, recipe, smoke)
    compressed["metrics"]["compress_seconds"] = round(compress_seconds, 3)
    calibration_stats = {m.registered_name: m._stats for m in methods if isinstance(getattr(m, "_stats", None), dict)}
    samples = task.samples(model) if hasattr(task, "samples") else None
    robustness = robust_section(recipe, fp32, model, task, smoke) if recipe.attack is not None else None
    crossbar = crossbar_section(recipe, fp32, model, task, smoke) if recipe.crossbar is not None else None
    deployed = None
    if recipe.export.deploy != "none":
        example = task.example(SMOKE["latency_batch"] if smoke else recipe.eval.latency_batch)
        runs = SMOKE["latency_runs"] if smoke else recipe.eval.latency_runs
        log.info(f"deploying on {recipe.export.deploy}")
        deployed = measure_deployed(model, task, recipe.export.deploy, example, runs, recipe.eval.threads)

    resolved = copy.deepcopy(resolved)
    resolved["methods"] = [m.config() for m in methods]  # solved allocations re-run without re-solving
    report = {
        "name": name or out.name,
        "model": recipe.model.name or source,
        "smoke": smoke,
        "data": {"name": recipe.data.name, "eval_examples": task.eval_examples, "calib_examples": task.calib_examples},
        "baseline": baseline,
        "compressed": compressed,
        "compressed_layers": layer_map,
        "training": history,
        "deployed": deployed,
        "robustness": robustness,
        "crossbar": crossbar,
        "calibration": calibration_stats,
        "samples": samples,
        "recipe": resolved,
    }
    writers: dict[str, Any] = {}
    if recipe.export.checkpoint:  # first: the report states the file's size
        meta = {"model": report["model"], "source": source, "task": task.kind, "recipe": resolved,
                "structure": structure_of(model)}  # fmt: skip

        def write_checkpoint(path: Path) -> None:
            save(model, path, meta=meta)
            compressed["metrics"]["file_bytes"] = path.stat().st_size

        writers["model.safetensors"] = write_checkpoint
    if recipe.export.gguf:  # before the report: a grid GGUF cannot hold stops the run with nothing published
        from bitsmith.export.gguf_file import write_gguf
        from bitsmith.zoo.llm import gguf_path

        writers["model.gguf"] = lambda path: write_gguf(
            model, gguf_path(str(recipe.model.name)), path, recipe.export.gguf_float
        )
    writers |= {
        **run_report_writers(report),
        "recipe.resolved.yaml": lambda path: atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False)),
    }
    folders: dict[str, Any] = {}
    tokenizer = getattr(task, "tokenizer", None)
    if recipe.export.hf:
        from bitsmith.export.hf import save_hf

        folders["hf"] = lambda path: save_hf(model, tokenizer, path)
    if recipe.export.compressed_tensors:
        from bitsmith.export.compressed_tensors import save_compressed_tensors

        folders["compressed-tensors"] = lambda path: save_compressed_tensors(model, tokenizer, path)
    publish_run(out, writers, fingerprint, folders)
    return report
