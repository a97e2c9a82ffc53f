"""Quantization-aware training and bit-level precision search: QAT (STE / LSQ), its QD-BEV-style distillation, BSQ, CSQ, MSQ, the Fisher-trace regulariser, bit-slice sparsity.

Importing this package registers its methods."""

from bitsmith.methods.qat import (  # noqa: F401  (imported to register)
    bitslice,
    bsq,
    csq,
    distill_qat,
    fisher_reg,
    msq,
    qat,
)
