"""Mixtures of experts: FactorLLM (dense FFN to experts), GEMQ (per-expert bit allocation), T-REX, MoFME (feature-modulated
experts sharing one FFN); the expert layers they share (experts).

Importing this package registers its methods."""

from bitsmith.methods.moe import (  # noqa: F401  (imported to register)
    factorllm,
    gemq,
    mofme,
    trex,
)
