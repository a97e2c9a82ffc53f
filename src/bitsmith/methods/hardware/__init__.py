"""Analog (ReRAM crossbar) hardware: ReSNA noise-aware training. The crossbar model itself is in the
core (``bitsmith.crossbar``): bit-slice sparsity (``qat``) maps its weights with it too.

Importing this package registers its methods."""

from bitsmith.methods.hardware import resna  # noqa: F401  (imported to register)
