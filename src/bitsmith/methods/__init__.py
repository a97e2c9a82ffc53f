"""Methods, one file per paper or baseline. Importing this package registers them all."""

from bitsmith.methods import noisyquant, ptq, qat, rtn, smoothquant  # noqa: F401
