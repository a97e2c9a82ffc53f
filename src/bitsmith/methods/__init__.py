"""Methods, one file per paper or baseline, grouped by family (one package each: ptq, llm, qat, sparse, moe, robust,
ensembles, hardware, attention). A family holds its methods and the helpers only they use; what two families share lives in the core
(bitsmith/*.py). Importing this package registers them all."""

from bitsmith.methods import (  # noqa: F401  (imported to register)
    attention,
    ensembles,
    hardware,
    llm,
    moe,
    ptq,
    qat,
    robust,
    sparse,
)
