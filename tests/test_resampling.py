"""Resampling schemes and the Feynman–Kac helpers."""

import math

import pytest
import torch

from diffpost.posterior.engines.smc.core import resample, reweight
from diffpost.posterior.resampling import RESAMPLERS, ess, normalize_log_weights

SCHEMES = sorted(RESAMPLERS)


def _weights(chains=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(chains, n, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_unbiased(scheme):
    log_weights = _weights()
    weights = normalize_log_weights(log_weights).exp()
    g = torch.Generator().manual_seed(1)
    repeats = 20000
    counts = torch.zeros_like(weights)
    for _ in range(repeats // 100):
        batch = log_weights.repeat(100, 1)  # 100 x 3 chains at once
        ancestors = RESAMPLERS[scheme](batch, g)
        assert ancestors.shape == batch.shape and ancestors.dtype == torch.long
        one_hot = torch.nn.functional.one_hot(ancestors, 6).sum(1).to(torch.float64)
        counts += one_hot.reshape(100, 3, 6).sum(0)
    expected = 6 * weights * repeats
    # multinomial counts have sd <= sqrt(repeats * 6 W (1 - W)) < 120; the others less: 5 sd
    assert torch.all(
        (counts - expected).abs() < 5 * (repeats * 6 * weights * (1 - weights)).sqrt() + 1
    )


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual"])
def test_low_variance_schemes_keep_the_integer_part(scheme):
    # systematic and residual give every particle floor(N W) or ceil(N W) copies: here exactly 2, 1
    log_weights = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ancestors = RESAMPLERS[scheme](log_weights, g)[0]
        counts = torch.bincount(ancestors, minlength=4)
        if scheme in ("systematic", "residual"):
            assert counts[0] == 2 and counts[1] == 1
        assert counts.sum() == 4


def test_ess_and_normalisation():
    uniform = torch.zeros(2, 10, dtype=torch.float64)
    torch.testing.assert_close(ess(uniform), torch.full((2,), 10.0, dtype=torch.float64))
    degenerate = torch.tensor([[0.0] + [-math.inf] * 9], dtype=torch.float64)
    torch.testing.assert_close(ess(degenerate), torch.ones(1, dtype=torch.float64))
    w = torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(ess(w.log() + 3.0), 1 / (w**2).sum(-1))
    torch.testing.assert_close(normalize_log_weights(w.log() + 5).exp(), w)


def test_reweight_returns_the_evidence_increment():
    log_weights = normalize_log_weights(_weights(2, 5))
    increments = _weights(2, 5, seed=1)
    new, increment = reweight(log_weights, increments)
    expected = torch.log((log_weights.exp() * increments.exp()).sum(-1))
    torch.testing.assert_close(increment, expected)
    torch.testing.assert_close(new.logsumexp(-1), torch.zeros(2, dtype=torch.float64))


def test_resample_only_the_chains_below_the_threshold():
    uniform = torch.full((1, 4), -math.log(4), dtype=torch.float64)
    skewed = normalize_log_weights(torch.tensor([[5.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    log_weights = torch.cat([uniform, skewed])
    g = torch.Generator().manual_seed(0)
    indices, new_log_weights, current_ess, resampled = resample(log_weights, "systematic", 0.5, g)
    assert resampled.tolist() == [False, True]
    assert indices[:4].tolist() == [0, 1, 2, 3]  # chain 0 untouched
    assert torch.all((indices[4:] >= 4) & (indices[4:] < 8))  # chain 1 indexes its own particles
    torch.testing.assert_close(
        new_log_weights[1], torch.full((4,), -math.log(4), dtype=torch.float64)
    )
    torch.testing.assert_close(new_log_weights[0], log_weights[0])
    torch.testing.assert_close(current_ess, ess(log_weights))
    # threshold 1 resamples every chain (also a uniform one), threshold 0 none
    assert resample(log_weights, "multinomial", 1.0, g)[3].all()
    assert not resample(log_weights, "multinomial", 0.0, g)[3].any()


def test_nan_weights_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        RESAMPLERS["systematic"](torch.tensor([[0.0, float("nan")]]), torch.Generator())
