"""Teacher-sparsification rows of the attention benchmark (issue 41, item 2, second half: "From Sparsity to
Simplicity" raises the teacher's attention sparsity by AViT-style token retention, then distils the sequential
replacement from it). Per retention level: the zoo ViT keeps that share of its patch tokens from block ``AT`` on (the
most attended by the class token in block ``AT``; the rest dropped) and is fine-tuned so, the teacher; its attention
sparsity in the replaced blocks is measured in the full token frame (dropped keys hold no attention); FAR replaces
blocks ``REPLACED`` and is distilled from that teacher and fine-tuned the same budget. The student-teacher gap is
the claim's measure: it should shrink as the teacher's sparsity grows."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from typing import Any

import torch
from common import table_rows

from bitsmith import build_method, compress, save
from bitsmith import load as load_checkpoint
from bitsmith.eval.attention import vit_attention_probs
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

TRAIN = TrainConfig(epochs=1, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=0.1,
                    label_smoothing=0.1)  # fmt: skip
TRAIN_IMAGES, CALIB, AT, REPLACED, TOKENS = 20_000, 1024, 1, [2, 3], 50
RETAIN = (1.0, 0.75, 0.5, 0.25)
FAR = {"name": "far", "blocks": REPLACED}


def images() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist("train")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:TRAIN_IMAGES]
    return x[order], y[order]


def teacher(keep: float) -> torch.nn.Module:
    """The ViT retaining ``keep`` of its patch tokens from block ``AT`` on, fine-tuned (cached)."""
    methods = [{"name": "sqap", "criterion": "top", "at": AT, "keep": keep}] if keep < 1 else []
    digest = hashlib.sha256(json.dumps([methods, TRAIN.__dict__, TRAIN_IMAGES], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "bench" / f"sparse-teacher-{digest[:12]}.safetensors"
    model = pretrained("vit")
    if path.is_file():
        return load_checkpoint(path, model).eval()
    built = [build_method(m) for m in methods]
    x, y = images()
    compress(model, built, [(x[:128], y[:128])])
    fit(model, x, y, TRAIN, built)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    return model.eval()


@torch.no_grad()
def full_frame_sparsity(model: torch.nn.Module, x: torch.Tensor, top_k: int = 4) -> dict[str, float]:
    """Mean attention entropy of the ``REPLACED`` blocks over ``log(TOKENS)`` (the full token frame: a dropped key
    holds no attention) and the mass of the top ``top_k`` keys."""
    entropy, mass = [], []

    def measure(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        probs = vit_attention_probs(module, args[0])
        entropy.append(float((-(probs * probs.clamp(min=1e-12).log()).sum(-1)).mean() / math.log(TOKENS)))
        mass.append(float(probs.topk(min(top_k, probs.shape[-1]), -1).values.sum(-1).mean()))

    blocks = [model.blocks[i] for i in REPLACED]
    hooks = [getattr(b, "block", b).attn.register_forward_pre_hook(measure) for b in blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return {"entropy": sum(entropy) / len(entropy), "top_mass": sum(mass) / len(mass)}


def row(keep: float) -> dict[str, Any]:
    xt, yt = load_fashion_mnist("test")
    x, y = images()
    began = time.perf_counter()
    model = teacher(keep)
    teacher_seconds = time.perf_counter() - began
    out: dict[str, Any] = {"keep": keep, "teacher_accuracy": accuracy(model, xt, yt),
                           "sparsity": full_frame_sparsity(model, xt[:1000])}  # fmt: skip
    student = copy.deepcopy(model)
    began = time.perf_counter()
    far = build_method(FAR)
    compress(student, [far], [(x[i : i + 128], y[i : i + 128]) for i in range(0, CALIB, 128)], finalize=False)
    out["distilled_accuracy"] = accuracy(student, xt, yt)
    fit(student, x, y, TRAIN, [far])
    far.finalize(student)
    out["student_accuracy"] = accuracy(student, xt, yt)
    out["gap"] = out["teacher_accuracy"] - out["student_accuracy"]
    out["distilled_gap"] = out["teacher_accuracy"] - out["distilled_accuracy"]
    out |= {"teacher_seconds": round(teacher_seconds, 1), "student_seconds": round(time.perf_counter() - began, 1)}
    return out


def page(rows: list[dict[str, Any]]) -> list[str]:
    done = [r for r in rows if r.get("section") == "sparse-teacher"]
    if not done:
        return []
    lines = ["## Sparser teachers: token retention before distillation", "",
             f"The zoo ViT as teacher, keeping a share of its 49 patch tokens from block {AT} on (the most attended by "
             f"the class token in block {AT}, the rest dropped; `sqap` with `criterion: top`) and fine-tuned "
             f"{TRAIN.epochs} epoch on {TRAIN_IMAGES:,} training images; FAR then replaces blocks "
             f"{REPLACED[0]}-{REPLACED[-1]} and is distilled from that teacher ({CALIB:,} images, 300 steps per block, "
             f"100 joint) and fine-tuned the same epoch. Sparsity: the replaced blocks' attention entropy over "
             f"log({TOKENS}) (the full token frame) and their top-4 mass, on 1,000 test images. Gap: teacher minus "
             "student top-1 (points), after distillation and after fine-tuning.", "",
             "| retained | teacher top-1 | entropy | top-4 mass | student distilled | gap | student fine-tuned | gap | "
             "train s (teacher + student) | load |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += table_rows(done, lambda r: [
        f"{r['keep']:.0%}", f"{100 * r['teacher_accuracy']:.2f}", f"{r['sparsity']['entropy']:.3f}",
        f"{r['sparsity']['top_mass']:.3f}", f"{100 * r['distilled_accuracy']:.2f}", f"{100 * r['distilled_gap']:.2f}",
        f"{100 * r['student_accuracy']:.2f}", f"{100 * r['gap']:.2f}", f"{r['teacher_seconds']} + {r['student_seconds']}",
        f"{r['load'][0]:.2f}"], 10)  # fmt: skip
    rho = rank_correlation(rows)
    if rho is not None:
        lines += ["", f"Spearman's rho between the teacher's entropy and the fine-tuned gap: {rho:+.2f} (positive: the "
                  "sparser the teacher, the smaller the gap)."]  # fmt: skip
    return [*lines, ""]


def rank_correlation(rows: list[dict[str, Any]]) -> float | None:
    """Spearman's rho between the teachers' entropy and the fine-tuned gap (negative sparsity = entropy)."""
    from scipy.stats import spearmanr

    done = [r for r in rows if r.get("section") == "sparse-teacher" and "error" not in r]
    if len(done) < 3:
        return None
    return float(spearmanr([r["sparsity"]["entropy"] for r in done], [r["gap"] for r in done]).statistic)
