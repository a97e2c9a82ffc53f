"""Sparsity and low rank on the zoo CNN and ViT: accuracy vs weight sparsity (magnitude, L1, DeepHoyer),
SVD training's rank reduction, bit-slice sparsity, and NViT's structured pruning vs uniform width.

Every run fine-tunes the FP32 zoo checkpoint with the same budget: AdamW (lr 1e-3, cosine, no weight
decay), 3 epochs (CNN: 20,000 training images per epoch, ViT: all 60,000). Stem / patch embedding
and classifier are not pruned; sparsity is over the other layers' weights.
- magnitude: global threshold raised along the cubic schedule over 2 epochs, 1 epoch at the final
  sparsity (iterative prune-finetune);
- L1 and DeepHoyer (Hoyer-square): 2 epochs with the regulariser, pruned to exact zeros at
  ``|w| <= 0.25 std(W)`` (DeepHoyer's rule, for both), 1 masked fine-tune epoch;
- SVD training: Hoyer on the singular values (lam_s 0.01), orthogonality lam_o 1, cut at the given
  energy after 2 epochs, 1 fine-tune epoch, then low-rank layers;
- bit-slice: 8-bit magnitudes on the step 2^(s-8), L1 on the four 2-bit slices vs plain L1 (both one mean
  over all weights), an alpha sweep each, compared at equal top-1;
- longer budget (``--part long``): CNN magnitude 0.9 / 0.95, DeepHoyer 1e-3 ... 2e-5 and SVD energy 0.15 / 0.05 with 8 epochs
  of all 60,000 images (magnitude ramps over 2/3 of them, DeepHoyer and SVD fine-tune the last 2).
Top-1 on the 10,000 test images.

Regenerate: ``make bench-sparsity`` (``python benchmarks/sparsity.py [--part weights|svd|bitslice|nvit|nvit-latency|long]``).
Writes ``docs/results/sparsity.{md,png,json}``; the JSON keeps finished rows (delete it to re-measure).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from common import RESULTS, Rows, load
from sparsity_nvit import run_nvit, time_latency
from sparsity_report import write

from bitsmith import compress
from bitsmith.method import Method
from bitsmith.methods.qat.bitslice import BitSlice
from bitsmith.methods.sparse.deephoyer import DeepHoyer
from bitsmith.methods.sparse.prune import Prune
from bitsmith.methods.sparse.svd_train import SVDTraining
from bitsmith.train import TrainConfig, fit

EPOCHS = 3
TRAIN_IMAGES = {"cnn": 20_000, "vit": 60_000}
INNER = {"exclude": ["@first", "@last"]}
MAGNITUDE = [0.5, 0.8, 0.9, 0.95]
L1_LAMBDAS = [1e-3, 1e-2, 1e-1]
HOYER_LAMBDAS = [1e-4, 1e-3, 1e-2]
SVD_ENERGIES = [0.05, 0.1, 0.15]
BITSLICE_ALPHAS = [0.1, 1.0, 10.0]
LONG = {"epochs": 8, "images": 60_000}
LONG_HOYER = [1e-3, 1e-4, 5e-5, 2e-5]
LONG_SVD = [0.15, 0.05]


def weight_runs() -> list[tuple[str, float, Method]]:
    runs: list[tuple[str, float, Method]] = [
        ("magnitude", s, Prune(sparsity=s, gradual=True, ramp=2 / 3, where=INNER)) for s in MAGNITUDE
    ]
    runs += [("L1", lam, DeepHoyer(regularizer="l1", lam=lam, where=INNER)) for lam in L1_LAMBDAS]
    runs += [("DeepHoyer", lam, DeepHoyer(regularizer="hoyer-square", lam=lam, where=INNER)) for lam in HOYER_LAMBDAS]
    return runs


def other_runs(part: str) -> list[tuple[str, float, Method]]:
    if part == "svd":
        return [("SVD", e, SVDTraining(energy=e, where=INNER)) for e in SVD_ENERGIES]
    return [
        (f"{reg} (8-bit)", a, BitSlice(regularizer=reg, alpha=a, where=INNER))
        for a in BITSLICE_ALPHAS
        for reg in ("bitslice", "l1")
    ]


def long_runs() -> list[tuple[str, float, Method]]:
    return [*[("magnitude", s, Prune(sparsity=s, gradual=True, ramp=2 / 3, where=INNER)) for s in (0.9, 0.95)],
            *[("DeepHoyer", lam, DeepHoyer(regularizer="hoyer-square", lam=lam, finetune_epochs=2, where=INNER))
              for lam in LONG_HOYER],
            *[("SVD", e, SVDTraining(energy=e, finetune_epochs=2, where=INNER)) for e in LONG_SVD]]  # fmt: skip


def finetune(model: torch.nn.Module, task: Any, name: str, methods: list[Method], long: bool = False) -> float:
    """Compress, train the fixed budget (or the longer one), finalize; returns the seconds taken."""
    images, labels = task.train
    count, epochs = (LONG["images"], LONG["epochs"]) if long else (TRAIN_IMAGES[name], EPOCHS)
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    start = time.perf_counter()
    compress(model, methods, task.calibration, finalize=False)
    fit(model, images[pick], labels[pick], TrainConfig(epochs=epochs, optimizer="adamw", lr=1e-3, weight_decay=0.0),
        methods)  # fmt: skip
    for method in methods:
        method.finalize(model)
    return time.perf_counter() - start


def weight_sparsity(model: torch.nn.Module) -> tuple[float, int, int]:
    """(zero fraction, kept, total) over the weights of the masked / low-rank layers."""
    kept = total = 0
    for module in model.modules():
        mask = getattr(module, "mask", None)
        if isinstance(mask, torch.Tensor):
            kept, total = kept + int(mask.sum()), total + mask.numel()
    return (1 - kept / total if total else 0.0), kept, total


def measure(rows: Rows, name: str, family: str, param: float, method: Method, long: bool = False) -> None:
    budget = {"budget": f"{LONG['epochs']} x {LONG['images']}"} if long else {}
    if rows.done(model=name, family=family, param=param, budget=budget.get("budget")):
        return
    base, task = load(name, calib_size=256)
    model = copy.deepcopy(base)
    seconds = finetune(model, task, name, [method], long)
    row: dict[str, Any] = {"model": name, "family": family, "param": param, **budget, **task.evaluate(model),
                           "seconds": seconds}  # fmt: skip
    if isinstance(method, SVDTraining):  # low-rank layers (or dense where low rank stores no fewer weights)
        layers = {n: model.get_submodule(n) for n in method._layers}
        row["ranks"] = {n: getattr(m, "rank", None) for n, m in layers.items()}
        row["dense_params"] = sum(int(base.get_submodule(n).weight.numel()) for n in layers)
        row["kept_params"] = sum(p.numel() for m in layers.values() for p in m.parameters() if p.dim() > 1)
    else:
        row["sparsity"], row["kept"], row["total"] = weight_sparsity(model)
    if isinstance(method, BitSlice):
        row["slice_sparsity"] = method.slice_sparsity(model)
    rows.add(row)
    print({k: v for k, v in row.items() if k != "ranks"}, flush=True)


def run(part: str) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "sparsity.json")
    for name in ("vit", "cnn"):
        if not rows.done(model=name, family="FP32"):
            base, task = load(name, calib_size=256)
            rows.add({"model": name, "family": "FP32", "param": 0.0, **task.evaluate(base), "sparsity": 0.0})
    for name in ("vit", "cnn"):  # the ViT first: its weight rows, then NViT, then the CNN's
        if part in ("weights", "all"):
            for family, param, method in weight_runs():
                measure(rows, name, family, param, method)
        if name == "vit" and part in ("nvit", "all"):
            run_nvit(rows)
    for other in ("svd", "bitslice"):
        if part in (other, "all"):
            for family, param, method in other_runs(other):
                measure(rows, "cnn", family, param, method)
    if part == "long":
        for family, param, method in long_runs():
            measure(rows, "cnn", family, param, method, long=True)
    if part == "nvit-latency":
        time_latency(rows)
    return rows.rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "weights", "svd", "bitslice", "nvit", "nvit-latency", "long"], default="all"
    )
    parser.add_argument("--write-only", action="store_true", help="re-render from the saved rows")
    args = parser.parse_args()
    write(Rows(RESULTS / "sparsity.json").rows if args.write_only else run(args.part), __doc__)
