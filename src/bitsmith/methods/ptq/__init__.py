"""Post-training quantization: weights and activations from calibration data (PTQ, RTN, SmoothQuant, a Hadamard rotation, NoisyQuant), block reconstruction (BRECQ, and Q-Diffusion on it for diffusion models) and mixed precision from sensitivities.

Importing this package registers its methods."""

from bitsmith.methods.ptq import (  # noqa: F401  (imported to register)
    brecq,
    hadamard,
    mixed,
    noisyquant,
    ptq,
    q_diffusion,
    rtn,
    smoothquant,
)
