"""The shared guidance helpers: Jacobian products of the denoiser, the Tweedie covariance, the data
residual, and their chunking and counting.

Closed forms: for a Gaussian prior :math:`\\mathcal{N}(\\mu, \\Sigma)` the denoiser is affine in
:math:`x_t` and :math:`\\operatorname{Cov}[x_0 \\mid x_t] = (\\Sigma^{-1} + (\\alpha_t^2 /
\\sigma_t^2) I)^{-1}`.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import gaussian_model
from torch import nn

from diffpost import posterior
from diffpost.models import (
    DiffusionPrior,
    Gaussian,
    GaussianMixture,
    GaussianObservation,
    operators,
)
from diffpost.models.denoisers import X0Denoiser
from diffpost.models.schedules import VP
from diffpost.posterior.engines.explicit import DPS, MMPS, PiGDM
from diffpost.posterior.guidance import (
    denoise_with_cotangent,
    denoise_with_jacobian,
    denoise_with_residual_gradient,
    measurement_inverse,
    observation_residual,
    prior_variance,
    residual_norm,
    tweedie_covariance_scale,
    tweedie_variance,
)

DTYPE = torch.float64


def _mixture_problem(batch_size=None):
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(2, 3, 3, generator=g, dtype=DTYPE)
    prior = GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=DTYPE),
        torch.randn(2, 3, generator=g, dtype=DTYPE),
        factor @ factor.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=DTYPE),
    )
    operator = operators.Matrix(torch.randn(2, 3, generator=g, dtype=DTYPE))
    y = torch.randn(2, generator=g, dtype=DTYPE)
    model = gaussian_model(prior, operator, 0.3)
    return posterior.Problem.from_model(model, y=y, batch_size=batch_size), prior, operator, y


def _dense_jacobians(prior, x_t, t):
    """``(n, d, d)``: the Jacobian of the denoiser at each particle (one at a time)."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda v: prior.denoise(v[None], t)[0], x) for x in x_t]
    )


def test_cotangent_products_match_the_dense_jacobian_and_are_chunked_and_counted():
    problem, prior, _, _ = _mixture_problem(batch_size=2)
    x_t = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    t = torch.tensor(0.4, dtype=DTYPE)
    x0, product = denoise_with_cotangent(problem, x_t, t, lambda x0: x0**2)
    jacobians = _dense_jacobians(prior, x_t, t)
    expected_x0 = prior.denoise(x_t, t)
    torch.testing.assert_close(x0, expected_x0)
    torch.testing.assert_close(product, torch.einsum("nij,ni->nj", jacobians, expected_x0**2))
    assert (problem.nfe, problem.vjp) == (1, 1)


def test_several_products_per_chunk_count_one_nfe_and_each_vjp():
    problem, prior, _, _ = _mixture_problem(batch_size=2)
    x_t = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    t = torch.tensor(0.7, dtype=DTYPE)
    w = torch.tensor([1.0, -1.0, 2.0], dtype=DTYPE)

    def apply(x0, vjp):
        once = vjp(w.expand_as(x0))
        return x0, vjp(once)  # J^T J^T w: two products at the same x_t

    x0, twice = denoise_with_jacobian(problem, x_t, t, apply)
    jacobians = _dense_jacobians(prior, x_t, t).transpose(-1, -2)
    expected = torch.einsum("nij,njk,k->ni", jacobians, jacobians, w)
    torch.testing.assert_close(twice, expected)
    assert (problem.nfe, problem.vjp) == (1, 2)
    # a single tensor out is returned as a tensor
    alone = denoise_with_jacobian(problem, x_t, t, lambda x0, vjp: x0)
    torch.testing.assert_close(alone, x0)
    assert (problem.nfe, problem.vjp) == (2, 2)


@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_tweedie_covariance_is_the_gaussian_posterior_covariance(t):
    g = torch.Generator().manual_seed(3)
    factor = torch.randn(3, 3, generator=g, dtype=DTYPE)
    covariance = factor @ factor.T + 0.2 * torch.eye(3, dtype=DTYPE)
    prior = Gaussian(torch.randn(3, generator=g, dtype=DTYPE), covariance, VP())
    t = torch.tensor(t, dtype=DTYPE)
    alpha, sigma = prior.schedule(t)
    exact = torch.linalg.inv(torch.linalg.inv(covariance) + (alpha / sigma) ** 2 * torch.eye(3))
    jacobian = _dense_jacobians(prior, torch.randn(1, 3, generator=g, dtype=DTYPE), t)[0]
    torch.testing.assert_close(tweedie_covariance_scale(prior.schedule, t) * jacobian, exact)
    # the isotropic case in closed form: tau^2 rho^2 / (tau^2 + rho^2), rho = sigma / alpha
    isotropic = 2.5 * (sigma / alpha) ** 2 / (2.5 + (sigma / alpha) ** 2)
    torch.testing.assert_close(tweedie_variance(prior.schedule, t, 2.5), isotropic)


def test_prior_variance_reads_a_mixture_and_falls_back_to_one():
    problem, prior, _, _ = _mixture_problem()
    assert prior_variance(problem) == pytest.approx(float(prior.variance.mean()))
    network_prior = DiffusionPrior(X0Denoiser(lambda x, t: 0 * x, VP()), (3,))
    model = gaussian_model(network_prior, operators.Identity((3,)), 0.1)
    assert prior_variance(posterior.Problem.from_model(model, y=torch.zeros(3))) == 1.0


def test_residual_of_gaussian_and_poisson_sites_and_its_gradient():
    problem, prior, operator, y = _mixture_problem()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    torch.testing.assert_close(observation_residual(problem, x), y - x @ operator.weight.T)

    counts = torch.tensor([3.0, 0.0, 5.0], dtype=DTYPE)

    def poisson_model(counts=None):
        x = pyro.sample("x", prior)
        pyro.sample("counts", dist.Poisson(x.exp()).to_event(1), obs=counts)

    poisson = posterior.Problem.from_model(poisson_model, counts=counts)
    torch.testing.assert_close(observation_residual(poisson, x), counts - x.exp())
    torch.testing.assert_close(residual_norm(poisson, x), (counts - x.exp()).norm(dim=1))

    # DPS's guidance is the chain rule through the denoiser: J^T grad_x0 ||y - E[y | x0]||
    x_t = x * 0.8
    t = torch.tensor(0.3, dtype=DTYPE)
    x0, norm, grad = denoise_with_residual_gradient(poisson, x_t, t)
    jacobians = _dense_jacobians(prior, x_t, t)
    inner = torch.func.vmap(torch.func.grad(lambda v: (counts - v.exp()).norm()))(x0)
    torch.testing.assert_close(grad, torch.einsum("nij,ni->nj", jacobians, inner))
    torch.testing.assert_close(norm, (counts - x0.exp()).norm(dim=1))


def test_residual_errors_name_the_site():
    prior = Gaussian(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))

    def with_factor(y=None):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)
        pyro.factor("penalty", -(x**2).sum(-1))

    problem = posterior.Problem.from_model(with_factor, y=torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="'penalty'"):
        observation_residual(problem, torch.zeros(3, 2, dtype=DTYPE))

    def not_batched(y=None):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.reshape(-1)[:2], 1.0).to_event(1), obs=y)

    problem = posterior.Problem.from_model(not_batched, y=torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="observed site 'y'.*leading particle dimension"):
        observation_residual(problem, torch.zeros(3, 2, dtype=DTYPE))


class _RecordingNetwork(nn.Module):
    """A tiny x0-prediction network that records the largest batch it sees with autograd on."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer = nn.Linear(dim + 1, dim)
        self.largest_graph_batch = 0

    def forward(self, x, t):
        if torch.is_grad_enabled():
            self.largest_graph_batch = max(self.largest_graph_batch, x.shape[0])
        return x + self.layer(torch.cat([x, t[:, None]], dim=1))


@pytest.mark.parametrize(
    "engine", [DPS(num_steps=1), PiGDM(num_steps=1), MMPS(num_steps=1, cg_iterations=2)]
)
def test_vjps_through_the_denoiser_are_chunked_by_batch_size(engine):
    torch.manual_seed(0)
    network = _RecordingNetwork(4)
    prior = DiffusionPrior(X0Denoiser(network, VP()), (4,))
    operator = operators.Matrix(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)

    result = posterior.sample(
        model,
        engine,
        num_particles=4096,
        batch_size=256,
        seed=0,
        progress=False,
        model_kwargs={"y": torch.ones(2)},
    )
    # 4096 particles never hold 4096 activations at once: one chunk of 256 at a time
    assert network.largest_graph_batch == 256
    assert result.info["vjp"] >= 1 and torch.isfinite(result.values["x"]).all()


def test_the_measurement_inverse_leaves_out_what_the_noise_swamps():
    """A 9-tap blur of a 16x16 image has singular values down to 1e-7: the plain pseudo-inverse
    of a noisy y reaches thousands; PiGDM and RED-diff start from the noise-truncated one."""
    shape = (1, 16, 16)
    blur = operators.Blur(shape, operators.gaussian_kernel(9, 2.0))
    sigma = 0.05
    prior = Gaussian(torch.zeros(256, dtype=DTYPE), torch.eye(256, dtype=DTYPE), event_shape=shape)
    x = torch.rand((1,) + shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE) - 0.5
    y = blur(x) + sigma * torch.randn(
        blur(x).shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE
    )

    def model(y=None):
        return pyro.sample("y", GaussianObservation(blur, pyro.sample("x", prior), sigma), obs=y)

    problem = posterior.Problem.from_model(model, y=y[0])
    start = measurement_inverse(problem, y)
    singular = blur.svd().singular_values
    kept = singular > sigma
    assert 0 < int(kept.sum()) < singular.numel()
    assert blur.pinv(y).abs().max() > 1e3  # what the engines started from before
    # the truncated inverse is the pseudo-inverse restricted to the kept directions: it explains
    # y there (residual only in the dropped directions and the noise) and stays at the data scale
    assert start.abs().max() < 3.0
    torch.testing.assert_close(start, blur.pinv(y, tol=sigma / float(singular.max())))
    noiseless = posterior.Problem.from_model(
        lambda y=None: pyro.sample(
            "y", GaussianObservation(blur, pyro.sample("x", prior), 0.0), obs=y
        ),
        y=y[0],
    )
    torch.testing.assert_close(measurement_inverse(noiseless, y), blur.pinv(y))
