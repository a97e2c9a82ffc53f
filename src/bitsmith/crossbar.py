"""ReRAM crossbars: how a layer's weights sit on them and what a read returns (shared by bit-slice sparsity and ReSNA).

Mapping (dynamic fixed point, as the bit-slice paper's): a weight tensor gets the step ``2^(ceil(log2 max|W|) - B)``
and the magnitude code ``c = clamp(round(|w| / step), 0, 2^B - 1)`` of ``B = weight_bits`` bits, cut into
``B / cell_bits`` slices of ``cell_bits`` bits, most significant first; each slice is one cell (conductance level
``s / L`` of the range, ``L = 2^cell_bits - 1``) on its own crossbar, positive and negative weights on a differential
pair. A layer's unrolled inputs (``in_features``, or ``C_in x k x k`` for a convolution) are cut into chunks of
``rows``: each chunk is one crossbar, each bit line sums its chunk.

A read (one input vector, one output) is stochastic: every device's conductance reads with Gaussian noise of standard
deviation ``noise`` times the conductance range, drawn anew for every read (thermal-like read noise, independent of
the stored level). In weight units a bit line's noise is ``step * 2^(cell_bits * (K-1-k)) * L * noise * ||x_chunk||``,
so the output's noise is ``step * L * noise * sqrt(2 * sum_k 4^(cell_bits * (K-1-k))) * ||x||`` with an ideal ADC.
An ADC of ``adc_bits`` rounds every bit line's sum to ``2^adc_bits`` levels over its full range
``rows * L * input_max`` (inputs applied as a positive and a negative phase).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _ste(hard: Tensor, soft: Tensor) -> Tensor:
    return soft + (hard - soft).detach()


def power_of_two_step(weight: Tensor, bits: int = 8) -> float:
    """``2^(ceil(log2 max|W|) - bits)``: the step of a ``bits``-bit magnitude covering ``W``."""
    peak = float(weight.detach().abs().max().clamp(min=1e-12))
    return 2.0 ** (math.ceil(math.log2(peak)) - bits)


def bit_slices(weight: Tensor, step: float, slice_bits: int = 2, bits: int = 8) -> list[Tensor]:
    """The magnitude code's slices, most significant first; ``sum_k slice_k * 2^(slice_bits * (K-1-k))``
    equals the code ``clamp(round(|w| / step), 0, 2^bits - 1)`` exactly (straight-through gradients)."""
    levels = 2**bits - 1
    scaled = weight.abs() / step
    code = _ste(torch.round(scaled).clamp(0, levels), scaled)
    count = math.ceil(bits / slice_bits)
    slices, rest = [], code
    for k in range(count):
        unit = 2 ** (slice_bits * (count - 1 - k))
        value = _ste(torch.floor(rest / unit), rest / unit)
        slices.append(value)
        rest = rest - unit * value.detach()
    return slices


@dataclass(frozen=True)
class Crossbar:
    """One crossbar design: size, cell and weight precision, read noise, ADC resolution."""

    rows: int = 128
    cell_bits: int = 2
    weight_bits: int = 8
    noise: float = 0.0
    adc_bits: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"crossbar rows {self.rows}: a crossbar has at least 1 row")
        if self.cell_bits < 1 or self.weight_bits % self.cell_bits:
            allowed = ", ".join(str(b) for b in range(1, self.weight_bits + 1) if self.weight_bits % b == 0)
            raise ValueError(f"crossbar cell_bits {self.cell_bits} does not divide weight_bits {self.weight_bits}: "
                             f"use one of {allowed}")  # fmt: skip
        if not self.noise >= 0:
            raise ValueError(
                f"crossbar noise {self.noise}: a noise level is >= 0 (a fraction of the conductance range)"
            )
        if self.adc_bits is not None and self.adc_bits < 1:
            raise ValueError(f"crossbar adc_bits {self.adc_bits}: an ADC has at least 1 bit (or null for an ideal one)")

    @property
    def levels(self) -> int:
        return 2**self.cell_bits - 1

    @property
    def places(self) -> list[int]:
        """Each slice's place value, most significant first."""
        count = self.weight_bits // self.cell_bits
        return [2 ** (self.cell_bits * (count - 1 - k)) for k in range(count)]

    def mapped_weight(self, weight: Tensor) -> Tensor:
        """The weight the crossbar stores: sign x step x code (straight-through gradient)."""
        step = power_of_two_step(weight, self.weight_bits)
        slices = bit_slices(weight, step, self.cell_bits, self.weight_bits)
        return torch.sign(weight) * step * sum(p * s for p, s in zip(self.places, slices, strict=True))

    def noise_per_input_norm(self, weight: Tensor) -> float:
        """The output noise's standard deviation per unit of ``||x||`` (ideal ADC), in weight units."""
        step = power_of_two_step(weight, self.weight_bits)
        return step * self.levels * self.noise * math.sqrt(2 * sum(p * p for p in self.places))


def _conv_output_size(layer: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """The convolution's output height and width for an input of ``height x width``."""
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(
            (height, width), layer.kernel_size, layer.stride, layer.padding, layer.dilation, strict=True
        )
    )


def _unrolled(layer: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The layer's inputs as rows of its unrolled weight (``M x D``) and the output shape before the channel moves."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N x D x P
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (x.shape[0], *_conv_output_size(layer, *x.shape[2:]))
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _folded(layer: nn.Module, rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Rows of outputs (``M x out``) back in the layer's output layout."""
    if isinstance(layer, nn.Conv2d):
        n, h, w = shape
        return rows.reshape(n, h * w, -1).transpose(1, 2).reshape(n, -1, h, w)
    return rows.reshape(*shape, -1)


def _adc(current: Tensor, full_scale: float, bits: int) -> Tensor:
    step = full_scale / (2**bits - 1)
    return _ste((current / step).round().clamp(0, 2**bits - 1) * step, current)


def crossbar_forward(layer: nn.Module, x: Tensor, crossbar: Crossbar, input_max: float | None = None,
                     generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """The output of a Linear / Conv2d layer run on ``crossbar`` (one stochastic read per input vector)."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError("crossbar: grouped convolutions are not mapped (groups must be 1)")
    if crossbar.adc_bits is not None:
        inputs, shape = _unrolled(layer, x)
        weight = layer.weight.reshape(layer.weight.shape[0], -1)  # out x D
        out = _folded(layer, _quantized_reads(weight, inputs, crossbar, input_max, generator), shape)
    else:  # the ideal ADC: the layer's own op on the mapped weight, plus the reads' summed noise in closed form
        mapped = crossbar.mapped_weight(layer.weight)
        if isinstance(layer, nn.Conv2d):
            conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
            out = F.conv2d(x, mapped, **conv)
            ones = x.new_ones(1, 1, *layer.kernel_size)
            square_norm = F.conv2d(x.detach().pow(2).sum(1, keepdim=True), ones, **conv)  # N x 1 x H x W
        else:
            out = F.linear(x, mapped)
            square_norm = x.detach().pow(2).sum(-1, keepdim=True)
        if crossbar.noise > 0:
            std = crossbar.noise_per_input_norm(layer.weight) * square_norm.clamp(min=0).sqrt()
            out = out + std * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    if layer.bias is not None:
        out = out + (layer.bias.view(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else layer.bias)
    return out


def _quantized_reads(weight: Tensor, inputs: Tensor, crossbar: Crossbar, input_max: float | None,
                     generator: torch.Generator | None) -> Tensor:  # fmt: skip
    """Bit line by bit line: every chunk x slice x weight sign x input phase read, noised and rounded by the ADC."""
    if input_max is None:
        raise ValueError("crossbar: an ADC needs the layer's calibrated input range (input_max)")
    step = power_of_two_step(weight, crossbar.weight_bits)
    slices = bit_slices(weight, step, crossbar.cell_bits, crossbar.weight_bits)
    out = inputs.new_zeros(inputs.shape[0], weight.shape[0])
    for start in range(0, inputs.shape[1], crossbar.rows):
        chunk = slice(start, start + crossbar.rows)
        full_scale = (min(start + crossbar.rows, inputs.shape[1]) - start) * crossbar.levels * input_max
        for phase_sign, phase in ((1.0, inputs[:, chunk].clamp(min=0)), (-1.0, (-inputs[:, chunk]).clamp(min=0))):
            norm = phase.detach().pow(2).sum(1, keepdim=True).sqrt()
            for place, cells in zip(crossbar.places, slices, strict=True):
                for weight_sign in (1.0, -1.0):
                    stored = cells[:, chunk] * (torch.sign(weight[:, chunk]) == weight_sign)
                    current = phase @ stored.t()
                    if crossbar.noise > 0:
                        noise = torch.randn(current.shape, generator=generator, dtype=current.dtype)
                        current = current + crossbar.levels * crossbar.noise * norm * noise
                    out = out + phase_sign * weight_sign * place * _adc(current, full_scale, crossbar.adc_bits)
    return step * out


def mapped_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers a crossbar holds: ``names``, or every Linear and Conv2d."""
    if names is not None:
        return {n: model.get_submodule(n) for n in names}
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def input_ranges(model: nn.Module, batches: Iterable[Tensor], names: Iterable[str] | None = None) -> dict[str, float]:
    """Each mapped layer's largest input magnitude over ``batches`` (an ADC's full range)."""
    seen: dict[str, float] = {}

    def record(name: str, x: Tensor) -> None:
        seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))

    layers = mapped_layers(model, names)
    handles = [layer.register_forward_pre_hook(lambda m, a, n=n: record(n, a[0])) for n, layer in layers.items()]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def attach_crossbars(layers: dict[str, nn.Module], crossbar: Crossbar, input_max: dict[str, float] | None = None,
                     generator: torch.Generator | None = None, training_only: bool = False) -> list[RemovableHandle]:  # fmt: skip
    """Make every layer compute as ``crossbar`` would (``training_only``: only while it trains, as noise-aware
    training injects the noise); remove the returned handles to undo."""

    def read(name: str, layer: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if training_only and not layer.training:
            return out
        return crossbar_forward(layer, args[0], crossbar, (input_max or {}).get(name), generator)

    return [layer.register_forward_hook(lambda m, a, o, n=n: read(n, m, a, o)) for n, layer in layers.items()]


@contextlib.contextmanager
def on_crossbars(model: nn.Module, crossbar: Crossbar, names: Iterable[str] | None = None,
                 input_max: dict[str, float] | None = None, generator: torch.Generator | None = None) -> Iterator[None]:  # fmt: skip
    """Inside the block the mapped layers compute as ``crossbar`` would, one stochastic read per input vector."""
    handles = attach_crossbars(mapped_layers(model, names), crossbar, input_max, generator)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def accuracy_under_noise(model: nn.Module, x: Tensor, y: Tensor, crossbar: Crossbar, draws: int = 20, seed: int = 0,
                         input_max: dict[str, float] | None = None, batch_size: int = 500) -> list[float]:  # fmt: skip
    """Top-1 accuracy of ``model`` on ``crossbar`` for each of ``draws`` independent noise draws (seeded)."""
    from bitsmith.train import accuracy

    if draws < 1:
        raise ValueError(f"draws {draws}: evaluate at least one noise draw")
    out = []
    for draw in range(draws):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + draw)
        with on_crossbars(model, crossbar, input_max=input_max, generator=generator):
            out.append(accuracy(model, x, y, batch_size))
    return out


def draw_summary(accuracies: list[float]) -> dict[str, Any]:
    """Mean, spread (population standard deviation) and every draw's accuracy, as reports and benchmarks keep them."""
    return {"mean": statistics.fmean(accuracies), "std": statistics.pstdev(accuracies), "draws": accuracies}
