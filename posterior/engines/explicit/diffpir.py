r"""DiffPIR: diffusion plug-and-play image restoration (Zhu et al., CVPRW 2023).

Half-quadratic splitting inside DDIM: the Tweedie estimate is replaced by the exact proximal
point of the data term, with a penalty that follows the noise level, and the next state is
built from that refined estimate and the noise it implies (paper, Algorithm 1; official
``main_ddpir_*.py``):

.. math::
    \hat x_0' = \arg\min_x\ \tfrac{1}{2\sigma_y^2}\lVert y - A x\rVert^2
        + \tfrac{\lambda}{2 \bar\sigma_t^2} \lVert x - \hat x_0 \rVert^2, \qquad
    \hat\epsilon' = \frac{x_t - \alpha_t \hat x_0'}{\sigma_t}, \qquad
    x_s = \alpha_s \hat x_0' + \sigma_s\big(\sqrt{1-\zeta}\,\hat\epsilon' + \sqrt{\zeta}\, z\big),

with :math:`\bar\sigma_t = \sigma_t / \alpha_t` (the official :math:`\rho_t = \lambda \sigma_y^2 /
\bar\sigma_t^2` on :math:`\lVert y - Ax\rVert^2 + \rho_t\lVert x - \hat x_0\rVert^2`, the same
minimiser); for noiseless data the projection of :math:`\hat x_0` onto :math:`\{A x = y\}`. The
last step returns :math:`\hat x_0'`. One NFE per step, no VJP.

Defaults (official deblurring and super-resolution scripts): 100 steps, :math:`\lambda = 1`,
:math:`\zeta = 0.1` (its inpainting scripts use 20 steps and :math:`\zeta = 1`). The proximal
step is solved in closed form through the operator's SVD where it has one and the noise level is
one number (the official code has one closed form per operator: FFT for blur and
super-resolution, entry-wise for inpainting), and otherwise by conjugate gradients to a relative
tolerance of 1e-6 (at most ``cg_iterations``), which reaches the same point for any linear
operator. Departures: the time grid is the engines' shared one
(:func:`~diffpost.posterior.engines.common.sampling_grid`: the DDIM sub-sequence, Karras
spacing on EDM) rather than the official quadratic skip, so that the engine is right on every
schedule; and it starts from the reference noise, not from :math:`y` noised to
:math:`t_{T-1}` (where :math:`y` carries a weight of 0.006).

Requires a :class:`~diffpost.models.observations.GaussianObservation` with a linear operator
(:math:`A` and :math:`A^\top`; an SVD is used where there is one; no VJP).

References:
    Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool. Denoising Diffusion Models for Plug-and-Play
    Image Restoration. CVPR Workshops 2023. arXiv:2305.08995. Official code:
    github.com/yuanzhi-zhu/DiffPIR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.posterior.engines.common import (
    check_positive,
    check_positive_integers,
    check_unit_interval,
)
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    advance,
    chain_mean,
    gaussian_noise,
    proximal_data_step,
)
from diffpost.posterior.guidance import residual_norm
from diffpost.posterior.problem import Problem

__all__ = ["DiffPIR"]


@dataclass(frozen=True)
class DiffPIR(ExplicitEngine, family="explicit"):
    """Diffusion plug-and-play image restoration (see the module docstring).

    Attributes:
        num_steps: steps of the grid (official: 100).
        lambda_: :math:`\\lambda > 0`, the prior's weight in the proximal step (official: 1).
        zeta: :math:`\\zeta \\in [0, 1]`, the fraction of fresh noise (official: 0.1).
        cg_iterations: cap on the conjugate-gradient iterations of the proximal step (used
            without an SVD or with one noise level per measurement).

    Per-step statistics: ``t`` and ``residual_norm`` (chain mean of :math:`\\lVert y - A \\hat
    x_0'\\rVert`).
    """

    num_steps: int = 100
    lambda_: float = 1.0
    zeta: float = 0.1
    cg_iterations: int = 100
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation", "linear"})

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive("DiffPIR", lambda_=self.lambda_)
        check_unit_interval("DiffPIR", zeta=self.zeta)
        check_positive_integers("DiffPIR", cg_iterations=self.cg_iterations)

    def _data_weight(self, problem: Problem, t: Tensor) -> Tensor | None:
        """:math:`\\bar\\sigma_t^2 / (\\lambda \\sigma_y^2)`, per measurement."""
        if problem.gaussian.noiseless:
            return None
        noise_ratio = problem.prior.schedule.noise_ratio(t).to(problem.dtype)
        sigma = problem.gaussian.sigma.to(problem.dtype)
        return noise_ratio**2 / (self.lambda_ * sigma**2)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, s = state.grid[state.step], state.grid[state.step + 1]
        last = state.step + 2 == state.grid.shape[0]
        x_t = state.particles

        x0 = problem.denoise(x_t, t)
        refined = proximal_data_step(
            problem, x0, self._data_weight(problem, t), self.cg_iterations, closed_form=True
        )
        if last:
            x_s = refined
        else:
            alpha_s, sigma_s = (v.to(x_t) for v in schedule(s))
            eps = epsilon_from_x0(schedule, x_t, refined, t)
            noise = gaussian_noise(x_t, generator)
            x_s = alpha_s * refined + sigma_s * (
                math.sqrt(1 - self.zeta) * eps + math.sqrt(self.zeta) * noise
            )
        return advance(state, x_s, residual_norm=chain_mean(residual_norm(problem, refined), state))
