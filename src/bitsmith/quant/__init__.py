"""Quantizers: uniform, codebook, bit-plane and round-clamp families, plus range observers."""

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer, build_quantizer, quantizers
from bitsmith.quant.bitplane import BitPlaneQuantizer
from bitsmith.quant.codebook import CodebookQuantizer, kmeans_1d
from bitsmith.quant.csq import CSQQuantizer
from bitsmith.quant.lift import LiftQuantizer
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.observers import OBSERVERS, Observer
from bitsmith.quant.roundclamp import RoundClampQuantizer
from bitsmith.quant.split import SplitQuantizer
from bitsmith.quant.uniform import UniformQuantizer

__all__ = [
    "OBSERVERS", "QUANTIZERS", "BitPlaneQuantizer", "CSQQuantizer", "CodebookQuantizer", "Encoded", "LiftQuantizer", "NoisyBias", "Observer",
    "Quantizer", "RoundClampQuantizer", "SplitQuantizer", "UniformQuantizer", "build_quantizer", "kmeans_1d", "quantizers",
]  # fmt: skip
