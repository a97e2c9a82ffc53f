"""Quantizers: uniform, codebook and bit-plane families, plus range observers."""

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer, build_quantizer, quantizers
from bitsmith.quant.bitplane import BitPlaneQuantizer
from bitsmith.quant.codebook import CodebookQuantizer, kmeans_1d
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.observers import OBSERVERS, Observer
from bitsmith.quant.uniform import UniformQuantizer

__all__ = [
    "OBSERVERS", "QUANTIZERS", "BitPlaneQuantizer", "CodebookQuantizer", "Encoded", "NoisyBias", "Observer",
    "Quantizer", "UniformQuantizer", "build_quantizer", "kmeans_1d", "quantizers",
]  # fmt: skip
