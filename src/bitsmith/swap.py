"""The one place where modules are replaced: ``swap(model, where, fn)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from bitsmith.select import Selection, as_selection

SwapFn = Callable[[str, nn.Module, dict[str, Any]], nn.Module]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def spec_of(module: nn.Module) -> dict[str, Any]:
    spec = getattr(module, "spec", None)
    return spec() if callable(spec) else {"type": type(module).__name__}


def swap(model: nn.Module, where: Selection | dict[str, Any] | None, fn: SwapFn) -> dict[str, dict[str, Any]]:
    """Replace each selected layer by ``fn(name, layer, overrides)`` and return ``{name: spec}``.

    ``fn`` may return the layer itself (modified in place) or a new module.
    """
    selected = as_selection(where).resolve(model)
    specs: dict[str, dict[str, Any]] = {}
    for name, overrides in selected.items():
        old = model.get_submodule(name)
        new = fn(name, old, overrides)
        if new is not old:
            set_submodule(model, name, new)
        specs[name] = spec_of(new)
    return specs
