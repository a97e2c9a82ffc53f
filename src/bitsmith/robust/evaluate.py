"""Robust evaluation: clean accuracy, accuracy under each attack, accuracy under a transfer attack from a source
model (the FP32 model a compressed one came from), and a flag when white-box accuracy beats transfer accuracy by
more than noise (gradient masking: quantization can hide gradients without adding robustness)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from bitsmith.robust.attacks import AttackSpec, art_attack, pgd
from bitsmith.train import predict

Attacker = Callable[[nn.Module, Tensor, Tensor, AttackSpec], Tensor]


@dataclass
class AttackResult:
    attack: str  # the spec's label, e.g. "pgd-20 Linf eps 0.1"
    name: str
    eps: float
    norm: str
    accuracy: float  # white-box: crafted on the model itself
    transfer_accuracy: float | None = None  # crafted on the source model, evaluated on this one
    seconds: float = 0.0


@dataclass
class RobustReport:
    clean: float
    examples: int
    results: list[AttackResult] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def robustbench_entry(self, model: str, recipe: Any, dataset: str = "fashion-mnist") -> dict[str, Any]:
        """A RobustBench-style leaderboard entry: clean and AutoAttack accuracy (in %) at the strongest eps."""
        auto = [r for r in self.results if r.name == "autoattack"]
        best = max(auto, key=lambda r: r.eps) if auto else None
        return {"dataset": dataset, "model": model, "clean_acc": round(100 * self.clean, 2),
                "autoattack_acc": round(100 * best.accuracy, 2) if best else None,
                "eps": best.eps if best else None, "norm": f"L{best.norm}" if best else None,
                "examples": self.examples, "bitsmith_recipe": recipe}  # fmt: skip

    def lines(self) -> list[str]:
        out = [f"clean top-1 {100 * self.clean:.2f}% on {self.examples} test images"]
        for r in self.results:
            transfer = (
                f", transfer from FP32 {100 * r.transfer_accuracy:.2f}%" if r.transfer_accuracy is not None else ""
            )
            out.append(f"{r.attack}: robust top-1 {100 * r.accuracy:.2f}%{transfer} ({r.seconds:.1f} s)")
        return out + [f"warning: {flag}" for flag in self.flags]


def noise_margin(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy ``p`` measured on ``n`` examples (at least one example)."""
    return max(2 * math.sqrt(max(p * (1 - p), 1e-12) / n), 1 / n)


def attacked_accuracy(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, clean: Tensor | None = None) -> float:
    """Top-1 on ``x_adv``; an example the model already misclassifies clean counts as broken. ``clean``: the
    model's clean correctness on ``x`` when already known."""
    clean = predict(model, x) == y if clean is None else clean
    return float((clean & (predict(model, x_adv) == y)).float().mean())


def robust_evaluate(model: nn.Module, images: Tensor, labels: Tensor, attacks: list[AttackSpec],
                    source: nn.Module | None = None, attacker: Attacker = art_attack) -> RobustReport:  # fmt: skip
    """Clean and robust top-1 of ``model``; with ``source``, also under each attack crafted on ``source``.
    ``attacker`` makes the white-box examples (ART by default; :func:`pgd` is bitsmith's own)."""
    correct = predict(model, images) == labels  # clean, once for every attack
    report = RobustReport(clean=float(correct.float().mean()), examples=len(labels))
    for spec in attacks:
        start = time.perf_counter()
        accuracy = attacked_accuracy(model, images, labels, attacker(model, images, labels, spec), correct)
        result = AttackResult(spec.label(), spec.name, spec.eps, spec.norm, accuracy)
        if source is not None:
            transfer_spec = spec if spec.name != "autoattack" else spec.model_copy(update={"name": "pgd"})
            crafted = pgd(source, images, labels, transfer_spec)
            result.transfer_accuracy = attacked_accuracy(model, images, labels, crafted, correct)
            margin = noise_margin(result.transfer_accuracy, len(labels))
            if accuracy > result.transfer_accuracy + margin:
                report.flags.append(
                    f"{spec.label()}: white-box robust top-1 {100 * accuracy:.2f}% exceeds the transfer attack's "
                    f"{100 * result.transfer_accuracy:.2f}% by more than noise ({100 * margin:.2f} points): the "
                    "gradients are likely masked (e.g. by quantization); trust the lower number"
                )
        result.seconds = round(time.perf_counter() - start, 1)
        report.results.append(result)
    return report
