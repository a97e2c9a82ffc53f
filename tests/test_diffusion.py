"""The zoo DDPM (diffusers U-Net), its training loop and the generative evaluation: DDIM with an oracle noise
predictor recovers its image exactly, the training loss of the oracle is zero, FID / KID behave as their formulas
say, and a killed training resumes bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import bitsmith.zoo.diffusion as diffusion
from bitsmith.eval.generative import (
    ddim_scheduler,
    frechet_distance,
    generative_scores,
    kernel_inception_distance,
    noise_mse_per_step,
    sample,
    start_noise,
    trajectories,
)
from bitsmith.train import TrainConfig
from bitsmith.zoo.diffusion import UNetConfig, build_ddpm, denoising_loss, fit_ddpm, noise_scheduler

TINY = UNetConfig(channels=(8, 16), norm_groups=4)


class Oracle(nn.Module):
    """The exact noise predictor for a data set of one image ``x0`` ([-1, 1]):
    ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.abar = noise_scheduler().alphas_cumprod

    def forward(self, sample: Tensor, timestep: Tensor) -> Tensor:
        a = self.abar[timestep].view(-1, 1, 1, 1)
        return (sample - a.sqrt() * self.x0) / (1 - a).sqrt()


def image() -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, 28, 28, generator=gen)


def test_the_unet_predicts_noise_of_the_input_shape() -> None:
    model = build_ddpm(TINY)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape
    with pytest.raises(ValueError, match="cannot be halved"):
        build_ddpm(UNetConfig(channels=(8, 16, 16, 16), image=28))


def test_ddim_with_the_oracle_noise_recovers_the_image() -> None:
    x0 = image()
    generated = sample(Oracle(x0 * 2 - 1), count=2, steps=10, seed=3)
    assert torch.allclose(generated, x0.expand(2, -1, -1, -1), atol=1e-4)


def test_the_training_loss_of_the_oracle_is_zero_and_of_a_wrong_model_is_not() -> None:
    x0 = image()
    gen = torch.Generator().manual_seed(1)
    assert float(denoising_loss(Oracle(x0 * 2 - 1), x0.expand(8, -1, -1, -1), gen, noise_scheduler())) < 1e-8
    assert float(denoising_loss(Oracle(x0 * 2 - 1), (1 - x0).expand(8, -1, -1, -1), gen, noise_scheduler())) > 0.1


def test_samples_depend_only_on_the_seed() -> None:
    model = build_ddpm(TINY)
    a, b = sample(model, 3, steps=2, seed=5, batch_size=2), sample(model, 3, steps=2, seed=5, batch_size=3)
    assert torch.allclose(a, b, atol=1e-4)  # batch-size-dependent kernels differ in the last digits
    assert not torch.allclose(a, sample(model, 3, steps=2, seed=6), atol=1e-2)


def test_the_noise_error_is_zero_against_itself_and_grows_with_a_change() -> None:
    model = build_ddpm(TINY)
    path = trajectories(model, count=2, steps=3)
    assert len(path) == 3 and all(v == 0 for v in noise_mse_per_step(model, model, path).values())
    other = build_ddpm(TINY)
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other.unet.conv_out.weight.add_(0.1)
    assert all(v > 0 for v in noise_mse_per_step(model, other, path).values())


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(feats + 0.5, feats) == pytest.approx(4 * 0.25, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kernel_inception_distance(a, b, subsets=5, size=200)
    shifted = kernel_inception_distance(a + 1.0, b, subsets=5, size=200)
    assert abs(same) < 0.05 and shifted > 10 * abs(same) and shifted > 0.1


def test_generative_scores_use_the_classifier_features() -> None:
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    real = torch.rand(64, 1, 28, 28)
    assert generative_scores(real, real, classifier).fid == pytest.approx(0, abs=1e-6)
    assert generative_scores(1 - real, real, classifier).fid > 0.01
    with pytest.raises(ValueError, match="at least 2 images"):
        generative_scores(real[:1], real, classifier)


@pytest.mark.parametrize("steps", [0, 1001])
def test_sampling_steps_outside_the_schedule_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match=f"sampling steps {steps}: the schedule has 1000"):
        ddim_scheduler(steps)


def test_zero_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="samples 0"):
        start_noise(0, seed=0)


class Killed(Exception):
    pass


def test_a_killed_ddpm_training_resumes_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.0)
    torch.manual_seed(0)
    reference = build_ddpm(TINY)
    history = fit_ddpm(reference, images, cfg)

    save = diffusion.save_training_state

    def save_then_die(path, model, optimizer, state, *rest) -> None:  # type: ignore[no-untyped-def]
        save(path, model, optimizer, state, *rest)
        raise Killed

    monkeypatch.setattr(diffusion, "save_training_state", save_then_die)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        fit_ddpm(build_ddpm(TINY), images, cfg, checkpoint=tmp_path / "state.pt")
    monkeypatch.setattr(diffusion, "save_training_state", save)
    torch.manual_seed(0)
    resumed = build_ddpm(TINY)
    assert fit_ddpm(resumed, images, cfg, checkpoint=tmp_path / "state.pt") == history
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_noise_error_is_measured_on_held_out_trajectories_with_t0_apart() -> None:
    """The evaluation's start noise is not the calibration's, and the summary states t = 0 separately."""
    from bitsmith.eval.generative import (
        CALIBRATION_SEED,
        EVALUATION_SEED,
        noise_error_summary,
        start_noise,
        trajectories,
    )
    from bitsmith.qdiffusion import trajectory_batches
    from conftest import make_ddpm

    model = make_ddpm()
    path = trajectories(model, 2, 4)
    calibration = trajectory_batches(model, samples=2, sampler_steps=4, calib_steps=4, batch_size=64)
    first = path[0][0]
    held_out = path[0][1]
    calibrated = calibration[0]["sample"][calibration[0]["timestep"] == first]
    assert EVALUATION_SEED != CALIBRATION_SEED and torch.equal(held_out, start_noise(2, EVALUATION_SEED))
    assert not any(torch.equal(row, other) for row in held_out for other in calibrated)
    summary = noise_error_summary({980: 1.0, 500: 3.0, 0: 20.0})
    assert summary == {"noise_mse": 8.0, "noise_mse_t0": 20.0, "noise_mse_without_t0": 2.0}
