"""Robust training: PGD adversarial training, MAT, HERO, CLAT, SAFER.

Importing this package registers its methods."""

from bitsmith.methods.robust import (  # noqa: F401  (imported to register)
    adv_train,
    clat,
    hero,
    mat,
    safer,
)
