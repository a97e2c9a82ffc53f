"""HERO vs plain SGD vs SAM: the zoo CNN trained from scratch, then post-training quantized at 8..2 bits.

Same architecture, data subset, epochs and SGD schedule for every run, over ``SEEDS`` (the seed sets
the initial weights and the shuffling); only the penalty hook differs (none / ``sam`` rho 0.05 /
``hero`` gamma 0.1 or 0.5, h 0.05). Each trained model is quantized with weight-only per-channel
symmetric min-max RTN (``ptq``, float activations) at 8/6/4/3/2 bits. The Hessian of the training
loss on 1,000 training images: total Hutchinson trace (sum over layers) and the largest per-layer top
eigenvalue.

Regenerate: ``make bench-hero`` (``python benchmarks/hero.py``). Writes ``docs/results/hero.{md,png,json}``.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, save_figure  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.eval.tasks import classification_task  # noqa: E402
from bitsmith.files import atomic_write_text  # noqa: E402
from bitsmith.method import Method  # noqa: E402
from bitsmith.methods.ptq.ptq import PTQ  # noqa: E402
from bitsmith.methods.robust.hero import HERO, SAM  # noqa: E402
from bitsmith.sensitivity import hutchinson_traces, top_eigenvalues  # noqa: E402
from bitsmith.train import TrainConfig, fit  # noqa: E402
from bitsmith.zoo import get_zoo_model  # noqa: E402

TRAIN_IMAGES = 20_000
EPOCHS = 4
PTQ_BITS = [8, 6, 4, 3, 2]
SEEDS = [0, 1, 2]
RUNS: dict[str, list[Method]] = {
    "SGD": [],
    "SAM rho=0.05": [SAM(rho=0.05)],
    "HERO gamma=0.1": [HERO(gamma=0.1)],
    "HERO gamma=0.5": [HERO(gamma=0.5)],
}


def run() -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "hero.json")
    task = classification_task(None, None, 256, 128, seed=0)
    images, labels = task.train
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:TRAIN_IMAGES]
    train = (images[pick], labels[pick])
    entry = get_zoo_model("cnn")
    for seed, (label, methods) in itertools.product(SEEDS, RUNS.items()):
        if rows.done(run=label, seed=seed):
            continue
        config = TrainConfig(**{**entry.train.__dict__, "epochs": EPOCHS, "seed": seed})
        torch.manual_seed(seed)
        model = entry.build()
        start = time.perf_counter()
        fit(model, *train, config, methods)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "run": label,
            "seed": seed,
            "train_seconds": seconds,
            "fp32": task.evaluate(model)["accuracy"],
        }
        row.update(hessian(model, train))
        for bits in PTQ_BITS:
            quantized = copy.deepcopy(model)
            compress(quantized, PTQ(w_bits=bits, a_bits=None), task.calibration)
            row[f"w{bits}"] = task.evaluate(quantized)["accuracy"]
        rows.add(row)
        print(row, flush=True)
    return rows.rows


def hessian(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    x, y = train[0][:1000], train[1][:1000]
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def loss(m: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(x), y)

    traces = hutchinson_traces(model, loss, names, max_probes=32)
    total = sum(traces[n] * model.get_submodule(n).weight.numel() for n in names)
    return {"trace": total, "lambda_max": max(top_eigenvalues(model, loss, names).values())}


def write(rows: list[dict[str, Any]]) -> None:
    header = " | ".join(f"W{b} %" for b in PTQ_BITS)
    lines = [
        "# HERO vs SGD vs SAM under post-training quantization (zoo CNN, Fashion-MNIST)",
        "",
        f"Trained from scratch on {TRAIN_IMAGES:,} training images for {EPOCHS} epochs (SGD, lr 0.1 cosine,",
        f"seeds {', '.join(map(str, SEEDS))}), then weight-only per-channel RTN; top-1 on the 10,000 test images.",
        "`tr(H)`: Hutchinson trace of the training loss on 1,000 training images (sum over layers); `λmax`:",
        "the largest per-layer top eigenvalue. Regenerate: `make bench-hero`.",
        "",
        "Mean over the seeds: accuracy lost to PTQ (W*b* minus FP32, points; closer to 0 is better).",
        "",
        "| run | seeds | FP32 % | " + " | ".join(f"W{b} drop" for b in PTQ_BITS) + " | tr(H) | λmax |",
        "|---|---|---|" + "---|" * len(PTQ_BITS) + "---|---|",
    ]
    for label in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == label]
        drops = " | ".join(f"{mean(100 * (r[f'w{b}'] - r['fp32']) for r in mine):+.2f}" for b in PTQ_BITS)
        lines.append(f"| {label} | {len(mine)} | {mean(100 * r['fp32'] for r in mine):.2f} | {drops} | "
                     f"{mean(r['trace'] for r in mine):.1f} | {mean(r['lambda_max'] for r in mine):.2f} |")  # fmt: skip
    lines += ["", "Every run:", "", f"| run | seed | FP32 % | {header} | tr(H) | λmax | train s |",
              "|---|---|---|" + "---|" * len(PTQ_BITS) + "---|---|---|"]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{100 * r[f'w{b}']:.2f}" for b in PTQ_BITS)
        lines.append(f"| {r['run']} | {r.get('seed', 0)} | {100 * r['fp32']:.2f} | {cells} | {r['trace']:.1f} | "
                     f"{r['lambda_max']:.2f} | {r['train_seconds']:.0f} |")  # fmt: skip
    lines += ["", "![PTQ accuracy by bits](hero.png)", ""]
    atomic_write_text(RESULTS / "hero.md", "\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in dict.fromkeys(r["run"] for r in rows):  # the mean over seeds
        mine = [r for r in rows if r["run"] == label]
        ax.plot(PTQ_BITS, [mean(100 * r[f"w{b}"] for r in mine) for b in PTQ_BITS], marker="o", label=label)
    ax.set_xlabel("weight bits (per-channel RTN)")
    ax.set_ylabel("top-1 %")
    ax.set_title("CNN: accuracy after PTQ, by training method")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "hero.png")


if __name__ == "__main__":
    write(Rows(RESULTS / "hero.json").rows if sys.argv[1:] == ["--write-only"] else run())
