"""The zoo's diffusion model: an unconditional DDPM on Fashion-MNIST 28x28, built from Hugging Face ``diffusers``
(``UNet2DModel`` and ``DDPMScheduler``; sampling with ``DDIMScheduler`` in ``bitsmith.eval.generative``).

The U-Net has three resolutions (28, 14, 7; channels 16 / 32 / 64; 0.64 M parameters), one ResNet block per resolution in the encoder
(two in the decoder), one attention layer only in the middle block (7x7, diffusers' default), and the usual skip
concatenations in its decoder (what Q-Diffusion's split quantization is about).
It predicts the noise ``eps`` of ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` on images scaled to [-1, 1];
training draws the time steps uniformly from the 1,000 of a linear beta schedule (DDPM's). Training is
resumable (a state per epoch, the noise and time steps seeded per epoch) and logs a line per epoch with an ETA;
8 epochs at batch 64 take about 27 minutes on 2 cores (0.21 s per step measured alone).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.data import batches
from bitsmith.progress import duration, log, track
from bitsmith.train import TrainConfig, TrainState, load_training_state, lr_at, make_optimizer, save_training_state

TIMESTEPS = 1000


@dataclass(frozen=True)
class UNetConfig:
    """The ``UNet2DModel`` arguments the zoo DDPM fixes (recorded in its checkpoint)."""

    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    image: int = 28


DDPM_UNET = UNetConfig()
DDPM_TRAIN = TrainConfig(epochs=8, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.0, warmup_epochs=0.1)
DESCRIPTION = (
    "DDPM (diffusers UNet2DModel 32/64/64, attention in the middle block, 1,000 linear-beta steps) for 28x28 images"
)


class NoisePredictor(nn.Module):
    """A ``diffusers`` U-Net as a plain module: ``forward(sample, timestep) -> predicted noise`` (a tensor), so
    calibration batches ``{"sample": x_t, "timestep": t}`` run through it like any bitsmith model's."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Tensor, timestep: Tensor | int) -> Tensor:
        return self.unet(sample, timestep).sample


def build_ddpm(config: UNetConfig = DDPM_UNET) -> NoisePredictor:
    from diffusers import UNet2DModel

    if len(config.channels) < 2 or config.image % 2 ** (len(config.channels) - 1):
        raise ValueError(f"a {config.image}x{config.image} image cannot be halved {len(config.channels) - 1} times")
    unet = UNet2DModel(
        sample_size=config.image,
        in_channels=1,
        out_channels=1,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.channels,
        norm_num_groups=config.norm_groups,
        down_block_types=("DownBlock2D",) * len(config.channels),
        up_block_types=("UpBlock2D",) * len(config.channels),
    )
    return NoisePredictor(unet)


def noise_scheduler() -> Any:
    """DDPM's training schedule: 1,000 steps, linear betas 1e-4 .. 0.02."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="linear")


def to_model_range(images: Tensor) -> Tensor:
    """[0, 1] images -> the model's [-1, 1]."""
    return images * 2 - 1


def denoising_loss(model: nn.Module, images: Tensor, generator: torch.Generator, scheduler: Any) -> Tensor:
    """DDPM's simple loss: MSE between the drawn noise and the model's prediction at a uniform time step."""
    x0 = to_model_range(images)
    noise = torch.randn(x0.shape, generator=generator)
    steps = torch.randint(0, TIMESTEPS, (x0.shape[0],), generator=generator)
    return nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, steps), steps), noise)


def fit_ddpm(
    model: nn.Module,
    images: Tensor,
    cfg: TrainConfig = DDPM_TRAIN,
    checkpoint: Path | None = None,
    fingerprint: str | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` to predict noise on ``images`` ([0, 1]); resumable from ``checkpoint`` after any epoch
    (ending where an uninterrupted run ends)."""
    scheduler = noise_scheduler()
    torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(images.shape[0] / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    state = TrainState(0, 0, [])
    if checkpoint is not None and checkpoint.is_file():
        state, optimizer = load_training_state(checkpoint, model, cfg, fingerprint=fingerprint)
    else:
        optimizer = make_optimizer(model, cfg)
    labels = torch.zeros(images.shape[0], dtype=torch.long)  # unconditional: the batches carry no labels
    model.train()
    started, first_epoch = time.perf_counter(), state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # noise and steps: same after a resume
        loss_sum, seen = 0.0, 0
        epoch_batches = batches(images, labels, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        for x, _ in track(epoch_batches, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, total, warmup, cfg.lr)
            loss = denoising_loss(model, x, generator, scheduler)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DDPM loss became {loss.item()} at epoch {epoch + 1}, step {state.step}; "
                                         "lower the lr")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            loss_sum, seen = loss_sum + loss.item() * x.shape[0], seen + x.shape[0]
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch + 1, "loss": loss_sum / seen})
        elapsed = time.perf_counter() - started
        left = elapsed / (epoch + 1 - first_epoch) * (cfg.epochs - epoch - 1)
        log.info(f"epoch {epoch + 1}/{cfg.epochs}: noise MSE {loss_sum / seen:.4f}, {duration(elapsed)} elapsed, "
                 f"about {duration(left)} left")  # fmt: skip
        if checkpoint is not None:
            save_training_state(checkpoint, model, optimizer, state, [], fingerprint)
    model.eval()
    return state.history


def ddpm_fingerprint(config: UNetConfig = DDPM_UNET, cfg: TrainConfig = DDPM_TRAIN) -> str:
    from bitsmith.export.checkpoint import FORMAT_VERSION

    blob = json.dumps({"unet": asdict(config), "train": asdict(cfg), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ddpm_path() -> Path:
    from bitsmith.zoo import cache_dir

    return cache_dir() / "zoo" / f"ddpm-{ddpm_fingerprint()}.safetensors"


def train_ddpm(data_root: str | None = None) -> tuple[NoisePredictor, dict[str, Any]]:
    """Train the zoo DDPM with its fixed seed on the 60,000 training images and cache it (resumable)."""
    from bitsmith.export.checkpoint import save
    from bitsmith.zoo.data import load_fashion_mnist

    images, _ = load_fashion_mnist("train", data_root)
    path = ddpm_path()
    state = path.with_suffix(".train_state.pt")
    torch.manual_seed(DDPM_TRAIN.seed)
    model = build_ddpm()
    log.info(f"training the DDPM: {DDPM_TRAIN.epochs} epochs on {images.shape[0]} images, batch "
             f"{DDPM_TRAIN.batch_size} (once: cached as {path}; resumes if interrupted)")  # fmt: skip
    start = time.perf_counter()
    history = fit_ddpm(model, images, DDPM_TRAIN, checkpoint=state, fingerprint=path.stem)
    info = {"model": "ddpm", "unet": asdict(DDPM_UNET), "train_seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "history": history}  # fmt: skip
    save(model, path, meta=info)
    state.unlink(missing_ok=True)
    return model, info


def pretrained_ddpm(data_root: str | None = None, train_if_missing: bool = True) -> NoisePredictor:
    """The trained zoo DDPM from the cache, or (once) trained now."""
    from bitsmith.export.checkpoint import load

    path = ddpm_path()
    if path.is_file():
        return load(path, build_ddpm()).eval()
    if not train_if_missing:
        raise FileNotFoundError(f"{path}: no cached DDPM; run `bitsmith train ddpm` first")
    return train_ddpm(data_root)[0].eval()
