"""Several observed sites of one signal: a joint likelihood and, for linear Gaussian sites, the
stacked structure, checked against the closed-form posterior of the stacked problem."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianObservation, operators
from diffpost.models.priors import Gaussian

D = torch.float64
_generator = torch.Generator().manual_seed(2)
PRIOR = Gaussian(torch.zeros(4, dtype=D), torch.eye(4, dtype=D))
M1 = torch.randn(2, 4, dtype=D, generator=_generator)
M2 = torch.randn(1, 4, dtype=D, generator=_generator)
A1, A2 = operators.Matrix(M1), operators.Matrix(M2)
Y1 = torch.tensor([1.5, -0.5], dtype=D)
Y2 = torch.tensor([0.8], dtype=D)
STACKED = operators.Matrix(torch.cat([M1, M2]))
Y = torch.cat([Y1, Y2])


def two_sites(y1=None, y2=None, sigma2=0.5):
    """A blurred and a downsampled frame, say: two linear views of one signal."""
    x = pyro.sample("x", PRIOR)
    pyro.sample("y1", GaussianObservation(A1, x, 0.3), obs=y1)
    return pyro.sample("y2", GaussianObservation(A2, x, sigma2), obs=y2)


def exact(sigma2=0.5):
    sigma = torch.tensor([0.3, 0.3, sigma2], dtype=D)
    return PRIOR.posterior(STACKED, Y, sigma), PRIOR.log_evidence(STACKED, Y, sigma)


def _run(engine, num_particles, sigma2=0.5, **options):
    return posterior.sample(
        two_sites,
        engine,
        num_particles=num_particles,
        num_chains=2,
        seed=0,
        model_kwargs={"y1": Y1, "y2": Y2, "sigma2": sigma2},
        **options,
    )


def test_two_sites_read_as_one_stacked_structure():
    problem = posterior.Problem.from_model(two_sites, y1=Y1, y2=Y2)
    gaussian = problem.gaussian
    assert gaussian.site == "y1, y2" and isinstance(gaussian.operator, operators.Stack)
    torch.testing.assert_close(gaussian.operator.matrix(), STACKED.matrix())
    torch.testing.assert_close(gaussian.sigma, torch.tensor([0.3, 0.3, 0.5], dtype=D))
    torch.testing.assert_close(gaussian.y, Y)
    x = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    joint = GaussianObservation(A1, x, 0.3).log_prob(Y1) + GaussianObservation(A2, x, 0.5).log_prob(
        Y2
    )
    torch.testing.assert_close(problem.log_likelihood(x), joint)
    assert {"linear", "svd", "gaussian_observation"} <= problem.capabilities
    assert "sites y1, y2" in problem.describe_observation()
    # one noise level: a scalar sigma, which engines needing one noise level accept
    same = posterior.Problem.from_model(two_sites, y1=Y1, y2=Y2, sigma2=0.3)
    assert same.gaussian.sigma.shape == ()


def test_exact_on_two_sites_is_the_stacked_closed_form():
    """4000 exact draws: means within 4.5 standard errors (posterior sd <= 0.9: 0.064); the
    evidence exactly."""
    result = _run(posterior.Exact(), 2000)
    closed_form, evidence = exact()
    torch.testing.assert_close(result.mean(), closed_form.mean, atol=0.064, rtol=0)
    torch.testing.assert_close(result.log_evidence, evidence.expand(2))


@pytest.mark.parametrize(
    "engine, sigma2, bound",
    [
        (posterior.MCGDiff(num_steps=50), 0.3, 0.12),  # measured 0.04
        (posterior.FPS(num_steps=50), 0.3, 0.16),  # measured 0.08
        (posterior.DDRM(num_steps=50), 0.3, 0.1),  # measured 0.01
        (posterior.PiGDM(num_steps=50), 0.5, 0.1),  # measured 0.01 (0.14 with guidance="paper")
        (posterior.MMPS(num_steps=50), 0.5, 0.23),  # measured 0.15
        (posterior.DDS(num_steps=50), 0.5, 0.22),  # measured 0.13
        (posterior.DPS(num_steps=200), 0.5, 0.22),  # measured 0.14
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_engines_on_two_sites_approach_the_stacked_posterior(engine, sigma2, bound):
    """Largest coordinate error of the mean against the stacked closed form (2 x 1000
    particles, seed 0; measured value beside each bound). The bound is the measurement plus 4
    Monte Carlo standard errors (posterior sd <= 0.73 over 2000 draws: 0.02 each); an engine
    that ignored the second site would be 0.71-0.76 off."""
    result = _run(engine, 1000, sigma2=sigma2)
    closed_form, _ = exact(sigma2)
    gap = (result.mean() - closed_form.mean).abs().max()
    assert gap < bound, float(gap)


def test_engines_needing_one_noise_level_refuse_different_levels():
    with pytest.raises(ValueError, match="one noise level"):
        _run(posterior.MCGDiff(num_steps=5), 10)


def _gaussian_and_poisson(y1=None, y2=None):
    x = pyro.sample("x", PRIOR)
    pyro.sample("y1", GaussianObservation(A1, x, 0.3), obs=y1)
    return pyro.sample("y2", dist.Poisson(torch.exp(A2(x))).to_event(1), obs=y2)


def test_a_non_gaussian_second_site_gives_a_joint_likelihood_without_structure():
    problem = posterior.Problem.from_model(_gaussian_and_poisson, y1=Y1, y2=torch.ones(1, dtype=D))
    assert problem.gaussian is None and "finite_likelihood" in problem.capabilities
    x = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    joint = GaussianObservation(A1, x, 0.3).log_prob(Y1) + dist.Poisson(torch.exp(A2(x))).to_event(
        1
    ).log_prob(torch.ones(1, dtype=D))
    torch.testing.assert_close(problem.log_likelihood(x), joint)
    with pytest.raises(ValueError, match="MCGDiff needs"):
        posterior.sample(
            _gaussian_and_poisson,
            posterior.MCGDiff(num_steps=2),
            num_particles=4,
            model_kwargs={"y1": Y1, "y2": torch.ones(1, dtype=D)},
        )


def test_stack_operator_adjoint_and_svd():
    stack = operators.Stack(A1, A2)
    assert isinstance(stack, operators.LinearStack) and stack.out_shape == (3,)
    operators.check_adjoint(stack)
    svd = stack.svd()
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(svd.apply(x, 3), stack(x))
    with pytest.raises(ValueError, match="in_shape"):
        operators.Stack(A1, operators.Matrix(torch.ones(2, 3, dtype=D)))
