r"""MCG: manifold-constrained gradient (Chung, Sim, Ryu, Ye; NeurIPS 2022).

An ancestral DDPM step, a step down the gradient of the data misfit through the denoiser (the
"manifold constraint": the Tweedie estimate stays on the data manifold), then the projection of
the result onto the measurement noised to the new time (paper, Algorithm 1 and eq. 14; official
``p_sample_loop_progressive`` with ``sample_method="MCG"``):

.. math::
    \hat x_0 &= D(x_t, t), \qquad
    x_s' = a\, \hat x_0 + b\, \hat\epsilon + c\, z \quad \text{(DDPM, } \eta = 1),\\
    x_s'' &= x_s' - \zeta\, \nabla_{x_t} \big\lVert y - A \hat x_0(x_t) \big\rVert_2, \qquad
    x_s = x_s'' + A^+\big(\alpha_s y + \sigma_s A z' - A x_s''\big).

The gradient step is the official code's (the unsquared norm, ``scale`` :math:`\zeta = 1`; the
paper's :math:`\alpha / \lVert y - A\hat x_0 \rVert` on the squared norm is the same rule with
:math:`\alpha = \zeta / 2`). The projection
(:func:`~diffpost.posterior.engines.explicit.common.noised_measurement_projection`) replaces the
observed part of the state by that of the measurement noised to :math:`s`; the official code
noises it to the step's starting time (its ``q_sample(y, t)``) and this to its end, where the
state is. The official code zeroes the gradient on the observed pixels, which the projection
overwrites anyway.

**Noise.** The projection treats :math:`y` as noiseless (:math:`A x_0 = y`): with
:math:`\sigma_y > 0` the draws reproduce :math:`y` and its noise on the observed part (Chung et
al. 2023 name this as MCG's weakness on noisy data, and DPS drops the projection). The engine
does not read :math:`\sigma_y` (``uses_noise_level = False``).

Defaults: 1000 DDPM steps on the engines' shared grid, ``scale = 1`` (official). Any linear
operator (:math:`A^+` by SVD in closed form, by conjugate gradients otherwise); one NFE and one
VJP per step.

References:
    Chung, Sim, Ryu, Ye. Improving Diffusion Models for Inverse Problems using Manifold
    Constraints. NeurIPS 2022. arXiv:2206.00941. Official code: github.com/HJ-harry/MCG_diffusion
    (``guided_diffusion/gaussian_diffusion.py``); also ``ManifoldConstraintGradient`` in
    github.com/DPS2022/diffusion-posterior-sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffpost.posterior.engines.common import check_nonnegative
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    add_gaussian_noise,
    advance,
    chain_mean,
    dps_mean,
    noised_measurement_projection,
)
from diffpost.posterior.problem import Problem

__all__ = ["MCG"]


@dataclass(frozen=True)
class MCG(ExplicitEngine, family="explicit"):
    """Manifold-constrained gradient with the measurement projection (see the module docstring).

    Attributes:
        num_steps: DDPM steps (official: 1000).
        scale: :math:`\\zeta`, the step on the gradient of the residual norm (official: 1).

    Per-step statistics: ``t`` and ``residual_norm`` (chain mean of :math:`\\lVert y - A \\hat
    x_0 \\rVert` before the step).
    """

    num_steps: int = 1000
    scale: float = 1.0
    requires: ClassVar[frozenset[str]] = frozenset({"linear"})
    uses_noise_level: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_nonnegative("MCG", scale=self.scale)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        t, s = state.grid[state.step], state.grid[state.step + 1]

        guided = dps_mean(problem, state.particles, t, s, self.scale)
        x_s = guided.mean
        if float(guided.noise_scale) > 0:
            x_s = add_gaussian_noise(x_s, guided.noise_scale, generator)
        x_s = noised_measurement_projection(problem, x_s, s, generator)
        return advance(state, x_s, residual_norm=chain_mean(guided.residual_norm, state))
