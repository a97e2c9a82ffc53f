"""Tables and plots of ``docs/results/sparsity.json`` (written by ``benchmarks/sparsity.py``)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, save_figure  # noqa: E402
from sparsity_nvit import nvit_lines  # noqa: E402

from bitsmith.files import atomic_write_text  # noqa: E402

WEIGHT_FAMILIES = ("magnitude", "L1", "DeepHoyer")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _fp32(rows: list[dict[str, Any]], model: str) -> float:
    return next(r["accuracy"] for r in rows if r["model"] == model and r["family"] == "FP32")


def weight_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Accuracy vs weight sparsity", "",
             "| model | method | setting | weight sparsity % | top-1 % | Δ vs FP32 | seconds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in ("cnn", "vit"):
        fp32 = _fp32(rows, model)
        lines.append(f"| {model} | FP32 | - | 0.00 | {_pct(fp32)} | - | - |")
        for family in WEIGHT_FAMILIES:
            for r in sorted(
                (r for r in rows if r["model"] == model and r["family"] == family and "budget" not in r),
                key=lambda r: r["param"],
            ):
                setting = f"s={r['param']:g}" if family == "magnitude" else f"λ={r['param']:g}"
                lines.append(f"| {model} | {family} | {setting} | {_pct(r['sparsity'])} | {_pct(r['accuracy'])} | "
                             f"{100 * (r['accuracy'] - fp32):+.2f} | {r['seconds']:.0f} |")  # fmt: skip
    return lines


def long_table(rows: list[dict[str, Any]]) -> list[str]:
    long = [r for r in rows if "budget" in r]
    if not long:
        return []
    fp32 = _fp32(rows, "cnn")
    lines = ["", "## A longer budget (CNN)", "",
             "| method | setting | epochs x images | weight sparsity % (SVD: reduction) | top-1 % | Δ vs FP32 | seconds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in long:
        setting = {"magnitude": f"s={r['param']:g}", "SVD": f"energy {r['param']:g}"}.get(
            r["family"], f"λ={r['param']:g}"
        )
        kept = (f"{_pct(r['sparsity'])}" if "sparsity" in r else
                f"{r['dense_params'] / r['kept_params']:.2f}x fewer params")  # fmt: skip
        lines.append(f"| {r['family']} | {setting} | {r['budget']} | {kept} | {_pct(r['accuracy'])} | "
                     f"{100 * (r['accuracy'] - fp32):+.2f} | {r['seconds']:.0f} |")  # fmt: skip
    return lines


DEFAULT_BUDGET = "3 x 20000"  # the main table's budget for the CNN (see the header)


def svd_table(rows: list[dict[str, Any]]) -> list[str]:
    svd = sorted((r for r in rows if r["family"] == "SVD"), key=lambda r: (r["param"], "budget" in r))
    if not svd:
        return []
    fp32 = _fp32(rows, "cnn")
    lines = ["", "## SVD training (CNN inner convolutions)", "",
             "| energy cut | epochs x images | params in the layers (dense → kept) | reduction | top-1 % | Δ vs FP32 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in svd:
        lines.append(f"| {r['param']:g} | {r.get('budget', DEFAULT_BUDGET)} | {r['dense_params']:,} → {r['kept_params']:,} | "
                     f"{r['dense_params'] / r['kept_params']:.2f}x | {_pct(r['accuracy'])} | "
                     f"{100 * (r['accuracy'] - fp32):+.2f} |")  # fmt: skip
    return lines


def _mean_zero_slices(row: dict[str, Any]) -> float:
    return sum(row["slice_sparsity"]) / len(row["slice_sparsity"])


def _l1_at(l1: list[dict[str, Any]], accuracy: float) -> float | None:
    """Plain L1's mean zero-slice fraction at ``accuracy``, linearly interpolated between its rows
    (None outside the accuracies L1 reached)."""
    pts = sorted((r["accuracy"], _mean_zero_slices(r)) for r in l1)
    for (a0, z0), (a1, z1) in zip(pts, pts[1:], strict=False):
        if a0 <= accuracy <= a1:
            return z0 if a1 == a0 else z0 + (z1 - z0) * (accuracy - a0) / (a1 - a0)
    return None


def bitslice_table(rows: list[dict[str, Any]]) -> list[str]:
    sliced = sorted((r for r in rows if r["family"].endswith("(8-bit)")), key=lambda r: (r["family"], r["param"]))
    if not sliced:
        return []
    lines = ["", "## Bit-slice sparsity (CNN, 8-bit magnitude on the step 2^(s-8), four 2-bit slices, MSB first)", "",
             "| regulariser | alpha | weight sparsity % | zero slices % (MSB → LSB) | mean zero slices % | top-1 % |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sliced:
        slices = " / ".join(f"{100 * s:.1f}" for s in r["slice_sparsity"])
        lines.append(f"| {r['family']} | {r['param']:g} | {_pct(r['sparsity'])} | {slices} | "
                     f"{_pct(_mean_zero_slices(r))} | {_pct(r['accuracy'])} |")  # fmt: skip
    l1 = [r for r in sliced if r["family"].startswith("l1")]
    lines += ["", "At equal accuracy (plain L1 interpolated to each bit-slice row's top-1; the paper claims about 2x "
              "more zero slices for bit-slice L1): ratio of zero slices and of non-zero slices, bit-slice / L1.", "",
              "| bit-slice alpha | top-1 % | bit-slice zero % | L1 zero % at that top-1 | zero ratio | "
              "non-zero ratio |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in sliced if r["family"].startswith("bitslice")):
        mine, theirs = _mean_zero_slices(r), _l1_at(l1, r["accuracy"])
        if theirs is None:
            lines.append(f"| {r['param']:g} | {_pct(r['accuracy'])} | {_pct(mine)} | outside L1's range | - | - |")
            continue
        lines.append(f"| {r['param']:g} | {_pct(r['accuracy'])} | {_pct(mine)} | {_pct(theirs)} | "
                     f"{mine / theirs:.2f}x | {(1 - mine) / (1 - theirs):.2f}x |")  # fmt: skip
    return lines


def plot(rows: list[dict[str, Any]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, model in zip(axes, ("cnn", "vit"), strict=True):
        ax.axhline(100 * _fp32(rows, model), color="black", linewidth=1, label="FP32")
        for family in WEIGHT_FAMILIES:
            pts = sorted(
                (r for r in rows if r["model"] == model and r["family"] == family and "budget" not in r),
                key=lambda r: r["sparsity"],
            )
            ax.plot([100 * r["sparsity"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=family)
        ax.set_xlabel("weight sparsity %")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"zoo {model.upper()}: accuracy vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, "sparsity.png")


def write(rows: list[dict[str, Any]], how: str) -> None:
    """The page: ``how`` (the benchmark's docstring) states the protocol in its second paragraph."""
    lines = ["# Sparsity and low rank (zoo CNN and ViT, Fashion-MNIST)", "", *how.split("\n\n")[1].splitlines(), ""]
    lines += weight_table(rows) + ["", "![accuracy vs sparsity](sparsity.png)"] + long_table(rows)
    lines += svd_table(rows) + bitslice_table(rows)
    lines += nvit_lines(rows)
    atomic_write_text(RESULTS / "sparsity.md", "\n".join(lines) + "\n")
    plot(rows)
