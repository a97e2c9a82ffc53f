"""Progress: rich bars on a terminal, and a log line per epoch or phase (logger ``bitsmith``) that also
reaches log files, CI and ``nohup`` output. The CLI shows the log at INFO; a library user enables it with
``logging.basicConfig(level=logging.INFO)``. ``BITSMITH_QUIET`` turns the bars off."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
log = logging.getLogger("bitsmith")


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("BITSMITH_QUIET")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``1 h 2 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on a terminal, plainly otherwise."""
    if not enabled():
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
