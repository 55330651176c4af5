r"""FlowChef: steering a rectified flow in its vector field (Patel, Wen, Metaxas, Yang; 2024).

An Euler step of the flow, with the state first moved down the gradient of the data misfit at the
flow's clean estimate, *skipping the network's Jacobian* (:math:`\partial \hat x_0 / \partial x_t`
taken as the identity, so no VJP through the network; official
``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py``):

.. math::
    \hat x_0 &= D(x_t, t), \qquad
    x_t' = x_t + \frac{\gamma}{\lVert A \rVert^2}\, J_A(\hat x_0)^\top \big(y - A(\hat x_0)\big),\\
    x_s &= x_t' + (\alpha_s - \alpha_t \tfrac{\sigma_s}{\sigma_t}) \hat x_0
        + (\tfrac{\sigma_s}{\sigma_t} - 1) x_t
    \quad \text{(deterministic DDIM at the unmoved state's } \hat x_0, \hat\epsilon),

i.e. :math:`x_s = \alpha_s \hat x_0 + \sigma_s \hat\epsilon + (x_t' - x_t)`. On the
:class:`~diffpost.models.schedules.RectifiedFlow` schedule (:math:`x_t = (1-t) x_0 + t\epsilon`,
velocity :math:`v = \hat\epsilon - \hat x_0`) the DDIM step is the official Euler step
:math:`x_t + (s - t) v` with the velocity of the unmoved state, so the update is the paper's; on
other schedules it is the same rule in the schedule's own deterministic step. The last step (to
:math:`t = 0`) is not guided, as in the official loop, and returns the flow's end point.

**Step size.** The official code takes ``gradient_scale`` :math:`s = 500` on the mean squared
residual over the :math:`m` entries of :math:`y`, a step of :math:`(2 s / m) A^\top(y - A\hat
x_0)`; on its 64x64x3 tasks (box inpainting, 4x average-pool super-resolution, Gaussian
deblurring) that is :math:`\gamma = 2 s \lVert A \rVert^2 / m = 0.081` in units of the data term's
curvature :math:`1 / \lVert A \rVert^2` for all three. The engine takes :math:`\gamma` in those
units (default 0.0814 = 1000 / 12288), so that the step does not grow with the number of pixels.
:math:`\lVert A \rVert` is the operator's spectral norm (1 for a non-linear operator, as
:func:`~diffpost.posterior.engines.common.operator_gain`).

Defaults (official ``inverseproblems_flowchef.sh``): 100 Euler steps, :math:`\gamma` as above, one
gradient step per time step. The grid is the engines' shared one (uniform in :math:`t` on
rectified flow, as the official ``t = i / N``), from the reference noise. The step reads only
the residual, not :math:`\sigma_y` (``uses_noise_level = False``); one NFE per step, no VJP
through the network.

References:
    Patel, Wen, Metaxas, Yang. FlowChef: Steering of Rectified Flow Models for Controlled
    Generations. 2024. arXiv:2412.00100. Official code: github.com/FlowChef/FlowChef.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.samplers import ddim_coefficients
from diffpost.posterior.engines.common import (
    check_positive,
    gaussian_data_gradient,
    operator_gain,
)
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    advance,
    chain_mean,
)
from diffpost.posterior.guidance import residual_norm
from diffpost.posterior.problem import Problem

__all__ = ["FlowChef"]

#: the official ``gradient_scale`` 500 on the mean squared residual of a 64x64x3 measurement,
#: in units of the data term's curvature: 2 * 500 / 12288
OFFICIAL_STEP = 1000 / 12288


@dataclass(frozen=True)
class FlowChef(ExplicitEngine, family="explicit"):
    """Gradient-skipping guidance of a flow's Euler steps (see the module docstring).

    Attributes:
        num_steps: Euler steps (official: 100).
        step_size: :math:`\\gamma`, the gradient step in units of :math:`1 / \\lVert A \\rVert^2`
            (official ``gradient_scale`` 500 on 64x64x3 images: 0.0814).

    Per-step statistics: ``t`` and ``residual_norm`` (chain mean of :math:`\\lVert y -
    A(\\hat x_0) \\rVert`).
    """

    num_steps: int = 100
    step_size: float = OFFICIAL_STEP
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation"})
    uses_noise_level: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive("FlowChef", step_size=self.step_size)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, s = state.grid[state.step], state.grid[state.step + 1]
        x_t = state.particles

        x0 = problem.denoise(x_t, t)
        a, b, _ = (v.to(x_t) for v in ddim_coefficients(schedule, t, s, 0.0))
        x_s = a * x0 + b * epsilon_from_x0(schedule, x_t, x0, t)
        unit = torch.ones((), dtype=x_t.dtype, device=x_t.device)
        misfit = gaussian_data_gradient(problem.gaussian, x0, unit)  # A^T (y - A x0)
        if state.step + 2 < state.grid.shape[0]:  # the official loop leaves the last step alone
            x_s = x_s + self.step_size / operator_gain(problem) * misfit
        return advance(state, x_s, residual_norm=chain_mean(residual_norm(problem, x0), state))
