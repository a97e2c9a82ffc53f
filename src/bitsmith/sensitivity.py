"""Layer sensitivities for mixed precision: Hessian trace (Hutchinson), top Hessian eigenvalue (power
iteration), empirical Fisher trace, and the plain quantization-error proxy.

Each function takes ``loss_fn(model) -> scalar`` (the loss on calibration data) or per-example losses,
the names of the layers, and ``target``: ``"weight"`` measures the curvature in the layer's weight,
``"input"`` in the layer's input activation on the calibration batch (the tensor its activation
quantizer sees). Results are per element (trace / n_l), so ``S_l * ||Q_b(t) - t||^2`` estimates the
loss increase of quantizing ``t`` (the weight, or the batch's inputs) for either target.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]
Target = Literal["weight", "input"]


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


@contextlib.contextmanager
def captured_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record each named layer's first input during the forward passes run inside the block; inputs
    that do not already require grad (the model's own input) are replaced by ones that do."""
    inputs: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], name: str) -> tuple[Any, ...] | None:
        if name in inputs:
            raise ValueError(f"layer {name!r} runs more than once per forward; its input sensitivity is ambiguous")
        x = args[0]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        inputs[name] = x
        return (x, *args[1:])

    handles = [model.get_submodule(n).register_forward_pre_hook(functools.partial(hook, name=n)) for n in names]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _loss_and_targets(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], names: list[str], target: Target
) -> tuple[Tensor, list[Tensor]]:
    """The loss and the tensors it is differentiated by: the layers' weights or their inputs."""
    if target == "weight":
        return loss_fn(model), [model.get_submodule(n).weight for n in names]
    with captured_inputs(model, names) as inputs:
        loss = loss_fn(model)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"layers {missing} did not run on the calibration batch")
    return loss, [inputs[n] for n in names]


def hutchinson_traces(
    model: nn.Module,
    loss_fn: LossFn,
    names: list[str],
    max_probes: int = 64,
    rel_se: float = 0.05,
    seed: int = 0,
    target: Target = "weight",
) -> dict[str, float]:
    """``tr(H_l) / n_l`` per layer: Rademacher probes ``v``, ``v_l^T (H v)_l`` by double backward, until
    every layer's running estimate has relative standard error < ``rel_se`` (at least 4 probes) or
    ``max_probes`` probes were used."""
    with double_backward_attention():
        loss, params = _loss_and_targets(model, loss_fn, names, target)
        grads = torch.autograd.grad(loss, params, create_graph=True)
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
    model: nn.Module,
    loss_fn: LossFn,
    names: list[str],
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    target: Target = "weight",
) -> dict[str, float]:
    """``lambda_max(H_l)`` per layer by power iteration on the layer's own Hessian block."""
    with double_backward_attention():
        loss, params = _loss_and_targets(model, loss_fn, names, target)
        grads = torch.autograd.grad(loss, params, create_graph=True)
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
    model: nn.Module, example_losses: Callable[[nn.Module], Tensor], names: list[str], target: Target = "weight"
) -> dict[str, float]:
    """Empirical Fisher ``mean_i ||grad_l loss_i||^2`` per element, from exact per-example gradients
    (``example_losses(model)`` is a vector of losses).

    Weights: one backward per example, divided by ``n_l``. Inputs: example ``i``'s input only affects
    ``loss_i`` (eval mode), so one backward of the sum gives every per-example gradient; divided by the
    batch's input elements and by the batch size, the scale of the Hessian of the *mean* loss that
    ``hutchinson_traces`` measures."""
    losses, params = _loss_and_targets(model, example_losses, names, target)
    count = losses.shape[0]
    if target == "input":
        grads = torch.autograd.grad(losses.sum(), params)
        return {n: float(g.pow(2).sum()) / count / p.numel() for n, g, p in zip(names, grads, params, strict=True)}
    sums = [0.0] * len(params)
    for i in range(count):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i < count - 1)
        for j, g in enumerate(grads):
            sums[j] += float(g.pow(2).sum())
    return {name: s / count / p.numel() for name, s, p in zip(names, sums, params, strict=True)}
