r"""DCDP: decoupled data consistency with diffusion purification (Li, Kwon, Alkhouri, Ravishankar,
Qu; 2024).

DCDP alternates two steps ``num_steps`` times, from :math:`x^{(0)} = 0` (official
``dcdp.py:Diffusion_Purified_CSGM``):

1. **Data consistency**: a point that explains the measurement, found from the previous iterate,

   .. math:: x_{\mathrm{dc}}^{(k)} = \arg\min_x\ -\log p(y \mid x)
             + \frac{\lambda}{2} \lVert x - x^{(k-1)} \rVert^2
             \quad\text{(solved inexactly, from } x^{(k-1)});

2. **Diffusion purification** at a decreasing time :math:`t_k`: noise it with the forward kernel,
   :math:`x_{t_k} = \alpha(t_k) x_{\mathrm{dc}}^{(k)} + \sigma(t_k) \epsilon`, and run the
   deterministic DDIM sampler from :math:`t_k` back to 0, which projects it towards the prior's
   support: :math:`x^{(k)} = \mathrm{DDIM}(x_{t_k})`.

The purification times decrease linearly from ``purification_start`` :math:`T_0` to
``purification_end`` (official ``Purification_Schedule(..., 'linear')``, where a time of 0 is
raised to one step of the 1000-step model; we raise it to :math:`10^{-3}`). They are times of the
official models' schedule (linear VP, 1000 steps), so on another schedule each is taken at the
same noise ratio :math:`\sigma/\alpha` (EDM's :math:`t = 0.7` would be a noise of 56 where the
official purification has 12, and its purifications would keep less of the data: measured mean
errors 0.41 posterior sds on EDM against 0.16 on VP before this mapping). Purification from
:math:`t_k` takes ``min(purification_steps, 1000 t_k)`` uniform DDIM steps (official
``ddim_num_iterations = 20``, fewer when :math:`t_k` is below 20 of 1000 steps; on
:class:`~diffpost.models.schedules.EDM` the purification steps follow Karras et al.'s noise spacing
instead, :func:`purification_grid`). The run's NFE is
the sum of these. Randomness enters only through the purification noise: DCDP is a stochastic
restoration method more than a posterior sampler, and its spread is not calibrated.

**Data consistency.** The official code takes ``csgm_num_iterations`` steps of SGD with momentum
0.9 on :math:`\operatorname{mean}((A(x) - y)^2)` from :math:`x^{(k-1)}`; its ``use_weight_decay``
option adds :math:`\lambda \operatorname{mean}((x - x^{(k-1)})^2)`, off in every released config
(``proximal_weight`` :math:`\lambda = 0`): starting from the previous iterate and stopping early is
the regulariser. Its learning rate is tuned per task and image size (1e3 for inpainting on
256 x 256 x 3 images, 500 for phase retrieval, on a mean over pixels). We weigh the data by the
model's likelihood (so noisy and per-measurement noise levels are handled) and replace the
hand-tuned SGD by solvers that need no learning rate:

- a linear operator with Gaussian noise: the normal equations
  :math:`(A^\top \Sigma_y^{-1} A + \lambda I)\, \delta = A^\top \Sigma_y^{-1}(y - A x^{(k-1)})`,
  :math:`x_{\mathrm{dc}} = x^{(k-1)} + \delta`, by conjugate gradients from :math:`\delta = 0`
  (:func:`diffpost.models.operators.base.conjugate_gradient`, at most ``consistency_steps``
  iterations); with :math:`\lambda = 0` this converges to the point of the least-squares set nearest
  to :math:`x^{(k-1)}`;
- any other likelihood (non-linear operator, Poisson, ...): ``consistency_steps`` steps of
  gradient descent with a per-particle backtracking (Armijo) step size, started at
  :math:`1 / (1 / v + \lambda)` with :math:`v` the smallest noise variance (1 for non-Gaussian
  observations), halved on failure and doubled on success.

**Defaults** (official inpainting config, ``purification_config_inpainting.yaml``): ``num_steps =
20`` outer iterations, :math:`T_0 = 0.7` (700 of 1000 steps), end 0, ``purification_steps = 20``,
``consistency_steps = 50``. Other official configs: super-resolution and Gaussian / motion blur
:math:`K = 10`, :math:`T_0 = 0.4`; phase retrieval :math:`K = 200`, :math:`T_0 = 1 \to 0.02`,
100 data-consistency steps; non-linear blur :math:`K = 200`, :math:`T_0 = 1 \to 0.05`.

Not implemented: the one-step (Tweedie) purification (``full_ddim = False``), the other
purification schedules (constant, cosine, ...), latent DCDP.

References:
    Li, Kwon, Alkhouri, Ravishankar, Qu. Decoupled Data Consistency with Diffusion Purification
    for Image Restoration. arXiv:2403.06054, 2024.
    Official code: github.com/Morefre/Decoupled-Data-Consistency-with-Diffusion-Purification-for-
    Image-Restoration (``dcdp.py``, ``purification_configurations/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.models.operators.base import LinearOperator, conjugate_gradient
from diffpost.models.schedules import EDM, VP, Schedule, time_grid
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.engines.common import EDM_NOISE_MIN, check_positive_integers
from diffpost.posterior.engines.langevin.common import (
    AnnealingState,
    deterministic_ddim,
    inverse_data_curvature,
    noised,
)
from diffpost.posterior.problem import Problem

__all__ = ["DCDP"]

#: the smallest purification time: one step of the 1000-step models the official code loads
MIN_PURIFICATION_TIME = 1e-3
#: the schedule of those models, in whose times the purification schedule is given
REFERENCE = VP("linear")


def purification_grid(schedule: Schedule, num_steps: int, t_max: float, device=None) -> Tensor:
    """The DDIM grid of one purification from ``t_max`` to 0, ``(num_steps + 1,)`` float64:
    uniform in ``t`` (official), or on :class:`~diffpost.models.schedules.EDM`, whose noise is
    linear in ``t``, Karras et al.'s spacing of the noise level down to 0.002 (as
    :func:`~diffpost.posterior.engines.common.sampling_grid`; uniform steps in ``t`` would end
    with a jump from noise ``80 t_max / K`` to 0)."""
    if isinstance(schedule, EDM) and float(schedule.noise_ratio(torch.tensor(t_max))) > (
        EDM_NOISE_MIN
    ):
        return time_grid(
            num_steps,
            "karras",
            schedule=schedule,
            t_max=t_max,
            noise_min=EDM_NOISE_MIN,
            device=device,
        )
    return time_grid(num_steps, "uniform", t_max=t_max, device=device)


def _per_particle(value: Tensor, x: Tensor) -> Tensor:
    """Reshape ``(n,)`` to broadcast against ``x`` of shape ``(n, *event)``."""
    return value.reshape((-1,) + (1,) * (x.dim() - 1))


def _squared_norm(x: Tensor) -> Tensor:
    return x.flatten(1).pow(2).sum(-1)


@dataclass(frozen=True)
class DCDP(Engine, family="langevin"):
    """Decoupled data consistency with diffusion purification (see the module docstring).

    Attributes:
        num_steps: outer iterations :math:`K` (official inpainting: 20).
        purification_start: first purification time :math:`T_0` in ``(0, 1]`` (official: 0.7).
        purification_end: last purification time, in ``[0, purification_start]`` (official: 0).
        purification_steps: DDIM steps of one purification at most (official: 20), one NFE each.
        consistency_steps: iterations of the data-consistency solver (official: 50).
        proximal_weight: :math:`\\lambda \\ge 0`, weight of the proximal term (official: 0).
    """

    num_steps: int = 20
    purification_start: float = 0.7
    purification_end: float = 0.0
    purification_steps: int = 20
    consistency_steps: int = 50
    proximal_weight: float = 0.0
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers(
            "DCDP",
            num_steps=self.num_steps,
            purification_steps=self.purification_steps,
            consistency_steps=self.consistency_steps,
        )
        if not (math.isfinite(self.proximal_weight) and self.proximal_weight >= 0):
            raise ValueError(
                "DCDP: proximal_weight must be finite and non-negative; got "
                f"{self.proximal_weight!r}"
            )
        if not (
            0 <= self.purification_end <= self.purification_start <= 1
            and self.purification_start > 0
        ):
            raise ValueError(
                "DCDP needs 0 <= purification_end <= purification_start <= 1, start > 0; got "
                f"{self.purification_end}, {self.purification_start}"
            )

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> AnnealingState:
        times = torch.linspace(
            self.purification_start, self.purification_end, self.num_steps, dtype=torch.float64
        ).clamp_min(MIN_PURIFICATION_TIME)
        shape = (num_chains * num_particles,) + tuple(problem.event_shape)
        particles = torch.zeros(shape, dtype=problem.dtype, device=problem.device)
        return AnnealingState.start(particles, times, num_chains, num_particles)

    def step(
        self, problem: Problem, state: AnnealingState, generator: torch.Generator
    ) -> tuple[AnnealingState, dict[str, Tensor]]:
        schedule = problem.prior.schedule
        reference = state.times[state.step]  # a time of the official 1000-step linear VP model
        t = schedule.time_of_noise_ratio(REFERENCE.noise_ratio(reference)).to(reference)
        consistent = self._consistency(problem, state.particles)

        num_ddim = max(1, min(self.purification_steps, math.ceil(1000 * float(reference))))
        grid = purification_grid(schedule, num_ddim, float(t), device=t.device)
        noisy = noised(schedule, consistent, t, generator)
        particles = deterministic_ddim(problem, noisy, grid)

        chains = state.log_weights.shape[0]
        with torch.no_grad():
            log_likelihood = problem.log_likelihood(consistent).reshape(chains, -1).mean(-1)
        info = {"t": t, "log_likelihood": log_likelihood}
        return state._replace(particles=particles, step=state.step + 1), info

    def _consistency(self, problem: Problem, anchor: Tensor) -> Tensor:
        """:math:`\\arg\\min_x -\\log p(y \\mid x) + \\lambda \\lVert x - \\text{anchor} \\rVert^2 /
        2`."""
        gaussian = problem.gaussian
        if gaussian is not None and isinstance(gaussian.operator, LinearOperator):
            operator = gaussian.operator
            precision = gaussian.sigma.to(anchor) ** -2

            def normal_matrix(v: Tensor) -> Tensor:
                return operator.adjoint(precision * operator(v)) + self.proximal_weight * v

            rhs = operator.adjoint(precision * (gaussian.y_for(anchor.shape[0]) - operator(anchor)))
            return anchor + conjugate_gradient(
                normal_matrix, rhs, max_iterations=self.consistency_steps
            )
        return self._backtracking_descent(problem, anchor)

    def _backtracking_descent(self, problem: Problem, anchor: Tensor) -> Tensor:
        """Gradient descent with a per-particle Armijo step (halved on failure, doubled on
        success)."""
        weight = self.proximal_weight

        def objective(x: Tensor) -> Tensor:
            return -problem.log_likelihood(x) + 0.5 * weight * _squared_norm(x - anchor)

        x = anchor
        value = objective(x)
        step = torch.full_like(value, 1 / (1 / inverse_data_curvature(problem) + weight))
        for _ in range(self.consistency_steps):
            gradient = -problem.grad_log_likelihood(x) + weight * (x - anchor)
            candidate = x - _per_particle(step, x) * gradient
            candidate_value = objective(candidate)
            accepted = candidate_value <= value - 0.5 * step * _squared_norm(gradient)
            x = torch.where(_per_particle(accepted, x), candidate, x)
            value = torch.where(accepted, candidate_value, value)
            step = torch.where(accepted, 2 * step, step / 2)
        return x
