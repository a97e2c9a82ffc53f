"""Q-Diffusion's pieces on a tiny diffusers U-Net: the skip-concatenation layers and their split channel, the
calibration time steps (uniform vs the single-step baseline), trajectory batches, and the method end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.qdiffusion import calibration_steps, concat_splits, trajectory_batches
from bitsmith.quant import SplitQuantizer
from conftest import make_ddpm, noisy_batches

RECIPES = Path(__file__).parents[1] / "recipes"


def test_the_decoder_shortcut_convolutions_read_the_concatenation_split_at_the_upsampled_channels() -> None:
    model = make_ddpm()
    splits = concat_splits(model, noisy_batches(1)[0])
    shortcuts = {n for n, m in model.named_modules() if n.startswith("unet.up_blocks") and n.endswith("conv_shortcut")}
    assert set(splits) == shortcuts
    for name, channel in splits.items():  # h has the previous block's channels, the skip the rest
        conv = model.get_submodule(name)
        assert 0 < channel < conv.in_channels
    assert splits["unet.up_blocks.0.resnets.0.conv_shortcut"] == 16  # h from the 16-channel middle block


def test_calibration_steps_spread_over_the_trajectory_or_sit_at_800() -> None:
    timesteps = list(range(980, -1, -20))  # DDIM, 50 steps
    assert calibration_steps(timesteps, 5) == [980, 780, 580, 380, 180]
    assert calibration_steps(timesteps, 5, uniform=False) == [800]
    # a count that does not divide the steps: every 2nd step, so the last stretch (t < 220) is calibrated too
    twenty = calibration_steps(timesteps, 20)
    assert twenty == timesteps[::2] and len(twenty) == 25 and min(twenty) == 20
    with pytest.raises(ValueError, match="calibration steps 51: the sampler has 50 steps"):
        calibration_steps(timesteps, 51)


def test_trajectory_batches_hold_the_same_number_of_inputs_either_way() -> None:
    model = make_ddpm()
    uniform = trajectory_batches(model, samples=2, sampler_steps=5, calib_steps=2, batch_size=3)
    naive = trajectory_batches(model, samples=2, sampler_steps=5, calib_steps=2, uniform=False, batch_size=3)
    steps = lambda batches: torch.cat([b["timestep"] for b in batches])  # noqa: E731
    assert len(steps(uniform)) == len(steps(naive)) == 6  # 2 does not divide 5: steps 0, 2 and 4 of each run
    assert len(set(steps(uniform).tolist())) == 3 and len(set(steps(naive).tolist())) == 1


def test_q_diffusion_splits_the_concatenation_layers_and_reconstructs_the_blocks() -> None:
    model = make_ddpm()
    method = build_method({"name": "q-diffusion", "iters": 5})
    compress(model, method, noisy_batches())
    for name in method._splits:
        layer = model.get_submodule(name)
        assert isinstance(layer.weight_q, SplitQuantizer) and isinstance(layer.input_q, SplitQuantizer)
    assert any(name.endswith("resnets.0") for name in method._stats)  # the ResNet blocks are units
    batch = noisy_batches(1)[0]
    assert torch.isfinite(model(**batch)).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.calib_steps=60", "generation.calib_steps 60: the sampler has 50 steps; choose 1..50"),
        ("generation.samples=0", "generation.samples: Input should be greater than or equal to 1"),
        ("generation.calib_timestep=1000", "generation.calib_timestep: Input should be less than or equal to 999"),
        ("generation.sampler_steps=1001", "generation.sampler_steps: Input should be less than or equal to 1000"),
    ],
)
def test_bad_generation_settings_name_the_field(override: str, message: str) -> None:
    from bitsmith.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "ddpm-q-diffusion-w4a8.yaml", [override])


def test_the_generation_section_belongs_to_the_ddpm() -> None:
    from bitsmith.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="generation: the generation task is the zoo ddpm's"):
        load_recipe(RECIPES / "cnn-ptq-w8a8.yaml", ["generation.samples=10"])
    recipe, _ = load_recipe(RECIPES / "ddpm-q-diffusion-w4a8.yaml")
    assert recipe.data.name == "fashion-mnist" and recipe.generation.calib_steps == 20


def test_split_convolutions_export_as_two_qdq_convolutions_that_onnx_runtime_runs_like_the_model(tmp_path: Path) -> None:  # fmt: skip
    from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx
    from bitsmith.export.qdq import QDQSplitLayer, deployable

    model = make_ddpm()
    compress(model, build_method({"name": "q-diffusion", "reconstruct": False}), noisy_batches())
    deploy, fallbacks = deployable(model)
    assert fallbacks == {}
    assert sum(isinstance(m, QDQSplitLayer) for m in deploy.modules()) == 4  # the decoder's shortcut convolutions
    export_onnx(model, noisy_batches(1)[0], tmp_path / "ddpm.onnx")
    batch = noisy_batches(1, batch=3, seed=5)[0]  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(**batch)
        for out in (deploy(**batch), OnnxRuntimeModel(tmp_path / "ddpm.onnx", threads=1)(**batch)):
            # equal up to the backends' x * (1/s) vs bitsmith's x / s: a half-step code flip spreads through the
            # group norms and the attention (ONNX Runtime: mean error 1.2% of the mean output on an AVX-512 VNNI
            # CPU, below 1% on AVX2), far below a wrong split (42%: half of the second group dropped)
            assert (out - expected).abs().mean() < 0.03 * expected.abs().mean()


def test_the_torchao_graph_names_asymmetric_weights_as_fallbacks_and_takes_symmetric_split_ones() -> None:
    from bitsmith.export.qdq import QDQSplitLayer, deployable

    asymmetric, symmetric = make_ddpm(), make_ddpm()
    compress(asymmetric, build_method({"name": "q-diffusion", "reconstruct": False}), noisy_batches())
    compress(symmetric, build_method({"name": "q-diffusion", "reconstruct": False, "w_symmetric": True}), noisy_batches())  # fmt: skip
    _, fallbacks = deployable(asymmetric, ops="pt2e")
    assert fallbacks and all(why.startswith("asymmetric weights") for why in fallbacks.values())
    graph, fallbacks = deployable(symmetric, ops="pt2e")
    assert fallbacks == {} and sum(isinstance(m, QDQSplitLayer) for m in graph.modules()) == 4
    assert deployable(asymmetric, ops="onnx")[1] == {}  # ONNX Runtime takes uint8 weights


def test_each_calibration_input_is_the_samplers_input_at_its_own_time_step() -> None:
    """The inputs kept at the first DDIM step are the seeded start noise itself (an input paired with the next
    step's time would already be denoised once)."""
    from bitsmith.eval.generative import ddim_scheduler, start_noise

    model = make_ddpm()
    batches = trajectory_batches(model, samples=3, sampler_steps=4, calib_steps=2, seed=1, batch_size=4)
    first = int(ddim_scheduler(4).timesteps[0])
    samples = torch.cat([b["sample"] for b in batches])
    steps = torch.cat([b["timestep"] for b in batches])
    kept = samples[steps == first]
    noise = start_noise(3, 1)
    assert kept.shape[0] == 3
    assert torch.equal(kept[kept.flatten(1).sum(1).argsort()], noise[noise.flatten(1).sum(1).argsort()])
