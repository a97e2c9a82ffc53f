"""argparse value types shared by the command-line modules (``cli``, ``cli_scale``), apart so that neither
imports the other for them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def probability(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value}")
    return value


def number_list(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated values, each read by ``parse``."""

    def parse_all(text: str) -> list[Any]:
        return [parse(part.strip()) for part in text.split(",") if part.strip()]

    return parse_all


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
