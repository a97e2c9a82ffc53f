"""Cheaper attention and fewer tokens: FAR (attention replaced by multi-head LSTMs), sparse attention distillation (the
same on the layers whose attention is sparsest) token pruning before the first block and quantization-aware token pruning inside a quantized model (SQAP); the attention-sparsity
measure is ``bitsmith.eval.attention``.

Importing this package registers its methods."""

from bitsmith.methods.attention import far, sparse_replace, sqap, token_prune  # noqa: F401  (imported to register)
