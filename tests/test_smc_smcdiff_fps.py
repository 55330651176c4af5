"""SMCDiff and FPS-SMC against closed forms (Gaussian and Gaussian-mixture priors).

Tolerances come from measured runs (fixed seeds, float64); the numbers are written beside each
assertion. Sliced Wasserstein distances use MANY chains and ONE weighted draw per chain, compared
with a large exact reference set; the noise floor is the mean distance of independent exact sets of
the same size to that reference (the floor is noisy for well-separated mixtures, hence the mean
over ten sets).
"""

import pytest
import torch
from helpers import gaussian_model

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models import Gaussian, GaussianMixture, operators
from diffpost.models.operators.nonlinear import PhaseRetrieval
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.models.schedules import VP
from diffpost.posterior.engines.common import sampling_grid
from diffpost.posterior.engines.smc.fps import FPS
from diffpost.posterior.engines.smc.smcdiff import SMCDiff

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these runs are many tiny tensor ops: on busy shared cores, intra-op threads only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_and_floor(exact, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    reference = exact.sample((20000,), generator=g)
    floor = (
        sum(sliced_wasserstein(exact.sample((size,), generator=g), reference) for _ in range(10))
        / 10
    )
    return reference, floor


# ----------------------------------------------------------------------------- SMCDiff


def _inpainting_mixture():
    """2-D mixture; the observed coordinate favours the rare, narrow component (prior 0.1,
    posterior 0.52), which replacement alone misses: SMC weights are essential here."""
    prior = GaussianMixture(
        torch.tensor([0.9, 0.1], dtype=DTYPE),
        torch.tensor([[0.0, -3.0], [1.5, 3.0]], dtype=DTYPE),
        torch.stack([torch.eye(2, dtype=DTYPE) * v for v in (1.0, 0.1)]),
        VP(),
    )
    operator = operators.Mask(torch.tensor([True, False]))
    y = torch.tensor([1.5], dtype=DTYPE)
    return prior, operator, y


def test_smcdiff_pins_the_observed_coordinates_exactly():
    prior = Gaussian(torch.zeros(4, dtype=DTYPE), torch.eye(4, dtype=DTYPE), VP())
    mask = torch.tensor([True, False, True, False])
    operator = operators.Mask(mask)
    y = torch.tensor([0.7, -1.3], dtype=DTYPE)
    result = posterior.sample(
        gaussian_model(prior, operator, 0.0),
        SMCDiff(num_steps=20),
        num_particles=8,
        num_chains=3,
        seed=0,
        progress=False,
        model_kwargs={"y": y},
    )
    x = result.values["x"]
    assert torch.equal(x[..., mask], y.expand(3, 8, 2))
    assert torch.isfinite(x).all() and result.log_evidence.shape == (3,)


def test_smcdiff_approaches_the_exact_posterior_as_particles_grow():
    prior, operator, y = _inpainting_mixture()
    exact = prior.posterior(operator, y, 0.0)
    chains = 500
    reference, floor = _reference_and_floor(exact, chains)
    model = gaussian_model(prior, operator, 0.0)
    distances, evidences = {}, {}
    for n in (16, 256):
        result = posterior.sample(
            model,
            SMCDiff(num_steps=100),
            num_particles=n,
            num_chains=chains,
            seed=0,
            progress=False,
            model_kwargs={"y": y},
        )
        distances[n] = sliced_wasserstein(result.one_draw_per_chain(seed=0)["x"], reference)
        evidences[n] = float(result.log_evidence.mean())
    # measured (seeds 0, 1, 2): floor 0.24 (single sets 0.13-0.41); N=16: 0.92, 1.06, 0.99;
    # N=256: 0.53, 0.74, 0.44, i.e. 2-3x the floor. The remainder is the 100-step Gaussian kernel
    # not being the exact reversal (N=1024 gives the same; 200 steps halve it), as the theory says.
    assert distances[256] < 0.7 * distances[16]
    assert distances[256] < 4.0 * floor
    # log-evidence under the exact-reversal assumption: exact -1.416; measured -1.521 (N=16) and
    # -1.448 (N=256), sd over chains 0.15 at N=256 (SE 0.007): a step bias of ~0.03
    exact_evidence = float(prior.log_evidence(operator, y, 0.0))
    assert abs(evidences[256] - exact_evidence) < 0.1
    assert abs(evidences[256] - exact_evidence) < abs(evidences[16] - exact_evidence)


def test_smcdiff_evidence_matches_the_gaussian_closed_form():
    prior = Gaussian(
        torch.tensor([0.5, -1.0], dtype=DTYPE),
        torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=DTYPE),
        VP(),
    )
    operator = operators.Mask(torch.tensor([True, False]))
    y = torch.tensor([1.2], dtype=DTYPE)
    result = posterior.sample(
        gaussian_model(prior, operator, 0.0),
        SMCDiff(num_steps=100),
        num_particles=256,
        num_chains=50,
        seed=0,
        progress=False,
        model_kwargs={"y": y},
    )
    exact = prior.posterior(operator, y, 0.0)
    x, w = result.values["x"][..., 1], result.log_weights.exp()
    mean = (w * x).sum(1).mean()
    variance = (w * (x - mean) ** 2).sum(1).mean()
    # measured: mean -0.599 (exact -0.580), variance 0.443 (exact 0.440), log-evidence -1.168
    # (exact -1.164, sd over chains 0.047). With variance="small" (DDPM posterior variance in the
    # weights) the same run gives variance 0.68 and log-evidence -13: see the module docstring.
    assert abs(float(mean) - float(exact.means[0, 1])) < 0.06
    assert abs(float(variance) / float(exact.covariances[0, 1, 1]) - 1) < 0.1
    assert (
        abs(float(result.log_evidence.mean()) - float(prior.log_evidence(operator, y, 0.0))) < 0.05
    )


# ----------------------------------------------------------------------------- FPS


def test_fps_is_close_to_the_exact_posterior_on_the_mixture_benchmark():
    problem = gaussian_mixture_benchmark(8, 2, seed=3)
    exact = problem.exact_posterior()
    chains = 500
    reference, floor = _reference_and_floor(exact, chains)
    distances = {}
    for n in (1, 64):
        result = posterior.sample(
            problem.model,
            FPS(num_steps=100),
            num_particles=n,
            num_chains=chains,
            seed=1,
            progress=False,
            model_kwargs=problem.model_kwargs,
        )
        assert result.log_evidence is None  # the auxiliary model's constant is not p(y)
        distances[n] = sliced_wasserstein(result.one_draw_per_chain(seed=0)["x"], reference)
    # measured: floor 0.42 (single sets 0.22-0.59); FPS with one particle 4.6, FPS-SMC with 64
    # particles 1.36 = 3.3x the floor. FPS-SMC is not asymptotically exact (see fps.py): its DDIM(c)
    # prior kernel alone loses ~40% of the variance at c = 0.95, so the floor is not reached.
    assert distances[64] < 0.5 * distances[1]
    assert distances[64] < 5.0 * floor


def _gaussian_problem(sigma):
    g = torch.Generator().manual_seed(0)
    prior = Gaussian(
        torch.randn(3, generator=g, dtype=DTYPE), torch.eye(3, dtype=DTYPE) * 2.0, VP()
    )
    operator = operators.Matrix(torch.randn(2, 3, generator=g, dtype=DTYPE))
    y = torch.randn(2, generator=g, dtype=DTYPE)
    return prior, operator, y


def _ddim_c_variance_factor(schedule, num_steps, c, v):
    """Variance of the DDIM(c) chain with the exact Tweedie denoiser of N(0, v), over v (from N(0,
    1))."""
    grid = sampling_grid(schedule, num_steps)
    variance = 1.0
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        a_t, s_t, a_s, s_s = (
            schedule.alpha(t),
            schedule.sigma(t),
            schedule.alpha(s),
            schedule.sigma(s),
        )
        gain = a_t * v / (a_t**2 * v + s_t**2)
        coefficient = a_s * gain + (1 - c) ** 0.5 * s_s * (1 - a_t * gain) / s_t
        variance = coefficient**2 * variance + c * s_s**2
    return float(variance / v)


def test_fps_mean_and_variance_on_a_gaussian_prior():
    prior, operator, y = _gaussian_problem(0.5)
    exact = prior.posterior(operator, y, 0.5)
    result = posterior.sample(
        gaussian_model(prior, operator, 0.5),
        FPS(num_steps=100),
        num_particles=64,
        num_chains=200,
        seed=0,
        progress=False,
        model_kwargs={"y": y},
    )
    x = result.values["x"].reshape(-1, 3)
    sd = torch.diagonal(exact.covariances[0]).sqrt()
    ratio = x.var(0) / sd**2
    # measured: mean errors (-0.058, -0.056, 0.093) = (0.05, 0.14, 0.14) posterior sd; variance
    # ratios (0.58, 0.19, 0.51): FPS-SMC is markedly overconfident (kernel loss x conditioning on
    # one path as if its noises were independent); the assertion records that, it is not a goal.
    assert ((x.mean(0) - exact.means[0]).abs() / sd).max() < 0.3
    assert bool(((ratio > 0.1) & (ratio < 0.9)).all())

    # an uninformative observation isolates the prior kernel: the engine's variance matches the
    # DDIM(c) recursion computed by hand (0.584 of the prior's), measured (0.579, 0.582, 0.600)
    prior, operator, y = _gaussian_problem(50.0)
    result = posterior.sample(
        gaussian_model(prior, operator, 50.0),
        FPS(num_steps=100),
        num_particles=64,
        num_chains=200,
        seed=0,
        progress=False,
        model_kwargs={"y": y},
    )
    exact = prior.posterior(operator, y, 50.0)
    ratio = result.values["x"].reshape(-1, 3).var(0) / torch.diagonal(exact.covariances[0])
    expected = _ddim_c_variance_factor(prior.schedule, 100, 0.95, 2.0)
    assert abs(expected - 0.584) < 0.005
    assert ((ratio / expected - 1).abs() < 0.1).all()


# ----------------------------------------------------------------------------- refusals


def _refusal_model(operator, sigma, d=3, event_shape=None):
    prior = Gaussian(
        torch.zeros(d, dtype=DTYPE), torch.eye(d, dtype=DTYPE), VP(), event_shape=event_shape
    )
    return gaussian_model(prior, operator, sigma)


@pytest.mark.parametrize(
    "engine, operator, sigma, message",
    [
        (
            SMCDiff(num_steps=5),
            operators.Matrix(torch.ones(2, 3, dtype=DTYPE)),
            0.0,
            "a Mask operator",
        ),
        (
            SMCDiff(num_steps=5),
            operators.Mask(torch.tensor([True, False, True])),
            0.1,
            "a noiseless observation",
        ),
        (
            FPS(num_steps=5),
            operators.Matrix(torch.ones(2, 3, dtype=DTYPE)),
            0.0,
            "a finite log-likelihood",
        ),
        (
            FPS(num_steps=5),
            operators.Mask(torch.tensor([True, False, True])),
            0.0,
            "a finite log-likelihood",
        ),
    ],
)
def test_engines_refuse_problems_they_cannot_handle(engine, operator, sigma, message):
    y = torch.zeros(2, dtype=DTYPE)
    with pytest.raises(ValueError, match=message) as error:
        posterior.sample(
            _refusal_model(operator, sigma),
            engine,
            num_particles=4,
            seed=0,
            progress=False,
            model_kwargs={"y": y},
        )
    assert type(engine).__name__ in str(error.value)


def test_fps_refuses_a_nonlinear_operator():
    operator = PhaseRetrieval((2, 2), oversampling=2.0)
    y = torch.zeros(operator.out_shape, dtype=DTYPE)
    with pytest.raises(ValueError, match="FPS needs a linear operator"):
        posterior.sample(
            _refusal_model(operator, 0.1, d=4, event_shape=(2, 2)),
            FPS(num_steps=5),
            num_particles=4,
            seed=0,
            progress=False,
            model_kwargs={"y": y},
        )


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: SMCDiff(num_steps=0), "num_steps"),
        (lambda: SMCDiff(num_steps=2.5), "num_steps"),
        (lambda: SMCDiff(resampling="bogus"), "resampling"),
        (lambda: SMCDiff(ess_threshold=1.5), "ess_threshold"),
        (lambda: SMCDiff(ess_threshold="half"), "ess_threshold"),
        (lambda: SMCDiff(departure=-0.1), "departure"),
        (lambda: SMCDiff(variance="medium"), "variance"),
        (lambda: FPS(num_steps=0), "num_steps"),
        (lambda: FPS(c_rate=0.0), "c_rate"),
        (lambda: FPS(c_rate=1.5), "c_rate"),
        (lambda: FPS(resampling="bogus"), "resampling"),
        (lambda: FPS(ess_threshold=-0.1), "ess_threshold"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_engine_and_field(build, field):
    with pytest.raises(ValueError, match=field) as error:
        build()
    assert str(error.value).split(":")[0] in ("SMCDiff", "FPS")


def test_defaults_follow_the_papers_and_code():
    assert (
        SMCDiff().num_steps == 1000
        and SMCDiff().resampling == "residual"
        and SMCDiff().departure == 0.75
    )
    assert FPS().c_rate == 0.95 and FPS().resampling == "multinomial" and FPS().ess_threshold == 1.0
