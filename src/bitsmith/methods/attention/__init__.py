"""Cheaper attention and fewer tokens: FAR (attention replaced by multi-head LSTMs); the attention-sparsity measure
they share is in ``bitsmith.eval.attention``.

Importing this package registers its methods."""

from bitsmith.methods.attention import far  # noqa: F401  (imported to register)
