"""Methods, one file per paper or baseline. Importing this package registers them all."""

from bitsmith.methods import bsq, fisher_reg, hero, mixed, msq, noisyquant, ptq, qat, rtn, smoothquant  # noqa: F401
