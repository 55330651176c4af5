r"""FLAIR: flow-based variational posterior with hard data consistency (Erbach, Narnhofer, Dombos,
Schiele, Lenssen, Schindler; 2025).

A point estimate :math:`\mu` per particle (the variational family's zero-variance limit) walks a
descending list of flow times. At each time the flow's regulariser pulls :math:`\mu` towards the
clean estimate of a noised copy of itself, whose noise follows the trajectory (deterministic
trajectory adjustment), and the data term is then fitted down to the noise level by gradient
steps (official ``src/flair/var_post_samp.py``):

.. math::
    \tilde\epsilon &= a_t\, \hat\epsilon_1 + \sqrt{1 - a_t^2}\, z, \quad a_t = 1 - \rho_t, \qquad
    x_t = \alpha_t \mu + \sigma_t \tilde\epsilon, \qquad
    \hat x_0 = D(x_t, t), \quad \hat\epsilon_1 \leftarrow \hat\epsilon(x_t), \\
    \mu &\leftarrow \mu - \eta_r\, \frac{\lambda w_t}{\rho_t} (\mu - \hat x_0), \qquad
    \mu \leftarrow \mu + \frac{\eta_d\, \lambda w_t}{\lVert A \rVert^2} \cdot 2 J_A^\top
        \big(y - A(\mu)\big) \ \text{(at most } K \text{ times, until }
        \lVert y - A(\mu) \rVert^2 < \textstyle\sum_j \sigma_{y,j}^2),

with :math:`\rho_t = \sigma_t / (\alpha_t + \sigma_t)` the rectified-flow time. On the
:class:`~diffpost.models.schedules.RectifiedFlow` schedule the regulariser is the official
:math:`w_t (v_\theta(x_t) - (\tilde\epsilon - \mu))` (which equals :math:`(w_t / t)(\mu - \hat
x_0)`) with the network's Jacobian skipped (score distillation: one NFE, no VJP per step), and
:math:`\hat\epsilon_1` is the official Euler jump to :math:`t = 1`. The estimate starts at
:math:`A^+ y` (official: the encoded pseudo-inverse) and the noise estimate at a standard normal
draw; the particles returned are the final :math:`\mu`.

**Weights.** The official :math:`w_t` is the inverse of the network's flow-matching error per
time, measured offline on images (normalised to mean 1 over the times), times
``regularizer_weight`` :math:`\lambda = 0.5`. For a denoiser the flow-matching error is
:math:`\operatorname{tr} \operatorname{Var}[x_0 \mid x_t] / \rho_t^2`; the engine takes
:math:`\operatorname{Var}[x_0 \mid x_t]` from a
:class:`~diffpost.models.covariance.PosteriorVariance` fitted to data when given
(``posterior_variance``, the official calibration), else from a Gaussian of the prior's variance
(:func:`diffpost.posterior.guidance.tweedie_variance`, as ΠGDM). The data step is in units of
the data term's curvature: the official learning rates (0.1 for inpainting, 12 for 12x
super-resolution, whose :math:`\lVert A \rVert^2 = 1/144`) are both about 0.1 there.

Defaults (official configurations): 50 times, linear in :math:`\rho` from 0.984 to 0.196 (the
official ``linspace(1, 0.18, 52)[1:-1]``), regulariser step :math:`\eta_r = 1`, data step
:math:`\eta_d = 0.1`, at most :math:`K = 15` data steps, :math:`\lambda = 0.5`. Departures: the
official method runs in Stable Diffusion 3's latent space through its decoder; this one in the
signal's space. Its early stop is a mean squared residual of ``1e-4`` (its noise level 0.01
squared); here the model's own noise level. One NFE per step, no VJP.

FLAIR is an optimiser: each particle is one point estimate, and their spread comes only from the
noise draws, not from the posterior.

References:
    Erbach, Narnhofer, Dombos, Schiele, Lenssen, Schindler. Solving Inverse Problems with FLAIR.
    2025. arXiv:2506.02680. Official code: github.com/prs-eth/FLAIR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.models.covariance import PosteriorVariance
from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.operators.base import LinearOperator
from diffpost.models.schedules import Schedule
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.engines.common import (
    check_nonnegative,
    check_positive,
    check_positive_integers,
    check_posterior_variance,
    flow_time,
    gaussian_data_gradient,
    operator_gain,
    squared_noise_level,
    uniform_log_weights,
)
from diffpost.posterior.guidance import measurement_inverse, prior_variance, tweedie_variance
from diffpost.posterior.problem import Problem

__all__ = ["FLAIR", "FLAIRState"]


class FLAIRState(NamedTuple):
    """State of FLAIR.

    Attributes:
        particles: ``(chains * N, *event)`` the point estimates :math:`\\mu`.
        log_weights: ``(chains, N)``, uniform.
        log_evidence: ``None``.
        noise_estimate: ``(chains * N, *event)`` :math:`\\hat\\epsilon_1`.
        times: ``(K,)`` descending times, one per step.
        weights: ``(K,)`` :math:`\\lambda w_t`.
        step: index of the next time.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    noise_estimate: Tensor
    times: Tensor
    weights: Tensor
    step: int


@dataclass(frozen=True)
class FLAIR(Engine, family="variational"):
    """Flow-based variational point estimates with hard data consistency (see the module
    docstring).

    Attributes:
        num_steps: flow times (official: 50).
        regularizer_weight: :math:`\\lambda` (official: 0.5).
        regularizer_step: :math:`\\eta_r` (official SGD rate: 1).
        data_step: :math:`\\eta_d`, in units of :math:`1 / \\lVert A \\rVert^2` (official: 0.1).
        data_iterations: :math:`K`, data steps at most per time (official: 15).
        posterior_variance: a fitted :math:`\\operatorname{Var}[x_0 \\mid x_t]` for the weights
            :math:`w_t`; ``None``: a Gaussian of the prior's variance.

    Per-step statistics: ``t``, ``residual_norm`` (chain mean of :math:`\\lVert y - A\\mu
    \\rVert` after the data steps) and ``data_iterations`` (chain mean).
    """

    num_steps: int = 50
    regularizer_weight: float = 0.5
    regularizer_step: float = 1.0
    data_step: float = 0.1
    data_iterations: int = 15
    posterior_variance: PosteriorVariance | None = None
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation"})

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers(
            "FLAIR", num_steps=self.num_steps, data_iterations=self.data_iterations
        )
        check_nonnegative("FLAIR", regularizer_weight=self.regularizer_weight)
        check_positive("FLAIR", regularizer_step=self.regularizer_step, data_step=self.data_step)
        check_posterior_variance("FLAIR", self.posterior_variance)

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> FLAIRState:
        count = num_chains * num_particles
        shape = (count,) + tuple(problem.event_shape)
        options = {"dtype": problem.dtype, "device": problem.device}
        gaussian = problem.gaussian
        if isinstance(gaussian.operator, LinearOperator):
            means = measurement_inverse(problem, gaussian.y_for(count)).to(**options)
        else:
            means = torch.zeros(shape, **options)
        times = flow_times(problem.prior.schedule, self.num_steps)
        return FLAIRState(
            particles=means.expand(shape).clone(),
            log_weights=uniform_log_weights(num_chains, num_particles, means),
            log_evidence=None,
            noise_estimate=torch.randn(shape, generator=generator, **options),
            times=times.to(**options),
            weights=self.regularizer_weight * self.time_weights(problem, times).to(**options),
            step=0,
        )

    def iterations(self, state: FLAIRState) -> int:
        return state.times.shape[0]

    def time_weights(self, problem: Problem, times: Tensor) -> Tensor:
        r""":math:`w_t \propto \rho_t^2 / \operatorname{tr}\operatorname{Var}[x_0 \mid x_t]`, the
        inverse flow-matching error, normalised to mean 1 over ``times`` (``(K,)`` float64)."""
        schedule = problem.prior.schedule
        if self.posterior_variance is not None:
            variances = torch.stack(
                [
                    self.posterior_variance.at_noise_ratio(schedule.noise_ratio(t)).mean()
                    for t in times
                ]
            )
        else:
            variance = prior_variance(problem)
            variances = torch.stack([tweedie_variance(schedule, t, variance) for t in times])
        errors = variances / flow_time(schedule, times) ** 2
        weights = 1 / (errors + 1e-7)
        return weights / weights.mean()

    def step(self, problem: Problem, state: FLAIRState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, weight, mu = state.times[state.step], state.weights[state.step], state.particles
        rho = flow_time(schedule, t).to(mu)
        alpha, sigma = (v.to(mu) for v in schedule(t))

        # deterministic trajectory adjustment: the noise follows the estimated trajectory
        fresh = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        noise = (1 - rho) * state.noise_estimate + (1 - (1 - rho) ** 2).sqrt() * fresh
        x_t = alpha * mu + sigma * noise
        x0 = problem.denoise(x_t, t)
        noise_estimate = epsilon_from_x0(schedule, x_t, x0, t)
        mu = mu - self.regularizer_step * weight / rho * (mu - x0)
        mu, residual, taken = self.data_consistent(problem, mu, weight)
        return state._replace(particles=mu, noise_estimate=noise_estimate, step=state.step + 1), {
            "t": t,
            "residual_norm": residual.sqrt().reshape(state.log_weights.shape).mean(-1),
            "data_iterations": taken.reshape(state.log_weights.shape).mean(-1),
        }

    def data_consistent(self, problem: Problem, mu: Tensor, weight: Tensor):
        r"""``(mu, squared residual, steps)`` after at most ``data_iterations`` gradient steps on
        :math:`\lambda w_t \lVert y - A(\mu) \rVert^2`, each particle stopping once its squared
        residual is below :math:`\sum_j \sigma_{y,j}^2`."""
        gaussian = problem.gaussian
        floor = squared_noise_level(gaussian).to(mu)
        step = 2 * self.data_step * weight / operator_gain(problem)
        unit = torch.ones((), dtype=mu.dtype, device=mu.device)
        taken = torch.zeros(mu.shape[0], dtype=mu.dtype, device=mu.device)
        for iteration in range(self.data_iterations + 1):
            residual = gaussian.y_for(mu.shape[0]).to(mu) - gaussian.operator(mu)
            squared = residual.flatten(1).pow(2).sum(-1)
            active = squared >= floor  # a particle below the floor stays there: it no longer moves
            if iteration == self.data_iterations or not bool(active.any()):
                break
            move = step * gaussian_data_gradient(gaussian, mu, unit)
            mu = mu + move * active.reshape((-1,) + (1,) * (mu.dim() - 1))
            taken = taken + active.to(mu.dtype)
        return mu, squared, taken


def flow_times(schedule: Schedule, num_steps: int) -> Tensor:
    r"""The official times, ``linspace(1, 0.18, num_steps + 2)[1:-1]`` in the rectified-flow
    time :math:`\rho`, as the schedule's times (``(num_steps,)`` float64, descending)."""
    rho = torch.linspace(1.0, 0.18, num_steps + 2, dtype=torch.float64)[1:-1]
    return schedule.time_of_noise_ratio(rho / (1 - rho))
