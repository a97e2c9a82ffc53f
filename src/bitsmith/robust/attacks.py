"""Attacks on image classifiers with inputs in ``[0, 1]``.

* :class:`AttackSpec` — one attack's settings, validated (a bad field gets one line naming it).
* :func:`pgd` — bitsmith's own batched PGD (L-inf or L2, random start, restarts keep each example's first
  success), fast enough to run inside every training step; FGSM is PGD with one step of size eps and no random
  start. A test holds it to the Adversarial Robustness Toolbox's PGD (same eps, steps, step size).
* :func:`art_attack` — the evaluation suite, from the Adversarial Robustness Toolbox (ART): FGSM, PGD,
  ``autoattack`` (ART's ``AutoAttack`` with its standard settings: APGD-CE and APGD-DLR, 100 iterations and 5
  restarts each, DeepFool, Square with 5,000 queries and 5 restarts; ``steps`` / ``restarts`` do not apply) and
  ``autoattack-lite``, a reduced worst case over APGD-CE (``steps``), APGD-T (DLR loss, targeted at the 3
  likeliest wrong classes), DeepFool and Square (1,000 queries) for quick looks (ART has no FAB; DeepFool, also
  a minimal-perturbation attack, stands in for it).

The model is attacked as it runs: fake-quant modules pass gradients straight through (their STE), so a
quantized model is differentiated through its quantizers, not around them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from bitsmith.method import eval_mode

ATTACKS = ("fgsm", "pgd", "autoattack", "autoattack-lite")
NORMS: dict[str, tuple[str, ...]] = {name: ("inf", "2") for name in ATTACKS}
LOW, HIGH = 0.0, 1.0  # the input range of bitsmith's image data


class AttackSpec(BaseModel):
    """One attack: ``name`` (fgsm, pgd, autoattack), ``eps`` in the input's units, ``norm`` ("inf" or "2"),
    ``steps`` (PGD iterations; APGD iterations in autoattack), ``step_size`` (default 2.5 eps / steps, Madry et
    al.), ``restarts`` (random starts; an example counts as broken when any restart breaks it), ``seed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["fgsm", "pgd", "autoattack", "autoattack-lite"] = "pgd"
    eps: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.1
    norm: Literal["inf", "2"] = "inf"
    steps: Annotated[int, Field(ge=1, le=10_000)] = 20
    step_size: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    restarts: Annotated[int, Field(ge=1, le=100)] = 1
    seed: int = 0

    @model_validator(mode="after")
    def _in_range(self) -> AttackSpec:
        if self.norm == "inf" and self.eps > HIGH - LOW:
            raise ValueError(
                f"eps {self.eps} is larger than the input range [{LOW:g}, {HIGH:g}]: every image is reachable; "
                "give eps in the input's units, e.g. 0.1"
            )
        return self

    def check_input(self, example: Tensor) -> None:
        """An L2 eps beyond the diagonal of the input box reaches every image: refused."""
        diagonal = (HIGH - LOW) * math.sqrt(example[0].numel())
        if self.norm == "2" and self.eps > diagonal:
            raise ValueError(f"eps {self.eps} (L2) exceeds the input box's diagonal {diagonal:.1f}: every image is "
                             "reachable; give a smaller eps")  # fmt: skip

    @property
    def iterations(self) -> int:
        return 1 if self.name == "fgsm" else self.steps

    @property
    def alpha(self) -> float:
        """The step size: eps for FGSM, else ``step_size`` or 2.5 eps / steps."""
        if self.name == "fgsm":
            return self.eps
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def label(self) -> str:
        steps = {"fgsm": "", "autoattack": " (standard)"}.get(self.name, f"-{self.steps}")
        return f"{self.name}{steps} L{self.norm} eps {self.eps:g}"


def attack_spec(what: str = "attack", **fields: object) -> AttackSpec:
    """An :class:`AttackSpec`, or a ``ValueError`` of one line per bad field: ``what.field: problem (got value)``."""
    try:
        return AttackSpec(**fields)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            message = e["msg"].removeprefix("Value error, ")
            if e["loc"]:
                message = f".{'.'.join(str(p) for p in e['loc'])}: {message} (got {e['input']!r})"
            else:  # a check across fields: its message names them
                message = f": {message}"
            lines.append(what + message)
        raise ValueError("; ".join(lines)) from None


def attack_specs(names: list[str], eps: list[float], norm: str, steps: int, restarts: int) -> list[AttackSpec]:
    """One validated :class:`AttackSpec` per (attack, eps): the suite of ``bitsmith eval --attack`` and of a
    recipe's ``attack`` section."""
    return [attack_spec("attack", name=name, eps=e, norm=norm, steps=steps, restarts=restarts)
            for name in names for e in eps]  # fmt: skip


def _per_example_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "inf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta)).clamp(max=1.0)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    if norm == "inf":
        return (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator)
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator) ** (1 / x[0].numel())
    return direction / _per_example_norm(direction) * radius * eps


def pgd(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec) -> Tensor:
    """Adversarial examples ``x_adv`` with ``||x_adv - x|| <= eps`` in ``[0, 1]``, untargeted, maximising the
    cross-entropy of the true label ``y``. The model runs in eval mode (batch norm uses its running statistics)
    and its parameters get no gradient."""
    spec.check_input(x)
    generator = torch.Generator().manual_seed(spec.seed)
    best = x.clone()
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    random_start = spec.name != "fgsm"
    with attacking(model):
        for _ in range(spec.restarts if random_start else 1):
            delta = _random_start(x, spec.eps, spec.norm, generator) if random_start else torch.zeros_like(x)
            adv = pgd_steps(model, x, (x + delta).clamp(LOW, HIGH), y, spec)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y
            take = fooled & ~broken
            best[take] = adv[take]
            best[~broken & ~fooled] = adv[~broken & ~fooled]  # the last restart's point where none broke it
            broken |= fooled
    return best.detach()


def pgd_steps(model: nn.Module, x: Tensor, start: Tensor, y: Tensor, spec: AttackSpec, ascend: bool = True) -> Tensor:
    """``spec.iterations`` projected steps from ``start``: up the cross-entropy of ``y`` (untargeted), or down it
    (``ascend=False``: a targeted attack toward ``y``); each step signed (L-inf) or unit-norm (L2), projected onto
    the ``eps`` ball around ``x`` and into ``[0, 1]``. Run it inside :func:`attacking`."""
    alpha = spec.alpha if ascend else -spec.alpha
    adv = start
    for _ in range(spec.iterations):
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(adv), y), adv)
        step = grad.sign() if spec.norm == "inf" else grad / _per_example_norm(grad)
        adv = (x + _project(adv.detach() + alpha * step - x, spec.eps, spec.norm)).clamp(LOW, HIGH)
    return adv.detach()


@contextlib.contextmanager
def attacking(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (batch norm uses its running statistics) and its parameters without gradients while
    an attack differentiates the input; both restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def art_classifier(model: nn.Module, example: Tensor, classes: int):  # noqa: ANN201  (ART's type)
    """``model`` wrapped as ART's ``PyTorchClassifier`` on CPU, inputs clipped to ``[0, 1]``."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(example.shape[1:]),
                             nb_classes=classes, clip_values=(LOW, HIGH), device_type="cpu")  # fmt: skip


def art_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, classes: int = 10,
               batch_size: int = 500) -> Tensor:  # fmt: skip
    """Adversarial examples from the Adversarial Robustness Toolbox (see the module docstring)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch

    spec.check_input(x)
    np.random.seed(spec.seed)  # ART draws its random starts from numpy
    norm = np.inf if spec.norm == "inf" else 2
    with eval_mode(model):
        classifier = art_classifier(model, x, classes)
        inputs, labels = x.numpy(), y.numpy()
        if spec.name == "fgsm":
            attack = FastGradientMethod(classifier, norm=norm, eps=spec.eps, batch_size=batch_size)
            return torch.from_numpy(attack.generate(inputs, labels))
        if spec.name == "pgd":
            attack = ProjectedGradientDescentPyTorch(
                classifier, norm=norm, eps=spec.eps, eps_step=spec.alpha, max_iter=spec.steps,
                num_random_init=spec.restarts, batch_size=batch_size, verbose=False,
            )  # fmt: skip
            return torch.from_numpy(attack.generate(inputs, labels))
        if spec.name == "autoattack":
            return torch.from_numpy(_standard_auto_attack(classifier, inputs, labels, spec, norm, batch_size))
        return torch.from_numpy(_auto_attack(classifier, inputs, labels, spec, norm, batch_size))


def _standard_auto_attack(classifier, x: np.ndarray, y: np.ndarray, spec: AttackSpec, norm: float,  # noqa: ANN001
                          batch_size: int) -> np.ndarray:  # fmt: skip
    """ART's ``AutoAttack`` with its standard attack list (the initial APGD step ``2 eps``, as AutoAttack's)."""
    from art.attacks.evasion import AutoAttack

    attack = AutoAttack(classifier, norm=norm, eps=spec.eps, eps_step=2 * spec.eps, batch_size=batch_size)
    return attack.generate(x, y)


def _auto_attack(classifier, x: np.ndarray, y: np.ndarray, spec: AttackSpec, norm: float,  # noqa: ANN001
                 batch_size: int) -> np.ndarray:  # fmt: skip
    """``autoattack-lite``: the worst case per example over APGD-CE, APGD-T, DeepFool and Square (reduced
    settings): each attack runs only on the examples that every earlier one failed to break (AutoAttack's
    protocol)."""
    from art.attacks.evasion import AutoProjectedGradientDescent, DeepFool, SquareAttack

    adv = x.copy()
    robust = classifier.predict(x, batch_size=batch_size).argmax(1) == y

    def run(attack, targets: np.ndarray | None = None) -> None:  # noqa: ANN001
        idx = np.flatnonzero(robust)
        if idx.size == 0:
            return
        found = attack.generate(x[idx], targets[idx] if targets is not None else y[idx])
        fooled = classifier.predict(found, batch_size=batch_size).argmax(1) != y[idx]
        adv[idx[fooled]] = found[fooled]
        robust[idx[fooled]] = False

    common = {"norm": norm, "eps": spec.eps, "eps_step": 2 * spec.eps, "max_iter": spec.steps, "batch_size": batch_size,
              "verbose": False}  # fmt: skip
    run(AutoProjectedGradientDescent(classifier, nb_random_init=spec.restarts, loss_type="cross_entropy", **common))
    logits = classifier.predict(x, batch_size=batch_size)
    logits[np.arange(len(y)), y] = -np.inf
    for rank in range(3):  # APGD-T at the 3 likeliest wrong classes
        targets = np.argsort(-logits, axis=1)[:, rank]
        apgd_t = AutoProjectedGradientDescent(classifier, targeted=True, nb_random_init=1,
                                              loss_type="difference_logits_ratio", **common)  # fmt: skip
        run(apgd_t, targets)
    deepfool = DeepFool(classifier, max_iter=50, epsilon=1e-3, nb_grads=10, batch_size=batch_size, verbose=False)
    idx = np.flatnonzero(robust)
    if idx.size:  # DeepFool is unbounded: keep only what lands inside the eps ball
        found = deepfool.generate(x[idx])
        delta = found - x[idx]
        size = np.abs(delta).reshape(len(idx), -1).max(1) if norm == np.inf else np.linalg.norm(
            delta.reshape(len(idx), -1), axis=1)  # fmt: skip
        fooled = (classifier.predict(found, batch_size=batch_size).argmax(1) != y[idx]) & (size <= spec.eps + 1e-6)
        adv[idx[fooled]] = found[fooled]
        robust[idx[fooled]] = False
    run(SquareAttack(classifier, norm=norm, eps=spec.eps, max_iter=1000, nb_restarts=1, batch_size=batch_size,
                     verbose=False))  # fmt: skip
    return adv
