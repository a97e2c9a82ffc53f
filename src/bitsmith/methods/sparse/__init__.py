"""Sparsity, low rank and structure: magnitude / N:M pruning, DeepHoyer, NViT, SVD training, PAT and its hidden-dimension baseline; the masks and regularisers they share (sparsity).

Importing this package registers its methods."""

from bitsmith.methods.sparse import (  # noqa: F401  (imported to register)
    deephoyer,
    hidden_prune,
    nvit,
    pat,
    prune,
    svd_train,
)
