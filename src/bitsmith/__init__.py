"""bitsmith: compress and harden PyTorch models (quantization, mixed precision, sparsity, low rank,
robust training) with the methods of one research line on one small core."""

from bitsmith import methods as _methods  # noqa: F401  (registers the built-in methods)
from bitsmith.ensemble import Ensemble
from bitsmith.eval.cost import model_cost
from bitsmith.export.checkpoint import CheckpointError, load, save
from bitsmith.method import METHODS, Method, build_method, compress, register_method, run_forward
from bitsmith.nn import LowRankConv2d, LowRankLinear, QConv2d, QLinear, compressed_layers, rebuild, strip
from bitsmith.quant import (
    OBSERVERS,
    QUANTIZERS,
    BitPlaneQuantizer,
    CodebookQuantizer,
    Quantizer,
    UniformQuantizer,
    build_quantizer,
)
from bitsmith.select import Selection
from bitsmith.split_ensemble import SplitEnsemble
from bitsmith.swap import swap

__version__ = "0.1.0"

__all__ = [
    "METHODS", "OBSERVERS", "QUANTIZERS", "BitPlaneQuantizer", "CheckpointError", "CodebookQuantizer", "Ensemble",
    "LowRankConv2d", "LowRankLinear", "Method", "QConv2d", "QLinear", "Quantizer", "Selection",
    "SplitEnsemble", "UniformQuantizer", "build_method", "build_quantizer", "compress", "compressed_layers", "load",
    "model_cost", "rebuild", "register_method", "run_forward", "save", "strip", "swap",
]  # fmt: skip
