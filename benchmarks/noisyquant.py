"""NoisyQuant vs its baselines on the zoo ViT (Fashion-MNIST top-1) and the pretrained all-MiniLM-L6-v2
(cosine to FP32, retrieval recall@1) at W8A8, W8A6, W6A6, W4A8.

Every run quantizes the same layers with the same quantizer: weights symmetric per-channel min-max,
activations (layer inputs) static per-tensor asymmetric. Rows: PTQ with min-max / percentile / MSE
activation ranges and dynamic per-token activations; the NoisyQuant ablation (+ clip search, + mean
shift, + noise = full NoisyQuant, 3 noise seeds); SmoothQuant; SmoothQuant + NoisyQuant (3 seeds).

Regenerate: ``make bench-noisyquant`` (``python benchmarks/noisyquant.py [vit minilm]``). Writes
``docs/results/noisyquant.{md,png,json}``; the JSON keeps finished rows (delete it to re-measure).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, load, save_figure  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.files import atomic_write_text  # noqa: E402
from bitsmith.method import Method  # noqa: E402
from bitsmith.methods.ptq.noisyquant import NoisyQuant  # noqa: E402
from bitsmith.methods.ptq.ptq import PTQ  # noqa: E402
from bitsmith.methods.ptq.smoothquant import SmoothQuant  # noqa: E402

SETTINGS = [(8, 8), (8, 6), (6, 6), (4, 8)]
SEEDS = [0, 1, 2]
WHERE = {"vit": {"include": ["blocks.*"]}, "minilm": {"include": ["encoder.*"]}}  # every Linear but the head
FC2 = {"vit": ".fc2", "minilm": "output.dense"}  # post-GELU inputs (``attention.output.dense`` excluded below)
QUALITY = {"vit": [("accuracy", "top-1 %")], "minilm": [("cosine", "cosine to FP32"), ("retrieval", "recall@1 %")]}


def configs(model: str, w: int, a: int) -> dict[str, list[Method]]:
    where = WHERE[model]

    def ptq(**kw: Any) -> PTQ:
        return PTQ(w_bits=w, a_bits=a, where=where, **kw)

    runs: dict[str, list[Method]] = {
        "PTQ min-max": [ptq()],
        "PTQ percentile": [ptq(a_observer="percentile")],
        "PTQ MSE": [ptq(a_observer="mse")],
        "PTQ per-token (dynamic)": [ptq(a_granularity="token")],
        "+ clip search": [ptq(), NoisyQuant(mean_shift=False, noise="none", where=where)],
        "+ clip + mean shift": [ptq(), NoisyQuant(noise="none", where=where)],
        "SmoothQuant": [SmoothQuant(where=where), ptq()],
    }
    for seed in SEEDS:
        runs[f"NoisyQuant seed {seed}"] = [ptq(), NoisyQuant(seed=seed, where=where)]
        runs[f"SmoothQuant + NoisyQuant seed {seed}"] = [
            SmoothQuant(where=where),
            ptq(),
            NoisyQuant(seed=seed, where=where),
        ]
    return runs


def noise_gain(methods: list[Method], model: str) -> dict[str, float]:
    """Mean relative layer-output error reduction by the noise step (after clip + mean), fc2 vs the rest."""
    nq = next((m for m in methods if isinstance(m, NoisyQuant)), None)
    if nq is None or nq.noise == "none":
        return {}
    gains = {"fc2": [], "other": []}
    for name, r in nq.report.items():
        group = "fc2" if name.endswith(FC2[model]) and "attention" not in name else "other"
        gains[group].append(1 - r["mse_noise"] / r["mse_mean"] if r["mse_mean"] > 0 else 0.0)
    return {f"noise_gain_{g}": statistics.mean(v) for g, v in gains.items() if v}


def run(models: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "noisyquant.json")
    for name in models:
        base, task = load(name, calib_size=256 if name == "vit" else 128)
        fp32 = task.evaluate(base)
        if not rows.done(model=name, setting="FP32"):
            rows.add({"model": name, "setting": "FP32", "run": "FP32", **fp32, "seconds": 0.0})
        for w, a in SETTINGS:
            for label, methods in configs(name, w, a).items():
                key = {"model": name, "setting": f"W{w}A{a}", "run": label}
                if rows.done(**key):
                    continue
                model = copy.deepcopy(base)
                start = time.perf_counter()
                compress(model, methods, task.calibration)
                seconds = time.perf_counter() - start
                rows.add({**key, **task.evaluate(model), "seconds": seconds, **noise_gain(methods, name)})
                print(rows.rows[-1], flush=True)
    return [r for r in rows.rows if r["model"] in models]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed rows merged into one row with mean and std per metric."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        label = r["run"].rsplit(" seed ", 1)[0]
        group = out.setdefault((r["model"], r["setting"], label), {"model": r["model"], "setting": r["setting"],
                                                                    "run": label, "samples": []})  # fmt: skip
        group["samples"].append(r)
    for group in out.values():
        samples = group.pop("samples")
        for key in ("accuracy", "cosine", "retrieval", "seconds", "noise_gain_fc2", "noise_gain_other"):
            values = [s[key] for s in samples if key in s]
            if values:
                group[key] = statistics.mean(values)
                group[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        group["seeds"] = len(samples)
    return list(out.values())


def cell(r: dict[str, Any], key: str) -> str:
    scale, digits = (1, 4) if key == "cosine" else (100, 2)
    if key not in r:
        return "-"
    text = f"{scale * r[key]:.{digits}f}"
    return text + (f" ± {scale * r[f'{key}_std']:.{digits}f}" if r.get(f"{key}_std") is not None else "")


def write(rows: list[dict[str, Any]]) -> None:
    summary = summarise(rows)
    lines = [
        "# NoisyQuant",
        "",
        "Same layers and quantizer in every run: weights symmetric per-channel min-max, activations (the",
        "input of each Linear) static per-tensor asymmetric, except the per-token row (dynamic). ViT: the 16",
        "Linear layers of the 4 blocks (not the patch conv and head), 256 calibration images, top-1 on the",
        "10,000 test images. MiniLM: the 36 Linear layers of the encoder, 128 calibration sentences, 406",
        "held-out docstring pairs. NoisyQuant rows: mean ± std over noise seeds 0, 1, 2. *noise gain* is the",
        "mean relative reduction of a layer's output error by the noise step alone (after clip + mean),",
        "on the post-GELU fc2 inputs and on the other layers. Calibration seconds on 2 threads.",
        "Regenerate: `make bench-noisyquant`.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in summary):
        metrics = QUALITY[model]
        lines += [f"## {model}", ""]
        header = " | ".join(title for _, title in metrics)
        lines += [f"| setting | run | {header} | noise gain fc2 | noise gain other | calib s |",
                  "|---" * (5 + len(metrics)) + "|"]  # fmt: skip
        for r in (r for r in summary if r["model"] == model):
            gains = [f"{100 * r[k]:.1f}%" if k in r else "-" for k in ("noise_gain_fc2", "noise_gain_other")]
            values = " | ".join(cell(r, key) for key, _ in metrics)
            lines.append(f"| {r['setting']} | {r['run']} | {values} | {' | '.join(gains)} | {r['seconds']:.1f} |")
        lines.append("")
    lines += ["![NoisyQuant](noisyquant.png)", ""]
    atomic_write_text(RESULTS / "noisyquant.md", "\n".join(lines))
    plot(summary)


def plot(summary: list[dict[str, Any]]) -> None:
    models = list(dict.fromkeys(r["model"] for r in summary))
    runs = [
        "PTQ min-max",
        "PTQ percentile",
        "+ clip + mean shift",
        "NoisyQuant",
        "SmoothQuant",
        "SmoothQuant + NoisyQuant",
    ]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        key, label = QUALITY[model][0] if model == "vit" else ("cosine", "cosine to FP32")
        settings = [f"W{w}A{a}" for w, a in SETTINGS]
        width = 0.8 / len(runs)
        for i, run_name in enumerate(runs):
            pts = {r["setting"]: r for r in summary if r["model"] == model and r["run"] == run_name}
            values = [(100 if key == "accuracy" else 1) * pts[s][key] if s in pts else 0 for s in settings]
            errs = [
                (100 if key == "accuracy" else 1) * (pts[s].get(f"{key}_std") or 0) if s in pts else 0 for s in settings
            ]
            ax.bar([j + i * width for j in range(len(settings))], values, width, yerr=errs, label=run_name)
        fp32 = next(r for r in summary if r["model"] == model and r["setting"] == "FP32")
        ax.axhline((100 if key == "accuracy" else 1) * fp32[key], color="black", linewidth=1, label="FP32")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        low = min((100 if key == "accuracy" else 1) * r[key] for r in summary if r["model"] == model)
        ax.set_ylim(low - (2 if key == "accuracy" else 0.02), (100 if key == "accuracy" else 1) * fp32[key] * 1.005)
        ax.set_title(f"{model}: {label}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    save_figure(fig, "noisyquant.png")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:  # re-render the tables and plot from the saved rows
        write(Rows(RESULTS / "noisyquant.json").rows)
    else:
        run(sys.argv[1:] or ["vit", "minilm"])
        write(Rows(RESULTS / "noisyquant.json").rows)  # every model's rows, not only the ones just measured
