"""Score-ALD, DAPS and DCDP against exact posteriors, grid quadrature and their own contracts.

These engines are approximate; tolerances come from measured runs (numbers beside each assertion,
with the reason for the margin). Where an engine is known to be biased, the test pins the measured
bias (e.g. DAPS' over-dispersion on a Gaussian), so that a change of behaviour is noticed.
Measured failure recorded here rather than asserted: on the multimodal GMM problem (d = 8,
d_y = 2, seed 0) DCDP's draws sit in the wrong modes, sliced Wasserstein 27 against a floor of 1.4
(prior draws: 13); it is a restoration method, not a posterior sampler.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import all_schedules, gaussian_model

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models import Gaussian, GaussianObservation, operators
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.models.schedules import VE
from diffpost.posterior.engines.langevin import DAPS, DCDP, ScoreALD

DTYPE = torch.float64


def _sample(model, engine, y, num_particles=500, seed=0, **kwargs):
    return posterior.sample(
        model,
        engine,
        num_particles=num_particles,
        seed=seed,
        progress=False,
        model_kwargs={"y": y},
        **kwargs,
    )


def _gaussian_problem(schedule=None):
    """2-D correlated Gaussian prior, one linear measurement with noise 0.5."""
    covariance = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=DTYPE)
    prior = Gaussian(torch.tensor([0.5, -1.0], dtype=DTYPE), covariance, schedule=schedule)
    operator = operators.Matrix(torch.tensor([[1.0, 0.5]], dtype=DTYPE))
    y = torch.tensor([1.3], dtype=DTYPE)
    return gaussian_model(prior, operator, 0.5), prior.posterior(operator, y, 0.5), y


def _moment_errors(draws, mean, variance):
    """Largest |mean error| and the per-coordinate variance ratios, draws ``(N, d)``."""
    return float((draws.mean(0) - mean).abs().max()), draws.var(0) / variance


# ----------------------------------------------------------------------------- exact posteriors


@pytest.mark.parametrize(
    "engine, d_y, seed, bound",
    [
        # unimodal posterior (d_y = 4): floor 0.069, prior draws 18.4; measured SW 0.095
        # (ScoreALD), 0.110 (DAPS), 0.127 (DCDP). Bound 0.2: ~2x the worst, far below the prior
        # (ScoreALD with 100 levels of 2 steps: 0.84, so the bound sees a degraded run)
        (ScoreALD(num_steps=200), 4, 1, 0.2),
        (DAPS(num_steps=20, langevin_steps=20), 4, 1, 0.2),
        (DCDP(), 4, 1, 0.2),
        # multimodal posterior (d_y = 2): floor 1.38, prior draws 13.1; measured 4.58 (ScoreALD
        # with 200 levels: 4.28): the mode weights are biased (the annealing flattens the
        # likelihood while the modes are chosen); bound 6.5 keeps a 40% margin, half the prior's
        (DAPS(num_steps=20, langevin_steps=20), 2, 0, 6.5),
    ],
    ids=["score_ald-unimodal", "daps-unimodal", "dcdp-unimodal", "daps-modes"],
)
def test_sliced_wasserstein_to_the_exact_gmm_posterior(engine, d_y, seed, bound):
    problem = gaussian_mixture_benchmark(8, d_y, seed=seed)
    exact = problem.exact_posterior()
    reference = exact.sample((500,), generator=torch.Generator().manual_seed(1))
    result = _sample(problem.model, engine, problem.y)
    assert sliced_wasserstein(result.values["x"][0], reference, seed=0) < bound


def test_score_ald_matches_gaussian_posterior_moments():
    model, exact, y = _gaussian_problem()
    engine = ScoreALD(num_steps=150, steps_per_level=2)
    result = _sample(model, engine, y, num_particles=1000, seed=1)
    mean_error, ratio = _moment_errors(
        result.values["x"][0], exact.means[0], exact.covariances[0].diagonal()
    )
    # measured: mean error 0.074, variance ratios 1.15, 1.16 (the default 1155 x 3: 0.035 and
    # 0.94, 0.96); Monte Carlo sd over 1000 draws: 0.045 for a ratio, 0.04 for a mean
    assert mean_error < 0.15
    assert bool(((ratio > 0.9) & (ratio < 1.3)).all()), ratio


def test_score_ald_on_undersampled_mri():
    """Fourier (MRI) operator on a 4x4 image with a smooth Gaussian prior: the exact posterior."""
    n = 4
    index = torch.arange(n * n)
    rows, cols = index // n, index % n
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    covariance = torch.exp(-squared.to(DTYPE) / 4.0) + 0.05 * torch.eye(n * n, dtype=DTYPE)
    prior = Gaussian(torch.zeros(n * n, dtype=DTYPE), covariance, event_shape=(1, n, n))
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[0, :] = mask[:, 0] = mask[1, 1] = True
    operator = operators.Fourier((1, n, n), mask)
    generator = torch.Generator().manual_seed(0)
    x_true = prior.sample(generator=generator)
    y = operator(x_true[None])[0] + 0.1 * torch.randn(
        operator.out_shape, generator=generator, dtype=DTYPE
    )
    exact = prior.posterior(operator, y, 0.1)
    result = _sample(gaussian_model(prior, operator, 0.1), ScoreALD(num_steps=200), y, 1000)
    draws = result.values["x"][0].flatten(1)
    sd = exact.covariances[0].diagonal().sqrt()
    # measured: largest |mean error| 0.14 posterior sd (posterior sd 0.25, prior sd 1.02) and
    # variance ratios 0.996..1.11 over the 16 pixels; Monte Carlo sd of a ratio: 0.045 (100
    # levels of 2 steps: 0.41 and up to 1.50, so the bounds see a degraded run)
    assert float(((draws.mean(0) - exact.means[0].flatten()) / sd).abs().max()) < 0.3
    ratio = draws.var(0) / sd**2
    assert bool(((ratio > 0.85) & (ratio < 1.3)).all()), ratio


def _smooth_image_prior(n):
    """A smooth Gaussian prior on ``(1, n, n)`` images (squared-exponential covariance)."""
    index = torch.arange(n * n)
    rows, cols = index // n, index % n
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    covariance = torch.exp(-squared.to(DTYPE) / 4.0) + 0.05 * torch.eye(n * n, dtype=DTYPE)
    return Gaussian(torch.zeros(n * n, dtype=DTYPE), covariance, event_shape=(1, n, n))


@pytest.mark.parametrize(
    "engine, mean_bound, ratio_range",
    [
        # measured: mean error 0.15 posterior sd, variance ratios 1.04..1.38 (1155 levels x 3)
        (ScoreALD(), 0.35, (0.85, 1.6)),
        # measured: 0.31 and 1.49..1.78 (DAPS' over-dispersion, pinned on a Gaussian below)
        (DAPS(num_steps=50, langevin_steps=50), 0.6, (1.2, 2.3)),
    ],
    ids=["score_ald", "daps"],
)
def test_step_sizes_follow_the_operator_norm(engine, mean_bound, ratio_range):
    """A 6x6 Radon transform (8 angles, spectral norm 6.69, no SVD): with step sizes for a
    unit-norm operator both engines diverged (non-finite particles at level 39 and step 7)."""
    prior = _smooth_image_prior(6)
    operator = operators.Radon((1, 6, 6), 8)
    generator = torch.Generator().manual_seed(0)
    y = operator(prior.sample(generator=generator)[None])[0] + 0.5 * torch.randn(
        operator.out_shape, generator=generator, dtype=DTYPE
    )
    exact = prior.posterior(operator, y, 0.5)
    result = _sample(gaussian_model(prior, operator, 0.5), engine, y, 1000)
    draws = result.values["x"][0].flatten(1)
    sd = exact.covariances[0].diagonal().sqrt()  # ~0.22, prior sd ~1.02
    assert float(((draws.mean(0) - exact.means[0].flatten()) / sd).abs().max()) < mean_bound
    ratio = draws.var(0) / sd**2
    assert bool(((ratio > ratio_range[0]) & (ratio < ratio_range[1])).all()), ratio


def test_daps_pins_its_measured_over_dispersion_on_a_gaussian():
    """DAPS' Gaussian approximation N(x0_hat, r^2) with r = the noise ratio over-disperses."""
    model, exact, y = _gaussian_problem()
    result = _sample(model, DAPS(num_steps=20, langevin_steps=20), y, num_particles=1000)
    mean_error, ratio = _moment_errors(
        result.values["x"][0], exact.means[0], exact.covariances[0].diagonal()
    )
    # measured: this run mean error 0.15, variance ratios 1.83, 2.13; DAPS-1K (200 levels x 5
    # ODE steps x 100 Langevin steps) 0.04 and 1.65, 1.73. Monte Carlo sd of a ratio: 0.045
    assert mean_error < 0.3
    assert bool(((ratio > 1.4) & (ratio < 2.8)).all()), ratio


def test_daps_with_data_std_equal_to_sigma_is_the_model_likelihood():
    """The legacy/paper data term ||A x - y||^2 / (2 tau^2) is the likelihood when tau = sigma."""
    model, _, y = _gaussian_problem()
    engine = DAPS(num_steps=5, langevin_steps=5, ode_steps=2)
    default = _sample(model, engine, y, num_particles=50, seed=3)
    explicit = _sample(
        model, DAPS(num_steps=5, langevin_steps=5, ode_steps=2, data_std=0.5), y, 50, 3
    )
    torch.testing.assert_close(default.values["x"], explicit.values["x"])
    weighted = _sample(
        model, DAPS(num_steps=5, langevin_steps=5, ode_steps=2, data_std=0.1), y, 50, 3
    )
    assert not torch.allclose(default.values["x"], weighted.values["x"])


@pytest.mark.parametrize(
    "engine",
    [ScoreALD(num_steps=40, steps_per_level=2), DAPS(num_steps=6, langevin_steps=6, ode_steps=2)],
    ids=["score_ald", "daps"],
)
def test_noise_ratio_levels_make_the_engine_schedule_invariant(engine):
    """Levels are noise ratios sigma/alpha: every schedule gives (almost) the same draws."""
    results = {}
    for name, schedule in all_schedules().items():
        model, exact, y = _gaussian_problem(schedule)
        results[name] = _sample(model, engine, y, num_particles=300, seed=1).values["x"][0]
    mean = exact.means[0]
    # measured: the means agree to 0.009 (ScoreALD) and 0.0075 (DAPS) across the six schedules
    # (VE and EDM start lower, at their largest ratios 50 and 80 instead of 151..232), while
    # these short runs are 0.24 and 0.32 from the exact mean: a wrong time <-> ratio map shows
    means = torch.stack([draws.mean(0) for draws in results.values()])
    assert float((means - means.mean(0)).abs().max()) < 0.05, means
    assert float((means - mean).abs().max()) < 0.5


# ----------------------------------------------------------------------------- other likelihoods


def _quadrature_moments(prior, log_likelihood):
    """Posterior mean and variance of a 2-D prior on a 551 x 551 grid over [-5, 6]^2."""
    axis = torch.linspace(-5, 6, 551, dtype=DTYPE)
    points = torch.cartesian_prod(axis, axis)
    shaped = points.reshape((-1,) + tuple(prior.event_shape))
    weights = torch.softmax(prior.log_prob(shaped) + log_likelihood(shaped), 0)[:, None]
    mean = (weights * points).sum(0)
    return mean, (weights * (points - mean) ** 2).sum(0)


def _phase_retrieval_problem():
    prior = Gaussian(
        torch.tensor([1.0, -0.5], dtype=DTYPE),
        torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=DTYPE),
        event_shape=(1, 2),
    )
    operator = operators.PhaseRetrieval((1, 2), oversampling=2.0)
    x_true = torch.tensor([[[1.2, 0.4]]], dtype=DTYPE)
    noise = torch.randn(operator.out_shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    y = operator(x_true)[0] + 0.3 * noise

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.3), obs=y)

    def log_likelihood(x):
        return GaussianObservation(operator, x, 0.3).log_prob(y)

    return model, prior, y, log_likelihood


def _rate(x):
    return 4.0 * torch.nn.functional.softplus(x)


def _poisson_problem():
    prior = Gaussian(
        torch.tensor([1.0, -0.5], dtype=DTYPE), torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=DTYPE)
    )
    y = torch.tensor([9.0, 1.0], dtype=DTYPE)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Poisson(_rate(x)).to_event(1), obs=y)

    def log_likelihood(x):
        return dist.Poisson(_rate(x)).to_event(1).log_prob(y)

    return model, prior, y, log_likelihood


@pytest.mark.parametrize(
    "engine, mean_tolerance, ratio_range",
    [
        # posterior sd 0.85, 0.83; Monte Carlo sd over 1000 draws: 0.027 for a mean, 0.045 for a
        # variance ratio. Measured: mean error 0.053, variance ratios 0.99, 0.94
        (ScoreALD(num_steps=100, steps_per_level=2), 0.15, (0.8, 1.2)),
        # measured: mean error 0.062, variance ratios 1.00, 1.05
        (DAPS(num_steps=20, langevin_steps=20), 0.2, (0.8, 1.3)),
    ],
    ids=["score_ald", "daps"],
)
def test_phase_retrieval_posterior_by_quadrature(engine, mean_tolerance, ratio_range):
    """A non-linear operator: |F x| of a 2-pixel signal; the exact posterior is bimodal."""
    model, prior, y, log_likelihood = _phase_retrieval_problem()
    mean, variance = _quadrature_moments(prior, log_likelihood)
    draws = _sample(model, engine, y, num_particles=1000).values["x"][0].flatten(1)
    mean_error, ratio = _moment_errors(draws, mean, variance)
    assert mean_error < mean_tolerance
    low, high = ratio_range
    assert bool(((ratio > low) & (ratio < high)).all()), ratio


def test_daps_with_a_poisson_likelihood():
    model, prior, y, log_likelihood = _poisson_problem()
    mean, variance = _quadrature_moments(prior, log_likelihood)
    result = _sample(model, DAPS(num_steps=20, langevin_steps=20), y, num_particles=1000)
    mean_error, ratio = _moment_errors(result.values["x"][0], mean, variance)
    # measured: mean error 0.28 (posterior sd 0.60, 0.66), variance ratios 1.25, 1.59: DAPS'
    # over-dispersion again; the prior is 0.8 away, and a wrong gradient would not come close
    assert mean_error < 0.5
    assert bool(((ratio > 1.0) & (ratio < 2.2)).all()), ratio


def test_dcdp_data_consistency_reaches_the_poisson_maximum_likelihood():
    """With no proximal term DCDP's data step maximises the likelihood (backtracking descent)."""
    model, _, y, _ = _poisson_problem()
    result = _sample(model, DCDP(num_steps=5, consistency_steps=30), y, num_particles=100)
    # rate(x) = y: x = softplus^{-1}(y / 4)
    mle = torch.log(torch.expm1(y / 4.0))
    # measured: mean of the draws 2e-3 from the MLE, draws' sd 0.01 (the last purification,
    # t = 1e-3); a data step that did not converge would leave them between the prior and the MLE
    torch.testing.assert_close(result.values["x"][0].mean(0), mle, atol=0.02, rtol=0)


def test_dcdp_conjugate_gradient_projects_onto_the_data():
    """Linear Gaussian: with lambda = 0 the data step is the projection onto {A x = y}."""
    model, _, y = _gaussian_problem()
    engine = DCDP(num_steps=1, purification_start=1e-3, purification_end=1e-3)
    result = _sample(model, engine, y, num_particles=20)
    # x^1 = purify(projection of 0): A x = y up to one purification at t = 1e-3 (noise ratio
    # 0.01); measured residual sd 0.011, largest of 20: 0.026
    residual = result.values["x"][0] @ torch.tensor([1.0, 0.5], dtype=DTYPE) - y
    assert float(residual.abs().max()) < 0.06
    # the projection of 0 is y A^T / |A|^2 = (1.04, 0.52); measured mean (1.037, 0.521)
    torch.testing.assert_close(
        result.values["x"][0].mean(0), torch.tensor([1.04, 0.52], dtype=DTYPE), atol=0.02, rtol=0
    )


# ----------------------------------------------------------------------------- contracts


def test_nfe_and_per_step_statistics():
    model, _, y = _gaussian_problem()
    daps = _sample(model, DAPS(num_steps=4, ode_steps=3, langevin_steps=2), y, 10, num_chains=2)
    assert daps.info["nfe"] == 12 and daps.info["vjp"] == 0
    assert set(daps.stats) == {"t", "noise", "step_size", "log_likelihood"}
    assert daps.stats["log_likelihood"].shape == (2, 4)
    assert bool((daps.stats["noise"][0, 1:] < daps.stats["noise"][0, :-1]).all())
    assert daps.log_evidence is None
    torch.testing.assert_close(daps.log_weights, torch.full((2, 10), -math.log(10), dtype=DTYPE))

    score_ald = _sample(model, ScoreALD(num_steps=7, steps_per_level=2), y, 10)
    assert score_ald.info["nfe"] == 14 and score_ald.info["vjp"] == 0
    assert set(score_ald.stats) == {"t", "noise", "step_size"}

    dcdp = _sample(model, DCDP(num_steps=3, purification_start=0.5), y, 10)
    # purification times 0.5, 0.25, 1e-3: min(20, ceil(1000 t)) DDIM steps each
    assert dcdp.info["nfe"] == 20 + 20 + 1 and dcdp.info["vjp"] == 0
    assert set(dcdp.stats) == {"t", "log_likelihood"}


def test_same_seed_same_draws_and_dtype_follows_the_prior():
    prior = Gaussian(torch.zeros(2), torch.eye(2))
    operator = operators.Matrix(torch.tensor([[1.0, 0.5]]))
    model, y = gaussian_model(prior, operator, 0.5), torch.tensor([1.3])
    for engine in (ScoreALD(num_steps=5), DAPS(num_steps=3, langevin_steps=3), DCDP(num_steps=2)):
        first = _sample(model, engine, y, num_particles=8, seed=4).values["x"]
        again = _sample(model, engine, y, num_particles=8, seed=4).values["x"]
        assert first.dtype == torch.float32
        torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_a_diverging_run_raises_engine_failed_with_the_step():
    model, _, y = _gaussian_problem()
    with pytest.raises(posterior.EngineFailed) as failure:
        _sample(model, DAPS(num_steps=5, langevin_steps=60, step_size=1e6), y, num_particles=4)
    assert failure.value.engine == "DAPS" and failure.value.step == 1
    assert "non-finite" in str(failure.value)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DAPS(num_steps=0), "num_steps"),
        (lambda: DAPS(langevin_steps=0), "langevin_steps"),
        (lambda: DAPS(step_size=-1.0), "step_size"),
        (lambda: DAPS(noise_min=0.001), "ode_noise_min < noise_min"),
        (lambda: DAPS(data_std=0.0), "data_std"),
        (lambda: ScoreALD(steps_per_level=1.5), "steps_per_level"),
        (lambda: ScoreALD(step_size=math.inf), "step_size"),
        (lambda: ScoreALD(noise_min=300.0), "noise_min < noise_max"),
        (lambda: ScoreALD(likelihood="exact"), "likelihood"),
        (lambda: DCDP(purification_start=1.5), "purification_start"),
        (
            lambda: DCDP(consistency_steps=True),
            "DCDP: consistency_steps must be a positive integer",
        ),
        (lambda: DCDP(purification_end=0.9), "purification_end"),
        (lambda: DCDP(consistency_steps=0), "consistency_steps"),
        (lambda: DCDP(proximal_weight=-1.0), "proximal_weight"),
    ],
)
def test_bad_hyperparameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_problems_the_engines_cannot_handle_are_refused():
    model, _, y, _ = _poisson_problem()
    with pytest.raises(ValueError, match="likelihood='norm_matched'"):
        _sample(model, ScoreALD(num_steps=2), y)
    with pytest.raises(ValueError, match="data_std"):
        _sample(model, DAPS(num_steps=2, data_std=0.1), y)
    _, _, y_linear = _gaussian_problem()
    noiseless = gaussian_model(
        Gaussian(torch.zeros(2), torch.eye(2)), operators.Identity((2,)), 0.0
    )
    for engine in (ScoreALD(), DAPS(), DCDP()):
        with pytest.raises(ValueError, match="finite log-likelihood"):
            _sample(noiseless, engine, torch.zeros(2))
    # VE cannot go below its sigma_min = 0.01: a range entirely under it is empty
    ve_model, _, _ = _gaussian_problem(VE())
    with pytest.raises(ValueError, match="noise range"):
        _sample(ve_model, ScoreALD(noise_max=0.005, noise_min=0.001), y_linear)


def test_a_plain_normal_likelihood_gets_the_step_sizes_of_its_gaussian_structure():
    """``Normal(A(x), sigma)`` without GaussianObservation: the data term's curvature is
    estimated by power iteration (it used to be taken as 1, which made DAPS diverge at step 2 for
    sigma = 0.3), and DAPS then runs as on the GaussianObservation model, to float precision."""
    prior = Gaussian(torch.zeros(3, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    matrix = torch.randn(2, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    operator = operators.Matrix(matrix)
    y = torch.tensor([1.0, -2.0], dtype=DTYPE)

    def structured(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.3), obs=y)

    def plain(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(operator(x), 0.3).to_event(1), obs=y)

    expected = torch.linalg.matrix_norm(matrix, ord=2).item() ** 2 / 0.09
    estimated = posterior.Problem.from_model(plain, y=y).likelihood_curvature()
    assert estimated == pytest.approx(expected, rel=1e-5)
    assert posterior.Problem.from_model(structured, y=y).likelihood_curvature() == pytest.approx(
        expected, rel=1e-9
    )
    engine = DAPS(num_steps=10, langevin_steps=10)
    one = _sample(structured, engine, y, num_particles=50)
    other = _sample(plain, engine, y, num_particles=50)
    torch.testing.assert_close(other.stats["step_size"], one.stats["step_size"], rtol=1e-4, atol=0)
    torch.testing.assert_close(other.values["x"], one.values["x"], rtol=1e-3, atol=1e-3)
