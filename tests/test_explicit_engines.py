"""DPS, ΠGDM, DDRM, MMPS, SNIPS, DDS, DiffPIR, DSG, DPPS, MCG, ScoreSDE, FlowChef, FlowDPS and
SITCOM against closed-form posteriors, on non-linear and Poisson problems, and their refusals and
bookkeeping.

These engines are approximations: their samples are biased even with an exact denoiser. Each
bound below is derived from a measured run (numbers in the comments, same seeds) with a margin,
and sits well below the distance of an uninformed sampler (the prior), so a broken guidance fails.
Measured on the 2-D mixture (N = 1000 against 1000 exact draws): noise floor 0.04–0.07, prior
1.08.
"""

import dataclasses

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import gaussian_model

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models import Gaussian, GaussianMixture, GaussianObservation, operators
from diffpost.models.operators import LinearOperator
from diffpost.models.schedules import RectifiedFlow
from diffpost.posterior.engines.explicit import (
    DDRM,
    DDS,
    DPPS,
    DPS,
    DSG,
    MCG,
    MMPS,
    SITCOM,
    SNIPS,
    DiffPIR,
    FlowChef,
    FlowDPS,
    PiGDM,
    ScoreSDE,
)
from diffpost.posterior.engines.explicit.dpps import candidate_count

DTYPE = torch.float64


def _run(model, engine, observed, num_particles, seed=0, **kwargs):
    return posterior.sample(
        model,
        engine,
        num_particles=num_particles,
        seed=seed,
        progress=False,
        model_kwargs=observed,
        **kwargs,
    )


# ----------------------------------------------------------------------------- closed forms


def _mixture():
    """The TDS paper's 3-component 2-D mixture (std 0.5), y = x + N(0, 0.5^2 I): three modes."""
    prior = GaussianMixture(
        torch.tensor([0.3, 0.5, 0.2], dtype=DTYPE),
        torch.tensor([[1.54, -0.29], [-2.18, 0.57], [-1.09, -1.40]], dtype=DTYPE),
        0.25 * torch.eye(2, dtype=DTYPE).expand(3, 2, 2),
    )
    operator = operators.Matrix(torch.eye(2, dtype=DTYPE))
    y = torch.tensor([-0.3, -0.6], dtype=DTYPE)  # posterior weights 0.13, 0.05, 0.81
    return gaussian_model(prior, operator, 0.5), prior.posterior(operator, y, 0.5), y


@pytest.mark.parametrize(
    "engine, bound",
    [
        # measured SW over seeds 0, 1, 2: 0.244, 0.238, 0.249
        (DDRM(), 0.35),
        # 0.408, 0.416, 0.415 (the normalised step keeps kicking near the data: over-dispersed)
        (DPS(num_steps=100), 0.55),
        # 0.471, 0.424, 0.473: the score form is no closer on this mixture
        (DPS(num_steps=100, guidance="score"), 0.6),
        # 0.386, 0.394, 0.394 (the official update under-weights the guidance at high noise)
        (PiGDM(guidance="paper"), 0.5),
        # 0.132, 0.116, 0.133: the same guidance plugged in as a score (the default) is far closer
        (PiGDM(), 0.2),
        # 0.156, 0.195, 0.153
        (MMPS(), 0.25),
        # 0.554, 0.554, 0.555: gamma = 1 pulls every draw onto y (variance 0.0008 vs 0.2-0.37)
        (DDS(), 0.7),
        # 0.252, 0.260, 0.258
        (DDS(gamma=None), 0.35),
        # 0.037, 0.035, 0.048: at the noise floor with 100 levels and a 10x larger step
        (SNIPS(num_steps=100, step_lr=3.3e-5), 0.08),
        # 0.212, 0.193, 0.222 (lambda = 8, InverseBench's: 0.63-0.65; zeta = 1: 0.13-0.14)
        (DiffPIR(), 0.3),
        # 0.266, 0.263, 0.283 (guidance rate 0.1: 0.62-0.66, 0.5: 0.55; DPS at 100 steps 0.41)
        (DSG(), 0.35),
        # 0.477, 0.492, 0.496: DPS's step at the official scale 1 (DPS at 0.5: 0.41), the best of
        # up to 50 noise candidates does not pull it back
        (DPPS(), 0.6),
        # 0.230, 0.224, 0.232 (on this VP schedule; on rectified flow 0.26, test below)
        (FlowDPS(), 0.32),
        # 0.196, 0.199, 0.200 (proximal weight 0: 0.197-0.202)
        (SITCOM(), 0.28),
    ],
    ids=lambda value: getattr(value, "name", None) if not isinstance(value, float) else None,
)
def test_sliced_wasserstein_to_the_exact_mixture_posterior(engine, bound):
    model, exact, y = _mixture()
    reference = exact.sample((1000,), generator=torch.Generator().manual_seed(1))
    result = _run(model, engine, {"y": y}, 1000)
    distance = sliced_wasserstein(result.values["x"][0], reference)
    assert distance < bound, distance
    assert result.log_evidence is None
    torch.testing.assert_close(result.log_weights, torch.full_like(result.log_weights, -6.907755))


def _gaussian():
    g = torch.Generator().manual_seed(0)
    prior = Gaussian(0.5 * torch.randn(2, generator=g, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    operator = operators.Matrix(torch.randn(1, 2, generator=g, dtype=DTYPE))
    y = torch.randn(1, generator=g, dtype=DTYPE)
    return gaussian_model(prior, operator, 0.5), prior.posterior(operator, y, 0.5), y


def test_ddrm_eta_c_defaults_to_eta_and_acts_on_the_less_noisy_coordinates():
    # sigma = 0.5 and |s| ~ 1: the observed coordinate is "less noisy than y" in the last steps
    model, _, y = _gaussian()
    same = [_run(model, engine, {"y": y}, 50).values["x"] for engine in (DDRM(), DDRM(eta_c=0.85))]
    assert torch.equal(*same)
    other = _run(model, DDRM(eta_c=0.0), {"y": y}, 50).values["x"]
    assert not torch.allclose(other, same[0])


class _FullRotationMatrix(operators.Matrix):
    """A dense matrix whose SVD offers no cheap leading rotation: DDRM rotates every coordinate."""

    def svd(self):
        return dataclasses.replace(super().svd(), leading_vt=None, leading_v=None)


def test_ddrm_thin_path_draws_the_same_law_as_the_full_rotation():
    # d = 6, d_y = 2: DDRM rotates 2 leading coordinates (O(n d k)) where the SVD offers them,
    # all 6 otherwise; the two paths draw the unobserved coordinates' noise in different bases,
    # so they agree in law, not draw by draw
    g = torch.Generator().manual_seed(3)
    factor = torch.randn(6, 6, generator=g, dtype=DTYPE)
    prior = Gaussian(torch.randn(6, generator=g, dtype=DTYPE), factor @ factor.T / 6 + torch.eye(6))
    matrix = torch.randn(2, 6, generator=g, dtype=DTYPE)
    y = torch.randn(2, generator=g, dtype=DTYPE)
    draws = [
        _run(gaussian_model(prior, op, 0.3), DDRM(), {"y": y}, 20000).values["x"][0]
        for op in (operators.Matrix(matrix), _FullRotationMatrix(matrix))
    ]
    assert not torch.allclose(*draws)  # the two paths did run
    # measured (seeds 0, 1, 2): largest mean difference 0.011, 0.006, 0.003; largest variance
    # difference 0.019, 0.018, 0.023. Variances 0.15-1.26 over 20000 draws each: the difference
    # of two means has sd <= 0.011, of two variances <= 0.018 (normal theory); bounds at 4 sd
    torch.testing.assert_close(draws[0].mean(0), draws[1].mean(0), atol=0.045, rtol=0)
    torch.testing.assert_close(draws[0].var(0), draws[1].var(0), atol=0.075, rtol=0)


@pytest.mark.parametrize(
    "engine, variance_band",
    [
        # variance ratios (per coordinate, seeds 0 and 1): 0.72 0.64 / 0.69 0.64 (DDRM
        # under-disperses)
        (DDRM(), (0.55, 0.85)),
        # 4.17 0.97 / 4.16 0.95: on the sharp observed direction the normalised step does not
        # shrink with the residual (14x with scale = 1); only the mean is asserted
        (DPS(num_steps=100), None),
        # 1.18 0.94 / 1.19 0.93: as a score in Tweedie's formula the push shrinks with the step
        (DPS(num_steps=100, guidance="score"), (0.8, 1.35)),
        # 0.63 0.93 / 0.62 0.93
        (PiGDM(guidance="paper"), (0.5, 1.05)),
        # 0.85 0.94 / 0.87 0.93 (the 100-step DDPM alone gives about 0.93)
        (PiGDM(), (0.75, 1.05)),
        # 0.80 0.87 / 0.81 0.90
        (MMPS(), (0.7, 1.0)),
        # 0.54 0.71 / 0.57 0.74
        (DDS(gamma=None), (0.45, 0.85)),
        # 1.03 1.03 / 1.02 1.04
        (SNIPS(num_steps=100, step_lr=3.3e-5), (0.92, 1.12)),
        # 0.86 0.95 / 0.90 0.94
        (DiffPIR(), (0.75, 1.05)),
        # 1.17 0.91 / 1.23 0.91 (the fixed-length step over-disperses the sharp direction less
        # than DPS's 4.2)
        (DSG(), (0.8, 1.4)),
        # 12.9 1.05 / 13.1 1.07: DPS's normalised step at scale 1 (the selection of the noise
        # does not narrow it); only the mean is asserted (measured errors 0.005, 0.023)
        (DPPS(), None),
        # 0.62 0.50 / 0.65 0.50: each step fits the measurement down to its noise level, which
        # narrows the draws; mean errors 0.13, 0.13 (below the 0.3-0.9 posterior sds)
        (SITCOM(), (0.4, 0.75)),
    ],
    ids=lambda value: getattr(value, "name", None) if not isinstance(value, tuple) else None,
)
def test_moments_of_a_gaussian_posterior(engine, variance_band):
    model, exact, y = _gaussian()
    x = _run(model, engine, {"y": y}, 4000).values["x"][0]
    # measured mean errors (max over coordinates) 0.000-0.020, DPS 0.012 (its variance is 4x);
    # posterior sd 0.3-0.9 over 4000 draws: SE <= 0.015, DPS 0.03; SITCOM 0.13 (a bias: its fit
    # to y moves the mean)
    tolerance = {"SITCOM": 0.2}.get(engine.name, 0.1 if variance_band is None else 0.05)
    torch.testing.assert_close(x.mean(0), exact.means[0], atol=tolerance, rtol=0)
    if variance_band is not None:
        ratio = x.var(0) / exact.covariances[0].diagonal()
        assert bool(((ratio > variance_band[0]) & (ratio < variance_band[1])).all()), ratio


def _masked_gaussian():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(4, 4, generator=g, dtype=DTYPE)
    prior = Gaussian(
        torch.randn(4, generator=g, dtype=DTYPE), factor @ factor.T + 0.5 * torch.eye(4)
    )
    mask = torch.tensor([True, False, True, False])
    operator = operators.Mask(mask)
    y = torch.tensor([0.7, -1.2], dtype=DTYPE)
    return gaussian_model(prior, operator, 0.0), prior, prior.posterior(operator, y, 0.0), mask, y


def test_noiseless_ddrm_dds_and_diffpir_reproduce_the_measurement():
    model, prior, exact, mask, y = _masked_gaussian()
    x = _run(model, DDRM(), {"y": y}, 4000).values["x"][0]
    # DDRM returns x0_hat of its last noisy state, whose observed coordinates are y plus the
    # noise of t_1 (sigma ~ 0.01): measured max deviation 0.043 over 4000 draws
    assert float((x[:, mask] - y).abs().max()) < 0.1
    # the free coordinates move towards the conditional mean (measured error 0.27 and 0.02,
    # the "replacement" bias of DDRM; the prior mean is off by more than that)
    error = (x.mean(0) - exact.means[0])[~mask].abs()
    prior_error = (prior.mean - exact.means[0])[~mask].abs()
    assert bool((error < 0.4).all()) and float(error.sum()) < float(prior_error.sum()), error
    x = _run(model, DDS(), {"y": y}, 500).values["x"][0]
    # DDS ends on the CG solution of A^T A x = A^T y from x0_hat: exact for a mask (measured 0.0)
    torch.testing.assert_close(x[:, mask], y.expand(500, 2), atol=1e-10, rtol=0)
    # DiffPIR's proximal step with noiseless data is the projection onto {Ax = y} (measured 0.0)
    x = _run(model, DiffPIR(), {"y": y}, 500).values["x"][0]
    torch.testing.assert_close(x[:, mask], y.expand(500, 2), atol=1e-10, rtol=0)


def _masked_mixture():
    """The 2-D mixture of :func:`_mixture` with its first coordinate observed exactly at -1.5:
    the exact posterior puts weights 0.58 and 0.42 on two modes along the free coordinate."""
    prior = GaussianMixture(
        torch.tensor([0.3, 0.5, 0.2], dtype=DTYPE),
        torch.tensor([[1.54, -0.29], [-2.18, 0.57], [-1.09, -1.40]], dtype=DTYPE),
        0.25 * torch.eye(2, dtype=DTYPE).expand(3, 2, 2),
    )
    operator = operators.Mask(torch.tensor([True, False]))
    y = torch.tensor([-1.5], dtype=DTYPE)
    exact = prior.posterior(operator, y, torch.tensor(0.0, dtype=DTYPE))
    return gaussian_model(prior, operator, 0.0), exact, y


@pytest.mark.parametrize(
    "engine, band",
    [
        # measured SW over seeds 0, 1, 2: 0.054, 0.067, 0.065 (the noise floor of 1000 against
        # 1000 draws is 0.04-0.07; the prior is at 1.08)
        (ScoreSDE(), (0.0, 0.12)),
        # 0.199, 0.237, 0.147: the projection alone (replacement) misweighs the two modes
        (MCG(scale=0.0), (0.05, 0.35)),
        # 1.294, 1.285, 1.298: at the official scale 1, tuned on 256x256x3 images, the
        # unnormalised gradient step overshoots in two dimensions: further than the prior
        (MCG(), (1.1, 1.5)),
    ],
    ids=lambda value: getattr(value, "name", None) if not isinstance(value, tuple) else None,
)
def test_projection_engines_on_a_noiseless_mask(engine, band):
    model, exact, y = _masked_mixture()
    reference = exact.sample((1000,), generator=torch.Generator().manual_seed(1))
    x = _run(model, engine, {"y": y}, 1000).values["x"][0]
    distance = float(sliced_wasserstein(x, reference))
    assert band[0] < distance < band[1], distance
    # the last projection, at t = 0 with weight 1, puts every draw on {x_0 = y} (measured 0.0)
    torch.testing.assert_close(x[:, 0], y.expand(1000), atol=1e-12, rtol=0)


class _WithoutSVD(LinearOperator):
    """A linear operator that hides its SVD (engines fall back to CG or refuse)."""

    def __init__(self, inner):
        super().__init__(tuple(inner.in_shape), tuple(inner.out_shape))
        self.inner = inner

    def _forward(self, x):
        return self.inner._forward(x)

    def _adjoint(self, y):
        return self.inner._adjoint(y)


@pytest.mark.parametrize("sigma", [0.3, 0.0])
def test_pigdm_conjugate_gradient_matches_the_svd_closed_form(sigma):
    g = torch.Generator().manual_seed(2)
    prior = Gaussian(torch.randn(4, generator=g, dtype=DTYPE), torch.eye(4, dtype=DTYPE))
    matrix = operators.Matrix(torch.randn(2, 4, generator=g, dtype=DTYPE))
    y = torch.randn(2, generator=g, dtype=DTYPE)
    engine = PiGDM(num_steps=30)
    with_svd = _run(gaussian_model(prior, matrix, sigma), engine, {"y": y}, 50)
    with_cg = _run(gaussian_model(prior, _WithoutSVD(matrix), sigma), engine, {"y": y}, 50)
    # measured difference 2e-15 (CG solves the 2x2 systems exactly)
    torch.testing.assert_close(with_cg.values["x"], with_svd.values["x"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("engine", [MCG(num_steps=20), ScoreSDE(num_steps=20)], ids=str)
def test_projection_by_conjugate_gradients_matches_the_svd_closed_form(engine):
    g = torch.Generator().manual_seed(2)
    prior = Gaussian(torch.randn(4, generator=g, dtype=DTYPE), torch.eye(4, dtype=DTYPE))
    matrix = operators.Matrix(torch.randn(2, 4, generator=g, dtype=DTYPE))
    y = torch.randn(2, generator=g, dtype=DTYPE)
    with_svd = _run(gaussian_model(prior, matrix, 0.0), engine, {"y": y}, 50)
    with_cg = _run(gaussian_model(prior, _WithoutSVD(matrix), 0.0), engine, {"y": y}, 50)
    # A^+ by CG on the 2x2 normal equations (relative tolerance 1e-6): measured difference 4e-15
    torch.testing.assert_close(with_cg.values["x"], with_svd.values["x"], atol=1e-6, rtol=0)


def test_dpps_draws_more_candidates_as_the_noise_falls():
    model, _, y = _gaussian()
    engine = DPPS(num_steps=10)
    result = _run(model, engine, {"y": y}, 8)
    counts = result.stats["candidates"][0]
    schedule = posterior.Problem.from_model(model, y=y).prior.schedule
    grid = posterior.engines.common.sampling_grid(schedule, 10)
    assert counts.tolist() == [float(candidate_count(schedule, t, 50)) for t in grid[:-1]]
    # 2 at the reference noise, 50 (1 - exp(-SNR)) near the data, 50 at t = 0
    assert counts[0] == 2 and counts[-1] > counts[0] and bool((counts.diff() >= 0).all())
    assert candidate_count(schedule, torch.tensor(0.0, dtype=DTYPE), 50) == 50


# ------------------------------------------------------------------- flow priors (rectified flow)


def _flow_mixture():
    """The 2-D mixture of :func:`_mixture` on the rectified-flow schedule: its velocity field
    :math:`\\hat\\epsilon - \\hat x_0` is exact."""
    prior = GaussianMixture(
        torch.tensor([0.3, 0.5, 0.2], dtype=DTYPE),
        torch.tensor([[1.54, -0.29], [-2.18, 0.57], [-1.09, -1.40]], dtype=DTYPE),
        0.25 * torch.eye(2, dtype=DTYPE).expand(3, 2, 2),
        schedule=RectifiedFlow(),
    )
    operator = operators.Matrix(torch.eye(2, dtype=DTYPE))
    y = torch.tensor([-0.3, -0.6], dtype=DTYPE)
    return gaussian_model(prior, operator, 0.5), prior.posterior(operator, y, 0.5), y


def test_flowdps_on_an_exact_flow_mixture():
    model, exact, y = _flow_mixture()
    reference = exact.sample((1000,), generator=torch.Generator().manual_seed(1))
    x = _run(model, FlowDPS(), {"y": y}, 1000).values["x"][0]
    # measured SW over seeds 0, 1, 2: 0.263, 0.259, 0.262 (DPS at 100 steps on this flow:
    # 0.40; DSG: 0.23-0.25; the prior: 1.08)
    # two-sided: the spread over seeds is 0.004; 1000 against 1000 exact draws alone give 0.04-0.07
    assert 0.15 < float(sliced_wasserstein(x, reference)) < 0.35


def test_flowchef_steers_every_draw_onto_the_data():
    """FlowChef fits the measurement, it does not sample the posterior: with y = x + noise its
    draws gather at y (measured over seeds 0, 1, 2: mean distance 0.0172, 0.0172, 0.0172, largest
    sd 0.0019, where the posterior has sds 0.45 and 0.59 and its mean is 0.37 from y)."""
    model, _, y = _flow_mixture()
    x = _run(model, FlowChef(), {"y": y}, 1000).values["x"][0]
    assert 0.01 < float((x - y).norm(dim=1).mean()) < 0.03
    assert float(x.std(0).max()) < 0.005


@pytest.mark.parametrize("name", ["FlowChef", "FlowDPS"])
def test_flow_engines_take_the_official_step_on_rectified_flow(name):
    """One step from t to s written as the official code does (``z0t = z - t v``, ``z1t = z +
    (1 - t) v``, v the velocity), against the engine's step."""
    model, _, y = _flow_mixture()
    problem = posterior.Problem.from_model(model, y=y)
    engine = FlowChef(num_steps=10) if name == "FlowChef" else FlowDPS(num_steps=10)
    state = engine.init(problem, 1, 64, torch.Generator().manual_seed(0))
    state = state._replace(step=3)
    (t, s), z = state.grid[3:5], state.particles
    velocity = problem.prior.denoiser.velocity(z, t)
    z0t, z1t = z - t * velocity, z + (1 - t) * velocity
    if name == "FlowChef":  # 2 s / m = gamma / |A|^2 on the mean squared residual
        expected = z + engine.step_size * (y - z0t) + (s - t) * velocity
    else:
        z0y = z0t
        for _ in range(3):
            z0y = z0y + (y - z0y)  # |A| = 1, step 1: one step reaches y
        z0y = (1 - t) * z0t + t * z0y
        noise = s.sqrt() * z1t + (1 - s).sqrt() * torch.randn(
            z.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE
        )
        expected = (1 - s) * z0y + s * noise
    moved, _ = engine.step(problem, state, torch.Generator().manual_seed(5))
    torch.testing.assert_close(moved.particles, expected, atol=1e-12, rtol=0)


def test_sitcom_stops_each_particle_at_the_noise_level():
    """The input optimisation runs until a particle's squared misfit is below sum_j (sigma_j +
    1e-3)^2, or for max_iterations steps; the network is called once per Adam step (NFE = VJP);
    with a noise level of 0.5 the early steps use all 30 iterations and the last ones few
    (measured per step: 30 at the first, 0.1 at the last)."""
    model, _, y = _gaussian()
    problem = posterior.Problem.from_model(model, y=y)
    engine = SITCOM()
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    t = torch.tensor(0.3, dtype=DTYPE)
    x0, misfit, iterations = engine.fitted_estimate(problem, x_t, t)
    floor = (0.5 + 1e-3) ** 2
    stopped = iterations < engine.max_iterations
    assert bool(stopped.any()) and bool((misfit[stopped] < floor).all())
    torch.testing.assert_close(misfit, ((y - problem.gaussian.operator(x0)) ** 2).sum(-1))
    result = _run(model, SITCOM(num_steps=20), {"y": y}, 32)
    assert result.info["nfe"] == result.info["vjp"] <= 20 * 30
    steps = result.stats["iterations"][0]
    assert float(steps[0]) == 30 and float(steps[-1]) < 5


# ----------------------------------------------------------------------------- non-linear, Poisson


def test_dps_and_dsg_solve_phase_retrieval():
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture(
        torch.full((3,), 1 / 3, dtype=DTYPE),
        torch.randn(3, 64, generator=g, dtype=DTYPE),
        0.05 * torch.eye(64, dtype=DTYPE).expand(3, 64, 64),
        event_shape=(8, 8),
    )
    x_true = prior.sample(generator=g)
    operator = operators.PhaseRetrieval((8, 8))
    y = operator(x_true[None])[0] + 0.05 * torch.randn(operator.out_shape, generator=g, dtype=DTYPE)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.05), obs=y)

    x = _run(model, DPS(num_steps=200, scale=1.0), {"y": y}, 64).values["x"][0]
    error = (x - x_true).flatten(1).norm(dim=1)
    residual = (operator(x) - y).flatten(1).norm(dim=1)
    # official phase-retrieval scale 1.0; measured medians: error 0.91 (prior mean 6.98, prior
    # draws 11.5); residual 0.74 (the noise alone gives 0.05 * 16 = 0.8; prior draws 5.2)
    assert float(error.median()) < 0.3 * float((prior.mean - x_true).norm())
    assert float(residual.median()) < 1.6
    # DSG at its defaults (100 steps): measured medians error 1.28, residual 0.96
    x = _run(model, DSG(), {"y": y}, 64).values["x"][0]
    assert float((x - x_true).flatten(1).norm(dim=1).median()) < 0.3 * float(
        (prior.mean - x_true).norm()
    )
    assert float((operator(x) - y).flatten(1).norm(dim=1).median()) < 1.6


def test_dps_and_dsg_with_a_poisson_likelihood():
    g = torch.Generator().manual_seed(1)
    prior = GaussianMixture(
        torch.full((3,), 1 / 3, dtype=DTYPE),
        2 * torch.randn(3, 16, generator=g, dtype=DTYPE),
        0.25 * torch.eye(16, dtype=DTYPE).expand(3, 16, 16),
    )
    x_true = prior.sample(generator=g)

    def rate(x):
        return 20 * torch.sigmoid(x)

    counts = torch.poisson(rate(x_true), generator=g)

    def model(counts=None):
        x = pyro.sample("x", prior)
        pyro.sample("counts", dist.Poisson(rate(x)).to_event(1), obs=counts)

    result = _run(model, DPS(num_steps=100), {"counts": counts}, 64)
    x = result.values["x"][0]
    # measured medians: error 3.67 (prior mean 10.2, prior draws 14.2); count residual 4.4
    # (prior draws 38.2)
    assert float((x - x_true).norm(dim=1).median()) < 0.55 * float((prior.mean - x_true).norm())
    assert float((counts - rate(x)).norm(dim=1).median()) < 10.0
    assert torch.isfinite(result.log_likelihood).all()
    assert result.stats["residual_norm"][0, -1] < result.stats["residual_norm"][0, 0]
    # DSG at its defaults: measured medians error 2.75, count residual 2.3
    result = _run(model, DSG(), {"counts": counts}, 64)
    x = result.values["x"][0]
    assert float((x - x_true).norm(dim=1).median()) < 0.55 * float((prior.mean - x_true).norm())
    assert float((counts - rate(x)).norm(dim=1).median()) < 10.0


# ----------------------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize(
    "engine, nfe, vjp",
    [
        (DPS(num_steps=5), 5, 5),
        (PiGDM(num_steps=5), 5, 5),
        (MMPS(num_steps=5), 5, 10),  # (cg_iterations + 1) VJPs per step
        (DDRM(num_steps=5), 5, 0),
        (DDS(num_steps=5), 5, 0),
        (DiffPIR(num_steps=5), 5, 0),
        (DSG(num_steps=5), 5, 5),
        (DSG(num_steps=6, interval=3), 6, 2),  # guided steps 0 and 3 only
        (SNIPS(num_steps=4, steps_per_level=2), 8, 0),
        (DPPS(num_steps=5), 5, 5),
        (MCG(num_steps=5), 5, 5),
        (ScoreSDE(num_steps=5), 10, 0),  # the corrector's and the predictor's NFE
        (FlowChef(num_steps=5), 5, 0),  # the gradient skips the network
        (FlowDPS(num_steps=5), 5, 0),
    ],
    ids=lambda value: getattr(value, "name", None) if not isinstance(value, int) else None,
)
def test_counts_statistics_and_determinism(engine, nfe, vjp):
    model, _, y = _gaussian()
    first = _run(model, engine, {"y": y}, 8, num_chains=3, seed=7)
    assert (first.info["nfe"], first.info["vjp"]) == (nfe, vjp)
    assert first.stats["t"].shape == (3, engine.num_steps)
    assert bool((first.stats["t"][:, 1:] < first.stats["t"][:, :-1]).all())
    if "residual_norm" in first.stats:
        assert first.stats["residual_norm"].shape == (3, engine.num_steps)
    again = _run(model, engine, {"y": y}, 8, num_chains=3, seed=7)
    torch.testing.assert_close(again.values["x"], first.values["x"], rtol=0, atol=0)


def _poisson_model():
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))

    def model(counts=None):
        x = pyro.sample("x", prior)
        pyro.sample("counts", dist.Poisson(x.exp()).to_event(1), obs=counts)

    return model, {"counts": torch.tensor([1.0, 2.0], dtype=DTYPE)}


def _nonlinear_model():
    prior = Gaussian(torch.zeros(16, dtype=DTYPE), torch.eye(16, dtype=DTYPE), event_shape=(4, 4))
    return gaussian_model(prior, operators.PhaseRetrieval((4, 4)), 0.1), {
        "y": torch.ones(8, 8, dtype=DTYPE)
    }


def _model_without_svd(sigma=0.1):
    prior = Gaussian(torch.zeros(3, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    operator = _WithoutSVD(operators.Matrix(torch.ones(2, 3, dtype=DTYPE)))
    return gaussian_model(prior, operator, sigma), {"y": torch.zeros(2, dtype=DTYPE)}


@pytest.mark.parametrize(
    "engine, build, message",
    [
        (DDRM(), _model_without_svd, r"DDRM needs a linear operator with an SVD.*_WithoutSVD"),
        (SNIPS(), _model_without_svd, r"SNIPS needs a linear operator with an SVD"),
        (
            DDRM(),
            _poisson_model,
            r"DDRM needs a GaussianObservation.*Poisson\.to_event\(1\) at site 'counts'",
        ),
        (PiGDM(), _poisson_model, r"PiGDM needs a GaussianObservation"),
        (MMPS(), _nonlinear_model, r"MMPS needs a linear operator"),
        (DDS(), _nonlinear_model, r"DDS needs a linear operator"),
        (DiffPIR(), _nonlinear_model, r"DiffPIR needs a linear operator"),
        (PiGDM(), _nonlinear_model, r"PiGDM needs a linear operator"),
        (MCG(), _nonlinear_model, r"MCG needs a linear operator"),
        (ScoreSDE(), _poisson_model, r"ScoreSDE needs a linear operator.*Poisson"),
        (DPPS(), _nonlinear_model, r"DPPS needs a linear operator"),
    ],
)
def test_engines_refuse_problems_they_cannot_handle(engine, build, message):
    model, observed = build()
    with pytest.raises(ValueError, match=message):
        _run(model, engine, observed, 4)


def test_svd_engines_need_one_noise_level_and_dps_an_observation():
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    sigma = torch.tensor([0.1, 0.2], dtype=DTYPE)
    model = gaussian_model(prior, operators.Identity((2,)), sigma)
    for engine in (DDRM(num_steps=2), SNIPS(num_steps=2)):
        with pytest.raises(ValueError, match="one noise level"):
            _run(model, engine, {"y": torch.zeros(2, dtype=DTYPE)}, 4)
    # MMPS takes a per-measurement noise level as a diagonal covariance
    assert torch.isfinite(
        _run(model, MMPS(num_steps=3), {"y": torch.zeros(2, dtype=DTYPE)}, 4).values["x"]
    ).all()

    def unobserved():
        pyro.sample("x", prior)

    with pytest.raises(ValueError, match="DPS needs a finite log-likelihood.*no observed site"):
        _run(unobserved, DPS(num_steps=2), {}, 4)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DPS(num_steps=0), "DPS: num_steps must be >= 1"),
        (lambda: DPS(scale=-1.0), "DPS: scale"),
        (lambda: DPS(scale=float("nan")), "DPS: scale"),
        (lambda: DPS(guidance="normalised"), "DPS: guidance must be"),
        (lambda: DDRM(eta=1.5), r"DDRM: eta must lie in \[0, 1\]"),
        (lambda: DDRM(eta_b=-0.1), "DDRM: eta_b"),
        (lambda: DDRM(eta_c=1.2), "DDRM: eta_c"),
        (lambda: PiGDM(eta=2.0), "PiGDM: eta"),
        (lambda: PiGDM(eta=True), "PiGDM: eta"),
        (lambda: PiGDM(guidance_weight=-1.0), "PiGDM: guidance_weight"),
        (lambda: PiGDM(data_variance=0.0), "PiGDM: data_variance"),
        (lambda: PiGDM(guidance="exact"), "PiGDM: guidance must be"),
        (lambda: MMPS(cg_iterations=0), "MMPS: cg_iterations"),
        (lambda: MMPS(cg_iterations=2.0), "MMPS: cg_iterations must be a positive integer"),
        (lambda: MMPS(eta=-0.5), "MMPS: eta"),
        (lambda: DDS(cg_iterations=0), "DDS: cg_iterations"),
        (lambda: DDS(gamma=0.0), "DDS: gamma"),
        (lambda: DDS(eta=1.1), "DDS: eta"),
        (lambda: DiffPIR(lambda_=0.0), "DiffPIR: lambda_ must be a positive number"),
        (lambda: DiffPIR(zeta=1.5), "DiffPIR: zeta must lie in"),
        (lambda: DiffPIR(cg_iterations=0), "DiffPIR: cg_iterations"),
        (lambda: DiffPIR(num_steps=0), "DiffPIR: num_steps"),
        (lambda: DSG(guidance_rate=1.5), "DSG: guidance_rate must lie in"),
        (lambda: DSG(interval=0), "DSG: interval must be a positive integer"),
        (lambda: DSG(eta=0.0), "DSG: eta must be > 0"),
        (lambda: DPPS(max_candidates=0), "DPPS: max_candidates must be a positive integer"),
        (lambda: DPPS(scale=float("nan")), "DPPS: scale must be finite"),
        (lambda: DPPS(scale=-0.5), "DPPS: scale must be a finite number >= 0"),
        (lambda: MCG(scale=-1.0), "MCG: scale must be a finite number >= 0"),
        (lambda: MCG(num_steps=0), "MCG: num_steps must be >= 1"),
        (lambda: ScoreSDE(snr=0.0), "ScoreSDE: snr must be a positive number"),
        (lambda: ScoreSDE(weight=1.5), r"ScoreSDE: weight must lie in \[0, 1\]"),
        (lambda: FlowChef(step_size=0.0), "FlowChef: step_size must be a positive number"),
        (lambda: FlowDPS(data_steps=0), "FlowDPS: data_steps must be a positive integer"),
        (lambda: FlowDPS(step_size=-1.0), "FlowDPS: step_size must be a positive number"),
        (lambda: SITCOM(max_iterations=0), "SITCOM: max_iterations must be a positive integer"),
        (lambda: SITCOM(learning_rate=0.0), "SITCOM: learning_rate must be a positive number"),
        (lambda: SITCOM(weight=-1.0), "SITCOM: weight must be a finite number >= 0"),
        (lambda: SNIPS(steps_per_level=0), "SNIPS: steps_per_level"),
        (lambda: SNIPS(step_lr=0.0), "SNIPS: step_lr"),
        (lambda: SNIPS(sigma_min=1.0, sigma_max=0.5), "SNIPS: needs 0 < sigma_min < sigma_max"),
    ],
)
def test_bad_hyperparameters_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_defaults_are_the_papers():
    assert (DPS().num_steps, DPS().scale, DPS().guidance) == (1000, 0.5, "paper")
    assert DPS(guidance="score").scale == 1.0 and DPS(scale=0.3, guidance="score").scale == 0.3
    assert (DDRM().num_steps, DDRM().eta, DDRM().eta_b, DDRM().eta_c) == (20, 0.85, 1.0, None)
    assert (PiGDM().num_steps, PiGDM().eta, PiGDM().guidance) == (100, 1.0, "score")
    assert (MMPS().num_steps, MMPS().cg_iterations) == (64, 1)
    assert (SNIPS().num_steps, SNIPS().steps_per_level, SNIPS().step_lr) == (500, 5, 3.3e-6)
    assert (DDS().num_steps, DDS().eta, DDS().cg_iterations, DDS().gamma) == (50, 0.85, 5, 1.0)
    assert (DiffPIR().num_steps, DiffPIR().lambda_, DiffPIR().zeta) == (100, 1.0, 0.1)
    assert (DSG().num_steps, DSG().guidance_rate, DSG().interval, DSG().eta) == (100, 0.2, 1, 1.0)
    assert (DPPS().num_steps, DPPS().scale, DPPS().max_candidates) == (1000, 1.0, 50)
    assert (MCG().num_steps, MCG().scale) == (1000, 1.0)
    assert (ScoreSDE().num_steps, ScoreSDE().snr, ScoreSDE().weight) == (1000, 0.206, 1.0)
    assert not ScoreSDE.independent_particles and MCG.independent_particles
    assert (FlowChef().num_steps, FlowChef().step_size) == (100, 1000 / 12288)
    assert (FlowDPS().num_steps, FlowDPS().data_steps, FlowDPS().step_size) == (28, 3, 1.0)
    sitcom = SITCOM()
    assert (sitcom.num_steps, sitcom.max_iterations, sitcom.learning_rate, sitcom.weight) == (
        20,
        30,
        0.02,
        0.5,
    )


@pytest.mark.parametrize("sigma", [0.3, 0.0])
def test_the_closed_form_proximal_step_is_the_converged_conjugate_gradient_point(sigma):
    # DiffPIR's proximal step through the SVD (one noise level) against CG run to convergence
    # (relative tolerance 1e-6): the same point, noisy (weight 2.7) and noiseless (projection)
    from diffpost.posterior.engines.explicit.common import proximal_data_step

    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    prior = Gaussian(torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operators.Matrix(matrix), x, sigma), obs=y)

    y = torch.randn(3, generator=generator, dtype=torch.float64)
    problem = posterior.Problem.from_model(model, y=y)
    x0 = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    weight = None if sigma == 0 else torch.tensor(2.7, dtype=torch.float64)
    closed = proximal_data_step(problem, x0, weight, 500, closed_form=True)
    iterative = proximal_data_step(problem, x0, weight, 500)
    assert torch.allclose(closed, iterative, atol=1e-6, rtol=0)
    assert not torch.allclose(closed, x0, atol=1e-2)
