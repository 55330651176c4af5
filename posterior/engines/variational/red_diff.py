r"""RED-diff: regularisation by denoising diffusion (Mardani, Song, Kautz, Vahdat; ICLR 2024).

Variational inference with a Gaussian family :math:`q(x_0 \mid y) = \mathcal{N}(\mu, s^2 I)` in
its :math:`s \to 0` limit (the official default ``sigma_x0 = 0``): minimising
:math:`\mathrm{KL}(q \,\|\, p(x_0 \mid y))` over :math:`\mu` gives the data term
:math:`-\log p(y \mid \mu)` plus the prior KL written as a weighted score-matching integral over the
diffusion. Each optimiser step draws one time and one noise,

.. math:: x_t = \alpha_t \mu + \sigma_t \epsilon, \qquad
   \nabla_\mu \ell = -\nabla_\mu \log p(y \mid \mu) + \lambda_t\, \big(\hat\epsilon(x_t, t) -
   \epsilon\big), \qquad \lambda_t = \lambda\, w(\sigma_t / \alpha_t),

with :math:`\hat\epsilon = (x_t - \alpha_t \hat x_0) / \sigma_t` from the denoiser and the
denoiser's Jacobian dropped (a stop-gradient, as in score-distillation sampling): one NFE per step
and no VJP through the denoiser. :math:`w` is the SNR weighting (``weighting``, default
``"linear"``: :math:`w(r) = r = 1/\sqrt{\mathrm{SNR}_t}`), :math:`\lambda` = ``regularization``.
The times run once down the DDIM sub-sequence of a 1000-step model (official ``get_timesteps``
reversed: ``t = 1000 - skip, ..., skip, 0`` in 0-based DDPM indices, i.e.
:func:`~diffpost.posterior.engines.common.sampling_grid` without its final 0; a
:class:`~diffpost.models.schedules.DiscreteVP` uses its own number of training steps, which also
caps ``num_steps``), coarse to fine: the paper ablates random against descending times and keeps
descending. On a schedule whose first grid time carries no signal (:math:`\alpha_1 = 0`: rectified
flow), the weight :math:`w(\sigma/\alpha)` is infinite there and :math:`x_t` says nothing of
:math:`\mu`; that first time is moved to the middle of the first interval (same number of steps;
the paper's VP schedules never reach :math:`\alpha = 0`). The optimiser is Adam with the
official betas ``(0.9, 0.99)``, its moments kept in the state as tensors.

**Data term (a choice).** The paper's objective weighs the data misfit by the noise,
:math:`\lVert y - f(\mu) \rVert^2 / (2\sigma_y^2)`; the official code drops :math:`\sigma_y` and
averages both terms over elements (``(e_obs**2).mean()/2`` and ``((eps_hat - eps) * mu).mean()``),
so its effective ratio also depends on the image and measurement sizes. We implement the paper's
form with the exact negative log-likelihood :math:`-\log p(y \mid \mu)` of the model (any
observation model, its noise level honoured) and sums over elements; ``regularization`` is therefore
not on the official code's scale. Noiseless observations have no finite likelihood and are refused.

**Initialisation.** ``"pseudo_inverse"`` (default, official ``H_pinv(y)``): every particle starts
at :math:`A^+ y` when the observation is a
:class:`~diffpost.models.observations.GaussianObservation` with a linear operator (without the
directions the noise swamps, as the official operators drop them for blur:
:func:`diffpost.posterior.guidance.measurement_inverse`), at zero otherwise (nonlinear operators
have no pseudo-inverse; InverseBench starts RED-diff at zero). ``"zeros"`` and ``"gaussian"``
(standard normal draws) are also available.

**Particles.** Each particle is an independent variational mean with its own noise draws: the run
returns ``chains * N`` point estimates, uniformly weighted. RED-diff is mode-seeking: the spread of
the particles is optimisation noise around a mode, not the posterior's spread, and on a multimodal
posterior all particles started at the same point usually reach the same mode. It approximates the
posterior mode region (a MAP-like estimate regularised by the whole family of denoisers), not the
posterior distribution.

Per-step statistics: ``t``; ``data_loss`` :math:`-\log p(y \mid \mu)`; ``denoising_loss``
:math:`\lambda_t \lVert \hat\epsilon - \epsilon \rVert^2`, the weighted score-matching term whose
stop-gradient gradient drives the prior; ``loss`` their sum; each the mean over a chain's particles,
``(chains,)``, evaluated before the step's update.

Defaults: ``num_steps = 1000`` (the paper's experiments and the official ``sample_batch.sh``;
``_configs/exp/default.yaml`` has 50 for quick tests), ``learning_rate = 0.1``
(``_configs/algo/reddiff.yaml``; the README uses 0.5), ``regularization = 0.25``
(``grad_term_weight``), ``weighting = "linear"``.

References:
    Mardani, Song, Kautz, Vahdat. A Variational Perspective on Solving Inverse Problems with
    Diffusion Models. ICLR 2024. arXiv:2305.04391.
    Official code: github.com/NVlabs/RED-diff (``algos/reddiff.py``,
    ``_configs/algo/reddiff.yaml``). Zheng et al. InverseBench: Benchmarking Plug-and-Play Diffusion
    Priors for Inverse Problems in Physical Sciences. ICLR 2025 (``algo/reddiff.py``: gradient
    injected directly, zero init).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.operators.base import LinearOperator
from diffpost.models.schedules import Schedule
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.engines.common import sampling_grid, uniform_log_weights
from diffpost.posterior.engines.variational.common import SNR_WEIGHTINGS, AdamMoments
from diffpost.posterior.guidance import measurement_inverse
from diffpost.posterior.problem import Problem

__all__ = ["REDDiff", "REDDiffState", "INITIALIZATIONS"]

INITIALIZATIONS = ("pseudo_inverse", "zeros", "gaussian")


class REDDiffState(NamedTuple):
    """State of RED-diff (and RSLD).

    Attributes:
        particles: ``(chains * N, *event)`` variational means.
        log_weights: ``(chains, N)``, uniform.
        log_evidence: ``None`` (no evidence estimate).
        adam: Adam's moment estimates of the means' gradient (:class:`AdamMoments`).
        times: ``(K,)`` the descending times, one per step.
        step: index of the next time (also Adam's count of updates done).
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    adam: AdamMoments
    times: Tensor
    step: int


def _flat_sum(value: Tensor) -> Tensor:
    return value.flatten(1).sum(-1)


@dataclass(frozen=True)
class REDDiff(Engine, family="variational"):
    """RED-diff (see the module docstring for the algorithm, the choices made and what it does not
    approximate).

    Attributes:
        num_steps: optimiser steps, one time each on the DDIM grid (paper: 1000).
        learning_rate: Adam's step size (official config: 0.1).
        regularization: :math:`\\lambda`, the weight of the distillation term (official: 0.25).
        weighting: SNR weighting :math:`w`, one of
            :data:`~diffpost.posterior.engines.variational.common.SNR_WEIGHTINGS` (official:
            ``"linear"``).
        initialization: ``"pseudo_inverse"`` (official), ``"zeros"`` or ``"gaussian"``.
        adam_betas: Adam's ``(beta1, beta2)`` (official: ``(0.9, 0.99)``).
    """

    num_steps: int = 1000
    learning_rate: float = 0.1
    regularization: float = 0.25
    weighting: str = "linear"
    initialization: str = "pseudo_inverse"
    adam_betas: tuple[float, float] = (0.9, 0.99)
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_steps < 1:
            raise ValueError(f"{self.name}: num_steps must be at least 1; got {self.num_steps}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"{self.name}: learning_rate must be positive; got {self.learning_rate}"
            )
        if not self.regularization >= 0:
            raise ValueError(
                f"{self.name}: regularization must be non-negative; got {self.regularization}"
            )
        if self.weighting not in SNR_WEIGHTINGS:
            raise ValueError(
                f"{self.name}: weighting must be one of {sorted(SNR_WEIGHTINGS)}; got "
                f"{self.weighting!r}"
            )
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(
                f"{self.name}: initialization must be one of {INITIALIZATIONS}; "
                f"got {self.initialization!r}"
            )
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(
                f"{self.name}: adam_betas must be two values in [0, 1); got {self.adam_betas}"
            )

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> REDDiffState:
        count = num_chains * num_particles
        shape = (count,) + tuple(problem.event_shape)
        means = self._initial_means(problem, shape, generator)
        times = self.optimisation_times(problem.prior.schedule, problem.device)
        return REDDiffState(
            particles=means,
            log_weights=uniform_log_weights(num_chains, num_particles, means),
            log_evidence=None,
            adam=AdamMoments.zeros_like(means),
            times=times.to(problem.dtype),
            step=0,
        )

    def optimisation_times(self, schedule: Schedule, device=None) -> Tensor:
        """The descending times, one per step, ``(K,)`` float64: the sampling grid without its
        final 0, its first time moved to the middle of the first interval where
        :math:`\alpha = 0` there (see the module docstring)."""
        grid = sampling_grid(schedule, self.num_steps, device=device)
        times = grid[:-1].clone()
        if float(schedule.alpha(times[:1])[0]) == 0.0:
            times[0] = 0.5 * (grid[0] + grid[1])
        return times

    def _initial_means(
        self, problem: Problem, shape: tuple[int, ...], generator: torch.Generator
    ) -> Tensor:
        options = {"dtype": problem.dtype, "device": problem.device}
        if self.initialization == "gaussian":
            return torch.randn(shape, generator=generator, **options)
        gaussian = problem.gaussian
        if (
            self.initialization == "pseudo_inverse"
            and gaussian is not None
            and isinstance(gaussian.operator, LinearOperator)
        ):
            y = gaussian.y_for(shape[0])
            return measurement_inverse(problem, y).to(**options).expand(shape).clone()
        return torch.zeros(shape, **options)

    def iterations(self, state: REDDiffState) -> int:
        return state.times.shape[0]

    def distillation_direction(
        self, x_t: Tensor, sigma: Tensor, noise_error: Tensor, num_chains: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-particle prior direction in noise units, ``(chains * N, *event)``, and any
        statistics of it.

        RED-diff uses the noise-prediction error :math:`\\hat\\epsilon - \\epsilon` as is; RSLD
        adds its repulsion here.
        """
        return noise_error, {}

    def step(
        self, problem: Problem, state: REDDiffState, generator: torch.Generator
    ) -> tuple[REDDiffState, dict[str, Tensor]]:
        schedule = problem.prior.schedule
        means = state.particles
        num_chains = state.log_weights.shape[0]
        t = state.times[state.step]
        alpha, sigma = schedule.alpha(t).to(means), schedule.sigma(t).to(means)
        noise = torch.randn(
            means.shape, generator=generator, dtype=means.dtype, device=means.device
        )
        x_t = alpha * means.detach() + sigma * noise
        x0 = problem.denoise(x_t, t)
        noise_error = epsilon_from_x0(schedule, x_t, x0, t) - noise
        weight = self.regularization * SNR_WEIGHTINGS[self.weighting](sigma / alpha)
        direction, direction_info = self.distillation_direction(x_t, sigma, noise_error, num_chains)
        with torch.enable_grad():
            leaf = means.detach().requires_grad_(True)
            log_likelihood = problem.log_likelihood(leaf)
            (data_gradient,) = torch.autograd.grad(log_likelihood.sum(), leaf)
        gradient = -data_gradient + weight * direction
        update, adam = state.adam.update(
            gradient, state.step + 1, self.learning_rate, tuple(self.adam_betas)
        )
        data_loss = -log_likelihood.detach().reshape(num_chains, -1).mean(-1)
        denoising_loss = weight * _flat_sum(noise_error**2).reshape(num_chains, -1).mean(-1)
        info = {
            "t": t,
            "loss": data_loss + denoising_loss,
            "data_loss": data_loss,
            "denoising_loss": denoising_loss,
            **direction_info,
        }
        return state._replace(particles=means + update, adam=adam, step=state.step + 1), info
