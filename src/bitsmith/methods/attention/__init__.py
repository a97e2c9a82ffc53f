"""Cheaper attention and fewer tokens: FAR (attention replaced by multi-head LSTMs) and sparse attention distillation
(the same on the layers whose attention is sparsest); the attention-sparsity measure is ``bitsmith.eval.attention``.

Importing this package registers its methods."""

from bitsmith.methods.attention import far, sparse_replace  # noqa: F401  (imported to register)
