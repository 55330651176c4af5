r"""DSG: diffusion with a spherical Gaussian constraint (Yang, Ding, Cai, Yu, Wang, Shi; ICML 2024).

DSG keeps DPS's guidance direction but not its step: in high dimension the stochastic part of a
DDIM step, :math:`c z` with :math:`c` the step's noise standard deviation, lies on the sphere of
radius :math:`r = \sqrt{n}\, c` around the step's mean, and DSG moves the sample on that sphere
towards the data instead of off it (paper, Algorithm 1; official ``condition_methods.DSG``):

.. math::
    \hat x_0 = D(x_t, t), \quad \mu = a\, \hat x_0 + b\, \hat\epsilon, \quad
    d^\star = -r\, \frac{g}{\lVert g \rVert}, \quad
    g = \nabla_{x_t} \big\lVert y - \mathbb{E}[y \mid \hat x_0(x_t)] \big\rVert_2,\\
    d = c z + w\,(d^\star - c z), \qquad x_s = \mu + r\, \frac{d}{\lVert d \rVert},

with :math:`(a, b, c)` the DDIM coefficients at :math:`\eta` and :math:`w` the guidance rate;
steps off the ``interval`` are plain DDIM steps (no gradient). Norms are per particle over the
signal's :math:`n` entries. The step is a fixed distance whatever the residual, so like DPS it
does not read :math:`\sigma_y` and needs a finite likelihood.

Defaults (the official ``run_DSG.sh``): 100 DDIM steps with :math:`\eta = 1` (its sampler's
default), guidance rate 0.2, guidance at every step (``interval = 1``; its 1000-step
configurations use 10). The norm is taken per particle (the official code's per image; its batch
is one image), and the grid is the engines' shared one
(:func:`~diffpost.posterior.engines.common.sampling_grid`).

Any likelihood with a residual (:func:`diffpost.posterior.guidance.observation_residual`), as for
DPS; one NFE per step and one VJP per guided step.

References:
    Yang, Ding, Cai, Yu, Wang, Shi. Guidance with Spherical Gaussian Constraint for Conditional
    Diffusion. ICML 2024. arXiv:2402.03201. Official code: github.com/LingxiaoYang2023/DSG2024
    (``guided_diffusion/condition_methods.py``, ``run_DSG.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.samplers import ddim_coefficients
from diffpost.posterior.engines.common import (
    check_positive_integers,
    check_unit_interval,
)
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    advance,
    chain_mean,
    gaussian_noise,
    per_particle_norm,
)
from diffpost.posterior.guidance import denoise_with_residual_gradient
from diffpost.posterior.problem import Problem

__all__ = ["DSG"]


@dataclass(frozen=True)
class DSG(ExplicitEngine, family="explicit"):
    """Diffusion with a spherical Gaussian constraint (see the module docstring).

    Attributes:
        num_steps: DDIM steps (official: 100).
        guidance_rate: :math:`w \\in [0, 1]`, how far the step turns from the sampled noise to
            the data's direction (official: 0.2; 0 is unguided DDIM).
        interval: guide every ``interval``-th step (official: 1 at 100 steps).
        eta: DDIM stochasticity, in ``(0, 1]`` (official: 1; the sphere's radius is 0 at 0).

    Per-step statistics: ``t`` and ``residual_norm`` (chain mean of :math:`\\lVert y -
    \\mathbb{E}[y \\mid \\hat x_0]\\rVert` on guided steps, NaN on the others).
    """

    num_steps: int = 100
    guidance_rate: float = 0.2
    interval: int = 1
    eta: float = 1.0
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})
    uses_noise_level: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_unit_interval("DSG", guidance_rate=self.guidance_rate, eta=self.eta)
        check_positive_integers("DSG", interval=self.interval)
        if self.eta == 0:
            raise ValueError("DSG: eta must be > 0 (the sphere's radius is the step's noise)")

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, s = state.grid[state.step], state.grid[state.step + 1]
        x_t = state.particles
        guided = state.step % self.interval == 0

        if guided:
            x0, norm, grad = denoise_with_residual_gradient(problem, x_t, t)
        else:
            x0, norm = problem.denoise(x_t, t), torch.full(x_t.shape[:1], float("nan"))
        a, b, c = (v.to(x_t) for v in ddim_coefficients(schedule, t, s, self.eta))
        mean = a * x0 + b * epsilon_from_x0(schedule, x_t, x0, t)
        sampled = c * gaussian_noise(x_t, generator)
        if guided and float(c) > 0:
            radius = c * x_t[0].numel() ** 0.5
            towards_data = -radius * grad / per_particle_norm(grad).clamp_min(1e-30)
            direction = sampled + self.guidance_rate * (towards_data - sampled)
            x_s = mean + radius * direction / per_particle_norm(direction).clamp_min(1e-30)
        else:
            x_s = mean + sampled
        return advance(state, x_s, residual_norm=chain_mean(norm.to(x_t), state))
