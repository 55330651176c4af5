"""Tests of diagnostics.calibration: prior-predictive draws, rank statistics, calibration studies.

The claims: with the Exact engine on a Gaussian-mixture problem the SBC ranks are uniform (the
study passes), and a deliberately wrong posterior (prior draws, an over-confident posterior)
fails. Measured numbers are written beside the assertions (``/tmp``-free scripts: the same
calls over seeds 0..49 or 0..9, see the comments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyro
import pytest
import torch
from helpers import gaussian_model

from diffpost import posterior
from diffpost.diagnostics import (
    CalibrationStudy,
    calibration_study,
    prior_predictive,
    rank_uniformity_test,
)
from diffpost.models import GaussianMixture, GaussianObservation
from diffpost.models.operators import Mask, Matrix
from diffpost.posterior.engines.exact import Exact, ExactState

TRIALS, DRAWS = 100, 49  # 10 bins of 5 ranks each (L + 1 = 50)


def small_mixture(d: int = 3, seed: int = 0) -> GaussianMixture:
    """3 components in d dims, spread means, isotropic covariances of different scales."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(3, d, generator=g, dtype=torch.float64)
    scales = 0.3 + torch.rand(3, generator=g, dtype=torch.float64)
    covariances = scales[:, None, None] * torch.eye(d, dtype=torch.float64)
    weights = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    return GaussianMixture(weights, means, covariances)


def noisy_model():
    """x ~ 3-component GMM in 3 dims, one random linear measurement with sigma = 0.5."""
    prior = small_mixture()
    matrix = torch.randn(1, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return gaussian_model(prior, Matrix(matrix), 0.5)


@dataclass(frozen=True)
class PriorDraws(posterior.Engine):
    """A deliberately wrong engine: returns prior samples, whatever the data."""

    requires: ClassVar[frozenset[str]] = frozenset()

    def init(self, problem, num_chains, num_particles, generator):
        x = problem.prior.sample((num_chains * num_particles,), generator=generator)
        uniform = x.new_full((num_chains, num_particles), -math.log(num_particles))
        return ExactState(x, uniform, None)


@dataclass(frozen=True)
class OverConfident(Exact):
    """A deliberately wrong engine: exact draws shrunk towards their mean (too narrow)."""

    shrink: float = 0.6

    def init(self, problem, num_chains, num_particles, generator):
        state = super().init(problem, num_chains, num_particles, generator)
        mean = state.particles.mean(0)
        return state._replace(particles=mean + self.shrink * (state.particles - mean))


def study(engine, **kwargs) -> CalibrationStudy:
    kwargs = {"num_particles": DRAWS, "seed": 0, "progress": False} | kwargs
    return calibration_study(noisy_model(), engine, TRIALS, **kwargs)


# --------------------------------------------------------------------------------------------
# the acceptance criteria
# --------------------------------------------------------------------------------------------


def test_exact_engine_passes_and_its_coverage_is_nominal():
    result = study(Exact())
    assert result.summaries == [f"x[{i}]" for i in range(3)] + [
        f"projection[{j}]" for j in range(8)
    ] + ["log_likelihood", "tarp"]
    assert result.ranks.shape == (TRIALS, 13) and result.num_draws == DRAWS
    assert int(result.ranks.min()) >= 0 and int(result.ranks.max()) <= DRAWS
    # Bonferroni p-value over the 13 summaries, measured over seeds 0..49: no rejection at 0.01
    # (smallest 0.020, 5% quantile 0.07, median 0.70); seed 0 gives 0.15. It is a valid level-
    # 0.01 test, so a calibrated engine fails it with probability below 1%.
    assert result.passed(0.01)
    assert result.p_value() > 0.01
    # coverage of the central intervals: the mean over the 13 summaries is within 4 binomial
    # sd of one summary, sqrt(q (1 - q) / T), of the nominal level q at each of the 19 levels.
    # Measured: largest |z| over the levels 2.82 at seed 0, at most 2.82 over seeds 0..19
    # (deviation 0.03 to 0.08). The over-confident engine below is at z ~ 10 for q = 0.9.
    q = result.levels
    z = (result.coverage.mean(1) - q).abs() / (q * (1 - q) / TRIALS).sqrt()
    assert float(z.max()) < 4, z


def test_prior_draws_fail_through_the_log_likelihood():
    result = study(PriorDraws())
    # measured over seeds 0..9: Bonferroni p between 1e-37 and 3e-22
    assert not result.passed(0.01)
    assert result.p_value() < 1e-10
    # SBC's blind spot (Talts et al. 2018): prior draws ignore y, so every data-independent
    # summary has exactly uniform ranks; measured p over seeds 0..9 without the likelihood:
    # 0.099 to 1 (1 at seed 0). Only the data-dependent log-likelihood sees the error: the
    # truth is more likely than prior draws, so its ranks pile up at the top.
    assert result.passed(0.01, kinds=["coordinates", "projections", "tarp"])
    top = result.normalized_ranks()[:, result.summaries.index("log_likelihood")]
    assert float(top.mean()) > 0.7  # 0.5 if calibrated; measured 0.81 at seed 0


def test_over_confident_posterior_fails_with_u_shaped_ranks():
    result = study(OverConfident())
    # measured over seeds 0..9: Bonferroni p between 8e-30 and 9e-13
    assert not result.passed(0.01)
    assert result.p_value() < 1e-6
    # intervals too narrow: the 90% intervals of the coordinates cover the truth far less than
    # 90% of the time (measured 0.56 at seed 0), and the ranks crowd the two extreme bins
    # (expected 20% of the trials; measured 50%)
    levels = result.levels.tolist()
    coordinates = result.columns(["coordinates"])
    assert float(result.coverage[levels.index(0.9), coordinates].mean()) < 0.75
    bins = result.ranks[:, coordinates] * result.num_bins // (DRAWS + 1)
    extreme = ((bins == 0) | (bins == result.num_bins - 1)).double().mean()
    assert float(extreme) > 0.35


def test_noiseless_observation_ties_are_broken_uniformly():
    # y = x[0] exactly: every posterior draw equals the truth in coordinate 0, a tie that must
    # give a uniform rank (not always 0). The likelihood is degenerate, so the default
    # summaries leave it out, and asking for it is refused.
    prior = small_mixture()
    model = gaussian_model(prior, Mask(torch.tensor([True, False, False])), 0.0)
    result = calibration_study(model, Exact(), TRIALS, num_particles=DRAWS, seed=0, progress=False)
    assert "log_likelihood" not in result.kinds
    tied = result.ranks[:, 0]
    assert int(tied.max()) > 40 and int(tied.min()) < 10  # spread over [0, 49]: measured 0..49
    # measured Bonferroni p over seeds 0..9, ties broken by each trial's own generator: 0.16 to
    # 1 (0.16 at seed 0); without tie-breaking the ranks of coordinate 0 would all be 0
    assert result.passed(0.01)
    with pytest.raises(ValueError, match="finite likelihood"):
        calibration_study(model, Exact(), 10, num_particles=9, summaries=["log_likelihood"])


def test_one_draw_per_chain_and_summary_selection():
    result = study(
        Exact(),
        num_particles=3,
        num_chains=29,
        one_draw_per_chain=True,
        summaries=["projections", "tarp"],
        num_projections=4,
        num_bins=5,
    )
    assert result.num_draws == 29 and result.num_bins == 5
    assert result.kinds == ["projections"] * 4 + ["tarp"]
    assert result.projections.shape == (3, 4)
    assert torch.allclose(result.projections.norm(dim=0), torch.ones(4, dtype=torch.float64))
    # measured Bonferroni p over seeds 0..9: 0.16 to 1 (1 at seed 0). Before ParticleSet drew
    # its pick from a stream of its own, the pick replayed the Exact engine's component draws
    # and this study failed (p = 2e-4)
    assert result.passed(0.01)
    assert result.info["nfe"] == 0 and result.info["engine"] == "Exact"


def test_same_seed_same_study_and_table():
    first = calibration_study(noisy_model(), Exact(), 20, num_particles=9, progress=False)
    second = calibration_study(noisy_model(), Exact(), 20, num_particles=9, progress=False)
    assert torch.equal(first.ranks, second.ranks)
    assert torch.equal(first.x_true, second.x_true)
    table = first.table()
    assert list(table["summary"]) == first.summaries and len(table) == 13
    assert "coverage_0.9" in table.columns and np.allclose(
        table["p_value"].to_numpy(), first.p_values.numpy()
    )
    assert "p_value=" in repr(first)


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def test_rank_test_matches_pearson_chi_square_with_exact_bin_probabilities():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    draws, bins = 10, 4  # 11 ranks in 4 bins: 3, 3, 3 and 2 ranks per bin
    ranks = torch.randint(0, draws + 1, (60, 3), generator=g)
    ranks[:, 2] = torch.randint(0, 3, (60,), generator=g)  # far from uniform
    p_values = rank_uniformity_test(ranks, draws, bins)
    for k in range(3):
        counts = np.bincount(ranks[:, k].numpy() * bins // (draws + 1), minlength=bins)
        expected = 60 * np.array([3, 3, 3, 2]) / 11
        assert float(p_values[k]) == pytest.approx(
            scipy_stats.chisquare(counts, expected).pvalue, rel=1e-9
        )
    assert float(p_values[2]) < 1e-10


def test_rank_test_p_values_are_uniform_under_the_null():
    g = torch.Generator().manual_seed(1)
    ranks = torch.randint(0, 50, (100, 4000), generator=g)
    p_values = rank_uniformity_test(ranks, 49, 10)
    # with 10 expected counts per bin the chi-square approximation is good: measured fraction
    # below 0.05 is 0.050 and below 0.01 is 0.010 (4000 columns: binomial sd 0.0034, 0.0016)
    assert abs(float((p_values < 0.05).double().mean()) - 0.05) < 0.015
    assert abs(float((p_values < 0.01).double().mean()) - 0.01) < 0.007


def test_prior_predictive_draws_the_model_with_explicit_generators():
    prior = small_mixture()
    operator = Matrix(torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64))
    model = gaussian_model(prior, operator, 0.5)
    state = torch.get_rng_state()
    name, x, observations = prior_predictive(model, 4000, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    assert name == "x" and x.shape == (4000, 3) and observations["y"].shape == (4000, 1)
    again = prior_predictive(model, 4000, seed=3)
    assert torch.equal(again[1], x) and torch.equal(again[2]["y"], observations["y"])
    # x ~ prior: its mean within 4 standard errors of the prior mean in each coordinate
    error = (x.mean(0) - prior.mean) / (prior.variance / 4000).sqrt()
    assert float(error.abs().max()) < 4, error
    # y - A x ~ N(0, 0.25): sample sd of 4000 residuals within 5% of 0.5 (sd of the estimate 1.1%)
    residual = observations["y"][:, 0] - x @ operator.matrix(dtype=torch.float64)[0]
    assert float(residual.std()) == pytest.approx(0.5, rel=0.05)


def test_prior_predictive_also_draws_distributions_without_a_generator_argument():
    prior = small_mixture()

    def model(y=None):
        x = pyro.sample("x", prior)
        rate = torch.nn.functional.softplus(x)
        return pyro.sample("y", pyro.distributions.Poisson(rate).to_event(1), obs=y)

    state = torch.get_rng_state()
    _, x, observations = prior_predictive(model, 500, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert observations["y"].shape == (500, 3)
    assert torch.equal(prior_predictive(model, 500, seed=0)[2]["y"], observations["y"])


def test_invalid_models_and_arguments_raise_value_errors():
    model = noisy_model()
    y = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="observed"):
        prior_predictive(model, 10, model_kwargs={"y": y})
    with pytest.raises(ValueError, match="no observation"):
        prior_predictive(lambda: pyro.sample("x", small_mixture()), 10)

    def two_priors(y=None):
        pyro.sample("a", small_mixture())
        pyro.sample("b", small_mixture())

    with pytest.raises(ValueError, match="exactly one DiffusionPrior"):
        prior_predictive(two_priors, 10)

    def unbatched(y=None):  # an observation that ignores x has no sample dimension
        pyro.sample("x", small_mixture())
        noise = pyro.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
        return pyro.sample("y", noise.to_event(1), obs=y)

    with pytest.raises(ValueError, match="leading sample dimension"):
        prior_predictive(unbatched, 10)

    bad = {
        "num_trials": dict(num_trials=0),
        "num_particles": dict(num_particles=0),
        "summaries": dict(summaries=["pixels"]),
        "levels": dict(levels=[0.5, 1.0]),
        "num_bins": dict(num_bins=1),
        "coordinates": dict(coordinates=[3]),
    }
    for match, kwargs in bad.items():
        arguments = {"num_trials": 20, "num_particles": 9, "progress": False} | kwargs
        with pytest.raises(ValueError, match=match):
            calibration_study(model, Exact(), **arguments)
    with pytest.raises(ValueError, match="engine"):
        calibration_study(model, "Exact", 20)
    with pytest.raises(ValueError, match="alpha"):
        study(Exact(), summaries=["tarp"], num_particles=9).passed(1.5)


def test_observation_kwargs_named_differently_from_the_site_are_conditioned():
    # the study conditions the sites by name, so the model's keyword need not match the site
    prior = small_mixture()
    operator = Matrix(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))

    def model(measurement=None):
        x = pyro.sample("x", prior)
        return pyro.sample("obs", GaussianObservation(operator, x, 0.5), obs=measurement)

    result = calibration_study(
        model, Exact(), 20, num_particles=9, summaries=["coordinates"], progress=False
    )
    assert set(result.observations) == {"obs"} and result.observations["obs"].shape == (20, 1)


def test_batched_trials_keep_the_verdicts():
    """Trials run 25 at a time as one plated run each: the calibrated engine still passes and
    prior draws still fail. Measured over seeds 0-4: Exact's Bonferroni p 0.14-1 (seed 0: 1.0),
    PriorDraws' 1e-31 to 1e-22, the sequential path's ranges (above)."""
    exact = study(Exact(), trials_per_batch=25)
    assert exact.passed(0.01) and exact.p_value() > 0.01
    assert exact.ranks.shape == (TRIALS, 13)
    wrong = study(PriorDraws(), trials_per_batch=25)
    assert not wrong.passed(0.01) and wrong.p_value() < 1e-10
    sequential = study(Exact())
    assert not torch.equal(exact.ranks, sequential.ranks)  # one seed per batch, not per trial
    with pytest.raises(ValueError, match="trials_per_batch must be a positive integer or None"):
        study(Exact(), trials_per_batch=0)
