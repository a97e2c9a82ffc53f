"""Layer sensitivities for mixed precision: Hessian trace (Hutchinson), top Hessian eigenvalue (power
iteration), empirical Fisher trace, and the plain quantization-error proxy.

Each function takes ``loss_fn(model) -> scalar`` (the loss on calibration data) or per-example losses,
and the names of the layers whose ``weight`` is measured; results are per parameter (trace / n_l).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Use the math attention kernel, the one with a second derivative (the fused CPU kernel has none)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is what CPU runs anyway
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _weights(model: nn.Module, names: list[str]) -> list[Tensor]:
    return [model.get_submodule(n).weight for n in names]


def hutchinson_traces(
    model: nn.Module, loss_fn: LossFn, names: list[str], max_probes: int = 64, rel_se: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """``tr(H_l) / n_l`` per layer: Rademacher probes ``v``, ``v_l^T (H v)_l`` by double backward, until
    every layer's running estimate has relative standard error < ``rel_se`` (at least 4 probes) or
    ``max_probes`` probes were used."""
    params = _weights(model, names)
    with double_backward_attention():
        grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    samples: list[list[float]] = [[] for _ in names]
    for probe in range(max_probes):
        vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=probe < max_probes - 1)
        for i, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
            samples[i].append(float((v * hv).sum()))
        if probe >= 3 and all(_rel_se(s) < rel_se for s in samples):
            break
    return {name: sum(s) / len(s) / p.numel() for name, s, p in zip(names, samples, params, strict=True)}


def _rel_se(values: list[float]) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values)) / max(abs(mean), 1e-12)


def top_eigenvalues(
    model: nn.Module, loss_fn: LossFn, names: list[str], iterations: int = 20, tol: float = 1e-3, seed: int = 0
) -> dict[str, float]:
    """``lambda_max(H_l)`` per layer by power iteration on the layer's own Hessian block."""
    params = _weights(model, names)
    with double_backward_attention():
        grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for name, p, g in zip(names, params, grads, strict=True):
        v = torch.randn(p.shape, generator=generator).to(p)
        v = v / v.norm()
        value = 0.0
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
            new = float((v * hv).sum())
            v = hv / hv.norm().clamp(min=1e-12)
            if abs(new - value) <= tol * max(abs(new), 1e-12):
                value = new
                break
            value = new
        out[name] = value
    return out


def fisher_traces(
    model: nn.Module, example_losses: Callable[[nn.Module], Tensor], names: list[str]
) -> dict[str, float]:
    """Empirical Fisher ``mean_i ||grad_l loss_i||^2 / n_l`` from per-example gradients (exact, one
    backward per example of ``example_losses(model)``, a vector of losses)."""
    params = _weights(model, names)
    losses = example_losses(model)
    sums = [0.0] * len(params)
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i < losses.shape[0] - 1)
        for j, g in enumerate(grads):
            sums[j] += float(g.pow(2).sum())
    return {name: s / losses.shape[0] / p.numel() for name, s, p in zip(names, sums, params, strict=True)}
