"""Privacy attacks: gradient inversion (DLG, cosine similarity) recovers a client's example from its gradient; the
adversaries read an attribute / an image from features that hold them and nothing from features that do not; the
styled data's device is readable from raw pixels and independent of the garment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.privacy import (
    attribute_inference,
    dlg,
    gradient_similarity,
    gradients_of,
    infer_label,
    matched_scores,
    reconstruction_attack,
)
from bitsmith.zoo.styled import STYLES, render, styled


def sigmoid_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 4))


def test_dlg_recovers_a_single_example_and_its_label_from_the_shared_gradient() -> None:
    model, x, y = sigmoid_mlp(), torch.rand(1, 1, 8, 8), torch.tensor([2])
    shared = gradients_of(model, x, y)
    assert infer_label(shared[2]) == 2  # iDLG: the true class's row of the last weight gradient sums below zero
    recon, labels = dlg(model, shared, (1, 1, 8, 8), classes=4, steps=15)
    assert matched_scores(recon, x)["mse"] < 1e-4 and int(labels.argmax()) == 2


def test_the_cosine_attack_reconstructs_far_closer_than_chance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))  # fmt: skip
    x = torch.rand(1, 1, 16, 16)
    x[..., 4:12, 4:12] = 0.9
    y = torch.tensor([1])
    recon = gradient_similarity(model, gradients_of(model, x, y), (1, 1, 16, 16), y, steps=150)
    chance = matched_scores(torch.rand(1, 1, 16, 16), x)
    scores = matched_scores(recon, x)
    assert scores["mse"] < 0.4 * chance["mse"] and scores["ssim"] > 0.5 > chance["ssim"]


def test_matching_finds_which_reconstruction_is_which_original() -> None:
    originals = torch.rand(5, 1, 12, 12)
    perm = torch.tensor([3, 0, 4, 1, 2])
    scores = matched_scores(originals[perm], originals)
    assert scores["mse"] == 0 and [int(perm[i]) for i in scores["order"]] == list(range(5))


def test_attribute_inference_reads_an_attribute_only_where_the_features_hold_it() -> None:
    gen = torch.Generator().manual_seed(0)
    attribute = torch.randint(0, 4, (1200,), generator=gen)
    holding = torch.nn.functional.one_hot(attribute, 4).float() + 0.3 * torch.randn(1200, 4, generator=gen)
    blind = torch.randn(1200, 4, generator=gen)
    assert attribute_inference(holding[:1000], attribute[:1000], holding[1000:], attribute[1000:]) > 0.95
    assert attribute_inference(blind[:1000], attribute[:1000], blind[1000:], attribute[1000:]) < 0.4  # chance 0.25


def test_the_reconstruction_adversary_inverts_informative_features_only() -> None:
    gen = torch.Generator().manual_seed(1)
    images = render(torch.rand(600, 1, 12, 12, generator=gen).round(), torch.zeros(600, dtype=torch.long))
    codes = images.flatten(1) @ torch.randn(144, 144, generator=gen)  # an invertible linear feature map
    noise = torch.randn(600, 144, generator=gen)
    good = reconstruction_attack(codes[:500], images[:500], codes[500:], images[500:], epochs=40)
    bad = reconstruction_attack(noise[:500], images[:500], noise[500:], images[500:], epochs=40)
    assert good["psnr"] > bad["psnr"] + 3 and good["ssim"] > bad["ssim"] + 0.2


def test_the_device_is_readable_from_raw_pixels_and_independent_of_the_garment() -> None:
    from bitsmith.zoo.data import load_fashion_mnist

    images, labels = (t[:1600] for t in load_fashion_mnist("test"))
    data = styled(images, labels, seed=0)
    assert set(data["style"].tolist()) == set(range(len(STYLES))) and torch.equal(data["label"], labels)
    counts = torch.zeros(10, len(STYLES))
    counts.index_put_((data["label"], data["style"]), torch.ones(1600), accumulate=True)
    assert (counts > 0).all()  # every garment in every style: the device is not a function of the label
    pixels = data["images"].flatten(1)
    assert attribute_inference(pixels[:1200], data["style"][:1200], pixels[1200:], data["style"][1200:]) > 0.9


def test_a_style_out_of_range_is_one_line() -> None:
    with pytest.raises(ValueError, match="styles: one device per image, in 0..3"):
        render(torch.rand(2, 1, 28, 28), torch.tensor([0, 4]))


def test_adversaries_leave_the_callers_random_stream_alone() -> None:
    """A seeded adversary does not reseed the global RNG (a caller's later draws stay its own)."""
    from bitsmith.privacy.adversaries import attribute_inference

    features, attribute = torch.randn(16, 4), torch.randint(0, 2, (16,))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    attribute_inference(features, attribute, features, attribute, epochs=1, hidden=4, seed=0)
    assert torch.equal(torch.rand(3), expected)
