"""Latency: repeated forward passes after warm-up with a fixed thread count, recorded with their spread
(min / median / max) and the machine's load average, and judged reliable or not before a speed-up is
stated."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsmith.method import eval_mode, run_forward

MAX_SPREAD = 1.5  # max / min above this: the runs disagree (only for records without quartiles)
MAX_IQR = 0.2  # interquartile range / median above this: the runs disagree too much to compare
MORE_RUNS = 3  # a spread-out timing is retried with up to this many times the runs before it is judged


@contextmanager
def threads(n: int | None):
    """Temporarily fix torch's intra-op thread count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_averages() -> list[float]:
    """The 1-, 5- and 15-minute load averages as the kernel prints them (empty where the OS does not say)."""
    path = Path("/proc/loadavg")
    return [float(x) for x in path.read_text().split()[:3]] if path.exists() else []


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not say)."""
    averages = load_averages()
    return averages[0] if averages else None


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Timing:
    """Milliseconds per forward pass over ``runs`` timed passes, with the load average before them."""

    min_ms: float
    median_ms: float
    max_ms: float
    runs: int
    load: float | None
    cores: int
    q1_ms: float | None = None  # quartiles of the runs (None in records written before they were kept)
    q3_ms: float | None = None

    def spread(self) -> float | None:
        """The interquartile range over the median: robust to one slow run among many."""
        if self.q1_ms is None or self.q3_ms is None or self.runs < 4:
            return None
        return (self.q3_ms - self.q1_ms) / self.median_ms

    def unreliable(self) -> str | None:
        """Why this timing cannot support a speed-up claim, or None: a busy machine (more runnable work than
        cores) or runs that disagree (interquartile range over median above ``MAX_IQR``; one slow run among
        many does not count; records without quartiles fall back to max / min above ``MAX_SPREAD``)."""
        reasons = []
        if self.load is not None and self.load > self.cores + 0.5:
            reasons.append(f"load average {self.load:.1f} on {self.cores} cores")
        spread = self.spread()
        if spread is not None and spread > MAX_IQR:
            reasons.append(f"runs spread: middle half {self.q1_ms:.2f}-{self.q3_ms:.2f} ms around "
                           f"{self.median_ms:.2f} (all {self.min_ms:.2f}-{self.max_ms:.2f})")  # fmt: skip
        elif spread is None and self.runs >= 2 and self.max_ms > MAX_SPREAD * self.min_ms:
            reasons.append(f"runs spread {self.min_ms:.2f}-{self.max_ms:.2f} ms")
        return "; ".join(reasons) or None

    @classmethod
    def from_times(cls, times: list[float], load: float | None, cores: int) -> Timing:
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) >= 2 else (times[0], 0.0, times[0])
        return cls(min(times), statistics.median(times), max(times), len(times), load, cores, q1, q3)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timing:
        keys = ("min_ms", "median_ms", "max_ms", "runs", "load", "cores")
        return cls(**{key: data[key] for key in keys}, q1_ms=data.get("q1_ms"), q3_ms=data.get("q3_ms"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unreliable": self.unreliable()}

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (min {self.min_ms:.2f}, max {self.max_ms:.2f}, {self.runs} runs)"


def speedup(baseline: Timing, faster: Timing) -> str:
    """``2.41x``, or why no speed-up is stated."""
    reasons = [r for r in (baseline.unreliable(), faster.unreliable()) if r]
    if reasons:
        return f"speed-up not stated, timing unreliable: {'; '.join(reasons)}; rerun on an idle machine"
    return f"{baseline.median_ms / faster.median_ms:.2f}x"


@torch.no_grad()
def time_forward(
    model: nn.Module, example: Any, runs: int = 10, warmup: int = 2, num_threads: int | None = None
) -> Timing:
    """Time ``runs`` forward passes of ``model`` on ``example`` after ``warmup`` untimed ones; runs that disagree
    (interquartile range over median above ``MAX_IQR``) get more runs, up to ``MORE_RUNS`` times as many."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    load, times = load_average(), []
    with threads(num_threads), eval_mode(model):
        for i in range(warmup + runs * MORE_RUNS):
            if i >= warmup + runs and len(times) % runs == 0:
                spread = Timing.from_times(times, load, cores()).spread()
                if spread is None or spread <= MAX_IQR:
                    break
            start = time.perf_counter()
            run_forward(model, example)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return Timing.from_times(times, load, cores())


def measure_latency(
    model: nn.Module, example: Any, runs: int = 10, warmup: int = 2, num_threads: int | None = None
) -> float:
    """Median milliseconds per forward pass (``time_forward`` has the spread and the load)."""
    return time_forward(model, example, runs, warmup, num_threads).median_ms
