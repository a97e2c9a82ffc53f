"""Methods, one file per paper or baseline. Importing this package registers them all."""

from bitsmith.methods import (  # noqa: F401  (imported to register)
    awq,
    bitslice,
    bsq,
    csq,
    deephoyer,
    fisher_reg,
    gptq,
    hero,
    liftquant,
    mixed,
    mobiquant,
    msq,
    noisyquant,
    nvit,
    prune,
    ptq,
    qat,
    rtn,
    smoothquant,
    svd_train,
)
