"""The Quantizer contract: fake-quantize in forward, ``encode`` to integer codes, ``decode`` back exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bitsmith.registry import Registry

QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


@dataclass
class Encoded:
    """Integer codes of a tensor plus the parameters needed to decode them.

    ``codes`` are int32 in ``[code_min, code_min + 2**code_bits - 1]``; storage subtracts
    ``code_min`` so that packed codes are non-negative.
    """

    codes: Tensor
    params: dict[str, Tensor] = field(default_factory=dict)
    code_bits: int = 8
    code_min: int = 0


class Quantizer(nn.Module):
    """Base class. Subclasses implement ``forward``, ``encode``, ``decode``, ``config``, ``bits``.

    A quantizer can be *observing* (it records statistics of what passes through and returns it
    unchanged) until ``stop_observing()`` turns the statistics into its parameters.
    """

    kind: ClassVar[str]
    # state tensors that packed checkpoints drop and ``restore`` re-derives from decoded values
    packed_exclude: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.observing = False

    # -- contract -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        raise NotImplementedError

    @property
    def code_bits(self) -> int:
        """Storage width of one code (can exceed ``bits``, e.g. sign-magnitude bit planes)."""
        return self.bits

    def encode(self, x: Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, including ``kind``."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """True once the quantizer has parameters (calibrated, fixed or learned)."""
        raise NotImplementedError

    def overhead_bits(self) -> int:
        """Bits needed to store the quantizer's own parameters (scales, zero points, levels)."""
        return 0

    def float_bias(self, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The bias a float layer needs when this (input) quantizer is dropped; unchanged unless the
        quantizer folded a correction into its layer's bias (NoisyQuant's denoising bias)."""
        return bias

    def restore(self, decoded: Tensor, enc: Encoded | None = None) -> None:
        """Re-derive ``packed_exclude`` state from the decoded values (and the codes ``enc`` they came from)
        after loading a packed checkpoint."""

    # -- observation ----------------------------------------------------------------------
    def start_observing(self) -> None:
        self.observing = True

    def stop_observing(self) -> None:
        self.observing = False

    @torch.no_grad()
    def calibrate_(self, x: Tensor) -> Quantizer:
        """Observe one tensor (e.g. a weight) and set the parameters from it."""
        self.start_observing()
        self(x)
        self.stop_observing()
        return self

    # -- loading: buffers whose shape depends on calibrated data are resized on load ------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name, tensor in list(self._buffers.items()) + list(self._parameters.items()):
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].shape != tensor.shape:
                new = torch.empty_like(state_dict[key], dtype=tensor.dtype)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                else:
                    self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "kind")


def build_quantizer(config: dict[str, Any] | None) -> Quantizer | None:
    """Construct a quantizer from its ``config()`` dict (``None`` stays ``None``)."""
    if config is None:
        return None
    config = dict(config)
    kind = config.pop("kind", None)
    if kind is None:
        raise ValueError(f"quantizer config {config} has no 'kind'; one of {QUANTIZERS.names()}")
    return QUANTIZERS.get(kind)(**config)


def quantizers(module: nn.Module) -> list[Quantizer]:
    """All quantizers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, Quantizer)]


class WrappedQuantizer(Quantizer):
    """A quantizer around ``self.inner`` (set by the subclass): bits, readiness and overhead are the
    inner one's unless overridden."""

    inner: Quantizer

    @property
    def bits(self) -> int:
        return self.inner.bits

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def overhead_bits(self) -> int:
        return self.inner.overhead_bits()
