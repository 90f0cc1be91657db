"""Recurrence sampling at the edges: wide sigma (Poisson rate overflow) and the (seed, step) -> stream mapping."""

import itertools
import math

import pytest
import torch

from recursive_model.sampling import recur_generator, sample_num_recur


@pytest.mark.parametrize("sigma", [2.0, 5.0, 10.0])
@pytest.mark.parametrize("mean, r_max", [(4.0, 16), (12.0, 16), (3.0, 8)])
def test_wide_sigma_keeps_every_draw_in_range_and_the_mean_calibrated(mean, sigma, r_max):
    # Unclamped, sigma=10 puts exp(tau) past 2^63 in some of 100k draws and torch.poisson returns INT64_MIN.
    draws = sample_num_recur(mean, sigma, r_max, torch.Generator().manual_seed(3), size=100_000)
    assert draws.dtype == torch.long
    assert int(draws.min()) >= 1 and int(draws.max()) <= r_max
    assert abs(draws.double().mean().item() - mean) / mean < 0.02


@pytest.mark.parametrize("sigma", [100.0, 1e6, 1e300])
def test_any_finite_sigma_keeps_every_draw_in_range(sigma):
    draws = sample_num_recur(8.0, sigma, 16, torch.Generator().manual_seed(3), size=100_000)
    assert int(draws.min()) >= 1 and int(draws.max()) <= 16


@pytest.mark.parametrize("sigma", [math.inf, math.nan, -1.0])
def test_non_finite_or_negative_sigma_is_refused_naming_it(sigma):
    with pytest.raises(ValueError, match=r"sigma=.*finite number > 0"):
        sample_num_recur(4.0, sigma, 16)


def _stream(seed: int, step: int) -> list[float]:
    return torch.rand(8, generator=recur_generator(seed, step)).tolist()


def test_seed_and_step_do_not_trade_off_into_the_same_stream():
    # An affine mix seed * K + step made (0, K + t) and (1, t) one stream for K = 1_000_003.
    for t in range(5):
        assert _stream(0, 1_000_003 + t) != _stream(1, t)


def test_distinct_seed_step_pairs_get_distinct_streams_and_equal_pairs_equal_ones():
    pairs = list(itertools.product([-1, 0, 1, 2, 7, 2**40], [0, 1, 2, 1_000_003, 1_000_004]))
    seeds = {recur_generator(seed, step).initial_seed() for seed, step in pairs}
    assert len(seeds) == len(pairs)
    assert len({tuple(_stream(seed, step)) for seed, step in pairs}) == len(pairs)
    assert all(_stream(seed, step) == _stream(seed, step) for seed, step in pairs)
