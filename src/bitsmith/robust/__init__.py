"""Attacks and robust evaluation (attacks from the Adversarial Robustness Toolbox; bitsmith's own PGD for
training)."""

from bitsmith.robust.attacks import ATTACKS, AttackSpec, art_attack, attack_spec, attack_specs, pgd
from bitsmith.robust.evaluate import AttackResult, RobustReport, robust_evaluate
from bitsmith.robust.ood import auroc, corrupt, ood_auroc

__all__ = ["ATTACKS", "AttackResult", "AttackSpec", "RobustReport", "art_attack", "attack_spec", "attack_specs",
           "auroc", "corrupt", "ood_auroc", "pgd", "robust_evaluate"]  # fmt: skip
