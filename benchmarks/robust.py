"""Robust training on Fashion-MNIST with the zoo CNN: plain fine-tuning vs PGD adversarial training (Madry) at each
single strength vs MAT (mixed, max over strengths), all fine-tuned from the shipped FP32 CNN for the same epochs on
the same images, then attacked with the Adversarial Robustness Toolbox's PGD-20 and FGSM over an eps sweep.
``--speed`` times one PGD-20 evaluation of the 10,000 test images (run it alone). Writes
docs/results/robustness.{json,md,png}; rows resume (a training killed mid-way resumes from its last epoch);
``--write-only`` rewrites the page; ``--autoattack [--only TEXT]`` adds the standard AutoAttack (and PGD-20 on the
same images) at eps 0.1 to the training and compressed rows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import RESULTS, Rows, save_figure, train_cached
from llm import Entry, bench_threads, fill

from bitsmith import Ensemble, compress
from bitsmith.data import subset
from bitsmith.eval.cost import model_cost
from bitsmith.method import build_method
from bitsmith.robust import AttackSpec, art_attack, pgd
from bitsmith.robust.evaluate import attacked_accuracy
from bitsmith.train import TrainConfig, accuracy
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

ROWS = RESULTS / "robustness.json"
TRAIN_EXAMPLES, EPOCHS, TRAIN_STEPS = 20_000, 3, 3  # fine-tune budget, the same for every row
EVAL_EXAMPLES, EVAL_STEPS = 2_000, 20
SWEEP = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2)
STRENGTHS = [0.05, 0.1, 0.2]
CONFIG = TrainConfig(epochs=EPOCHS, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.0)

TRAININGS: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain fine-tune", []),
    *[(f"PGD-AT eps {eps}", [{"name": "adv-train", "eps": eps, "steps": TRAIN_STEPS}]) for eps in STRENGTHS],
    ("MAT mixed {0.05, 0.1, 0.2}", [{"name": "mat", "strengths": STRENGTHS, "steps": TRAIN_STEPS, "mode": "mixed"}]),
    ("MAT max {0.05, 0.1, 0.2}", [{"name": "mat", "strengths": STRENGTHS, "steps": TRAIN_STEPS, "mode": "max"}]),
]


@functools.cache
def data() -> tuple[torch.Tensor, ...]:
    train = subset(*load_fashion_mnist("train"), TRAIN_EXAMPLES, seed=0)
    test = subset(*load_fashion_mnist("test"), EVAL_EXAMPLES, seed=1)
    return (*train, *test)


def train(methods: list[dict[str, Any]], cfg: TrainConfig = CONFIG, start: str = "cnn",
          examples: int = TRAIN_EXAMPLES) -> tuple[torch.nn.Module, float]:  # fmt: skip
    """``start`` (a zoo model, or ``at-0.1``: the PGD-AT eps 0.1 CNN) fine-tuned with ``methods`` on ``examples``
    training images; the result is cached (other rows start from it) and a killed run resumes from its last epoch."""
    x, y, _, _ = data()
    x, y = x[:examples], y[:examples]
    torch.manual_seed(0)
    model = train(AT_BASE)[0] if start == "at-0.1" else pretrained(start)
    digest = hashlib.sha256(json.dumps([methods, str(cfg), len(y), start], sort_keys=True).encode()).hexdigest()
    return train_cached(model, methods, cfg, x, y, cache_dir() / "bench" / f"robust-{digest[:16]}.safetensors")


AT_BASE = [{"name": "adv-train", "eps": 0.1, "steps": TRAIN_STEPS}]
TUNE = TrainConfig(epochs=1, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.0)
TUNE_BUDGETS = (1, 2, 4)  # CLAT / SAFER and their full PGD-AT baselines at 1x, 2x, 4x the fine-tune epochs
CONTINUED = [  # from the PGD-AT eps 0.1 CNN, one more epoch
    ("full PGD-AT", [{"name": "adv-train", "eps": 0.1, "steps": TRAIN_STEPS}]),
    ("CLAT (5 % of parameters)", [{"name": "clat", "eps": 0.1, "steps": TRAIN_STEPS, "budget": 0.05}]),
]
VIT_EXAMPLES = 5_000
VIT_TUNING = [  # from the shipped ViT
    ("ViT: full PGD-AT eps 0.1", [{"name": "adv-train", "eps": 0.1, "steps": TRAIN_STEPS}]),
    ("ViT: SAFER (3 sharpest layers, rho 0.05)", [{"name": "safer", "eps": 0.1, "steps": TRAIN_STEPS}]),
]
COMPRESSED = [  # the PGD-AT eps 0.1 CNN compressed after training, attacked as it runs
    ("FP32 (PGD-AT eps 0.1)", []),
    ("W8A8 PTQ", [{"name": "ptq", "w_bits": 8, "a_bits": 8}]),
    (
        "W4A8 PTQ (first / last layer W8)",
        [
            {
                "name": "ptq",
                "w_bits": 4,
                "a_bits": 8,
                "where": {"overrides": {"@first": {"w_bits": 8}, "@last": {"w_bits": 8}}},
            }
        ],
    ),
    (
        "2:4 sparse (magnitude, stem dense, no fine-tune)",
        [{"name": "prune", "kind": "nm", "n": 2, "m": 4, "where": {"exclude": ["@first"]}}],
    ),
    ("mixed precision W{2..8} avg 4, A8 (Hessian)", [{"name": "mixed", "avg_bits": 4.0}]),
]


def trainable_share(methods: list[dict[str, Any]], start: str) -> float:
    """The share of parameters a method leaves trainable (after its selection on calibration images)."""
    x, y, _, _ = data()
    model = train(AT_BASE)[0] if start == "at-0.1" else pretrained(start)
    compress(model, [build_method(m) for m in methods], [(x[:256], y[:256])], finalize=False)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def tuned_row(methods: list[dict[str, Any]], start: str, examples: int, epochs: int = TUNE.epochs) -> dict[str, Any]:
    model, seconds = train(methods, dataclasses.replace(TUNE, epochs=epochs), start, examples)
    row = sweep(model, SWEEP[:4] if start == "vit" else SWEEP)
    return {**row, "train_seconds": round(seconds, 1), "trainable": trainable_share(methods, start), "epochs": epochs}


def tuned_label(name: str, start: str, scale: int) -> str:
    """The row's label (and key): the 1x rows keep the labels they were measured under."""
    epochs = TUNE.epochs * scale
    if start == "vit":
        return name if scale == 1 else f"{name}, {epochs} epochs"
    return f"{name}, {epochs} more epoch" + "s" * (epochs > 1)


def tuned_entries() -> list[Entry]:
    """CLAT and SAFER against full PGD-AT fine-tuning at 1x, 2x and 4x the fine-tune epochs (the budget curve)."""
    out: list[Entry] = []
    for scale in TUNE_BUDGETS:
        for section, start, examples, tunings in (("continued", "at-0.1", TRAIN_EXAMPLES, CONTINUED),
                                                  ("vit", "vit", VIT_EXAMPLES, VIT_TUNING)):  # fmt: skip
            for name, methods in tunings:
                label = tuned_label(name, start, scale)
                out.append((label, {"section": section, "variant": label}, {"methods": methods, "budget": scale},
                            functools.partial(tuned_row, methods, start, examples, TUNE.epochs * scale)))  # fmt: skip
    return out


def compressed_row(methods: list[dict[str, Any]]) -> dict[str, Any]:
    """Clean and PGD-20 (eps 0.05 / 0.1) top-1, white-box through the fake-quant modules and transferred from the
    FP32 robust CNN."""
    robust, _ = train(AT_BASE)
    model = copy.deepcopy(robust)
    x, y, xt, yt = data()
    if methods:
        compress(
            model,
            [build_method(m) for m in methods],
            [(x[i : i + 128], y[i : i + 128]) for i in range(0, min(512, len(x)), 128)],
        )
    row: dict[str, Any] = {"clean": accuracy(model, xt, yt), "white": {}, "transfer": {},
                           "avg_weight_bits": model_cost(model).totals["avg_weight_bits"]}  # fmt: skip
    for eps in (0.05, 0.1):
        spec = AttackSpec(eps=eps, steps=EVAL_STEPS)
        row["white"][str(eps)] = attacked_accuracy(model, xt, yt, art_attack(model, xt, yt, spec))
        row["transfer"][str(eps)] = attacked_accuracy(model, xt, yt, art_attack(robust, xt, yt, spec))
    return {**row, "threads": torch.get_num_threads()}


AA_EXAMPLES, AA_EPS, AA_CHUNK = 500, 0.1, 50  # the standard AutoAttack (ART) on the first 500 test images, eps 0.1


def autoattack_fields(
    model: torch.nn.Module, done: dict[str, Any], save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The standard AutoAttack and PGD-20 at ``AA_EPS`` on the same first ``AA_EXAMPLES`` test images, and the
    strongest (least accuracy) of the two: the robust number a table should quote. The images are attacked in chunks
    of ``AA_CHUNK``; each finished chunk (robust count, seconds) is saved through ``save`` and skipped when ``done``
    (the row so far) already holds it, so an interrupted run resumes (a chunk's AutoAttack took 25 minutes of a shared
    core). The bench cache does not outlive a session here, so chunks of different sessions attack the model trained
    again from the same recipe and seed; each chunk records its clean count to show they agree."""
    _, _, xt, yt = data()
    out: dict[str, Any] = {k: v for k, v in done.items() if k.startswith("aa_")}
    for name in ("autoattack", "pgd"):
        chunks = out.setdefault(f"aa_chunks_{name}", {})
        for start in range(0, AA_EXAMPLES, AA_CHUNK):
            if str(start) in chunks:
                continue
            x, y = xt[start : start + AA_CHUNK], yt[start : start + AA_CHUNK]
            began = time.perf_counter()
            robust = attacked_accuracy(
                model, x, y, art_attack(model, x, y, AttackSpec(name=name, eps=AA_EPS, steps=EVAL_STEPS))
            )
            chunks[str(start)] = {
                "robust": round(robust * x.shape[0]),
                "seconds": round(time.perf_counter() - began, 1),
                "clean": round(accuracy(model, x, y) * x.shape[0]),
            }
            print(f"  {name} images {start}-{start + x.shape[0] - 1}: {chunks[str(start)]}", flush=True)
            save(out)
        out[f"aa_subset_{name}"] = sum(c["robust"] for c in chunks.values()) / AA_EXAMPLES
        out[f"aa_subset_{name}_seconds"] = round(sum(c["seconds"] for c in chunks.values()), 1)
    out["aa_subset_strongest"] = min(out["aa_subset_autoattack"], out["aa_subset_pgd"])
    return out


def model_of(row: dict[str, Any]) -> torch.nn.Module | None:
    """The (cached or re-trained) model a training or compressed row measured."""
    if row.get("section") == "training" and row.get("variant") == "parallel MAT":
        parts = [train([{"name": "adv-train", "eps": eps, "steps": TRAIN_STEPS}])[0] for eps in STRENGTHS]
        return Ensemble(parts, torch.zeros(1, 1, 28, 28)).eval()
    if row.get("section") == "training":
        return train(dict(TRAININGS)[row["variant"]])[0]
    if row.get("section") == "compressed":
        model = copy.deepcopy(train(AT_BASE)[0])
        methods = dict(COMPRESSED)[row["variant"]]
        if methods:
            x, y, _, _ = data()
            compress(model, [build_method(m) for m in methods],
                     [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)])  # fmt: skip
        return model
    return None


def add_autoattack(rows: Rows, only: str | None) -> None:
    """Fill the AutoAttack fields of every training and compressed row that lacks them (``only``: by label)."""
    for row in list(rows.rows):
        if "aa_subset_autoattack" in row or "error" in row or (only and only not in row["name"]):
            continue
        model = model_of(row)
        if model is None:
            continue
        print(f"AutoAttack: {row['name']} ...", flush=True)

        def save(fields: dict[str, Any], row: dict[str, Any] = row) -> None:
            rows.put({**row, **fields}, section=row["section"], variant=row["variant"])

        save(autoattack_fields(model, row, save))
        write(rows.rows)


def sweep_row(methods: list[dict[str, Any]]) -> dict[str, Any]:
    model, seconds = train(methods)
    return {**sweep(model), "train_seconds": round(seconds, 1)}


def sweep(model: torch.nn.Module, strengths: tuple[float, ...] = SWEEP) -> dict[str, Any]:
    """Clean top-1 and ART PGD-20 / FGSM top-1 at every eps of ``strengths``, with their mean and worst."""
    _, _, xt, yt = data()
    row: dict[str, Any] = {"clean": accuracy(model, xt, yt), "pgd": {}, "fgsm": {}}
    for eps in strengths:
        for name in ("pgd", "fgsm"):
            if eps == 0:
                row[name][str(eps)] = row["clean"]
                continue
            spec = AttackSpec(name=name, eps=eps, steps=EVAL_STEPS)
            row[name][str(eps)] = attacked_accuracy(model, xt, yt, art_attack(model, xt, yt, spec))
    for name in ("pgd", "fgsm"):
        values = list(row[name].values())
        row[f"{name}_mean"], row[f"{name}_worst"] = sum(values) / len(values), min(values)
    row["threads"] = torch.get_num_threads()
    return row


def speed_row() -> dict[str, Any]:
    """One PGD-20 (L-inf 0.1) evaluation of the shipped CNN on all 10,000 test images: ART's and bitsmith's."""
    model = pretrained("cnn")
    x, y = load_fashion_mnist("test")
    spec = AttackSpec(eps=0.1, steps=20)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "examples": len(y)}
    for name, attacker in (("art", art_attack), ("bitsmith", pgd)):
        start = time.perf_counter()
        out[f"{name}_accuracy"] = attacked_accuracy(model, x, y, attacker(model, x, y, spec))
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return out


def parallel_mat_row() -> dict[str, Any]:
    """Parallel MAT: the PGD-AT models of each strength, averaged as one Ensemble."""
    parts = [train([{"name": "adv-train", "eps": eps, "steps": TRAIN_STEPS}]) for eps in STRENGTHS]
    model = Ensemble([m for m, _ in parts], torch.zeros(1, 1, 28, 28)).eval()
    return {**sweep(model), "train_seconds": round(sum(s for _, s in parts), 1)}


def entries() -> list[Entry]:
    out = [(label, {"section": "training", "variant": label}, {"methods": methods},
            functools.partial(sweep_row, methods)) for label, methods in TRAININGS]  # fmt: skip
    out += [(label, {"section": "compressed", "variant": label}, {"methods": methods},
             functools.partial(compressed_row, methods)) for label, methods in COMPRESSED]  # fmt: skip
    out.append((f"parallel MAT: ensemble of the PGD-AT {STRENGTHS} models", {"section": "training",
                "variant": "parallel MAT"}, {}, parallel_mat_row))  # fmt: skip
    return out + tuned_entries()


def write(rows: list[dict[str, Any]]) -> None:
    trained = [r for r in rows if r.get("section") == "training" and "error" not in r]
    head = " | ".join(f"PGD {eps}" for eps in SWEEP[1:])
    lines = [
        "# Robustness",
        "",
        "Regenerate: `make bench-robust` (`python benchmarks/robust.py`, then `--speed` alone; rows resume).",
        "",
        "## Adversarial training: plain vs PGD-AT vs MAT (zoo CNN, Fashion-MNIST)",
        "",
        f"Every row fine-tunes the shipped FP32 CNN for {EPOCHS} epochs on the same {TRAIN_EXAMPLES:,} training images "
        f"(AdamW lr 1e-3, batch 128; training attacks PGD-{TRAIN_STEPS}, step 2.5 eps / {TRAIN_STEPS}, random start). "
        f"Top-1 % on {EVAL_EXAMPLES:,} test images (a seeded subset) under the Adversarial Robustness Toolbox's "
        f"PGD-{EVAL_STEPS} (L-inf, step 2.5 eps / {EVAL_STEPS}, one random start) and FGSM; mean and worst over eps "
        f"in {{{', '.join(str(e) for e in SWEEP)}}} (0 = clean).",
        "",
        f"The last three columns: the standard AutoAttack (ART's `AutoAttack`: APGD-CE and APGD-DLR, 100 iterations "
        f"x 5 restarts, DeepFool, Square 5,000 queries x 5 restarts) and PGD-{EVAL_STEPS} at eps {AA_EPS} on the same "
        f"first {AA_EXAMPLES} of those test images, and the strongest of the two (the robust number to quote); "
        "empty where not run yet (`python benchmarks/robust.py --autoattack`).",
        "",
        f"| training | clean | {head} | PGD mean | PGD worst | FGSM mean | train s | load | AutoAttack {AA_EPS} | "
        f"PGD {AA_EPS} (same {AA_EXAMPLES}) | strongest {AA_EPS} |",
        "|---|---|" + "---|" * (len(SWEEP) - 1) + "---|---|---|---|---|---|---|---|",
    ]
    for r in trained:
        cells = " | ".join(f"{100 * r['pgd'][str(eps)]:.2f}" for eps in SWEEP[1:])
        lines.append(f"| {r['name']} | {100 * r['clean']:.2f} | {cells} | {100 * r['pgd_mean']:.2f} | "
                     f"{100 * r['pgd_worst']:.2f} | {100 * r['fgsm_mean']:.2f} | {r['train_seconds']:.0f} | "
                     f"{r['load'][0]:.1f} | {aa_cells(r)} |")  # fmt: skip
    lines += compressed_lines([r for r in rows if r.get("section") == "compressed" and "error" not in r])
    for section, title, start in (("continued", "CLAT vs full PGD-AT fine-tuning (zoo CNN)", "the PGD-AT eps 0.1 CNN "
                                   f"above, {TUNE.epochs} more epoch on the same {TRAIN_EXAMPLES:,} images"),
                                  ("vit", "SAFER vs full PGD-AT fine-tuning (zoo ViT)", f"the shipped ViT, "
                                   f"{TUNE.epochs} epoch on the first {VIT_EXAMPLES:,} of those images")):  # fmt: skip
        tuned = [r for r in rows if r.get("section") == section and "error" not in r]
        if tuned:
            eps = [e for e in SWEEP[1:] if str(e) in tuned[0]["pgd"]]
            lines += ["", f"## {title}", "", f"From {start} (AdamW lr 5e-4, training attack PGD-{TRAIN_STEPS} eps 0.1); "
                      f"evaluation as above; mean over eps in {{0, {', '.join(str(e) for e in eps)}}}. The budget curve: "
                      f"both rows again at {' and '.join(f'{b}x' for b in TUNE_BUDGETS[1:])} the fine-tune epochs (the "
                      "gap plotted against budget in [budget curves](budget-curves.md)).", "",
                      f"| fine-tuning | trainable params % | clean | {' | '.join(f'PGD {e}' for e in eps)} | PGD mean | "
                      "train s | load |", "|---|---|---|" + "---|" * len(eps) + "---|---|---|"]  # fmt: skip
            lines += [f"| {r['name']} | {100 * r['trainable']:.1f} | {100 * r['clean']:.2f} | "
                      + " | ".join(f"{100 * r['pgd'][str(e)]:.2f}" for e in eps)
                      + f" | {100 * r['pgd_mean']:.2f} | {r['train_seconds']:.0f} | {r['load'][0]:.1f} |"
                      for r in tuned]  # fmt: skip
    speed = [r for r in rows if r.get("section") == "speed" and "error" not in r]
    if speed:
        s = speed[-1]
        lines += ["", "## Evaluation time", "", f"PGD-20 (L-inf 0.1) of the shipped CNN on all {s['examples']:,} test "
                  f"images, {s['threads']} threads, load {s['load'][0]:.2f} when it started:", "",
                  "| attack implementation | robust top-1 % | seconds |", "|---|---|---|",
                  f"| Adversarial Robustness Toolbox | {100 * s['art_accuracy']:.2f} | {s['art_seconds']:.1f} |",
                  f"| bitsmith.robust.pgd | {100 * s['bitsmith_accuracy']:.2f} | {s['bitsmith_seconds']:.1f} |"]  # fmt: skip
    lines += ["", "![accuracy vs eps](robustness.png)", ""]
    (RESULTS / "robustness.md").write_text("\n".join(lines))
    plot(trained)


def aa_cells(r: dict[str, Any]) -> str:
    """The AutoAttack, PGD and strongest cells; a row whose AutoAttack is under way shows its finished chunks."""
    keys = ("aa_subset_autoattack", "aa_subset_pgd", "aa_subset_strongest")
    chunks = r.get("aa_chunks_autoattack", {})
    if "aa_subset_autoattack" not in r and chunks:
        robust = sum(c["robust"] for c in chunks.values())
        return (f"not finished: {robust} of the first {len(chunks) * AA_CHUNK} robust ({len(chunks)} of "
                f"{AA_EXAMPLES // AA_CHUNK} chunks) | |")  # fmt: skip
    return " | ".join(f"{100 * r[k]:.2f}" if k in r else "" for k in keys)


def compressed_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## The robust CNN compressed, attacked as deployed", "",
             "The PGD-AT eps 0.1 CNN compressed after training (calibration: 512 training images). White-box: ART "
             f"PGD-{EVAL_STEPS} through the fake-quant / masked layers (straight-through gradients); transfer: the "
             "same attack crafted on the FP32 robust CNN. A white-box number above the transfer number would be "
             "gradient masking.", "",
             "| model | avg weight bits | clean | PGD 0.05 white-box | PGD 0.05 transfer | PGD 0.1 white-box | "
             f"PGD 0.1 transfer | load | AutoAttack {AA_EPS} | PGD {AA_EPS} (same {AA_EXAMPLES}) | strongest "
             f"{AA_EPS} |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['name']} | {r['avg_weight_bits']:.2f} | {100 * r['clean']:.2f} | "
                     f"{100 * r['white']['0.05']:.2f} | {100 * r['transfer']['0.05']:.2f} | "
                     f"{100 * r['white']['0.1']:.2f} | {100 * r['transfer']['0.1']:.2f} | {r['load'][0]:.1f} | "
                     f"{aa_cells(r)} |")  # fmt: skip
    return lines


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(SWEEP, [100 * r["pgd"][str(eps)] for eps in SWEEP], marker="o", label=r["name"])
    ax.set_xlabel("PGD-20 eps (L-inf, images in [0, 1])")
    ax.set_ylabel("top-1 %")
    ax.set_title("Zoo CNN on Fashion-MNIST: accuracy vs attack strength")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "robustness.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        torch.set_num_threads(bench_threads())
        if "--autoattack" in sys.argv:
            add_autoattack(Rows(ROWS), sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None)
            sys.exit(0)
        speed = "--speed" in sys.argv
        todo = [("PGD-20 timing", {"section": "speed"}, {}, speed_row)] if speed else entries()
        fill(Rows(ROWS), todo, write)
