"""Attacks and robust evaluation (attacks from the Adversarial Robustness Toolbox; bitsmith's own PGD for
training)."""

from bitsmith.robust.attacks import ATTACKS, AttackSpec, art_attack, attack_spec, attack_specs, pgd
from bitsmith.robust.evaluate import AttackResult, RobustReport, robust_evaluate

__all__ = ["ATTACKS", "AttackResult", "AttackSpec", "RobustReport", "art_attack", "attack_spec", "attack_specs", "pgd",
           "robust_evaluate"]  # fmt: skip
