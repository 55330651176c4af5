r"""Score-SDE projection: the unconditional predictor-corrector sampler with each update preceded by
a projection onto the noised measurement (Song, Shen, Xing, Ermon; ICLR 2022; the inpainting of
Song et al. 2021 for a general linear operator).

Before the corrector and before the predictor the state's observed part is moved towards the
measurement noised to the current time, with weight :math:`\lambda` (paper, eq. 7 and Algorithm
2; official ``cs.get_projection_sampler``):

.. math::
    x &\leftarrow x + \lambda A^+\big(\alpha_t y + \sigma_t A z - A x\big), \\
    x &\leftarrow x + \epsilon\, \nabla \log p_t(x) + \sqrt{2\epsilon}\, z', \quad
    \epsilon = 2 \frac{\alpha_t^2}{\alpha_s^2}
        \Big(r\, \overline{\lVert z' \rVert} \big/
        \overline{\lVert \nabla \log p_t(x) \rVert}\Big)^2
    \quad \text{(Langevin corrector)}, \\
    x &\leftarrow x + \lambda A^+\big(\alpha_t y + \sigma_t A z'' - A x\big), \qquad
    x_s = a\, \hat x_0 + b\, \hat\epsilon + c\, z''' \quad \text{(predictor)},

with the score from Tweedie, :math:`\nabla \log p_t = (\alpha_t \hat x_0 - x)/\sigma_t^2`, and
:math:`r` the signal-to-noise ratio (the bars: means over the particles of a chain). The last step
ends at :math:`t = 0` on the Tweedie estimate (the official ``denoise`` step), which is then
projected with weight 1 (its final merge). The projection is
:func:`~diffpost.posterior.engines.explicit.common.noised_measurement_projection`: for an operator
with orthonormal rows :math:`A = \Lambda T` (the paper's subsampled orthogonal transforms) it is the
paper's :math:`T^{-1}[\lambda \Lambda \hat y_t + (1-\lambda)\Lambda T x + (I - \Lambda) T x]`; for
any other linear operator its least-squares generalisation.

Defaults (official ``configs/default_cs_configs.py``): 1000 steps, one corrector step per step,
:math:`r = 0.206`, :math:`\lambda = 1`. Departures: the predictor is the ancestral (DDPM) step,
which agrees with the official reverse-diffusion predictor to first order in the step and holds
on every schedule; the corrector's step size averages the norms over a chain, as the official
code does over its batch (per-particle norms, correlated with the move's own noise, inflate the
variance: 2-3x on a 4-D Gaussian), so the particles of a chain share it and are not independent
draws (``independent_particles = False``; a chain of one particle is the per-particle rule); it
carries :math:`\alpha_t^2 / \alpha_s^2` (the official :math:`1 - \beta_i` on VP, 1 on VE).

**Noise.** As MCG, it treats :math:`y` as noiseless: with :math:`\sigma_y > 0` the draws carry
the measurement's noise on the observed part (``uses_noise_level = False``). Two NFE per step,
no VJP; any linear operator (:math:`A^+` in closed form with an SVD, by conjugate gradients
otherwise).

References:
    Song, Shen, Xing, Ermon. Solving Inverse Problems in Medical Imaging with Score-Based
    Generative Models. ICLR 2022. arXiv:2111.08005. Official code:
    github.com/yang-song/score_inverse_problems (``cs.py``, ``configs/default_cs_configs.py``).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through
    Stochastic Differential Equations. ICLR 2021. arXiv:2011.13456 (predictor-corrector
    sampling, Algorithm 5; inpainting, appendix I.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0, score_from_x0
from diffpost.models.samplers import ddim_coefficients
from diffpost.posterior.engines.common import check_positive, check_unit_interval
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    add_gaussian_noise,
    advance,
    chain_mean,
    gaussian_noise,
    noised_measurement_projection,
    per_particle_norm,
)
from diffpost.posterior.problem import Problem

__all__ = ["ScoreSDE"]


def chain_norm_ratio(noise: Tensor, score: Tensor, state: ExplicitState) -> Tensor:
    """Per chain, the mean over its particles of :math:`\\lVert z \\rVert` over that of
    :math:`\\lVert \\nabla \\log p_t \\rVert`, ``(chains * N, 1, ..., 1)`` (one value per
    particle, repeated within its chain)."""
    shape = state.log_weights.shape
    noise_norm = per_particle_norm(noise).reshape(shape).mean(-1, keepdim=True)
    score_norm = per_particle_norm(score).reshape(shape).mean(-1, keepdim=True)
    ratio = (noise_norm / score_norm.clamp_min(1e-30)).expand(shape)
    return ratio.reshape((-1,) + (1,) * (noise.dim() - 1))


@dataclass(frozen=True)
class ScoreSDE(ExplicitEngine, family="explicit"):
    """Predictor-corrector sampling with measurement projections (see the module docstring).

    Attributes:
        num_steps: predictor steps, each after one corrector step (official: 1000).
        snr: :math:`r`, the corrector's signal-to-noise ratio (official default 0.206).
        weight: :math:`\\lambda \\in [0, 1]`, how far each projection moves the observed part
            (official ``coeff``: 1; its CT configuration 0.841).

    Per-step statistics: ``t`` and ``corrector_step`` (chain mean of the Langevin step size).
    """

    num_steps: int = 1000
    snr: float = 0.206
    weight: float = 1.0
    requires: ClassVar[frozenset[str]] = frozenset({"linear"})
    uses_noise_level: ClassVar[bool] = False
    independent_particles: ClassVar[bool] = False  # a chain shares its corrector step size

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive("ScoreSDE", snr=self.snr)
        check_unit_interval("ScoreSDE", weight=self.weight)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, s = state.grid[state.step], state.grid[state.step + 1]

        x = noised_measurement_projection(problem, state.particles, t, generator, self.weight)
        score = score_from_x0(schedule, x, problem.denoise(x, t), t)
        noise = gaussian_noise(x, generator)
        decay = (schedule.alpha(t) / schedule.alpha(s)).to(x) ** 2
        step_size = 2 * decay * (self.snr * chain_norm_ratio(noise, score, state)) ** 2
        x = x + step_size * score + torch.sqrt(2 * step_size) * noise

        x = noised_measurement_projection(problem, x, t, generator, self.weight)
        x0 = problem.denoise(x, t)
        a, b, c = (v.to(x) for v in ddim_coefficients(schedule, t, s, 1.0))
        x_s = a * x0 + b * epsilon_from_x0(schedule, x, x0, t)
        if float(c) > 0:
            x_s = add_gaussian_noise(x_s, c, generator)
        if float(s) == 0:  # the official final merge of the denoised estimate with y
            x_s = noised_measurement_projection(problem, x_s, s, generator)
        return advance(state, x_s, corrector_step=chain_mean(step_size.flatten(), state))
