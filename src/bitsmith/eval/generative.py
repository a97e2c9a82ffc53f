"""Generative evaluation of a noise-predicting diffusion model: DDIM sampling with a fixed seed (``diffusers``'
``DDIMScheduler``), FID and KID on the features of the zoo CNN classifier, and the per-time-step noise-prediction
error of a compressed model against FP32 on the same trajectories.

"FID (zoo-CNN features)": no Inception weights can be downloaded here, so the Frechet distance is taken between
Gaussians fitted to the zoo CNN's penultimate features (64 values per image) of generated and real test images.
Its values are not comparable with Inception FIDs in papers, only between rows measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import linalg
from torch import Tensor, nn

from bitsmith.progress import track
from bitsmith.zoo.diffusion import TIMESTEPS, noise_scheduler


def ddim_scheduler(steps: int) -> Any:
    """DDIM over the training schedule with ``steps`` sampling steps (eta 0: deterministic given the start)."""
    from diffusers import DDIMScheduler

    if not 1 <= steps <= TIMESTEPS:
        raise ValueError(f"sampling steps {steps}: the schedule has {TIMESTEPS} time steps; choose 1..{TIMESTEPS}")
    scheduler = DDIMScheduler.from_config(noise_scheduler().config)
    scheduler.set_timesteps(steps)
    return scheduler


def start_noise(count: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> Tensor:
    """The seeded x_T of ``count`` samples: the same seed gives FP32 and compressed models the same starts."""
    if count < 1:
        raise ValueError(f"samples {count}: generate at least 1")
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(
    model: nn.Module,
    count: int,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 250,
    record: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``count`` images in [0, 1] by DDIM with ``steps`` steps from seeded noise. ``record(t, x_t, eps)``, when
    given, sees every step's input and predicted noise (for trajectories)."""
    scheduler = ddim_scheduler(steps)
    noise = start_noise(count, seed)
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in track(range(0, count, batch_size), f"sampling {count} images, {steps} DDIM steps",
                           -(-count // batch_size)):  # fmt: skip
            x = noise[start : start + batch_size]
            for t in scheduler.timesteps:
                steps_tensor = torch.full((x.shape[0],), int(t), dtype=torch.long)
                eps = model(x, steps_tensor)
                if record is not None:
                    record(int(t), x, eps)
                x = scheduler.step(eps, t, x).prev_sample
            out.append(((x + 1) / 2).clamp(0, 1))
    finally:
        model.train(was_training)
    return torch.cat(out)


CALIBRATION_SEED = 1  # the start noise of the calibration trajectories
EVALUATION_SEED = 2  # held-out starts for the noise error: never the calibration trajectories


@torch.no_grad()
def trajectories(model: nn.Module, count: int, steps: int, seed: int = EVALUATION_SEED) -> list[tuple[int, Tensor]]:
    """The FP32 sampler's inputs ``(t, x_t)`` at every DDIM step for ``count`` seeded samples (by default the
    held-out evaluation starts)."""
    seen: list[tuple[int, Tensor]] = []
    sample(model, count, steps, seed, batch_size=count, record=lambda t, x, _eps: seen.append((t, x.clone())))
    return seen


@torch.no_grad()
def noise_mse_per_step(reference: nn.Module, model: nn.Module, path: list[tuple[int, Tensor]]) -> dict[int, float]:
    """Mean squared difference between ``model``'s and ``reference``'s predicted noise on the same inputs, per
    time step (the inputs are the FP32 sampler's, so the errors do not compound)."""
    result = {}
    for t, x in path:
        steps = torch.full((x.shape[0],), t, dtype=torch.long)
        result[t] = float(nn.functional.mse_loss(model(x, steps), reference(x, steps)))
    return result


def noise_error_summary(per_step: dict[int, float]) -> dict[str, float]:
    """The mean noise error over all steps, and separately the last step (t = 0, where the quantized models' error
    concentrates) and the mean over the others."""
    last = min(per_step)
    others = [v for t, v in per_step.items() if t != last]
    return {"noise_mse": sum(per_step.values()) / len(per_step), "noise_mse_t0": per_step[last],
            "noise_mse_without_t0": sum(others) / len(others) if others else per_step[last]}  # fmt: skip


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 10, size: int = 1000, seed: int = 0
) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over random subsets."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    size = min(size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = size * (size - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values))


@dataclass
class GenerativeScores:
    fid: float
    kid: float
    samples: int

    def to_dict(self) -> dict[str, float]:
        return {"fid_zoo_cnn": self.fid, "kid_zoo_cnn": self.kid, "samples": self.samples}


def zoo_cnn_features(images: Tensor, classifier: nn.Module | None = None) -> np.ndarray:
    """The zoo CNN's penultimate features (the input of its classifier layer) of [0, 1] images."""
    from bitsmith.split_ensemble import penultimate_features
    from bitsmith.zoo import pretrained

    classifier = classifier if classifier is not None else pretrained("cnn")
    with torch.no_grad():
        return penultimate_features(classifier, images).double().numpy()


def generative_scores(generated: Tensor, real: Tensor, classifier: nn.Module | None = None) -> GenerativeScores:
    """FID and KID (zoo-CNN features) of generated against real images."""
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (got {len(generated)} and {len(real)})")
    fake, true = zoo_cnn_features(generated, classifier), zoo_cnn_features(real, classifier)
    return GenerativeScores(frechet_distance(fake, true), kernel_inception_distance(fake, true), len(generated))


@dataclass
class GenerationTask:
    """The zoo DDPM's task: FID / KID (zoo-CNN features) of ``samples`` DDIM samples against as many test images,
    the per-step noise error against the first model evaluated (the FP32 reference) on held-out trajectories
    (``EVALUATION_SEED``; all steps, t = 0 and the rest), and calibration batches ``{"sample": x_t, "timestep": t}``
    from the FP32 sampler's trajectories of ``CALIBRATION_SEED``."""

    real: Tensor
    calibration: list[dict[str, Tensor]]
    sample_count: int = 2000
    sampler_steps: int = 50
    seed: int = 0
    trajectory_count: int = 16
    kind: str = "generation"
    reference: nn.Module | None = None
    path: list[tuple[int, Tensor]] | None = None
    last_per_step: dict[int, float] | None = None  # the last evaluated model's noise error per time step

    @property
    def eval_examples(self) -> int:
        return self.sample_count

    @property
    def calib_examples(self) -> int:
        return sum(int(b["timestep"].shape[0]) for b in self.calibration)

    def example(self, batch_size: int) -> dict[str, Tensor]:
        return {"sample": start_noise(batch_size, self.seed), "timestep": torch.full((batch_size,), TIMESTEPS // 2)}

    def first(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value[:1] for key, value in batch.items()}

    def set_reference(self, model: nn.Module) -> None:
        """The float model the noise error is measured against, and its trajectories."""
        import copy

        self.reference = copy.deepcopy(model).eval()
        self.path = trajectories(self.reference, self.trajectory_count, self.sampler_steps)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.reference is None:  # the first model evaluated is the FP32 reference
            self.set_reference(model)
        generated = sample(model, self.sample_count, self.sampler_steps, self.seed)
        self.last_per_step = noise_mse_per_step(self.reference, model, self.path or [])
        return {**generative_scores(generated, self.real).to_dict(), **noise_error_summary(self.last_per_step)}


class GenerationSection(BaseModel):
    """A recipe's ``generation`` section (no unknown fields): the zoo DDPM's generation task, DDIM samples scored by
    FID / KID on zoo-CNN features, the noise error against FP32, and calibration inputs from the FP32 sampler's
    trajectories."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(2000, ge=1, le=100_000, description="generated images scored against as many test images")
    sampler_steps: int = Field(50, ge=1, le=1000, description="DDIM steps (the schedule has 1,000 time steps)")
    seed: int = 0
    calib_samples: int = Field(64, ge=1, le=10_000, description="FP32 trajectories the calibration inputs come from")
    calib_steps: int = Field(20, ge=1, description="time steps kept per trajectory, spread over the sampler's steps")
    calib_uniform: bool = Field(True, description="false: the single-step baseline (every input at calib_timestep)")
    calib_timestep: int = Field(800, ge=0, le=999, description="the single-step baseline's time step (0..999)")
    trajectories: int = Field(16, ge=1, le=1000, description="FP32 trajectories the per-step noise error is taken on")
