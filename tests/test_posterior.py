"""The inference spine: Problem.from_model, the driver, the Exact engine and ParticleSet."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models import Gaussian, GaussianMixture, GaussianObservation, operators
from diffpost.models.denoisers import EpsilonDenoiser
from diffpost.models.priors import DiffusionPrior
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.models.schedules import VP
from diffpost.posterior.engines.base import Engine

DTYPE = torch.float64


def _gaussian_problem(sigma=0.5, d=3, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = Gaussian(torch.randn(d, generator=g, dtype=DTYPE), torch.eye(d, dtype=DTYPE) * 2.0)
    operator = operators.Matrix(torch.randn(m, d, generator=g, dtype=DTYPE))
    y = torch.randn(m, generator=g, dtype=DTYPE)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    return model, prior, operator, y


# ----------------------------------------------------------------------------- Problem


def test_problem_reads_the_model_without_running_the_prior_sampler():
    calls = []

    class CountingDenoiser(EpsilonDenoiser):
        def forward(self, x_t, t):
            calls.append(1)
            return super().forward(x_t, t)

    prior = DiffusionPrior(CountingDenoiser(lambda x, t: torch.zeros_like(x), VP()), (4,))
    assert calls == [1]  # the construction's one check that the network takes the shape
    calls.clear()
    operator = operators.Identity((4,))

    def model(y=None):
        x = pyro.sample("x", prior)
        pyro.deterministic("x_sum", x.sum(-1))
        return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)

    problem = posterior.Problem.from_model(model, y=torch.zeros(4))
    assert not calls
    assert problem.latent_name == "x" and problem.gaussian.site == "y"
    assert problem.capabilities == {"gaussian_observation", "linear", "svd", "finite_likelihood"}


def test_log_likelihood_and_gradient_match_the_closed_form():
    model, prior, operator, y = _gaussian_problem(sigma=0.5)
    problem = posterior.Problem.from_model(model, y=y)
    x = torch.randn(6, 3, dtype=DTYPE)
    residual = y - x @ operator.weight.T
    expected = -0.5 * (residual**2).sum(-1) / 0.25 - 2 * math.log(0.5 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(problem.log_likelihood(x), expected)
    torch.testing.assert_close(problem.grad_log_likelihood(x), residual @ operator.weight / 0.25)


def test_generic_observation_sites_and_factors_enter_the_likelihood():
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    counts = torch.tensor([3.0, 1.0], dtype=DTYPE)

    def model(counts=None):
        x = pyro.sample("x", prior)
        pyro.sample("counts", dist.Poisson(x.exp()).to_event(1), obs=counts)
        pyro.factor("penalty", -0.5 * (x**2).sum(-1))

    problem = posterior.Problem.from_model(model, counts=counts)
    assert problem.gaussian is None and problem.capabilities == {"finite_likelihood", "exact_prior"}
    x = torch.randn(5, 2, dtype=DTYPE)
    expected = dist.Poisson(x.exp()).to_event(1).log_prob(counts) - 0.5 * (x**2).sum(-1)
    torch.testing.assert_close(problem.log_likelihood(x), expected)
    grad = problem.grad_log_likelihood(x)
    torch.testing.assert_close(grad, counts - x.exp() - x)


def test_a_transformed_latent_has_no_gaussian_structure():
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    operator = operators.Identity((2,))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, 2 * x, 0.1), obs=y)

    problem = posterior.Problem.from_model(model, y=torch.zeros(2, dtype=DTYPE))
    assert problem.gaussian is None
    with pytest.raises(
        ValueError,
        match=r"Exact needs a GaussianObservation of the latent itself.*GaussianObservation "
        r"at site 'y' whose x is not the signal 'x' itself",
    ):
        problem.require(posterior.Exact())


def test_denoiser_calls_are_chunked_and_counted():
    seen = []
    model, prior, _, y = _gaussian_problem()
    inner = prior.denoiser.forward

    def spy(x_t, t):
        seen.append(x_t.shape[0])
        return inner(x_t, t)

    prior.denoiser.forward = spy
    problem = posterior.Problem.from_model(model, y=y, batch_size=4)
    x = torch.randn(10, 3, dtype=DTYPE)
    torch.testing.assert_close(problem.denoise(x, 0.3), inner(x, 0.3))
    assert seen == [4, 4, 2] and problem.nfe == 1
    t = torch.linspace(0.1, 0.9, 10, dtype=DTYPE)
    torch.testing.assert_close(problem.denoise(x, t), inner(x, t))
    assert problem.nfe == 2


def test_denoise_with_vjp_matches_the_gaussian_jacobian():
    model, prior, _, y = _gaussian_problem()
    problem = posterior.Problem.from_model(model, y=y, batch_size=3)
    x_t = torch.randn(7, 3, dtype=DTYPE)
    t = 0.4
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    x0, grad = problem.denoise_with_vjp(x_t, t, lambda x0: x0 @ direction)
    schedule = prior.schedule
    alpha, sigma = float(schedule.alpha(torch.tensor(t))), float(schedule.sigma(torch.tensor(t)))
    # Gaussian prior N(mu, 2 I): E[x0 | x_t] is affine with Jacobian alpha 2 / (alpha^2 2 + sigma^2)
    # I
    jacobian = alpha * 2.0 / (alpha**2 * 2.0 + sigma**2)
    torch.testing.assert_close(grad, jacobian * direction.expand(7, 3))
    torch.testing.assert_close(x0, prior.denoise(x_t, t))
    assert problem.nfe == 1 and problem.vjp == 1


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda p: lambda y=None: pyro.sample("y", dist.Normal(0.0, 1.0), obs=y),
            "no DiffusionPrior",
        ),
        (
            lambda p: (
                lambda y=None: (
                    pyro.sample("a", p),
                    pyro.sample("b", p),
                    pyro.sample("c", p),
                )
            ),
            "3 DiffusionPrior sites .* at most two",
        ),
        (
            lambda p: (
                lambda y=None: (pyro.sample("x", p), pyro.sample("noise", dist.Bernoulli(0.5)))
            ),
            "latent site 'noise' .Bernoulli. is discrete",
        ),
    ],
)
def test_misdeclared_models_raise_naming_the_site(build, message):
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    with pytest.raises(ValueError, match=message):
        posterior.Problem.from_model(build(prior), y=torch.zeros(2, dtype=DTYPE))


@pytest.mark.parametrize(
    "y, message",
    [
        (
            torch.zeros(3, dtype=DTYPE),
            r"observed site 'y' has value of shape \(3,\).*expects \(2,\)",
        ),
        (torch.tensor([0.0, float("nan")], dtype=DTYPE), "observed site 'y' contains NaN or inf"),
        (torch.tensor([0.0, float("inf")], dtype=DTYPE), "observed site 'y' contains NaN or inf"),
    ],
)
def test_bad_observations_raise_before_sampling(y, message):
    model, *_ = _gaussian_problem()
    with pytest.raises(ValueError, match=message):
        posterior.sample(model, posterior.Exact(), num_particles=4, model_kwargs={"y": y})


def test_missing_observation_is_reported_as_a_latent_site():
    model, *_ = _gaussian_problem()
    with pytest.raises(ValueError, match=r"latent site 'y'.*model_kwargs"):
        posterior.Problem.from_model(model)


def test_negative_sigma_is_rejected():
    model, prior, operator, y = _gaussian_problem(sigma=-0.1)
    with pytest.raises(ValueError, match="sigma must be finite and non-negative"):
        posterior.Problem.from_model(model, y=y)


def test_noiseless_observation_has_no_likelihood_and_engines_that_need_one_are_refused():
    model, prior, operator, y = _gaussian_problem(sigma=0.0)
    problem = posterior.Problem.from_model(model, y=y)
    assert "noiseless" in problem.capabilities and "finite_likelihood" not in problem.capabilities
    with pytest.raises(ValueError, match="degenerate"):
        problem.log_likelihood(torch.zeros(2, 3, dtype=DTYPE))

    class NeedsLikelihood(Engine):
        requires = frozenset({"finite_likelihood"})

    with pytest.raises(ValueError, match=r"NeedsLikelihood needs a finite log-likelihood.*sigma=0"):
        posterior.sample(model, NeedsLikelihood(), num_particles=2, model_kwargs={"y": y})


def test_exact_refuses_a_learned_prior_naming_what_is_missing():
    prior = DiffusionPrior(EpsilonDenoiser(lambda x, t: torch.zeros_like(x), VP()), (2,))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operators.Identity((2,)), x, 0.1), obs=y)

    with pytest.raises(ValueError, match="Exact needs a Gaussian or GaussianMixture prior"):
        posterior.sample(
            model, posterior.Exact(), num_particles=2, model_kwargs={"y": torch.zeros(2)}
        )


# ----------------------------------------------------------------------------- driver + Exact


def test_exact_engine_is_at_the_noise_floor_on_the_benchmark():
    problem = gaussian_mixture_benchmark(8, 2, seed=1)
    result = posterior.sample(
        problem.model,
        posterior.Exact(),
        num_particles=2000,
        num_chains=2,
        seed=0,
        model_kwargs=problem.model_kwargs,
    )
    draws = result.get_samples()["x"]
    exact = problem.exact_posterior()
    reference = exact.sample((4000,), generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(
        exact.sample((4000,), generator=torch.Generator().manual_seed(2)), reference
    )
    distance = sliced_wasserstein(draws, reference)
    # both are SW between independent exact sets of 4000: they agree within sampling noise
    # (measured 0.148 vs 0.151 here); 1.5x allows for that noise, a wrong posterior is > 1.
    assert distance < 1.5 * floor
    expected = problem.prior.log_evidence(problem.operator, problem.y, problem.sigma)
    torch.testing.assert_close(result.log_evidence, expected.expand(2))


def test_particle_set_shapes_info_and_determinism():
    model, prior, operator, y = _gaussian_problem()

    def run(seed):
        return posterior.sample(
            model,
            posterior.Exact(),
            num_particles=50,
            num_chains=3,
            seed=seed,
            model_kwargs={"y": y},
        )

    first, second, other = run(7), run(7), run(8)
    assert first.values["x"].shape == (3, 50, 3) and first.values["x"].dtype == DTYPE
    assert torch.equal(first.values["x"], second.values["x"])
    assert not torch.equal(first.values["x"], other.values["x"])
    assert first.log_weights.shape == (3, 50) and first.log_likelihood.shape == (3, 50)
    torch.testing.assert_close(first.log_weights.logsumexp(-1), torch.zeros(3, dtype=DTYPE))
    torch.testing.assert_close(first.ess(), torch.full((3,), 50.0, dtype=DTYPE))
    assert (
        first.info["engine"] == "Exact"
        and first.info["seed"] == 7
        and first.info["num_chains"] == 3
    )
    assert first.info["config"] == {"num_steps": 0}
    assert torch.equal(first.observed["y"], y)
    torch.testing.assert_close(
        first.log_likelihood.flatten(),
        posterior.Problem.from_model(model, y=y).log_likelihood(first.values["x"].flatten(0, 1)),
    )


def test_weighted_mean_variance_and_equal_weight_draws():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=DTYPE)[..., None]  # (1 chain, 4 draws, 1)
    log_weights = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=DTYPE))
    result = posterior.ParticleSet({"x": values}, log_weights, info={"seed": 0, "latent_name": "x"})
    torch.testing.assert_close(result.mean(), torch.tensor([2.0], dtype=DTYPE))
    torch.testing.assert_close(result.var(), torch.tensor([1.0], dtype=DTYPE))
    torch.testing.assert_close(result.ess(), torch.tensor([1 / 0.3], dtype=DTYPE))
    draws = result.get_samples()["x"]
    assert draws.shape == (4, 1) and torch.equal(draws, result.get_samples()["x"])  # deterministic
    # systematic resampling of N = 4 with weights 0.1..0.4: counts differ from 4 W_i by < 1
    counts = torch.stack([(draws[:, 0] == v).sum() for v in range(4)]).to(DTYPE)
    assert torch.all((counts - 4 * torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE)).abs() < 1)


def test_save_load_and_concat(tmp_path):
    model, prior, operator, y = _gaussian_problem()
    a = posterior.sample(
        model, posterior.Exact(), num_particles=10, num_chains=2, seed=1, model_kwargs={"y": y}
    )
    b = posterior.sample(
        model, posterior.Exact(), num_particles=10, num_chains=1, seed=2, model_kwargs={"y": y}
    )
    a.save(tmp_path / "a.pt")
    loaded = posterior.ParticleSet.load(tmp_path / "a.pt")
    assert torch.equal(loaded.values["x"], a.values["x"]) and loaded.info == a.info
    joined = posterior.ParticleSet.concat([a, b])
    assert joined.values["x"].shape == (3, 10, 3) and joined.info["num_chains"] == 3
    assert torch.equal(joined.values["x"][2], b.values["x"][0])


def test_driver_rejects_bad_arguments():
    model, prior, operator, y = _gaussian_problem()
    kwargs = {"model_kwargs": {"y": y}}
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        posterior.sample(model, posterior.Exact(), num_particles=0, **kwargs)
    with pytest.raises(ValueError, match="num_chains must be a positive integer"):
        posterior.sample(model, posterior.Exact(), num_particles=3, num_chains=1.5, **kwargs)
    with pytest.raises(ValueError, match="engine must be a posterior engine"):
        posterior.sample(model, "exact", num_particles=3, **kwargs)
    with pytest.raises(ValueError, match="device"):
        posterior.sample(model, posterior.Exact(), num_particles=3, device="meta", **kwargs)
    with pytest.raises(ValueError, match="num_steps must be 0"):
        posterior.Exact(num_steps=3)


class _Drift(Engine):
    """A toy engine whose particles blow up at step 3 (to test the driver's loop and its checks)."""

    def init(self, problem, num_chains, num_particles, generator):
        from diffpost.posterior.engines.exact import ExactState

        particles = torch.zeros(
            (num_chains * num_particles,) + tuple(problem.event_shape), dtype=problem.dtype
        )
        log_weights = torch.full(
            (num_chains, num_particles), -math.log(num_particles), dtype=problem.dtype
        )
        return ExactState(particles, log_weights, None)

    def step(self, problem, state, generator):
        step = int(state.particles[0, 0]) + 1
        particles = state.particles + 1 if step < 3 else state.particles * float("inf")
        return state._replace(particles=particles), {
            "t": 1.0 - step / 10,
            "ess": torch.full((2,), 5.0),
        }


def test_driver_collects_statistics_calls_back_and_raises_engine_failed():
    model, prior, operator, y = _gaussian_problem()
    seen = []
    with pytest.raises(
        posterior.EngineFailed, match=r"_Drift failed at step 3 \(t = 0.7\): non-finite particles"
    ):
        posterior.sample(
            model,
            _Drift(num_steps=5),
            num_particles=5,
            num_chains=2,
            model_kwargs={"y": y},
            callback=lambda step, state, info: seen.append(step),
        )
    assert seen == [0, 1]
    result = posterior.sample(
        model, _Drift(num_steps=2), num_particles=5, num_chains=2, model_kwargs={"y": y}
    )
    assert result.stats["t"].shape == (2, 2) and result.stats["ess"].shape == (2, 2)
    torch.testing.assert_close(result.stats["t"][0], torch.tensor([0.9, 0.8]))
    assert result.log_evidence is None


class _BlowUpThenScore(_Drift):
    """A toy engine whose particles turn NaN at step 3 and are then scored by the likelihood."""

    def step(self, problem, state, generator):
        state, info = super().step(problem, state, generator)
        particles = torch.nan_to_num(state.particles, posinf=float("nan"))
        problem.log_likelihood(particles)
        return state._replace(particles=particles), info


def test_non_finite_particles_fail_before_reaching_the_model():
    # a Poisson site validates its rate: without the check, inf particles raised Pyro's
    # "Expected parameter rate ..." ValueError from inside the step instead of EngineFailed
    prior = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Poisson(torch.exp(x)).to_event(1), obs=y)

    with pytest.raises(posterior.EngineFailed, match=r"step 3: non-finite particles reached"):
        posterior.sample(
            model,
            _BlowUpThenScore(num_steps=5),
            num_particles=5,
            num_chains=2,
            model_kwargs={"y": torch.tensor([1.0, 2.0])},
        )


def test_float32_in_float32_out():
    prior = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operators.Identity((2,)), x, 0.3), obs=y)

    result = posterior.sample(
        model, posterior.Exact(), num_particles=4, seed=0, model_kwargs={"y": torch.ones(2)}
    )
    assert (
        result.values["x"].dtype == torch.float32 and result.log_likelihood.dtype == torch.float32
    )


def test_one_draw_per_chain_follows_the_weights():
    values = torch.arange(12, dtype=DTYPE).reshape(3, 4, 1)
    log_weights = torch.full((3, 4), -math.inf, dtype=DTYPE)
    log_weights[torch.arange(3), torch.tensor([2, 0, 3])] = 0.0  # all the weight on one particle
    result = posterior.ParticleSet({"x": values}, log_weights, info={"seed": 5, "latent_name": "x"})
    draws = result.one_draw_per_chain()["x"]
    assert draws.shape == (3, 1) and draws[:, 0].tolist() == [2.0, 4.0, 11.0]


def test_select_chains_keeps_every_per_chain_quantity_of_those_chains():
    model, prior, operator, y = _gaussian_problem()
    result = posterior.sample(
        model,
        posterior.MCGDiff(num_steps=5),
        num_particles=6,
        num_chains=4,
        seed=0,
        model_kwargs={"y": y},
    )
    picked = result.select_chains([3, 1])
    assert picked.num_chains == 2 and picked.info["num_chains"] == 2
    assert torch.equal(picked.values["x"], result.values["x"][[3, 1]])
    assert torch.equal(picked.log_weights, result.log_weights[[3, 1]])
    assert torch.equal(picked.log_evidence, result.log_evidence[[3, 1]])
    assert torch.equal(picked.stats["ess"], result.stats["ess"][[3, 1]])
    assert torch.equal(result.select_chains(2).values["x"], result.values["x"][2:3])
    with pytest.raises(ValueError, match=r"chains must lie in \[0, 4\); got \[4\]"):
        result.select_chains(4)
