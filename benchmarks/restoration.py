"""MoFME on multi-weather restoration (Fashion-MNIST under several weathers at once, bitsmith.zoo.weather): the
zoo's U-Net-style restorer with its bottleneck FFNs dense, as a parallel mixture of experts, or as MoFME's
feature-modulated experts (with its uncertainty-aware router, and with a plain linear router as the ablation), all
trained from scratch with the same budget. PSNR on held-out images (overall and per weather), parameters in the
expert layers, and (``--time``, alone on an idle machine) forward time. Writes docs/results/restoration.{json,md,png};
rows resume (a killed training continues from its last epoch).

Usage: python benchmarks/restoration.py [--only TEXT] [--time] [--write-only]
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS, bench_parser, save_figure
from llm import Entry, run_rows

from bitsmith import build_method, compress, load, save
from bitsmith.data import subset
from bitsmith.eval.latency import time_forward
from bitsmith.files import atomic_write_text
from bitsmith.zoo import cache_dir
from bitsmith.zoo.data import load_fashion_mnist
from bitsmith.zoo.restorer import ZOO_ARCH, Restorer
from bitsmith.zoo.weather import WEATHERS, psnr, weathered

ROWS = RESULTS / "restoration.json"
TRAIN_EXAMPLES, EVAL_EXAMPLES, EPOCHS, BATCH, LR = 20_000, 2_000, 6, 128, 2e-3
ARCH = ZOO_ARCH  # the restoration task's restorer too
MOE = {"experts": 8, "top_k": 2}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "dense FFN": [],
    "parallel MoE (8 experts, top-2, linear router)": [
        {"name": "mofme", "kind": "parallel", "router": "linear", **MOE}
    ],
    "MoFME (8 feature-modulated experts, top-2, uncertainty-aware router)": [{"name": "mofme", **MOE}],
    "MoFME, linear router (ablation)": [{"name": "mofme", "router": "linear", **MOE}],
}
TIME_BATCH, TIME_RUNS = 64, 20


@functools.cache
def data() -> tuple[torch.Tensor, ...]:
    train = subset(*load_fashion_mnist("train"), TRAIN_EXAMPLES, seed=0)[0]
    test = subset(*load_fashion_mnist("test"), EVAL_EXAMPLES, seed=1)[0]
    return (*weathered(train, seed=0), *weathered(test, seed=1))


def fresh(methods: list[dict[str, Any]]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Restorer(**ARCH)
    if methods:
        compress(model, [build_method(m) for m in methods], [data()[0][:64]])
    return model


def trained(methods: list[dict[str, Any]]) -> tuple[torch.nn.Module, float]:
    """Trained from scratch (Adam, MSE to the clean image); cached, and a killed run resumes from its last epoch."""
    digest = hashlib.sha256(json.dumps([methods, ARCH, EPOCHS, BATCH, LR, TRAIN_EXAMPLES]).encode()).hexdigest()[:16]
    final = cache_dir() / "bench" / f"restoration-{digest}.safetensors"
    if final.is_file():  # the checkpoint rebuilds the mixtures on the plain restorer
        torch.manual_seed(0)
        return load(final, Restorer(**ARCH)).eval(), json.loads(final.with_suffix(".json").read_text())["seconds"]
    model = fresh(methods)
    x, y = data()[0], data()[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    state, start, seconds = final.with_suffix(".pt"), 0, 0.0
    if state.is_file():
        saved = torch.load(state, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, seconds = saved["epoch"], saved["seconds"]
    for epoch in range(start, EPOCHS):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), BATCH):
            rows = order[i : i + BATCH]
            loss = F.mse_loss(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - began
        print(f"  epoch {epoch + 1}/{EPOCHS}: loss {float(loss):.5f}", flush=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "seconds": seconds}, state)  # fmt: skip
    save(model, final)
    atomic_write_text(final.with_suffix(".json"), json.dumps({"seconds": round(seconds, 1)}))
    state.unlink(missing_ok=True)
    return model.eval(), seconds


def expert_parameters(model: torch.nn.Module) -> int:
    """Parameters in the bottleneck's FFN / expert layers (routers included)."""
    return sum(p.numel() for block in model.bottleneck for p in block.ffn.parameters())


def row(methods: list[dict[str, Any]]) -> dict[str, Any]:
    model, seconds = trained(methods)
    xt, yt, present = data()[3:]
    with torch.no_grad():
        restored = torch.cat([model.eval()(xt[i : i + 256]) for i in range(0, len(xt), 256)])
    scores, before = psnr(restored, yt), psnr(xt, yt)
    per = {w: float(scores[present[:, i] > 0].mean()) for i, w in enumerate(WEATHERS)}
    return {"psnr": float(scores.mean()), "psnr_input": float(before.mean()), "psnr_per_weather": per,
            "expert_params": expert_parameters(model), "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads()}  # fmt: skip


def time_row(methods: list[dict[str, Any]]) -> dict[str, Any]:
    """Forward time of a batch of ``TIME_BATCH`` images at 2 threads (run alone)."""
    model, _ = trained(methods)
    timing = time_forward(model.eval(), data()[3][:TIME_BATCH], runs=TIME_RUNS, num_threads=2)
    return {"median_ms": timing.median_ms, "timing": timing.to_dict()}


def entries(timed: bool) -> list[Entry]:
    fn = time_row if timed else row
    section = "time" if timed else "quality"
    return [(label, {"section": section, "variant": label}, {"methods": methods}, functools.partial(fn, methods))
            for label, methods in VARIANTS.items()]  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    quality = [r for r in rows if r.get("section") == "quality" and "error" not in r]
    times = {r["variant"]: r for r in rows if r.get("section") == "time" and "error" not in r}
    lines = ["# Multi-weather restoration: dense FFN vs parallel MoE vs MoFME", "",
             "Regenerate: `make bench-restoration` (`python benchmarks/restoration.py`, then `--time` alone on an idle "
             "machine; rows resume).", "",
             f"The zoo's U-Net-style restorer (width {ARCH['width']}, {ARCH['blocks']} bottleneck mixer blocks at 7x7, "
             f"FFN ratio {ARCH['ffn_ratio']}) with its bottleneck FFNs dense, as {MOE['experts']} parallel experts or "
             f"as {MOE['experts']} feature-modulated experts (top-{MOE['top_k']}), trained from scratch for {EPOCHS} "
             f"epochs on {TRAIN_EXAMPLES:,} Fashion-MNIST training images under random weathers (Adam lr {LR:g}, "
             f"batch {BATCH}, MSE to the clean image). PSNR (dB) on {EVAL_EXAMPLES:,} held-out test images under "
             f"their own weathers (every image has one to four of {', '.join(WEATHERS)}); per-weather columns: the "
             f"images that have it. Forward time: a batch of {TIME_BATCH} at 2 threads, median of {TIME_RUNS} runs, "
             "timed alone.", ""]  # fmt: skip
    if quality:
        heads = " | ".join(WEATHERS)
        lines += [f"| model | PSNR | {heads} | expert-layer params | forward ms | train s | load |",
                  "|---|---|" + "---|" * len(WEATHERS) + "---|---|---|---|",
                  f"| the corrupted input | {quality[0]['psnr_input']:.2f} |" + " |" * len(WEATHERS) + " | | | |"]  # fmt: skip
        for r in quality:
            timed = times.get(r["variant"])
            forward = f"{timed['median_ms']:.2f}" if timed else ""
            cells = " | ".join(f"{r['psnr_per_weather'][w]:.2f}" for w in WEATHERS)
            lines.append(f"| {r['name']} | {r['psnr']:.2f} | {cells} | {r['expert_params']:,} | {forward} | "
                         f"{r['train_seconds']:.0f} | {r['load'][0]:.1f} |")  # fmt: skip
        lines += ["", "![PSNR against expert-layer parameters](restoration.png)", ""]
    (RESULTS / "restoration.md").write_text("\n".join(lines))
    plot(quality)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.scatter(r["expert_params"], r["psnr"], s=40)
        ax.annotate(r["name"].split(" (")[0], (r["expert_params"], r["psnr"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters in the expert layers")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Multi-weather restoration")
    ax.grid(alpha=0.3)
    save_figure(fig, "restoration.png")


if __name__ == "__main__":
    parser = bench_parser(__doc__)
    parser.add_argument("--time", action="store_true", help="time the forward passes (alone, on an idle machine)")
    run_rows(__doc__, ROWS, lambda args: entries(args.time), write, parser)
