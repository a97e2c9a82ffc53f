"""Methods, one file per paper or baseline. Importing this package registers them all."""

from bitsmith.methods import ptq, rtn  # noqa: F401
