r"""SNIPS: solving noisy inverse problems stochastically (Kawar, Vaksman, Elad; NeurIPS 2021).

Annealed Langevin dynamics (Song & Ermon 2019) on the posterior, in the spectral coordinates
:math:`\bar x = V^\top x` of :math:`A = U \operatorname{diag}(s) V^\top`, with the
variance-exploding variable :math:`x = x_t / \alpha_t` at noise level :math:`\rho = \sigma_t /
\alpha_t` and its prior score :math:`(\hat x_0 - x) / \rho^2`. At each level :math:`\rho_c`
(decreasing geometrically), a few Langevin steps :math:`\bar x \leftarrow \bar x + \alpha \odot g +
\sqrt{2 \alpha} \odot z` use a per-coordinate step and gradient (official
``general_anneal_Langevin_dynamics``), with :math:`\epsilon` = ``step_lr`` :math:`/ \rho_L^2`
(:math:`\rho_L` the last level):

.. math::
    \begin{array}{lll}
      s_i = 0: & \alpha_i = \epsilon \rho_c^2, &
        g_i = (V^\top \nabla \log p)_i \\
      s_i \rho_c > \sigma_y: & \alpha_i = \epsilon (\rho_c^2 - \sigma_y^2 / s_i^2), &
        g_i = s_i \big((U^\top y)_i - s_i \bar x_i\big) / (s_i^2 \rho_c^2 - \sigma_y^2) \\
      s_i \rho_c < \sigma_y: & \alpha_i = \epsilon \rho_c^2 (1 - s_i^2 \rho_c^2 / \sigma_y^2), &
        g_i = (V^\top \nabla \log p)_i
              + s_i \big((U^\top y)_i - s_i \bar x_i\big) / (\sigma_y^2 - s_i^2 \rho_c^2)
    \end{array}

(a coordinate with :math:`s_i \rho_c = \sigma_y` exactly gets no gradient, as in the official code).
On coordinates noisier than the measurement, the prior's score is dropped and the iterate is pulled
to :math:`\bar y_i = (U^\top y)_i / s_i`; on the others the likelihood of :math:`y` given the noisy
iterate is added to the prior's score. The particles are the iterates :math:`x`; the result is the
last iterate at the smallest level (no final denoising, as in the official code).

Levels: ``num_steps`` noise ratios spaced geometrically from ``sigma_max`` to ``sigma_min``, clipped
to the schedule's range, read at the times where the schedule has them
(:meth:`~diffpost.models.schedules.Schedule.time_of_noise_ratio`). One driver iteration runs the
``steps_per_level`` Langevin steps of one level (as many NFEs, no VJP). The chain starts from
:math:`\mathcal{N}(0, \rho_1^2 I)`, the law of the first level for data much smaller than
:math:`\rho_1` (the official code starts from uniform noise on the image range).

Defaults (official CelebA configuration, an NCSNv2 network): 500 levels from 90 to 0.01, 5 steps
per level (2500 NFEs), ``step_lr = 3.3e-6``. The official code computes a dense SVD and zeroes
singular values below :math:`10^{-3}`; here the operator's structured SVD is used and only singular
values below :math:`10^{-10}` times the largest are treated as zero.

The step size is tied to the number of levels: with the default ``step_lr`` each step moves a
particle by 3.3% of its distance to :math:`\hat x_0`, so a few levels do not equilibrate. Measured
on the Gaussian-mixture benchmark (``benchmarks/gmm.py --dims 8,80 --obs-dims 1,2,4 --steps 20
--seeds 3 --draws 300 --metric sw2``; sliced Wasserstein SW_2 to the exact posterior, mean over
seeds 0-2, cells (d, d_y) = (8,1) (8,2) (8,4) (80,1) (80,2) (80,4)): with 20 levels (100 NFEs) 24.3,
25.0, 24.1, 24.1, 23.2, 25.4 (the prior's distance is 7–18); with the default 500 levels at d = 8:
5.47, 7.13, 1.68. On a 2-D mixture, 100 levels with ``step_lr = 3.3e-5`` reach the noise floor
(``tests/test_explicit_engines.py``).

Requires a :class:`~diffpost.models.observations.GaussianObservation` with a linear operator that
has an SVD and a single noise level.

References:
    Kawar, Vaksman, Elad. SNIPS: Solving Noisy Inverse Problems Stochastically. NeurIPS 2021.
    arXiv:2105.14951. Official code: github.com/bahjat-kawar/snips_torch
    (``models/__init__.py: general_anneal_Langevin_dynamics``, ``configs/celeba.yml``).
    Song, Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. NeurIPS
    2019. arXiv:1907.05600.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.posterior.engines.common import check_positive_integers
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    SpectralObservation,
    advance,
    gaussian_noise,
    initial_state,
    spectral_observation,
)
from diffpost.posterior.problem import Problem

__all__ = ["SNIPS"]


@dataclass(frozen=True)
class SNIPS(ExplicitEngine, family="explicit"):
    """SNIPS annealed Langevin sampling in the SVD basis (see the module docstring).

    Attributes:
        num_steps: number of noise levels (official: 500).
        steps_per_level: Langevin steps per level (official: 5).
        step_lr: base step size; the step at level :math:`\\rho_c` is ``step_lr`` times
            :math:`(\\rho_c / \\rho_L)^2` (official: 3.3e-6).
        sigma_max: largest noise ratio (official: 90), lowered to the schedule's largest.
        sigma_min: smallest noise ratio (official: 0.01), raised to the schedule's smallest.

    Per-step statistics: ``t`` and ``noise_level`` (:math:`\\rho_c`).
    """

    num_steps: int = 500
    steps_per_level: int = 5
    step_lr: float = 3.3e-6
    sigma_max: float = 90.0
    sigma_min: float = 0.01
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation", "linear", "svd"})

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive_integers("SNIPS", steps_per_level=self.steps_per_level)
        if not (
            isinstance(self.step_lr, (int, float))
            and math.isfinite(self.step_lr)
            and self.step_lr > 0
        ):
            raise ValueError(f"SNIPS: step_lr must be a finite number > 0; got {self.step_lr!r}")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(
                "SNIPS: needs 0 < sigma_min < sigma_max < inf; got "
                f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}"
            )

    def _levels(self, problem: Problem) -> Tensor:
        """Times of the levels after the first one again (the initial law's), ``(K + 1,)``."""
        schedule = problem.prior.schedule
        ends = schedule.noise_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64))
        high = min(self.sigma_max, float(ends[1]))
        low = max(self.sigma_min, float(ends[0]))
        if not low < high:
            raise ValueError(
                f"SNIPS: the schedule's noise ratios [{float(ends[0]):.3g}, {float(ends[1]):.3g}] "
                f"do not meet [sigma_min, sigma_max] = [{self.sigma_min}, {self.sigma_max}]"
            )
        ratios = torch.logspace(
            math.log10(high), math.log10(low), self.num_steps, dtype=torch.float64
        )
        times = schedule.time_of_noise_ratio(ratios)
        return torch.cat([times[:1], times]).to(problem.device)

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> ExplicitState:
        spectral = spectral_observation(problem, self.name, num_chains * num_particles)
        grid = self._levels(problem)
        schedule = problem.prior.schedule
        first = float(schedule.noise_ratio(grid[0]))
        last = float(schedule.noise_ratio(grid[-1]))
        particles = first * torch.randn(
            (num_chains * num_particles,) + tuple(problem.event_shape),
            generator=generator,
            dtype=problem.dtype,
            device=problem.device,
        )
        return initial_state(
            problem,
            grid,
            num_chains,
            num_particles,
            generator,
            particles=particles,
            constants={"spectral": spectral, "epsilon": self.step_lr / last**2},
        )

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        spectral: SpectralObservation = state.constants["spectral"]
        svd, singular, sigma = spectral.svd, spectral.singular_values, spectral.sigma
        t = state.grid[state.step + 1]
        x = state.particles
        alpha = schedule.alpha(t).to(x)
        level = schedule.noise_ratio(t).to(x)

        # per-coordinate step sizes and which coordinates see the prior and the likelihood
        noisier = spectral.observed & (singular * level > sigma)
        less_noisy = spectral.observed & (singular * level < sigma)
        variance = level**2
        if sigma > 0:
            safe = torch.where(spectral.observed, singular, 1.0)
            gap = torch.where(noisier, level**2 - (sigma / safe) ** 2, 0.0)
            shrink = torch.where(less_noisy, 1 - (singular * level / sigma) ** 2, 1.0)
            variance = torch.where(noisier, gap, level**2 * shrink)
        step_size = state.constants["epsilon"] * variance  # (d,)
        denominator = torch.where(
            noisier | less_noisy, (singular * level) ** 2 - sigma**2, 1.0
        ).abs()
        uses_prior = ~noisier & (less_noisy | ~spectral.observed)

        x_bar = svd.vt(x)
        for _ in range(self.steps_per_level):
            x0 = problem.denoise(alpha * x, t)
            score_bar = svd.vt((x0 - x) / level**2)
            data = singular * (spectral.rotated_y - singular * x_bar) / denominator
            gradient = torch.where(noisier | less_noisy, data, 0.0)
            gradient = gradient + torch.where(uses_prior, score_bar, 0.0)
            x_bar = (
                x_bar
                + step_size * gradient
                + (2 * step_size).sqrt() * gaussian_noise(x_bar, generator)
            )
            x = svd.v(x_bar)
        return advance(state, x, noise_level=level)
