"""Decoder-LLM quantization and fine-tuning: GPTQ, AWQ, LiftQuant, MoBiQuant with dynamic precision routing, NPFT; the per-token routers they share (routing).

Importing this package registers its methods."""

from bitsmith.methods.llm import (  # noqa: F401  (imported to register)
    awq,
    gptq,
    liftquant,
    mobiquant,
    npft,
    precision_routing,
)
