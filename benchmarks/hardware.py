"""ReSNA on the zoo CNN (Fashion-MNIST): the same fine-tune without noise (plain) and with the crossbar's read noise
injected at several levels, each evaluated on crossbars at every noise level (mean and spread over 20 draws).
Writes docs/results/hardware.{json,md,png}; rows resume (a training killed mid-way resumes from its last epoch);
``--write-only`` rewrites the page.

Usage: python benchmarks/hardware.py [--only TEXT] [--write-only]
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import torch
from common import RESULTS, save_figure, train_cached
from llm import Entry, run_rows

from bitsmith.crossbar import Crossbar, accuracy_under_noise, draw_summary
from bitsmith.data import subset
from bitsmith.train import TrainConfig, accuracy
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

ROWS = RESULTS / "hardware.json"
TRAIN_EXAMPLES, EVAL_EXAMPLES, DRAWS = 20_000, 2_000, 20
LEVELS = (0.03, 0.05, 0.07, 0.1)  # read noise evaluated (fraction of the conductance range)
TRAIN_LEVELS = (0.05, 0.07, 0.1)  # read noise injected by ReSNA
DESIGN = {"rows": 128, "cell_bits": 2, "weight_bits": 8}
CONFIG = TrainConfig(epochs=2, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.0)


@functools.cache
def data() -> tuple[torch.Tensor, ...]:
    train = subset(*load_fashion_mnist("train"), TRAIN_EXAMPLES, seed=0)
    test = subset(*load_fashion_mnist("test"), EVAL_EXAMPLES, seed=1)
    return (*train, *test)


def trained(methods: list[dict[str, Any]]) -> tuple[torch.nn.Module, float]:
    """The zoo CNN fine-tuned with ``methods`` (cached; a killed run resumes from its last epoch)."""
    x, y, _, _ = data()
    torch.manual_seed(0)
    digest = hashlib.sha256(json.dumps([methods, str(CONFIG), len(y)], sort_keys=True).encode()).hexdigest()
    return train_cached(
        pretrained("cnn"), methods, CONFIG, x, y, cache_dir() / "bench" / f"hardware-{digest[:16]}.safetensors"
    )


def row(methods: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Clean top-1 and top-1 on crossbars at every level (every draw kept) of the zoo CNN (``None``) or a fine-tune."""
    model, seconds = (pretrained("cnn").eval(), 0.0) if methods is None else trained(methods)
    _, _, xt, yt = data()
    out: dict[str, Any] = {"clean": accuracy(model, xt, yt), "train_seconds": round(seconds, 1), "noisy": {},
                           "threads": torch.get_num_threads(), "design": DESIGN, "draws": DRAWS}  # fmt: skip
    for level in LEVELS:
        out["noisy"][str(level)] = draw_summary(accuracy_under_noise(model, xt, yt, Crossbar(**DESIGN, noise=level),
                                                                     DRAWS, seed=0))  # fmt: skip
    return out


def entries() -> list[Entry]:
    runs: list[tuple[str, list[dict[str, Any]] | None]] = [
        ("zoo CNN, no fine-tune", None),
        (f"plain fine-tune ({CONFIG.epochs} epochs, no noise)", []),
        *[(f"ReSNA, noise {level} in training ({CONFIG.epochs} epochs)",
           [{"name": "resna", "noise": level, **DESIGN}]) for level in TRAIN_LEVELS],
    ]  # fmt: skip
    return [
        (label, {"variant": label}, {"methods": methods}, functools.partial(row, methods)) for label, methods in runs
    ]


def write(rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if "error" not in r]
    heads = " | ".join(f"noise {level}" for level in LEVELS)
    lines = ["# ReRAM crossbars: noise-aware training (ReSNA)", "",
             "Regenerate: `make bench-hardware` (`python benchmarks/hardware.py`; rows resume).", "",
             f"The zoo CNN fine-tuned on {TRAIN_EXAMPLES:,} Fashion-MNIST training images for {CONFIG.epochs} epochs "
             f"(AdamW lr {CONFIG.lr:g}, batch {CONFIG.batch_size}) without noise (plain) or with ReSNA's read noise "
             f"injected at one level; every model then runs on crossbars of {DESIGN['rows']} rows, "
             f"{DESIGN['cell_bits']}-bit cells and {DESIGN['weight_bits']}-bit weights (ideal ADC) at each read-noise "
             f"level (a fraction of the conductance range; `bitsmith.crossbar`). Top-1 % on {EVAL_EXAMPLES:,} test "
             f"images, mean +- spread over {DRAWS} noise draws.", "",
             f"| model | clean | {heads} | train s | load |", "|---|---|" + "---|" * len(LEVELS) + "---|---|"]  # fmt: skip
    for r in done:
        cells = " | ".join(f"{100 * r['noisy'][str(lv)]['mean']:.2f} +- {100 * r['noisy'][str(lv)]['std']:.2f}"
                           for lv in LEVELS)  # fmt: skip
        lines.append(f"| {r['name']} | {100 * r['clean']:.2f} | {cells} | {r['train_seconds']:.0f} | "
                     f"{r['load'][0]:.1f} |")  # fmt: skip
    lines += ["", "![accuracy vs read noise](hardware.png)", ""]
    (RESULTS / "hardware.md").write_text("\n".join(lines))
    plot(done)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        means = [100 * r["noisy"][str(lv)]["mean"] for lv in LEVELS]
        spreads = [100 * r["noisy"][str(lv)]["std"] for lv in LEVELS]
        ax.errorbar(LEVELS, means, yerr=spreads, marker="o", capsize=3, label=r["name"])
    ax.set_xlabel("read noise (fraction of the conductance range)")
    ax.set_ylabel("top-1 % (mean +- spread over draws)")
    ax.set_title("Zoo CNN on ReRAM crossbars")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "hardware.png")


if __name__ == "__main__":
    run_rows(__doc__, ROWS, lambda args: entries(), write)
