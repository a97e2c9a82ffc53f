"""Robust evaluation: clean accuracy, accuracy under each attack, accuracy under a transfer attack from a source
model of the same training (the compressed model's own weights in float: no fake quantization in the gradient
path), a flag when white-box accuracy beats transfer accuracy by more than noise (gradient masking: quantization
can hide gradients without adding robustness), and the standard sanity checks of a white-box number (Carlini et
al., 2019, "On Evaluating Adversarial Robustness"): accuracy falls with eps, more steps and restarts never raise
it, and an unbounded attack (Linf eps 1 on [0, 1] images) reaches 0 %."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from bitsmith.robust.attacks import AttackSpec, art_attack, attacking, pgd, pgd_steps
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
    checks: dict[str, float] = field(default_factory=dict)  # sanity checks' accuracies (see ``sanity_checks``)


@dataclass
class RobustReport:
    clean: float
    examples: int
    results: list[AttackResult] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def robustbench_entry(self, model: str, recipe: Any, dataset: str = "fashion-mnist") -> dict[str, Any]:
        """A RobustBench-style leaderboard entry at the largest eps: clean accuracy, the standard AutoAttack's
        (``autoattack_acc``, None when it was not run: a reduced variant is reported as ``autoattack_lite_acc``),
        and ``robust_acc``, the least accuracy any attack run left (in %)."""
        if not self.results:
            return {"dataset": dataset, "model": model, "clean_acc": round(100 * self.clean, 2), "robust_acc": None,
                    "examples": self.examples, "bitsmith_recipe": recipe}  # fmt: skip
        top = max(self.results, key=lambda r: r.eps)
        at = [r for r in self.results if (r.eps, r.norm) == (top.eps, top.norm)]
        named = {r.name: round(100 * r.accuracy, 2) for r in at}
        worst = min(at, key=robust_accuracy)  # the attack that left the least accuracy there
        return {"dataset": dataset, "model": model, "clean_acc": round(100 * self.clean, 2),
                "autoattack_acc": named.get("autoattack"), "autoattack_lite_acc": named.get("autoattack-lite"),
                "robust_acc": round(100 * robust_accuracy(worst), 2), "strongest_attack": worst.attack,
                "eps": top.eps, "norm": f"L{top.norm}",
                "examples": self.examples, "bitsmith_recipe": recipe}  # fmt: skip

    def lines(self) -> list[str]:
        out = [f"clean top-1 {100 * self.clean:.2f}% on {self.examples} test images"]
        for r in self.results:
            transfer = f", transfer {100 * r.transfer_accuracy:.2f}%" if r.transfer_accuracy is not None else ""
            out.append(f"{r.attack}: robust top-1 {100 * r.accuracy:.2f}%{transfer} ({r.seconds:.1f} s)")
        return out + [f"warning: {flag}" for flag in self.flags]


def robust_accuracy(result: AttackResult) -> float:
    """The lower of an attack's white-box and transfer accuracy: what the strongest example left."""
    return min(result.accuracy, result.transfer_accuracy if result.transfer_accuracy is not None else 1.0)


def noise_margin(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy ``p`` measured on ``n`` examples (at least one example)."""
    return max(2 * math.sqrt(max(p * (1 - p), 1e-12) / n), 1 / n)


def attacked_accuracy(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, clean: Tensor | None = None) -> float:
    """Top-1 on ``x_adv``; an example the model already misclassifies clean counts as broken. ``clean``: the
    model's clean correctness on ``x`` when already known."""
    clean = predict(model, x) == y if clean is None else clean
    return float((clean & (predict(model, x_adv) == y)).float().mean())


def gradient_walk(model: nn.Module, images: Tensor, labels: Tensor, spec: AttackSpec) -> Tensor:
    """PGD steps from the clean images (no random start, which alone breaks a model at eps 1): only the
    gradient moves them."""
    with attacking(model):
        return pgd_steps(model, images, images.clone(), labels, spec).detach()


UNBOUNDED_ACCURACY = 0.02  # what an attack that may change every pixel fully is allowed to leave standing


def sanity_checks(model: nn.Module, images: Tensor, labels: Tensor, spec: AttackSpec, accuracy: float,
                  correct: Tensor, attacker: Attacker) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """The accuracies of the checks of one white-box PGD number ``accuracy`` and a line for each failed one:
    twice the eps (bitsmith's PGD) must not be more accurate, ``attacker`` with twice the steps and one more
    restart must not be more accurate, and PGD steps from the clean images at Linf eps 1 must leave at most 2 %
    (all beyond noise)."""
    margin = noise_margin(accuracy, len(labels))
    wider = spec.model_copy(update={"eps": min(2 * spec.eps, 1.0) if spec.norm == "inf" else 2 * spec.eps})
    stronger = spec.model_copy(update={"steps": 2 * spec.steps, "restarts": spec.restarts + 1, "step_size": None})
    unbounded = spec.model_copy(update={"eps": 1.0, "norm": "inf", "step_size": None})
    checks = {
        "eps_x2": attacked_accuracy(model, images, labels, pgd(model, images, labels, wider), correct),
        "steps_x2_restarts_plus_1": attacked_accuracy(
            model, images, labels, attacker(model, images, labels, stronger), correct
        ),  # fmt: skip
        "unbounded": attacked_accuracy(model, images, labels, gradient_walk(model, images, labels, unbounded), correct),
    }
    why = "the gradients are likely masked; trust a transfer or black-box number"
    flags = []
    if checks["eps_x2"] > accuracy + margin:
        flags.append(f"{spec.label()}: accuracy rises with eps ({100 * accuracy:.2f}% at eps {spec.eps:g}, "
                     f"{100 * checks['eps_x2']:.2f}% at {wider.eps:g}): {why}")  # fmt: skip
    if checks["steps_x2_restarts_plus_1"] > accuracy + margin:
        flags.append(f"{spec.label()}: a stronger attack ({stronger.steps} steps, {stronger.restarts} restarts) "
                     f"leaves more accuracy ({100 * checks['steps_x2_restarts_plus_1']:.2f}%): {why}")  # fmt: skip
    if checks["unbounded"] > UNBOUNDED_ACCURACY + margin:
        flags.append(f"{spec.label()}: an unbounded attack (Linf eps 1) leaves {100 * checks['unbounded']:.2f}% "
                     f"(should reach 0): {why}")  # fmt: skip
    return checks, flags


def robust_evaluate(model: nn.Module, images: Tensor, labels: Tensor, attacks: list[AttackSpec],
                    source: nn.Module | None = None, attacker: Attacker = art_attack,
                    sanity: bool = False) -> RobustReport:  # fmt: skip
    """Clean and robust top-1 of ``model``; with ``source``, also under each attack crafted on ``source``.
    ``attacker`` makes the white-box examples (ART by default; :func:`pgd` is bitsmith's own). ``sanity``: run
    ``sanity_checks`` on every PGD number."""
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
        if sanity and spec.name == "pgd":
            result.checks, flags = sanity_checks(model, images, labels, spec, accuracy, correct, attacker)
            report.flags.extend(flags)
        result.seconds = round(time.perf_counter() - start, 1)
        report.results.append(result)
    return report
