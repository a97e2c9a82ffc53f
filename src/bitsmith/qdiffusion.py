"""Q-Diffusion's two diffusion-specific pieces: calibration data drawn from the float sampler's trajectories
(uniformly over its time steps, or at one step: the naive baseline), and the layers fed by a U-Net decoder's skip
concatenation with the channel where the concatenation splits; and the recipe's generation task, whose calibration
batches are those trajectories."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.eval.generative import CALIBRATION_SEED, GenerationTask, ddim_scheduler, sample
from bitsmith.method import eval_mode, run_forward

NAIVE_STEP = 800  # the single-step baseline's time step (Q-Diffusion's fallback)


def calibration_steps(
    timesteps: list[int], count: int, uniform: bool = True, single_step: int = NAIVE_STEP
) -> list[int]:
    """The sampler's time steps to calibrate on: every ``n // count``-th of the ``n`` steps, from the first to the
    last stretch of the trajectory (the official ``range(0, n, n // count)``: at least ``count`` steps, more when
    ``count`` does not divide ``n``), or only the step nearest ``single_step``."""
    if not 1 <= count <= len(timesteps):
        raise ValueError(
            f"calibration steps {count}: the sampler has {len(timesteps)} steps; choose 1..{len(timesteps)}"
        )
    if not uniform:
        return [min(timesteps, key=lambda t: abs(t - single_step))]
    return [timesteps[i] for i in range(0, len(timesteps), len(timesteps) // count)]


@torch.no_grad()
def trajectory_batches(
    model: nn.Module, samples: int, sampler_steps: int, calib_steps: int, uniform: bool = True,
    seed: int = CALIBRATION_SEED,
    batch_size: int = 32, single_step: int = NAIVE_STEP,
) -> list[dict[str, Tensor]]:  # fmt: skip
    """Calibration batches ``{"sample": x_t, "timestep": t}`` of the float model's DDIM trajectories. Uniform:
    ``samples`` trajectories, each kept at the time steps ``calibration_steps`` spreads over the sampler's steps;
    single-step: as many inputs in all (one trajectory per uniform input), all at the step nearest t = 800."""
    timesteps = [int(t) for t in ddim_scheduler(sampler_steps).timesteps]
    keep = set(calibration_steps(timesteps, calib_steps, uniform, single_step))
    runs = samples if uniform else samples * len(calibration_steps(timesteps, calib_steps))
    kept: list[tuple[int, Tensor]] = []
    sample(model, runs, sampler_steps, seed, record=lambda t, x, _e: kept.append((t, x.clone())) if t in keep else None)
    inputs = torch.cat([x for _, x in kept])
    steps = torch.cat([torch.full((x.shape[0],), t, dtype=torch.long) for t, x in kept])
    order = torch.randperm(len(steps), generator=torch.Generator().manual_seed(seed))
    inputs, steps = inputs[order], steps[order]
    return [{"sample": inputs[i : i + batch_size], "timestep": steps[i : i + batch_size]}
            for i in range(0, len(steps), batch_size)]  # fmt: skip


def concat_splits(model: nn.Module, batch: Any) -> dict[str, int]:
    """``{layer name: channel}`` of the layers that read a decoder's skip concatenation ``cat(h, skip)`` directly
    (the 1x1 shortcut convolutions of ``diffusers``' up blocks' ResNets), with the number of ``h`` channels."""
    skips: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "resnets") and type(module).__name__.endswith("UpBlock2D"):

            def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ())
                skips[name] = [int(t.shape[1]) for t in res]

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model), contextlib.ExitStack():
            run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    splits = {}
    for name, channels in skips.items():
        block = model.get_submodule(name)
        for i, resnet in enumerate(block.resnets):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is not None and i < len(channels):
                skip = channels[-(i + 1)]
                splits[f"{name}.resnets.{i}.conv_shortcut"] = int(shortcut.in_channels) - skip
    return splits


def generation_task(model: nn.Module, spec: Any, data_root: str | None, smoke: bool = False) -> GenerationTask:
    """The task of a recipe's ``generation`` section (``smoke``: 64 samples, 4 sampler steps, 2 trajectories)."""
    from bitsmith.zoo.data import load_fashion_mnist

    samples, steps = (
        (min(spec.samples, 64), min(spec.sampler_steps, 4)) if smoke else (spec.samples, spec.sampler_steps)
    )
    calib_steps, calib_samples = (
        min(spec.calib_steps, steps),
        (min(spec.calib_samples, 4) if smoke else spec.calib_samples),
    )
    images, _ = load_fashion_mnist("test", data_root)
    batches = trajectory_batches(
        model, calib_samples, steps, calib_steps, spec.calib_uniform, single_step=spec.calib_timestep
    )
    return GenerationTask(images[:samples], batches, samples, steps, spec.seed, 2 if smoke else spec.trajectories)
