r"""Tests for models.denoisers against an analytic Gaussian prior.

The prior is :math:`x_0 \sim \mathcal N(\mu, \mathrm{diag}(s^2))` on an event of shape ``(2, 2)``
(4-D; a diagonal covariance also catches coordinates being mixed up). Under any schedule,
:math:`x_t \sim \mathcal N(\alpha\mu, V)` with :math:`V = \alpha^2 s^2 + \sigma^2`, and

- :math:`E[x_0 \mid x_t] = \mu + \alpha s^2 / V \, (x_t - \alpha\mu)`,
- :math:`E[\epsilon \mid x_t] = \sigma / V \, (x_t - \alpha\mu)` (from :math:`\mathrm{Cov}(\epsilon,
  x_t) = \sigma I`, independently of the x0 formula),
- :math:`\nabla \log p_t(x_t) = -(x_t - \alpha\mu) / V`,
- the probability-flow velocity :math:`\dot\alpha E[x_0|x_t] + \dot\sigma E[\epsilon|x_t]`.

Each exact quantity is wrapped as a "network" in every parametrisation and the adapters must
return the exact Tweedie mean. float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import all_schedules

from diffpost.models.denoisers import (
    DiscreteDDPMDenoiser,
    EpsilonDenoiser,
    ScoreDenoiser,
    VDenoiser,
    VelocityDenoiser,
    X0Denoiser,
    broadcast_time,
)
from diffpost.models.schedules import VP, ddpm_linear_betas

F64 = torch.float64
EVENT = (2, 2)
MU = torch.tensor([[0.7, -1.3], [2.1, 0.2]], dtype=F64)
S = torch.tensor([[0.5, 1.7], [0.9, 1.1]], dtype=F64)
TIMES = [0.031, 0.2, 0.4537, 0.61, 0.83, 0.97]
N_TRAIN = 1000
RTOL = 1e-10


SCHEDULES = all_schedules()
NAMES = sorted(SCHEDULES)


def times_for(name: str) -> torch.Tensor:
    """One time per particle; for DiscreteVP strictly inside a segment (away from the knots)."""
    if name == "discrete_linear":
        return torch.tensor([(math.floor(u * N_TRAIN) + 0.41) / N_TRAIN for u in TIMES], dtype=F64)
    return torch.tensor(TIMES, dtype=F64)


def per_sample(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, *(1,) * len(EVENT))


class GaussianOracle:
    """Exact conditional expectations of the Gaussian prior under ``schedule``."""

    def __init__(self, schedule):
        self.schedule = schedule

    def coefficients(self, t):
        alpha = per_sample(self.schedule.alpha(t))
        sigma = per_sample(self.schedule.sigma(t))
        return alpha, sigma, alpha**2 * S**2 + sigma**2

    def x0(self, x, t):
        alpha, _, variance = self.coefficients(t)
        return MU + alpha * S**2 / variance * (x - alpha * MU)

    def eps(self, x, t):
        alpha, sigma, variance = self.coefficients(t)
        return sigma / variance * (x - alpha * MU)

    def score(self, x, t):
        alpha, _, variance = self.coefficients(t)
        return -(x - alpha * MU) / variance

    def v(self, x, t):  # Salimans & Ho: v = alpha eps - sigma x0
        alpha, sigma, _ = self.coefficients(t)
        return alpha * self.eps(x, t) - sigma * self.x0(x, t)

    def velocity(self, x, t):
        alpha_dot = per_sample(self.schedule.alpha_derivative(t))
        sigma_dot = per_sample(self.schedule.sigma_derivative(t))
        return alpha_dot * self.x0(x, t) + sigma_dot * self.eps(x, t)

    def log_density(self, x, t):
        alpha, _, variance = self.coefficients(t)
        z = (x - alpha * MU) ** 2 / variance
        terms = -0.5 * (z + torch.log(2 * math.pi * variance))
        return terms.flatten(1).sum(1)

    def sample(self, t, generator):
        alpha, _, variance = self.coefficients(t)
        noise = torch.randn((t.shape[0], *EVENT), dtype=F64, generator=generator)
        return alpha * MU + variance.sqrt() * noise


def marginal_mean_and_variance(schedule, t):
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    return alpha * MU, alpha**2 * S**2 + sigma**2


def noisy_batch(name: str, seed: int = 0):
    schedule = SCHEDULES[name]
    oracle = GaussianOracle(schedule)
    t = times_for(name)
    x = oracle.sample(t, torch.Generator().manual_seed(seed))
    return schedule, oracle, x, t


ADAPTERS = {
    "eps": (EpsilonDenoiser, "eps"),
    "x0": (X0Denoiser, "x0"),
    "v": (VDenoiser, "v"),
    "score": (ScoreDenoiser, "score"),
    "velocity": (VelocityDenoiser, "velocity"),
}


def make_net(oracle, quantity: str, time_scale: float = 1.0, calls: list | None = None):
    def net(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        if calls is not None:
            calls.append(t.clone())
        return getattr(oracle, quantity)(x, t / time_scale)

    return net


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("name", NAMES)
def test_adapter_recovers_exact_x0(name, adapter):
    schedule, oracle, x, t = noisy_batch(name)
    cls, quantity = ADAPTERS[adapter]
    denoiser = cls(make_net(oracle, quantity), schedule)
    torch.testing.assert_close(denoiser(x, t), oracle.x0(x, t), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_oracle_parametrisations_are_consistent(name):
    # Guards the oracle itself: x_t = alpha E[x0|x_t] + sigma E[eps|x_t] holds exactly.
    schedule, oracle, x, t = noisy_batch(name)
    alpha, sigma, _ = oracle.coefficients(t)
    torch.testing.assert_close(
        alpha * oracle.x0(x, t) + sigma * oracle.eps(x, t), x, rtol=RTOL, atol=RTOL
    )


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_scalar_time_broadcasts(adapter):
    schedule, oracle, x, _ = noisy_batch("vp_cosine")
    cls, quantity = ADAPTERS[adapter]
    denoiser = cls(make_net(oracle, quantity), schedule)
    full = torch.full((x.shape[0],), 0.37, dtype=F64)
    expected = oracle.x0(x, full)
    torch.testing.assert_close(denoiser(x, 0.37), expected, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(
        denoiser(x, torch.tensor(0.37, dtype=F64)), expected, rtol=RTOL, atol=RTOL
    )


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_time_scale_is_applied(adapter):
    schedule, oracle, x, t = noisy_batch("vp_linear")
    cls, quantity = ADAPTERS[adapter]
    calls: list = []
    net = make_net(oracle, quantity, time_scale=1000.0, calls=calls)
    denoiser = cls(net, schedule, time_scale=1000.0)
    torch.testing.assert_close(denoiser(x, t), oracle.x0(x, t), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(calls[-1], 1000.0 * t, rtol=0, atol=0)
    unscaled = cls(net, schedule)  # forgetting the scale must give a wrong answer
    assert (unscaled(x, t) - oracle.x0(x, t)).abs().max() > 1e-3


# --------------------------------------------------------------------------- derived quantities


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("name", NAMES)
def test_epsilon_score_velocity_are_exact(name, adapter):
    schedule, oracle, x, t = noisy_batch(name, seed=1)
    cls, quantity = ADAPTERS[adapter]
    denoiser = cls(make_net(oracle, quantity), schedule)
    torch.testing.assert_close(denoiser.epsilon(x, t), oracle.eps(x, t), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(denoiser.velocity(x, t), oracle.velocity(x, t), rtol=RTOL, atol=RTOL)
    # The score against autograd of the exact log density of N(alpha mu, diag(V)).
    x_leaf = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(oracle.log_density(x_leaf, t).sum(), x_leaf)
    torch.testing.assert_close(denoiser.score(x, t), score, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_probability_flow_moves_marginal(name):
    """The ODE velocity transports p_t: d/dt mean = E[v], d/dt Var = 2 Cov(x, v).

    The exact velocity is affine in x, v(x) = m_v + C (x - alpha mu), so E[v] = v(alpha mu) and
    Cov(x_j, v_j) = C_jj V_j with C the Jacobian (diagonal here). Both sides are compared with
    central differences of the marginal mean and variance computed from alpha and sigma only.
    A first-order Euler step x - dt v(x) is also checked to map p_t to p_{t - dt} up to O(dt^2).
    """
    schedule = SCHEDULES[name]
    denoiser = X0Denoiser(make_net(GaussianOracle(schedule), "x0"), schedule)
    h = 1e-6
    for t_value in times_for(name).tolist():
        t = torch.tensor([t_value], dtype=F64)
        mean, variance = marginal_mean_and_variance(schedule, t)
        mean_velocity = denoiser.velocity(mean.unsqueeze(0), t)[0]
        jacobian = torch.autograd.functional.jacobian(
            lambda x, t=t: denoiser.velocity(x.unsqueeze(0), t)[0], mean.clone()
        ).reshape(4, 4)
        assert (jacobian - torch.diag(jacobian.diagonal())).abs().max() < 1e-12
        slope = jacobian.diagonal().reshape(EVENT)

        mean_plus, variance_plus = marginal_mean_and_variance(schedule, t + h)
        mean_minus, variance_minus = marginal_mean_and_variance(schedule, t - h)
        mean_rate = (mean_plus - mean_minus) / (2 * h)
        variance_rate = (variance_plus - variance_minus) / (2 * h)
        scale = max(1.0, float(variance.max()))
        torch.testing.assert_close(mean_velocity, mean_rate, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            2 * slope * variance, variance_rate, rtol=1e-6, atol=1e-7 * scale
        )

        # Euler step: the remainder is O(dt^2), so it must be a small fraction (here < 1 %) of
        # the O(dt) change of the marginal; a wrong sign or factor would be off by ~100 %.
        dt = 1e-6
        pushed_mean = mean - dt * mean_velocity
        pushed_variance = (1 - dt * slope) ** 2 * variance
        target_mean, target_variance = marginal_mean_and_variance(schedule, t - dt)
        for pushed, target, now in (
            (pushed_mean, target_mean, mean),
            (pushed_variance, target_variance, variance),
        ):
            change = (target - now).abs()
            # (+ a dt^2 term for coordinates whose variance is stationary, e.g. RF at t = 0.2)
            assert ((pushed - target).abs() <= 1e-2 * change + 1e2 * dt**2 * scale).all()


# --------------------------------------------------------------------------- discrete DDPM


def discrete_oracle_net(prediction: str, calls: list):
    """A DDPM net at integer steps n, built from alphas_cumprod[n] only (not from DiscreteVP)."""
    alphas_cumprod = torch.cumprod(1 - ddpm_linear_betas(N_TRAIN), 0)

    def net(x, n):
        assert n.dtype == torch.long and n.shape == (x.shape[0],)
        calls.append(n.clone())
        abar = per_sample(alphas_cumprod[n])
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        variance = alpha**2 * S**2 + sigma**2
        x0 = MU + alpha * S**2 / variance * (x - alpha * MU)
        eps = sigma / variance * (x - alpha * MU)
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction]

    return net, alphas_cumprod


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_discrete_ddpm_denoiser_on_grid(prediction):
    calls: list = []
    net, alphas_cumprod = discrete_oracle_net(prediction, calls)
    denoiser = DiscreteDDPMDenoiser(net, alphas_cumprod, prediction=prediction)
    steps = torch.tensor([0, 1, 99, 500, 998, 999])
    t = (steps + 1).to(F64) / N_TRAIN
    oracle = GaussianOracle(denoiser.schedule)
    x = oracle.sample(t, torch.Generator().manual_seed(3))
    x0 = denoiser(x, t)
    assert torch.equal(calls[-1], steps)
    # the exact x0 at the network's noise level bar-alpha = alphas_cumprod[n]
    abar = per_sample(alphas_cumprod[steps])
    variance = abar * S**2 + 1 - abar
    expected = MU + abar.sqrt() * S**2 / variance * (x - abar.sqrt() * MU)
    torch.testing.assert_close(x0, expected, rtol=RTOL, atol=RTOL)


def test_discrete_ddpm_step_index_rounds_to_nearest():
    calls: list = []
    net, alphas_cumprod = discrete_oracle_net("epsilon", calls)
    denoiser = DiscreteDDPMDenoiser(net, alphas_cumprod)
    t = torch.tensor(
        [0.0, 0.3e-3, 1.4e-3, (500 + 0.49) / N_TRAIN, (500 + 0.51) / N_TRAIN, 1.0], dtype=F64
    )
    assert torch.equal(denoiser.step_index(t), torch.tensor([0, 0, 0, 499, 500, 999]))
    grid_t = torch.arange(1, N_TRAIN + 1, dtype=F64) / N_TRAIN
    assert torch.equal(denoiser.step_index(grid_t), torch.arange(N_TRAIN))


def test_discrete_ddpm_invalid_prediction():
    with pytest.raises(ValueError):
        DiscreteDDPMDenoiser(lambda x, n: x, torch.cumprod(1 - ddpm_linear_betas(), 0), "score")


# --------------------------------------------------------------------------- errors


def wrong_shape_net(x, t):
    return x.flatten(1)[:, :3]


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_network_of_wrong_shape_raises(adapter):
    cls, _ = ADAPTERS[adapter]
    denoiser = cls(wrong_shape_net, VP())
    x = torch.zeros(3, *EVENT, dtype=F64)
    with pytest.raises(ValueError, match="shape"):
        denoiser(x, 0.5)
    # a (N, 1, 1) output would broadcast silently without the check
    broadcasting = cls(lambda x, t: x[:, :1, :1], VP())
    with pytest.raises(ValueError, match="shape"):
        broadcasting(x, 0.5)


def test_discrete_network_of_wrong_shape_raises():
    denoiser = DiscreteDDPMDenoiser(
        lambda x, n: x[:, :1, :1], torch.cumprod(1 - ddpm_linear_betas(), 0)
    )
    with pytest.raises(ValueError, match="shape"):
        denoiser(torch.zeros(3, *EVENT, dtype=F64), 0.5)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_time_of_wrong_shape_raises(adapter):
    schedule, oracle, x, _ = noisy_batch("vp_linear")
    cls, quantity = ADAPTERS[adapter]
    denoiser = cls(make_net(oracle, quantity), schedule)
    for t in (
        torch.full((x.shape[0] + 1,), 0.5, dtype=F64),
        torch.full((x.shape[0], 1), 0.5, dtype=F64),
        torch.full((1,), 0.5, dtype=F64),
    ):
        with pytest.raises(ValueError, match="t must be"):
            denoiser(x, t)
        with pytest.raises(ValueError):
            denoiser.score(x, t)


def test_discrete_time_of_wrong_shape_raises():
    calls: list = []
    net, alphas_cumprod = discrete_oracle_net("epsilon", calls)
    denoiser = DiscreteDDPMDenoiser(net, alphas_cumprod)
    with pytest.raises(ValueError, match="t must be"):
        denoiser(torch.zeros(3, *EVENT, dtype=F64), torch.full((2,), 0.5, dtype=F64))


def test_broadcast_time_follows_x():
    x = torch.zeros(4, 3, dtype=F64)
    t = broadcast_time(0.25, x)
    assert t.shape == (4,) and t.dtype == F64 and (t == 0.25).all()


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        EpsilonDenoiser(lambda x, t: x, schedule="vp")
    with pytest.raises(ValueError):
        EpsilonDenoiser("not a network", VP())
    with pytest.raises(ValueError):
        DiscreteDDPMDenoiser("not a network", torch.cumprod(1 - ddpm_linear_betas(), 0))
