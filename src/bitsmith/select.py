"""Selection: which layers a method touches (name globs / regexes, a type filter, skips, overrides)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict
from torch import nn

DEFAULT_TYPES = ("Linear", "Conv2d", "Conv1D")


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


@dataclass
class Selection:
    """Layers chosen by name and type, with per-layer overrides.

    Patterns are shell globs on the dotted module name (``encoder.*.attention.*``), or regular
    expressions prefixed with ``re:`` (``re:layer\\.[0-5]\\..*``). ``@first`` and ``@last`` name the
    first and last layer that the include patterns and type filter select (in module order), e.g.
    ``exclude: ["@first", "@last"]`` to keep the stem and the classifier in float.

    Args:
        include: patterns of layers to select.
        exclude: patterns of layers to skip.
        types: class names accepted (a subclass of a named class is accepted too).
        overrides: ``{pattern: {field: value}}`` applied to the selected layers that match, in order.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # recipes: a misspelt key is an error

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern in [*self.include, *self.exclude, *self.overrides]:
            if isinstance(pattern, str) and pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"pattern {pattern[:80]!r} is not a valid regular expression ({exc})") from None

    def candidates(self, model: nn.Module) -> list[str]:
        """Names selected by ``include`` and ``types`` (before ``exclude``), in module order."""
        allowed = set(self.types)
        names = [n for n, m in model.named_modules() if n and _type_names(m) & allowed]
        return [n for n in names if any(_match(p, n, names) for p in self.include)]

    def resolve(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """``{layer name: overrides}`` of the selected layers; errors when nothing matches."""
        candidates = self.candidates(model)
        chosen = [n for n in candidates if not any(_match(p, n, candidates) for p in self.exclude)]
        if not chosen:
            layers = [n for n, m in model.named_modules() if n and _type_names(m) & set(DEFAULT_TYPES)]
            raise ValueError(
                f"selection matched no layers (include={self.include}, exclude={self.exclude}, "
                f"types={self.types}); layers of the model include {layers[:8]}"
            )
        result: dict[str, dict[str, Any]] = {n: {} for n in chosen}
        for pattern, fields in self.overrides.items():
            hits = [n for n in chosen if _match(pattern, n, chosen)]
            if not hits:
                raise ValueError(
                    f"override pattern {pattern!r} matches none of the selected layers {chosen[:8]}; "
                    "fix the pattern or remove the override"
                )
            for name in hits:
                result[name].update(fields)
        return result


def _match(pattern: str, name: str, ordered: list[str]) -> bool:
    if pattern == "@first":
        return bool(ordered) and name == ordered[0]
    if pattern == "@last":
        return bool(ordered) and name == ordered[-1]
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def as_selection(where: Selection | dict[str, Any] | None) -> Selection:
    """Accept a ``Selection``, a dict of its fields, or ``None`` (everything)."""
    if where is None:
        return Selection()
    if isinstance(where, Selection):
        return where
    unknown = set(where) - {"include", "exclude", "types", "overrides"}
    if unknown:
        raise ValueError(f"unknown selection field(s) {sorted(unknown)}; allowed: include, exclude, types, overrides")
    fields = {k: ([v] if isinstance(v, str) and k != "overrides" else v) for k, v in where.items()}
    return Selection(**fields)
