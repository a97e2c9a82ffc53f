"""ReSNA: stochastic-noise-aware training for ReRAM crossbars (Yang, Belakaria, Joardar, H. Yang, Doppa, Pande,
Chakrabarty, Li, "Multi-Objective Optimization of ReRAM Crossbars for Robust DNN Inferencing under Stochastic
Noise", ICCAD 2021).

Every training forward runs the selected layers as the crossbar would (``bitsmith.crossbar``: weights on the
crossbar's fixed-point grid in ``cell_bits`` slices, one stochastic read per input vector with per-device read noise,
optionally an ADC), so the task loss is the loss *under* noise and its gradient (straight through the grid and the
ADC, exact through the additive noise) moves the weights to where noise costs least; evaluation samples the noise
anew (``bitsmith.crossbar.accuracy_under_noise``, mean and spread over draws).

Deviations (stated on the method page): the paper's full text and code were not available here, so the crossbar
model is ours, not the paper's device model: Gaussian read noise of a fixed fraction of the conductance range per
device and read (thermal-like; no shot or telegraph noise, no programming variation, no IR drop), inputs applied as
analog values in a positive and a negative phase (no bit-serial DACs); the noise injected in training is the noise
evaluated (``train_noise`` sets another level). The weights stay float in the model: the crossbar maps them when it
runs them, so the same model can be evaluated on any crossbar design.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field
from torch import Tensor, nn

from bitsmith.crossbar import Crossbar, input_ranges, on_crossbars
from bitsmith.method import Method, register_method


@register_method("resna")
@dataclass
class ReSNA(Method):
    """Train under the crossbar's read noise (and ADC), so the trained weights tolerate it."""

    description = "ReSNA: stochastic-noise-aware training for ReRAM crossbars (read noise, cell slices, ADC)"

    rows: Annotated[int, Field(ge=1)] = 128
    cell_bits: Annotated[int, Field(ge=1, le=8)] = 2
    weight_bits: Annotated[int, Field(ge=1, le=16)] = 8
    noise: Annotated[float, Field(ge=0.0)] = 0.1
    adc_bits: Annotated[int, Field(ge=1)] | None = None
    train_noise: Annotated[float, Field(ge=0.0)] | None = None  # the level injected in training (default: noise)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.crossbar  # validates the design: one line naming the field  # noqa: B018
        self._layers: list[str] = []
        self._input_max: dict[str, float] = {}

    @property
    def crossbar(self) -> Crossbar:
        """The evaluated design."""
        return Crossbar(self.rows, self.cell_bits, self.weight_bits, self.noise, self.adc_bits)

    @property
    def training_crossbar(self) -> Crossbar:
        level = self.noise if self.train_noise is None else self.train_noise
        return Crossbar(self.rows, self.cell_bits, self.weight_bits, level, self.adc_bits)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._layers = list(self.where.resolve(model))
        return {}

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        """The layers' input ranges (an ADC's full scale)."""
        if self.adc_bits is not None:
            inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]
            self._input_max = input_ranges(model, inputs, self._layers)

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        """The task loss with every selected layer read once, noisily, from the crossbar."""
        x, y = batch
        with on_crossbars(model, self.training_crossbar, self._layers, self._input_max):
            return nn.functional.cross_entropy(model(x), y)
