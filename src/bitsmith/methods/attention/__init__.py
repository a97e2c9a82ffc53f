"""Cheaper attention and fewer tokens: FAR (attention replaced by multi-head LSTMs), sparse attention distillation (the
same on the layers whose attention is sparsest) and token pruning before the first block; the attention-sparsity
measure is ``bitsmith.eval.attention``.

Importing this package registers its methods."""

from bitsmith.methods.attention import far, sparse_replace, token_prune  # noqa: F401  (imported to register)
