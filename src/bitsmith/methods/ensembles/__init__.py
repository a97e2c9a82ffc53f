"""Ensembles: deep ensembles, DVERGE, HCE, SharpBalance, Split-Ensemble.

Importing this package registers its methods."""

from bitsmith.methods.ensembles import (  # noqa: F401  (imported to register)
    deep_ensemble,
    dverge,
    hce,
    sharpbalance,
    split_ensemble,
)
