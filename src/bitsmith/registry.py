"""Name -> class registries (methods, quantizers, observers, ...), with plugin discovery."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of classes. Registering a name twice is an error; lookups name the options."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, type[T]] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@METHODS.register("ptq")``."""

        def add(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._items[name].__module__}; pick another name"
                )
            self._items[name] = cls
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            ep.load()  # importing the plugin module registers its classes

    def get(self, name: str) -> type[T]:
        self._load_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def items(self) -> list[tuple[str, type[T]]]:
        return [(n, self._items[n]) for n in self.names()]
