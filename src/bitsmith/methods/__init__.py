"""Methods, one file per paper or baseline. Importing this package registers them all."""

from bitsmith.methods import noisyquant, ptq, rtn, smoothquant  # noqa: F401
