"""Latency: median wall time of repeated forward passes after warm-up, with a fixed thread count."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bitsmith.method import eval_mode, run_forward


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


@torch.no_grad()
def measure_latency(
    model: nn.Module, example: Any, runs: int = 10, warmup: int = 2, num_threads: int | None = None
) -> float:
    """Median milliseconds per forward pass of ``model`` on ``example``."""
    times = []
    with threads(num_threads), eval_mode(model):
        for i in range(warmup + runs):
            start = time.perf_counter()
            run_forward(model, example)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
