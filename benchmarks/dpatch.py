"""DPatch on a detector trained from scratch: Fashion-MNIST scenes (bitsmith.zoo.scenes), two CenterNet-style
detectors (bitsmith.zoo.detector; different seeds and widths), mAP@0.5 on held-out scenes clean, with a random patch
of the same size, with an untargeted DPatch trained on the first detector (on it, and transferred to the second),
and with a targeted DPatch (how often the patch itself is detected as the target class). Writes
docs/results/dpatch.{json,md,png}; rows resume.

Usage: python benchmarks/dpatch.py [--only TEXT] [--write-only]
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import torch
from common import RESULTS, save_figure
from llm import Entry, run_rows

from bitsmith import load, save
from bitsmith.robust.dpatch import paste, train_dpatch
from bitsmith.zoo import cache_dir
from bitsmith.zoo.data import load_fashion_mnist
from bitsmith.zoo.detector import CenterDetector, mean_average_precision
from bitsmith.zoo.scenes import compose

ROWS = RESULTS / "dpatch.json"
TRAIN_SCENES, TEST_SCENES, SIZE, EPOCHS, BATCH, LR = 3000, 500, 64, 6, 32, 2e-3
DETECTORS = {"A": {"width": 32, "seed": 0}, "B": {"width": 48, "seed": 1}}
PATCH, STEPS, PATCH_LR, TARGET = 16, 600, 0.03, 3  # a 16x16 patch on 64x64 scenes (6 % of the area); target: Dress


@functools.cache
def scenes() -> tuple[Any, Any]:
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    return compose(x[:10_000], y[:10_000], TRAIN_SCENES, SIZE, seed=0), compose(xt, yt, TEST_SCENES, SIZE, seed=1)


def targets(s: Any) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": b, "labels": c} for b, c in zip(s.boxes, s.labels, strict=True)]


@functools.cache
def detector(name: str) -> tuple[CenterDetector, float]:
    """A detector trained from scratch (cached)."""
    spec = DETECTORS[name]
    path = cache_dir() / "bench" / f"dpatch-detector-{name}-w{spec['width']}-s{spec['seed']}-e{EPOCHS}.safetensors"
    torch.manual_seed(spec["seed"])
    model = CenterDetector(width=spec["width"])
    if path.is_file():
        return load(path, model).eval(), json.loads(path.with_suffix(".json").read_text())["seconds"]
    train, _ = scenes()
    goal = targets(train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    began = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(train), BATCH):
            rows = order[i : i + BATCH].tolist()
            loss = sum(model.losses(train.images[rows], [goal[r] for r in rows]).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  detector {name} epoch {epoch + 1}/{EPOCHS}: loss {float(loss):.3f}", flush=True)
    seconds = time.perf_counter() - began
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"seconds": round(seconds, 1)}))
    return model.eval(), seconds


@functools.cache
def patch(kind: str) -> tuple[torch.Tensor, float]:
    """The random control, the untargeted or the targeted DPatch (trained on detector A's training scenes)."""
    if kind == "random":
        return torch.rand(1, PATCH, PATCH, generator=torch.Generator().manual_seed(5)), 0.0
    train, _ = scenes()
    began = time.perf_counter()
    found = train_dpatch(detector("A")[0], train.images, targets(train), PATCH, STEPS, BATCH, PATCH_LR,
                         TARGET if kind == "targeted" else None)  # fmt: skip
    return found, time.perf_counter() - began


def row(kind: str, on: str) -> dict[str, Any]:
    _, test = scenes()
    model, train_seconds = detector(on)
    images, boxes = test.images, None
    the_patch, patch_seconds = patch(kind) if kind != "clean" else (None, 0.0)
    if the_patch is not None:
        images, boxes = paste(test.images, the_patch, torch.Generator().manual_seed(9))
    with torch.no_grad():
        found = model(images)
    out: dict[str, Any] = {"map50": mean_average_precision(found, targets(test)), "detector_seconds": round(train_seconds, 1),
                           "patch_seconds": round(patch_seconds, 1), "threads": torch.get_num_threads()}  # fmt: skip
    if kind == "targeted" and boxes is not None:
        out["target_hit"] = sum(_hit(f, box) for f, box in zip(found, boxes, strict=True)) / len(found)
    if the_patch is not None and on == "A":
        out["patch"] = the_patch[0].tolist()  # kept for the page's picture
    return out


def _hit(found: dict[str, torch.Tensor], box: torch.Tensor) -> bool:
    """Whether a detection of the target class overlaps the pasted patch (IoU >= 0.5)."""
    chosen = found["boxes"][found["labels"] == TARGET]
    return bool(len(chosen) and (_iou(chosen, box) >= 0.5).any())


def locality_row(kind: str) -> dict[str, Any]:
    """Recall (a same-class detection with IoU >= 0.5) of the held-out objects near the patch (centre within
    ``NEAR`` pixels of the patch's centre) and far from it, on detector A: does the patch act beyond its
    neighbourhood?"""
    _, test = scenes()
    model, _ = detector("A")
    the_patch, _ = patch(kind)
    images, boxes = paste(test.images, the_patch, torch.Generator().manual_seed(9))
    with torch.no_grad():
        found = model(images)
    counts = {"near": [0, 0], "far": [0, 0]}
    for f, truth, labels, box in zip(found, test.boxes, test.labels, boxes, strict=True):
        centre = (box[:2] + box[2:]) / 2
        for t, label in zip(truth, labels, strict=True):
            side = "near" if float(((t[:2] + t[2:]) / 2 - centre).norm()) <= NEAR else "far"
            counts[side][1] += 1
            same = f["boxes"][f["labels"] == label]
            counts[side][0] += int(len(same) > 0 and bool((_iou(same, t) >= 0.5).any()))
    return {f"recall_{k}": v[0] / max(v[1], 1) for k, v in counts.items()} | {
        f"objects_{k}": v[1] for k, v in counts.items()} | {"threads": torch.get_num_threads()}  # fmt: skip


def _iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.maximum(boxes[:, :2], box[:2]), torch.minimum(boxes[:, 2:], box[2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    return inter / ((boxes[:, 2:] - boxes[:, :2]).prod(1) + (box[2:] - box[:2]).prod() - inter)


NEAR = 24  # pixels between centres: the patch's half-width plus an item's

LABELS = {("clean", "A"): "detector A, clean", ("random", "A"): f"detector A, random {PATCH}x{PATCH} patch",
          ("untargeted", "A"): "detector A, untargeted DPatch (white-box)",
          ("targeted", "A"): f"detector A, targeted DPatch (class {TARGET}, white-box)",
          ("clean", "B"): "detector B, clean", ("random", "B"): f"detector B, random {PATCH}x{PATCH} patch",
          ("untargeted", "B"): "detector B, untargeted DPatch from detector A (transfer)"}  # fmt: skip


def entries() -> list[Entry]:
    out = [(label, {"variant": f"{kind}-{on}"}, {}, functools.partial(row, kind, on))
           for (kind, on), label in LABELS.items()]  # fmt: skip
    return out + [(f"detector A, recall near / far from a {kind} patch", {"variant": f"locality-{kind}"}, {},
                   functools.partial(locality_row, kind)) for kind in ("random", "untargeted")]  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if "error" not in r]
    lines = ["# DPatch on a detector trained from scratch", "",
             "Regenerate: `make bench-dpatch` (`python benchmarks/dpatch.py`; rows resume).", "",
             f"Scenes of 1-4 Fashion-MNIST items on {SIZE}x{SIZE} canvases (`bitsmith.zoo.scenes`): {TRAIN_SCENES:,} "
             f"for training, {TEST_SCENES:,} held out. Detectors (`bitsmith.zoo.detector`, CenterNet-style): A width "
             f"{DETECTORS['A']['width']}, B width {DETECTORS['B']['width']} (other seed), each trained from scratch "
             f"for {EPOCHS} epochs (Adam lr {LR:g}, batch {BATCH}). DPatch (`bitsmith.robust.dpatch`): a {PATCH}x{PATCH} "
             f"patch trained on detector A for {STEPS} signed steps of {PATCH_LR:g}, pasted at a random place in every "
             "held-out scene. mAP@0.5 by pycocotools; target hit: the share of scenes in which a detection of the "
             "target class covers the patch (IoU >= 0.5).", "",
             "| row | mAP@0.5 | target hit % | detector train s | patch train s | load |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in done:
        if r["variant"].startswith("locality-"):
            continue
        hit = f"{100 * r['target_hit']:.1f}" if "target_hit" in r else ""
        lines.append(f"| {r['name']} | {r['map50']:.3f} | {hit} | {r['detector_seconds']:.0f} | {r['patch_seconds']:.0f} | "
                     f"{r['load'][0]:.1f} |")  # fmt: skip
    local = [r for r in done if r["variant"].startswith("locality-")]
    if local:
        lines += ["", f"Where the patch acts (detector A): recall of the held-out objects whose centre is within {NEAR} "
                  "pixels of the patch's centre (near) or farther (far).", "",
                  "| patch | recall near | objects near | recall far | objects far |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['variant'].split('-', 1)[1]} | {100 * r['recall_near']:.1f} | {r['objects_near']} | "
                  f"{100 * r['recall_far']:.1f} | {r['objects_far']} |" for r in local]  # fmt: skip
    lines += ["", "![the patches and a patched scene](dpatch.png)", ""]
    (RESULTS / "dpatch.md").write_text("\n".join(lines))
    plot({r["variant"]: r for r in done})


def plot(rows: dict[str, dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    kinds = [k for k in ("random", "untargeted", "targeted") if f"{k}-A" in rows]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(3 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        ax.imshow(torch.tensor(rows[f"{kind}-A"]["patch"]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{kind} patch: mAP@0.5 {rows[f'{kind}-A']['map50']:.3f}", fontsize=9)
        ax.axis("off")
    save_figure(fig, "dpatch.png")


if __name__ == "__main__":
    run_rows(__doc__, ROWS, lambda args: entries(), write)
