"""LiftQuant's lift-then-project codebook: a trained ``M`` codes Gaussian data below the scalar 2-bit
optimum, fractional rates sit between integer ones, the candidate search is near brute force, and the
packed signs decode exactly."""

from __future__ import annotations

import pytest
import torch

from bitsmith.quant.lattice import LiftCodebook, pack_signs, rate_pair, sign_table, unpack_signs

LLOYD_MAX_2BIT = 0.1175  # MSE of the best scalar 2-bit quantizer of N(0, 1)
RATE_DISTORTION_2BIT = 2.0**-4


def gaussian(count: int, m: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(count, m, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def codebook_8to4() -> LiftCodebook:
    return LiftCodebook.train(4, 8, steps=300, restarts=1)


def test_a_trained_2_bit_codebook_beats_the_best_scalar_2_bit_quantizer(codebook_8to4: LiftCodebook) -> None:
    """At 2.0 bits per weight (8 signs per 4 weights) the trained codebook's MSE on N(0, 1) is below Lloyd-Max's
    (fails with an untrained M) and above the rate-distortion bound."""
    mse = codebook_8to4.mse(gaussian(4000, 4))
    assert codebook_8to4.bits_per_weight == 2.0
    assert RATE_DISTORTION_2BIT < mse < LLOYD_MAX_2BIT


def test_fractional_rates_lie_between_the_integer_ones() -> None:
    """2.0 > 2.5 > 3.0 bits per weight in MSE (the quasi-continuous rate claim), at groups of 2."""
    mses = [LiftCodebook.train(2, n, steps=200, restarts=1).mse(gaussian(4000, 2)) for n in (4, 5, 6)]
    assert mses[0] > mses[1] > mses[2]


def test_the_candidate_search_is_close_to_brute_force_and_decodes_exactly(codebook_8to4: LiftCodebook) -> None:
    z = gaussian(2000, 4, seed=3)
    y = codebook_8to4.encode(z)
    every = sign_table(8)
    brute = every[torch.cdist(z, codebook_8to4.decode(every)).argmin(1)]
    assert (y == brute).all(1).float().mean() > 0.9
    assert codebook_8to4.mse(z) < 1.05 * float((z - codebook_8to4.decode(brute)).pow(2).mean())
    packed = pack_signs(y)
    assert packed.numel() == 2000 and torch.equal(unpack_signs(packed, 2000, 8), y)


def test_rates_pick_a_codebook_shape_or_are_refused_with_the_allowed_values() -> None:
    assert rate_pair(2.0) == (4, 8) and rate_pair(2.5) == (4, 10) and rate_pair(3.0) == (4, 12)
    assert rate_pair(8 / 3) == (3, 8)
    with pytest.raises(ValueError, match=r"no codebook realises 1.0 bits per weight.*2\.5"):
        rate_pair(1.0)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), 2, 8)
