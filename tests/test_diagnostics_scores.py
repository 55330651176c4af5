"""Tests of diagnostics.scores (PSNR, SSIM, coverage, CRPS) and diagnostics.metrics.mmd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpost.diagnostics import (
    central_intervals,
    coverage,
    crps,
    mmd,
    psnr,
    rank_coverage,
    ssim,
)

DTYPE = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------


def test_psnr_closed_form_and_default_range():
    truth = torch.zeros(4, 4, dtype=DTYPE)
    truth[0, 0] = 2.0  # range 2
    estimate = truth + 0.1  # MSE 0.01
    assert psnr(estimate, truth) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-12)
    assert psnr(estimate, truth, data_range=1.0) == pytest.approx(20.0, rel=1e-12)
    assert psnr(truth, truth) == math.inf
    # halving the error gains 20 log10(2) dB
    assert psnr(truth + 0.05, truth) - psnr(estimate, truth) == pytest.approx(
        20 * math.log10(2), rel=1e-9
    )
    with pytest.raises(ValueError, match="constant"):
        psnr(estimate, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="data_range"):
        psnr(estimate, truth, data_range=0.0)
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.zeros(3), truth)


def test_ssim_of_a_single_window_matches_the_formula():
    # an 11 x 11 image is exactly one window: the weighted moments can be written out directly
    x, y = randn(11, 11, seed=1), randn(11, 11, seed=2)
    coords = torch.arange(11, dtype=DTYPE) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    peak = 3.0
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y, data_range=peak) == pytest.approx(float(expected), rel=1e-10)


def test_ssim_properties():
    image = randn(3, 16, 16, seed=3)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    noisy = [ssim(image + s * randn(3, 16, 16, seed=4), image) for s in (0.1, 0.3, 1.0)]
    assert noisy[0] > noisy[1] > noisy[2]  # more noise, less similar
    # mirrored structure around the same mean: the structure term (2 cov + C2) / (...) < 0
    assert ssim(0.5 - 0.1 * image, 0.5 + 0.1 * image, data_range=1.0) < -0.5
    # symmetric in its two images (data_range fixed, since the default comes from the truth)
    other = randn(3, 16, 16, seed=5)
    assert ssim(other, image, data_range=4.0) == pytest.approx(
        ssim(image, other, data_range=4.0), rel=1e-12
    )
    # channels are averaged: a (C, H, W) SSIM is the mean of the per-channel ones
    per_channel = [ssim(other[c], image[c], data_range=4.0) for c in range(3)]
    assert ssim(other, image, data_range=4.0) == pytest.approx(np.mean(per_channel), rel=1e-12)
    # constant images: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b = torch.full((8, 8), 0.2, dtype=DTYPE), torch.full((8, 8), 0.6, dtype=DTYPE)
    c1 = 0.01**2
    assert ssim(a, b, data_range=1.0) == pytest.approx(
        (2 * 0.12 + c1) / (0.04 + 0.36 + c1), rel=1e-12
    )


def test_ssim_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        ssim(torch.zeros(64), torch.ones(64))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(8, 8), torch.ones(8, 9))
    with pytest.raises(ValueError, match="window_size"):
        ssim(randn(8, 8), randn(8, 8), window_size=4)
    with pytest.raises(ValueError, match="non-finite"):
        ssim(torch.full((8, 8), math.nan), randn(8, 8))


# --------------------------------------------------------------------------------------------
# coverage and CRPS
# --------------------------------------------------------------------------------------------


def test_central_intervals_match_numpy_quantiles():
    samples = randn(37, 2, 3, seed=6)
    lower, upper = central_intervals(samples, [0.5, 0.9])
    expected = np.quantile(samples.numpy(), [0.25, 0.05, 0.75, 0.95], axis=0)
    np.testing.assert_allclose(lower.numpy(), expected[[0, 1]], rtol=1e-12)
    np.testing.assert_allclose(upper.numpy(), expected[[2, 3]], rtol=1e-12)


def test_coverage_of_calibrated_and_overconfident_samples():
    # 2000 coordinates, truth and samples from the same N(0, 1): each level's interval covers a
    # fraction close to it (binomial sd over 2000 coordinates <= 0.011, plus the quantile
    # error of 400 samples). Measured: largest deviation over the 3 levels 0.017 here, at most
    # 0.024 over 20 other seeds.
    truth = randn(2000, seed=7)
    samples = randn(400, 2000, seed=8)
    result = coverage(samples, truth, levels=(0.5, 0.9, 0.95))
    assert set(result) == {0.5, 0.9, 0.95}
    for level, fraction in result.items():
        assert abs(fraction - level) < 0.04, (level, fraction)
    # samples with half the spread: the 90% interval covers P(|Z| < 0.5 * 1.645) = 0.589
    # (measured 0.570: 1.7 binomial sd away)
    narrow = coverage(0.5 * samples, truth, levels=[0.9])[0.9]
    assert narrow == pytest.approx(0.59, abs=0.04)
    with pytest.raises(ValueError, match="levels"):
        coverage(samples, truth, levels=[1.2])
    with pytest.raises(ValueError, match="event shape"):
        coverage(samples, truth[:10])


def test_rank_coverage_is_nominal_for_few_calibrated_draws():
    # 8 draws and the truth from the same N(0, 1) at 100000 coordinates: the truth's randomised
    # PIT is exactly uniform, so the fraction is the level up to the coordinates' Monte Carlo
    # error (per-coordinate sd at most 0.5: 0.0016 here; measured deviations 0.0001-0.0012 with
    # these seeds and three other pairs); bound 0.006. The empirical interval of the same 8 draws
    # covers 0.720-0.725 (the bias the rank form removes); half and twice the spread give
    # 0.776-0.777 and 0.972-0.973.
    truth = randn(100_000, seed=11)
    samples = randn(8, 100_000, seed=12)
    result = rank_coverage(samples, truth, levels=(0.5, 0.9))
    for level, fraction in result.items():
        assert abs(fraction - level) < 0.006, (level, fraction)
    assert coverage(samples, truth, levels=[0.9])[0.9] == pytest.approx(0.72, abs=0.01)
    # too narrow and too wide are read as such
    assert rank_coverage(0.5 * samples, truth, levels=[0.9])[0.9] < 0.8
    assert rank_coverage(2.0 * samples, truth, levels=[0.9])[0.9] > 0.96


def test_rank_coverage_by_hand():
    # 9 draws 0..8: u ~ U[r_<, r_<= + 1] / 10. Truth 4.5: u in [0.5, 0.6], inside [0.05, 0.95]: 1.
    # Truth -1: u in [0, 0.1], half inside: 0.5. Truth 4 (a tie): u in [0.4, 0.6]: 1.
    # Truth 8 (a tie with the largest): u in [0.8, 1.0], [0.8, 0.95] inside: 0.75.
    samples = torch.arange(9, dtype=DTYPE)[:, None].expand(9, 4)
    truth = torch.tensor([4.5, -1.0, 4.0, 8.0], dtype=DTYPE)
    assert rank_coverage(samples, truth, levels=[0.9])[0.9] == pytest.approx(
        (1 + 0.5 + 1 + 0.75) / 4, rel=1e-12
    )
    with pytest.raises(ValueError, match="levels"):
        rank_coverage(samples, truth, levels=[0.0])


def test_crps_matches_brute_force_and_the_gaussian_closed_form():
    samples = randn(7, 3, seed=9)
    truth = randn(3, seed=10)
    brute = (samples - truth).abs().mean(0) - 0.5 * (samples[:, None] - samples[None]).abs().mean(
        (0, 1)
    )
    np.testing.assert_allclose(crps(samples, truth, reduction="none").numpy(), brute, rtol=1e-12)
    assert crps(samples, truth) == pytest.approx(float(brute.mean()), rel=1e-12)
    # a point mass scores the absolute error
    assert crps(torch.zeros(5, 2, dtype=DTYPE), torch.tensor([1.0, -3.0])) == pytest.approx(2.0)

    # N(mu, s^2) against y: s [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)], z = (y - mu) / s
    s, y = 2.0, 1.3
    z = torch.tensor(y / s, dtype=DTYPE)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=DTYPE), 1.0)
    exact = s * (
        z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi)
    )
    draws = s * randn(20000, 1, seed=11)
    # the ensemble estimate at S = 20000 has a negligible bias (-E|X - X'| / 2S ~ -6e-5);
    # measured error 0.0042 here, sd 0.0075 (max 0.019) over 20 other seeds: 4 sd tolerance
    assert crps(draws, torch.tensor([y])) == pytest.approx(float(exact), abs=0.03)
    with pytest.raises(ValueError, match="reduction"):
        crps(draws, torch.tensor([y]), reduction="sum")


# --------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------


def test_mmd_matches_the_gaussian_closed_form():
    # N(0, s^2 I) vs N(m, s^2 I) in d dims with a Gaussian kernel of bandwidth h:
    # MMD^2 = 2 r^(d/2) (1 - exp(-|m|^2 / (2 (h^2 + 2 s^2)))), r = h^2 / (h^2 + 2 s^2)
    d, h = 3, 1.5
    shift = torch.tensor([1.0, -0.5, 0.0], dtype=DTYPE)
    a, b = randn(2000, d, seed=12), randn(2000, d, seed=13) + shift
    r = h**2 / (h**2 + 2)
    exact = 2 * r ** (d / 2) * (1 - math.exp(-float(shift @ shift) / (2 * (h**2 + 2))))
    # exact = 0.105; measured error -0.0027 here, sd 0.0061 (max 0.014) over 20 other seeds at
    # n = m = 2000: 4 sd tolerance.
    assert mmd(a, b, bandwidth=h) == pytest.approx(exact, abs=0.025)
    # the same distribution: the unbiased estimate scatters around 0 (measured -0.0001 here,
    # |value| <= 0.0011 over 20 other seeds)
    assert abs(mmd(a, randn(2000, d, seed=14), bandwidth=h)) < 0.005
    assert mmd(a, b, bandwidth=h, squared=False) == pytest.approx(
        math.sqrt(mmd(a, b, bandwidth=h)), rel=1e-12
    )


def test_mmd_kernels_bandwidths_and_errors():
    a, b = randn(300, 4, seed=15), randn(200, 4, seed=16) + 1.0
    for kernel in ("gaussian", "imq"):
        same = mmd(a, randn(300, 4, seed=17), kernel=kernel)
        apart = mmd(a, b, kernel=kernel)
        assert apart > 10 * abs(same), (kernel, same, apart)
        assert mmd(b, a, kernel=kernel) == pytest.approx(apart, rel=1e-10)  # symmetric
    # the median heuristic is the median pairwise distance of the pooled samples
    pooled = torch.cat([a, b])
    distances = torch.cdist(pooled, pooled)
    median = float(distances[torch.triu_indices(500, 500, 1).unbind()].median())
    assert mmd(a, b) == pytest.approx(mmd(a, b, bandwidth=median), rel=1e-12)
    with pytest.raises(ValueError, match="kernel"):
        mmd(a, b, kernel="linear")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(a, b, bandwidth=-1.0)
    with pytest.raises(ValueError, match="event size"):
        mmd(a, randn(10, 3))
