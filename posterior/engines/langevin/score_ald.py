r"""Score-ALD: annealed Langevin dynamics with an annealed likelihood (Jalal, Arvinte, Daras, Price,
Dimakis, Tamir; NeurIPS 2021).

Annealed Langevin dynamics (Song & Ermon 2019) runs a few Langevin steps on each of a decreasing
list of noise levels :math:`\beta_1 > \dots > \beta_L`, targeting the noised prior :math:`p_\beta`
tilted by the likelihood. Jalal et al. (Alg. 1) anneal the likelihood too: a sample at level
:math:`\beta` is :math:`x_0 + \beta z`, so :math:`y - A x \approx \beta A z + \text{noise}` and
its variance is inflated from :math:`\sigma_y^2` to :math:`\sigma_y^2 + \gamma^2`:

.. math:: x \leftarrow x + \eta_\beta \Big( s_\theta(x; \beta)
          + \frac{A^H (y - A x)}{\sigma_y^2 + \gamma_\beta^2} \Big) + \sqrt{2 \eta_\beta}\, \zeta,
          \qquad \eta_\beta = \epsilon\, \beta^2 / \beta_L^2,

repeated ``steps_per_level`` times per level. The paper calls :math:`\gamma_\beta` an annealing
term without fixing it; we take :math:`\gamma_\beta = \beta` (the standard deviation that
:math:`\beta z` adds to each measurement for an operator with unit-norm rows). For a
non-linear operator :math:`A^H (y - A x)` is :math:`J_A(x)^\top (y - A(x))`.

Here the variable :math:`x` is the variance-exploding one, :math:`x = x_t / \alpha(t)` with
:math:`\beta = \sigma(t)/\alpha(t)`, whose score is :math:`(D(\alpha x, t) - x) / \beta^2` with the
library's denoiser :math:`D` (Tweedie), so the engine runs on every schedule; the particles are
kept in that variable and end at :math:`x_0 + \beta_L z` (no final denoising, as the official code).

**Two data terms** (``likelihood``):

- ``"paper"`` (default): the annealed Gaussian term above; needs a
  :class:`~diffpost.models.observations.GaussianObservation` (any operator).
- ``"norm_matched"``: the official code's (``main.py:LangevinOptimizer._sample``): the likelihood
  gradient :math:`g = \nabla_x \log p(y \mid x)` is rescaled to ``norm_ratio`` times the norm of
  the prior score, :math:`g \leftarrow g\, \lVert s_\theta \rVert / \lVert g \rVert \cdot
  \text{mse}` with ``mse = 5``, so the weight of the data no longer depends on :math:`\sigma_y`.
  The official code takes the norms over the whole batch; here they are per particle, so that
  particles stay independent. Works with any differentiable likelihood.

**Defaults** (official ``configs/file/*.yaml``): NCSNv2 geometric levels from ``noise_max = 232``
to ``noise_min = 0.0066`` (clamped to the schedule's range of noise ratios), ``steps_per_level =
3`` (the code uses 3 up to level 1800 and ``n_steps_each`` = 3 or 4 after). The official runs use
the last 1155 of 2311 levels (from :math:`\beta \approx 1.2`, their MRI images being normalised to
unit scale) starting from :math:`x \sim \mathcal{U}[0, 1)`; our ``num_steps = 1155`` levels span the
whole range instead, from the reference law :math:`\mathcal{N}(0, (1 + \beta_1^2) I)`, since a
library prior need not have unit scale (pass ``noise_max`` to start lower).

**Step size** ``step_size`` :math:`= \epsilon / \beta_L^2` (the step at level :math:`\beta` is
``step_size`` :math:`\cdot \beta^2`). The official :math:`\epsilon = 5 \cdot 10^{-5}` gives
:math:`\approx 1.15`, which diverges with the paper's data term (measured on a 2-D Gaussian
problem with :math:`\lVert A \rVert^2 = 1.25`: non-finite particles at level 256 of 1155): at a
high level the prior term has curvature :math:`\approx 1/\beta^2` and the annealed data term
:math:`\lVert A \rVert^2 / (\sigma_y^2 + \beta^2) \approx \lVert A \rVert^2 / \beta^2`, and
unadjusted Langevin is stable only for :math:`\text{step\_size}\,(1 + \lVert A \rVert^2) < 2`.
The step is therefore divided by :math:`\max(1, \lVert A \rVert^2)` (the operator's spectral
norm, :meth:`~diffpost.models.operators.base.LinearOperator.norm`; non-linear operators count as
1-Lipschitz), which keeps that product below 1 for any operator (without it a 6x6
:class:`~diffpost.models.operators.Radon` of norm 6.7 diverged at level 39;
``tests/test_langevin_engines.py``). We default to 0.5, one Newton step on the summed curvature
:math:`2/\beta^2` of an operator of unit norm (measured on that problem with the default 1155
levels, 1000 draws: variance ratios 0.94 and 0.96 with a Monte Carlo sd of 0.045, means within
0.04 for posterior standard deviations of 0.7 and 1.2; 1.007 and 1.008 before the division by
:math:`\lVert A \rVert^2 = 1.25`). The norm-matched term has its own
limit, about ``step_size * norm_ratio < 2`` in low dimension (where the prior score is not
dominated by its noise component): with ``norm_ratio = 5`` it diverges on the Gaussian problem and
on the Gaussian-mixture benchmark at 0.5 too, so pass a smaller ``step_size`` with it outside
images.

**Measured** on the Gaussian-mixture benchmark at the default 1155 levels
(``benchmarks/results/gmm-langevin-default-steps.md``, 10 seeds): sliced Wasserstein 5.83, 2.95,
6.77 and 8.25 at (d, d_y) = (8, 1), (8, 4), (80, 1), (80, 4), against 0.4-2.0 for the particle
filters: it matches Gaussian posteriors (above), but nothing in it reweights modes.

References:
    Jalal, Arvinte, Daras, Price, Dimakis, Tamir. Robust Compressed Sensing MRI with Deep
    Generative Priors. NeurIPS 2021. arXiv:2108.01368 (Alg. 1).
    Official code: github.com/utcsilab/csgm-mri-langevin (``main.py``, ``configs/file/*.yaml``).
    Jalal, Karmalkar, Dimakis, Price. Instance-Optimal Compressed Sensing via Posterior Sampling.
    ICML 2021. arXiv:2106.11438.
    Song, Ermon. Improved Techniques for Training Score-Based Generative Models (NCSNv2).
    NeurIPS 2020 (geometric levels, step size proportional to the noise variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Engine
from diffpost.posterior.engines.common import (
    check_positive,
    check_positive_integers,
    gaussian_data_gradient,
    initial_particles,
    operator_gain,
)
from diffpost.posterior.engines.langevin.common import (
    AnnealingState,
    langevin_move,
    noise_levels,
)
from diffpost.posterior.problem import Problem

__all__ = ["ScoreALD"]

LIKELIHOODS = ("paper", "norm_matched")


def _per_particle_norm(x: Tensor) -> Tensor:
    """Euclidean norm of each particle, shaped to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))


@dataclass(frozen=True)
class ScoreALD(Engine, family="langevin"):
    """Annealed Langevin dynamics with an annealed likelihood (see the module docstring).

    Attributes:
        num_steps: noise levels (default 1155, the number of levels the official runs use).
        steps_per_level: Langevin steps per level, one NFE each (official: 3).
        step_size: :math:`\\epsilon / \\beta_L^2`; the step at level :math:`\\beta` is
            ``step_size * beta**2`` (default 0.5; official 5e-5 / 0.0066**2, which diverges with
            the paper's data term, see the module docstring).
        noise_max: largest noise ratio :math:`\\beta_1` (official NCSNv2 model: 232).
        noise_min: smallest noise ratio :math:`\\beta_L` (official: 0.0066).
        likelihood: ``"paper"`` (annealed Gaussian term) or ``"norm_matched"`` (official code).
        norm_ratio: data-gradient norm over prior-score norm for ``"norm_matched"`` (official
            ``mse``: 5).
    """

    num_steps: int = 1155
    steps_per_level: int = 3
    step_size: float = 0.5
    noise_max: float = 232.0
    noise_min: float = 0.0066
    likelihood: str = "paper"
    norm_ratio: float = 5.0
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers(
            "ScoreALD", num_steps=self.num_steps, steps_per_level=self.steps_per_level
        )
        check_positive(
            "ScoreALD",
            step_size=self.step_size,
            noise_max=self.noise_max,
            noise_min=self.noise_min,
            norm_ratio=self.norm_ratio,
        )
        if not self.noise_min < self.noise_max:
            raise ValueError(
                f"ScoreALD needs noise_min < noise_max; got {self.noise_min}, {self.noise_max}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"ScoreALD: likelihood must be one of {LIKELIHOODS}; got {self.likelihood!r}"
            )

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> AnnealingState:
        if self.likelihood == "paper" and problem.gaussian is None:
            raise ValueError(
                "ScoreALD(likelihood='paper') anneals the noise variance of a GaussianObservation; "
                f"the model has {problem.describe_observation()} (use likelihood='norm_matched')"
            )
        schedule = problem.prior.schedule
        _, times = noise_levels(
            "ScoreALD", schedule, self.num_steps, self.noise_max, self.noise_min, rho=None
        )
        x_t = initial_particles(problem, times, num_chains * num_particles, generator)
        particles = x_t / schedule.alpha(times[0]).to(x_t)
        return AnnealingState.start(particles, times, num_chains, num_particles)

    def step(
        self, problem: Problem, state: AnnealingState, generator: torch.Generator
    ) -> tuple[AnnealingState, dict[str, Tensor]]:
        schedule = problem.prior.schedule
        t = state.times[state.step]
        alpha, noise = schedule.alpha(t), schedule.noise_ratio(t)
        step_size = (self.step_size * noise**2 / self._gain(problem)).to(state.particles)
        x = state.particles
        for _ in range(self.steps_per_level):
            prior_score = (problem.denoise(alpha.to(x) * x, t) - x) / noise.to(x) ** 2
            drift = prior_score + self._data_gradient(problem, x, noise, prior_score)
            x = langevin_move(x, drift, step_size, generator)
        info = {"t": t, "noise": noise, "step_size": step_size}
        return state._replace(particles=x, step=state.step + 1), info

    def _gain(self, problem: Problem) -> float:
        """The step's divisor: :math:`\\max(1, \\lVert A \\rVert^2)` for the paper's term, else
        1."""
        return max(1.0, operator_gain(problem)) if self.likelihood == "paper" else 1.0

    def _data_gradient(
        self, problem: Problem, x: Tensor, noise: Tensor, prior_score: Tensor
    ) -> Tensor:
        if self.likelihood == "paper":
            gaussian = problem.gaussian
            variance = gaussian.sigma.to(x) ** 2 + noise.to(x) ** 2
            return gaussian_data_gradient(gaussian, x, variance)
        gradient = problem.grad_log_likelihood(x)
        # a particle that fits the data exactly has a zero gradient, and keeps it
        # (normalised first: the prior score's norm over a tiny one would overflow to inf * 0)
        gradient_norm = _per_particle_norm(gradient).clamp_min(torch.finfo(x.dtype).tiny)
        return self.norm_ratio * _per_particle_norm(prior_score) * (gradient / gradient_norm)
