"""Beyond one process (issue 23): data-parallel epoch time 1 vs 2 gloo processes on the zoo CNN, accuracy-aware
tuning of the zoo ViT at W4A4, and a Ray sweep of the zoo CNN's PTQ widths. Writes docs/results/scale.md.

``python benchmarks/scale.py`` (the timed data-parallel rows want an idle machine: the load is recorded with
them); every part resumes (finished rows, tuning trials and sweep runs are kept under the cache).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, Rows

from bitsmith.files import atomic_write_text
from bitsmith.zoo import cache_dir

ROOT = Path(__file__).resolve().parents[1]
ROWS = RESULTS / "scale.json"
WORK = cache_dir() / "bench" / "scale"
DDP_RECIPE = "recipes/cnn-qat-lsq-w4a4.yaml"
TUNE_ARGS = ["recipes/vit-ptq-w8a8.yaml", "--max-drop", "0.5", "methods.0.w_bits=4", "methods.0.a_bits=4",
             "export.deploy=none"]  # fmt: skip
SWEEP_ARGS = ["recipes/cnn-ptq-w8a8.yaml", "export.deploy=none", "--grid", "methods.0.w_bits=2,3,4,6,8",
              "methods.0.a_bits=4,8"]  # fmt: skip


def bitsmith(*args: str) -> float:
    """Run the CLI; its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitsmith", *args], cwd=ROOT)
    if done.returncode not in (0, 1):  # tune: 1 = target not reached (reported, not an error)
        raise SystemExit(f"bitsmith {' '.join(args)} failed ({done.returncode})")
    return time.perf_counter() - start


def ddp_rows(rows: Rows) -> None:
    for nproc in (1, 2):
        if rows.done(section="ddp", nproc=nproc):
            continue
        out = WORK / f"ddp-{nproc}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"QAT W4A4 of the zoo CNN, 1 epoch, {nproc} process(es) ...", flush=True)
        wall = bitsmith("run", DDP_RECIPE, "--out", str(out), "--nproc", str(nproc), "train.epochs=1",
                        "export.deploy=none")  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        metrics = report["compressed"]["metrics"]
        rows.add({"section": "ddp", "nproc": nproc, "train_seconds": metrics["compress_seconds"],
                  "wall_seconds": round(wall, 1), "accuracy": metrics["accuracy"],
                  "train_accuracy": report["training"][-1]["train_accuracy"]})  # fmt: skip


def tune_part() -> dict[str, Any]:
    out = WORK / "tune-vit-w4a4"
    start = time.perf_counter()
    bitsmith("tune", *TUNE_ARGS[:1], "--out", str(out), *TUNE_ARGS[1:])
    return {**json.loads((out / "tune.json").read_text()), "seconds_this_call": round(time.perf_counter() - start)}


def sweep_part() -> str:
    out = WORK / "sweep-cnn-ptq"
    bitsmith("sweep", SWEEP_ARGS[0], "--out", str(out), *SWEEP_ARGS[1:])
    shutil.copyfile(out / "pareto.png", RESULTS / "scale-sweep.png")
    table = (out / "sweep.md").read_text().split("\n\n")[2]
    return table


def write(rows: list[dict[str, Any]], tuning: dict[str, Any], sweep_table: str) -> None:
    lines = [
        "# Beyond one process",
        "",
        "Regenerate: `make bench-scale` (`python benchmarks/scale.py`; resumes: rows, tuning trials and sweep runs "
        "are kept under `~/.cache/bitsmith/bench/scale/`). Commands and design: [../scale.md](../scale.md).",
        "",
        "## Data-parallel training (torch.distributed, gloo)",
        "",
        f"`bitsmith run {DDP_RECIPE} --nproc N train.epochs=1`: QAT (LSQ, W4A4) of the zoo CNN, one epoch over the "
        "60,000 training images, global batch 128. Seconds: quantizer calibration + the epoch (rank 0's "
        "`compress_seconds`); wall includes start-up, the FP32 and the final evaluation. On 2 cores no speed-up is "
        "expected (each process has one core, and they share it with the collectives); the point is correctness "
        "(`tests/test_distributed.py`). Top-1 differs slightly between 1 and 2 processes: the CNN's batch norm "
        "normalises over each process's half batch.",
        "",
        "| processes | train s | wall s | test top-1 % | train top-1 % | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["section"] == "ddp"), key=lambda r: r["nproc"]):
        lines.append(f"| {r['nproc']} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {100 * r['accuracy']:.2f} "
                     f"| {100 * r['train_accuracy']:.2f} | {r['load'][0]:.2f} |")  # fmt: skip
    verdict = "reached" if tuning["reached"] else "not reached"
    best = tuning["best"]
    lines += [
        "",
        "## Accuracy-aware tuning of the zoo ViT at W4A4",
        "",
        f"`bitsmith tune {' '.join(TUNE_ARGS)}`: per-channel 4-bit weights, per-tensor 4-bit activations "
        "(percentile observer, 512 calibration images), 10,000 test images; layers ranked by the measured "
        f"calibration-loss increase. FP32 {tuning['metric']} {tuning['baseline']:.2f}; allowed drop "
        f"{tuning['max_drop']}: **{verdict}** with {best['k']} of {len(tuning['ranking'])} layers at W8A8 "
        f"({best['quality']:.2f}, drop {best['drop']:.2f}).",
        "",
        "| layers at 8 bits | top-1 % | drop | size KB | within |",
        "|---|---|---|---|---|",
    ]
    for t in sorted(tuning["trials"], key=lambda t: t["k"]):
        if t["error"] is None:
            lines.append(f"| {t['k']} | {t['quality']:.2f} | {t['drop']:.2f} | {t['size_kb']:.1f} | "
                         f"{'yes' if t['passed'] else 'no'} |")  # fmt: skip
    ranked = ", ".join(f"`{name}`" for name, _ in tuning["ranking"][: max(best["k"], 5)])
    lines += ["", f"Most sensitive first: {ranked}, ...", ""]
    lines += [
        "## A Ray sweep: PTQ widths of the zoo CNN",
        "",
        f"`bitsmith sweep {' '.join(SWEEP_ARGS)}` on a local Ray (one run per core); 10,000 test images.",
        "",
        sweep_table,
        "",
        "![Pareto front of the sweep](scale-sweep.png)",
    ]
    atomic_write_text(RESULTS / "scale.md", "\n".join(lines) + "\n")


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    rows = Rows(ROWS)
    tuning = tune_part()
    sweep_table = sweep_part()
    ddp_rows(rows)  # timed: last, when the accuracy parts no longer share the cores
    write(rows.rows, tuning, sweep_table)


if __name__ == "__main__":
    main()
