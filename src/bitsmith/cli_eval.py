"""The command-line commands that read a checkpoint: ``eval`` (task metrics, attacks, MoBiQuant operating points)
and ``deploy`` (an integer backend, timed against FP32)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bitsmith.progress import log
from bitsmith.terminal import console, errors

GGUF_WINDOWS = 8  # 512-token windows per text when a GGUF file is scored without --windows
QUALITY = ("accuracy", "cosine", "retrieval", "perplexity", "fid_zoo_cnn", "kid_zoo_cnn", "noise_mse")  # printed


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def cmd_eval(args: argparse.Namespace) -> int:
    from bitsmith.eval.cost import model_cost
    from bitsmith.run import load_checkpoint

    if args.checkpoint.endswith(".gguf"):
        return _gguf_in_llamacpp(Path(args.checkpoint), args.model or "smollm2", args.windows, args.threads,
                                 timed=args.backend is not None)  # fmt: skip
    model, fp32, task = load_checkpoint(args.checkpoint, args.model, args.data, args.windows)
    if args.attack:
        return _eval_attacks(args, model, task)
    if args.slices or args.threshold:
        return _eval_precisions(args, model, task)
    log.info(f"scoring {args.checkpoint} on {task.eval_examples} examples")
    metrics = task.evaluate(model)
    cost = model_cost(model, task.first(task.example(1))).totals
    reference = args.model or "the zoo model the checkpoint names"
    console.print(
        f"{args.checkpoint}: {_summary(metrics)} on {task.eval_examples} examples (KL / agreement / cosine against "
        f"the float {reference}), "
        f"size {cost['size_bytes'] / 1024:.1f} KB, avg weight bits {cost['avg_weight_bits']:.2f}, "
        f"GBOPs {cost['bops'] / 1e9:.3f}",
        highlight=False,
    )
    if args.backend is not None:
        _deploy_and_time(args, model, fp32, task)
    return 0


def _eval_attacks(args: argparse.Namespace, model: Any, task: Any) -> int:
    """Clean and robust top-1 under each attack and eps, white-box (through the fake-quant modules) and transferred
    from the checkpoint's own weights in float, with the sanity checks of every PGD number; ``--json`` also writes
    the report and a RobustBench-style entry."""
    from bitsmith.data import subset
    from bitsmith.export.checkpoint import read_meta
    from bitsmith.files import atomic_write_text
    from bitsmith.robust import attack_specs, robust_evaluate
    from bitsmith.run import float_twin

    if task.kind != "classification":
        raise ValueError(
            f"--attack evaluates image classifiers (the zoo CNN / ViT); this checkpoint's task is {task.kind}"
        )
    specs = attack_specs(args.attack, args.eps, args.norm, args.steps, args.restarts)
    meta = read_meta(args.checkpoint)
    name = args.model or meta.get("model")
    images, labels = subset(*task.test, args.subset, seed=0)
    source = float_twin(model) if args.transfer else None  # the same training's weights, without fake quantization
    report = robust_evaluate(model, images, labels, specs, source=source, sanity=True)
    scope = "all" if args.subset is None or args.subset >= len(task.test[1]) else f"a seeded subset of {len(labels)}"
    console.print(f"{args.checkpoint} ({scope} test images; transfer source: "
                  f"{'its own weights in float' if source is not None else 'none'})", highlight=False)  # fmt: skip
    for line in report.lines():
        console.print(f"  {line}", highlight=False)
    if args.json:
        entry = report.robustbench_entry(name, meta.get("recipe"))
        atomic_write_text(args.json, json.dumps({"report": report.to_dict(), "robustbench": entry}, indent=2))
        console.print(f"wrote {args.json}", highlight=False)
    return 0


def _eval_precisions(args: argparse.Namespace, model: Any, task: Any) -> int:
    """One MoBiQuant checkpoint read at several fixed slice counts and router thresholds, never re-quantized."""
    from bitsmith.methods.llm.routing import average_bits, set_operating_point

    points = [(f"{k} slices", {"slices": k}) for k in args.slices or []]
    points += [(f"router threshold {t:g}", {"threshold": t}) for t in args.threshold or []]
    for label, point in points:
        set_operating_point(model, **point)
        metrics = task.evaluate(model)
        console.print(f"{args.checkpoint} at {label}: {_summary(metrics)}, {average_bits(model):.2f} weight bits per "
                      "weight (token average)", highlight=False)  # fmt: skip
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from bitsmith.files import writable_folder
    from bitsmith.run import load_checkpoint

    if args.out:
        writable_folder(Path(args.out))
    if args.backend == "llama.cpp":  # the checkpoint as a GGUF file (embedding Q8_0), scored and timed in llama.cpp
        path = export_gguf(args.checkpoint, Path(args.out) / "model.gguf" if args.out else None, "q8_0")
        log.info(f"written: {path}")
        return _gguf_in_llamacpp(path, args.model or "smollm2", None, args.threads, timed=True)
    model, fp32, task = load_checkpoint(args.checkpoint, args.model, args.data)
    deployed = _deploy_and_time(args, model, fp32, task)
    if deployed["path"]:
        console.print(f"written: {deployed['path']}")
    return 0


def _deploy_and_time(args: argparse.Namespace, model: Any, fp32: Any, task: Any) -> dict[str, Any]:
    """Deploy ``model`` on ``args.backend``; print its agreement, task metrics and latency vs FP32."""
    from bitsmith.eval.latency import Timing, speedup, time_forward
    from bitsmith.run import measure_deployed

    example = task.example(args.batch)
    log.info(f"deploying on {args.backend}: export, then {args.runs} timed runs and the task's metrics")
    deployed = measure_deployed(model, task, args.backend, example, args.runs, args.threads, getattr(args, "out", None))
    log.info(f"timing the float model ({args.runs} runs)")
    fp32_timing = time_forward(fp32, example, runs=args.runs, num_threads=args.threads)
    timing = Timing.from_dict(deployed["timing"])
    scores = {k: deployed[k] for k in QUALITY if k in deployed}
    console.print(
        f"deployed on {deployed['backend']} in {deployed['export_seconds']:.1f} s "
        f"({integer_kernels(deployed)}): agreement with the fake-quant model (cosine) {deployed['agreement']:.5f}; "
        f"{_summary(scores)}",
        highlight=False,
    )
    if deployed["integer_layers"] > 0:
        verdict = speedup(fp32_timing, timing)
    else:
        verdict = "no speed-up stated: nothing runs in integer kernels"
    console.print(f"latency at batch {args.batch}: {timing} vs FP32 {fp32_timing}: {verdict}", highlight=False)
    if deployed["timings"]:
        tried = ", ".join(f"{name} {ms:.2f} ms" for name, ms in deployed["timings"].items())
        console.print(f"auto: timed {tried}; kept {deployed['backend']}", highlight=False)
    if deployed["agreement"] < 0.999:
        errors.print(f"[yellow]warning:[/] the deployed model's outputs differ (cosine {deployed['agreement']:.5f})")
    return deployed


def integer_kernels(deployed: dict[str, Any]) -> str:
    """How much of a deployed model runs in integer kernels, in words."""
    count, fallbacks = deployed["integer_layers"], deployed["fallbacks"]
    if count == 0 and not fallbacks:
        return "nothing quantized: it runs in float"
    if count == 0:
        return f"every quantized layer fell back to float: {', '.join(fallbacks)}"
    return f"{count} layer(s) in integer kernels" + (f", {len(fallbacks)} in float" if fallbacks else "")


def cmd_export(args: argparse.Namespace) -> int:
    """A run's checkpoint as a GGUF file: the zoo LLM's architecture and tokenizer, bitsmith's codes as blocks."""
    out = export_gguf(args.checkpoint, Path(args.out) if args.out else None, args.float_type)
    console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; every tensor checked against the checkpoint)")
    return 0


def export_gguf(given: str, out: Path | None, float_type: str) -> Path:
    """Write the checkpoint ``given`` (or a run folder's) as a GGUF file at ``out`` (default: ``model.gguf``
    beside it); refused in one line for a model without a llama-architecture GGUF source."""
    from bitsmith.export.checkpoint import read_meta
    from bitsmith.export.gguf_file import write_gguf
    from bitsmith.run import load_checkpoint
    from bitsmith.zoo.llm import GGUF_MODELS, gguf_path

    checkpoint = _checkpoint_file(given)
    name = read_meta(str(checkpoint)).get("model")
    if name not in GGUF_MODELS:
        raise ValueError(f"{checkpoint}: --gguf needs a checkpoint of a zoo LLM with the llama architecture "
                         f"({', '.join(GGUF_MODELS)}), whose GGUF gives the architecture and tokenizer; this one is "
                         f"of {str(name)[:80]!r}")  # fmt: skip
    model, _, _ = load_checkpoint(str(checkpoint), None, None, 1)
    return write_gguf(model, gguf_path(str(name)), out or checkpoint.with_name("model.gguf"), float_type)


def _checkpoint_file(given: str) -> Path:
    """``given`` or, for a run folder, its ``model.safetensors``; one line when there is none."""
    checkpoint = Path(given)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "model.safetensors"
    if not checkpoint.is_file():
        raise ValueError(f"{given}: no checkpoint there; pass model.safetensors or a run folder written "
                         "with export: {checkpoint: true}")  # fmt: skip
    return checkpoint


def _gguf_in_llamacpp(path: Path, name: str, windows: int | None, threads: int, timed: bool) -> int:
    """A GGUF file scored by llama.cpp on the language-model task's windows (KL / top-1 against the FP32 zoo model
    ``name``, whose tokenizer the file shares), and with ``timed`` its prefill / decode speed."""
    from bitsmith.eval.lm import language_model_task
    from bitsmith.export.gguf_check import validate_gguf
    from bitsmith.export.llamacpp import GgufLanguageModel, speed
    from bitsmith.zoo.llm import load_llm

    validate_gguf(path)  # a missing or damaged file is refused before the FP32 model loads
    fp32, tokenizer = load_llm(name)
    count = windows or GGUF_WINDOWS
    task = language_model_task(tokenizer, count, 1, 1, seed=0, kl_windows=min(count, 16))
    log.info(f"scoring FP32 {name} and {path.name} (llama.cpp, {threads} threads) on {count} windows per text")
    task.evaluate(fp32)
    lm = GgufLanguageModel(path, threads=threads)
    try:
        metrics = task.evaluate(lm)
    finally:
        lm.close()
    line = f"{path}: {_summary(metrics)} on {task.eval_examples} tokens (KL / agreement against FP32 {name})"
    if timed:
        speeds = speed(path, next(iter(task.eval_rows.values()))[0].tolist(), threads=threads)
        line += (f"; llama.cpp prefill {speeds['prefill_tokens_per_s']:.0f} tokens/s (512), decode "
                 f"{speeds['decode_tokens_per_s']:.1f} tokens/s (128 new, batch 1), {threads} threads")  # fmt: skip
    console.print(line, highlight=False)
    return 0
