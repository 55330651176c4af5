r"""DAPS: decoupled annealing posterior sampling (Zhang, Chu, Berner, Meng, Anandkumar, Song; CVPR
2025).

DAPS anneals a sample of :math:`x_0` rather than a diffusion trajectory. At each noise level
:math:`\beta_i` (a noise ratio :math:`\sigma/\alpha`, see
:mod:`~diffpost.posterior.engines.langevin.common`) it holds :math:`x_{t_i} = \alpha_i (x_0^{(i-1)}
+ \beta_i \epsilon)` and does three things (paper, Alg. 1; official ``sampler.py:DAPS.sample``):

1. **Unconditional denoising** by the probability-flow ODE, from :math:`t_i` to 0 in ``ode_steps``
   Euler steps (no measurement, no gradient through the denoiser):
   :math:`\hat x_0 = \mathrm{ODE}(x_{t_i})`;
2. **Langevin on** :math:`x_0` for ``langevin_steps`` steps, targeting the decoupled posterior
   :math:`p(x_0 \mid x_{t_i}, y) \propto \mathcal{N}(x_0; \hat x_0, r_i^2 I)\, p(y \mid x_0)`
   with :math:`r_i = \beta_i` (the official ``prior_solver='gaussian'``), started at :math:`\hat
   x_0`:

   .. math:: x \leftarrow x + \eta_i \Big(\nabla_x \log p(y \mid x) + \frac{\hat x_0 -
   x}{r_i^2}\Big)
             + \sqrt{2 \eta_i}\, \xi;

3. **Re-noising** to the next level, :math:`x_{t_{i+1}} = \alpha_{i+1} (x_0^{(i)} + \beta_{i+1}
   \epsilon)` (plain :math:`x_0^{(i)}` after the last level).

The Langevin target needs only :math:`\nabla_x \log p(y \mid x)`, so any differentiable
likelihood works (Gaussian with a non-linear operator such as phase retrieval, Poisson, ...), and no
vector-Jacobian product through the denoiser is ever taken: a run costs
``num_steps * ode_steps`` NFEs plus ``num_steps * langevin_steps`` likelihood gradients.

**Schedules** (official ``configs/sampler/edm_daps.yaml`` and ``cores/mcmc.py``): the levels are
``num_steps = 200`` Karras :math:`\rho = 7` ratios from ``noise_max = 100`` to ``noise_min = 0.1``
(clamped to the schedule's range), then 0. The inner ODE runs ``ode_steps = 5`` Euler steps of
the EDM ODE: the legacy branch's grid, 4 :math:`\rho = 7` intervals from :math:`\beta_i` down to
``ode_noise_min = 0.01`` and a last step to 0, so that :math:`\hat x_0` is a denoiser output (the
main branch stops at 0.01). An Euler step of the EDM ODE in the variable :math:`x_t / \alpha` is
a deterministic DDIM step in :math:`x_t` (:func:`diffpost.models.samplers.ddim_coefficients`,
``eta = 0``), which is how it is computed here on any schedule. The step size decays linearly over
the levels, :math:`\eta_i = \eta_0 (1 + \tfrac{i}{N}(\delta - 1))` with ``step_size_min_ratio``
:math:`\delta = 0.01`; ``langevin_steps = 100``.

**Step size relative to the target's curvature.** The official :math:`\eta_0 = 10^{-4}`
(super-resolution, Gaussian blur and random inpainting configs; :math:`5 \cdot 10^{-5}` for phase
retrieval) goes with :math:`\tau = 0.01` and images on :math:`[-1, 1]`: it is one over the
curvature :math:`1/\tau^2` of the data term for an operator of unit norm, so one Langevin step is a
Gauss–Newton step. An absolute step size does not carry over to other noise levels or data scales
(measured on the Gaussian-mixture benchmark: :math:`10^{-4}` leaves the particles where the ODE
put them, log-likelihood -80 against -0.9 for exact posterior draws), so ``step_size`` is that
fraction of the inverse curvature of the Langevin target,

.. math:: \eta_i = \text{step\_size} \cdot \Big(1 + \frac{i}{N}(\delta - 1)\Big)
          \Big/ \Big(\frac{1}{r_i^2} + \frac{\lVert A \rVert^2}{v}\Big),

with :math:`v` the data term's variance (:math:`\tau^2`, or the smallest :math:`\sigma_y^2` of the
model's GaussianObservation; for other observation models :math:`\lVert A \rVert^2 / v` is the
data term's largest curvature, estimated by power iteration at ``x = 0``,
:meth:`~diffpost.posterior.Problem.likelihood_curvature`) and
:math:`\lVert A \rVert` the spectral norm of a linear operator (1 for non-linear ones, taken as
1-Lipschitz; without it a 6x6 :class:`~diffpost.models.operators.Radon` of norm 6.7 diverged). With
:math:`\tau = 0.01` and :math:`r_i \ge 0.1` this is the official :math:`\eta_i` within 1% for
``step_size = 1`` (0.5 for phase retrieval), and it keeps :math:`\eta_i` below the stability limit
of the prior term when the data term is weak (measured: a step size proportional to
:math:`\sigma_y^2` alone, without the decay, diverges on a 2-D Gaussian problem at the small levels,
where :math:`1/r_i^2` dominates).

**Data term.** By default the Langevin target uses the model's own likelihood :math:`p(y \mid
x_0)`, so that DAPS targets the posterior the model declares. The official configs instead use a
Gaussian data term of standard deviation :math:`\tau = 0.01` whatever the true :math:`\sigma_y`
(0.05 in their benchmarks), i.e. they over-weight the data; ``data_std = tau`` reproduces that for
a :class:`~diffpost.models.observations.GaussianObservation`. The two branches of the official code
differ by a factor of 2 in that term: the legacy branch (and the paper's Gaussian likelihood) uses
:math:`\lVert A(x) - y\rVert^2 / (2\tau^2)`, the main branch :math:`\lVert A(x) - y\rVert^2 /
\tau^2` (its ``score_fn`` drops the 1/2). We use the legacy/paper form, which is the Gaussian
log-likelihood of standard deviation :math:`\tau`, so that ``data_std = sigma_y`` is the model's
likelihood exactly.

**Measured.** On phase retrieval (``benchmarks/phase_retrieval.py``, 60 held-out digits, 8 draws
each, both engines in their official phase-retrieval configurations: here ``data_std = 0.01,
step_size = 0.5``, DPS ``scale = 1``): on the shipped 8x8 prior the PSNR of the posterior mean is
27.15 ± 0.61 dB against DPS's 24.30 ± 0.79; DPS fails (below 20 dB) on 5 of the 60 images, which
DAPS reconstructs at 21.5-31.9 dB, and DAPS on none (``benchmarks/results/phase_retrieval.md``).
On the 16x16 prior: 33.33 ± 0.65 against 30.95 ± 0.76 dB (``phase_retrieval_16.md``). On the
Gaussian-mixture benchmark at the default 200 levels (``gmm-langevin-default-steps.md``, 5 seeds)
the sliced Wasserstein distance is 0.81 at (d, d_y) = (8, 4) and about 5 with one observed
coordinate or d = 80, where the particle filters reach 0.4-2.0; we attribute the gap to the mode
weights of a multimodal posterior, which nothing in DAPS corrects (it does not reweight).

Not implemented: the official alternatives to Langevin (Metropolis–Hastings ``mc_algo='mh'``,
damped HMC ``'hmc'``), the other prior solvers (``'exact'``, ``'score-t'``, ``'score-min'``) and
latent DAPS. The official code returns zeros when a chain turns NaN; here the driver raises
:class:`~diffpost.posterior.EngineFailed` with the level instead.

References:
    Zhang, Chu, Berner, Meng, Anandkumar, Song. Improving Diffusion Inverse Problem Solving with
    Decoupled Noise Annealing. CVPR 2025. arXiv:2407.01521 (Alg. 1).
    Official code: github.com/zhangbingliang2019/DAPS (main: ``sampler.py``, ``cores/mcmc.py``,
    ``cores/scheduler.py``, ``configs/``; legacy: ``sampler.py:LangevinDynamics``).
    Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
    Models. NeurIPS 2022 (the EDM ODE and its Euler steps).
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
)
from diffpost.posterior.engines.langevin.common import (
    AnnealingState,
    deterministic_ddim,
    inverse_data_curvature,
    langevin_move,
    noise_levels,
    noised,
    spaced_ratios,
)
from diffpost.posterior.problem import Problem

__all__ = ["DAPS"]

#: Karras' exponent of the official annealing and ODE grids (``timestep: 'poly-7'``)
RHO = 7.0


@dataclass(frozen=True)
class DAPS(Engine, family="langevin"):
    """Decoupled annealing posterior sampling (see the module docstring for the algorithm).

    Attributes:
        num_steps: annealing levels :math:`N` (official: 200, "DAPS-1K" with 5 ODE steps).
        ode_steps: Euler steps of the probability-flow ODE per level (official: 5), one NFE each.
        langevin_steps: Langevin steps per level (official: 100; 200 for non-linear blur).
        step_size: the first level's Langevin step size over the inverse curvature of the target
            (official: 1e-4 with tau = 0.01, i.e. 1; see the module docstring).
        step_size_min_ratio: :math:`\\delta`, the last level's step size over :math:`\\eta_0`
            (official: 0.01).
        noise_max: largest noise ratio :math:`\\sigma/\\alpha` (official: 100).
        noise_min: smallest annealing noise ratio before the final 0 (official: 0.1).
        ode_noise_min: where the inner ODE's :math:`\\rho`-grid ends before its last step to 0
            (official: 0.01); must be below ``noise_min``.
        data_std: :math:`\\tau` of a Gaussian data term replacing the model's likelihood (needs a
            GaussianObservation; official configs: 0.01), or ``None`` for the model's likelihood.
    """

    num_steps: int = 200
    ode_steps: int = 5
    langevin_steps: int = 100
    step_size: float = 1.0
    step_size_min_ratio: float = 0.01
    noise_max: float = 100.0
    noise_min: float = 0.1
    ode_noise_min: float = 0.01
    data_std: float | None = None
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers(
            "DAPS",
            num_steps=self.num_steps,
            ode_steps=self.ode_steps,
            langevin_steps=self.langevin_steps,
        )
        check_positive(
            "DAPS",
            step_size=self.step_size,
            step_size_min_ratio=self.step_size_min_ratio,
            noise_max=self.noise_max,
            noise_min=self.noise_min,
            ode_noise_min=self.ode_noise_min,
        )
        if not self.ode_noise_min < self.noise_min < self.noise_max:
            raise ValueError(
                "DAPS needs ode_noise_min < noise_min < noise_max; got "
                f"{self.ode_noise_min}, {self.noise_min}, {self.noise_max}"
            )
        if self.data_std is not None:
            check_positive("DAPS", data_std=self.data_std)

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> AnnealingState:
        if self.data_std is not None and problem.gaussian is None:
            raise ValueError(
                "DAPS(data_std=...) replaces a GaussianObservation's noise level; the model has "
                f"{problem.describe_observation()} (use data_std=None for its own likelihood)"
            )
        _, times = noise_levels(
            "DAPS", problem.prior.schedule, self.num_steps, self.noise_max, self.noise_min, RHO
        )
        particles = initial_particles(problem, times, num_chains * num_particles, generator)
        return AnnealingState.start(particles, times, num_chains, num_particles)

    def step(
        self, problem: Problem, state: AnnealingState, generator: torch.Generator
    ) -> tuple[AnnealingState, dict[str, Tensor]]:
        schedule = problem.prior.schedule
        t = state.times[state.step]
        noise = schedule.noise_ratio(t)
        x0_hat = self._denoise_by_ode(problem, state.particles, t, noise)

        fraction = state.step / self.num_steps
        decay = 1 + fraction * (self.step_size_min_ratio - 1)
        data_std = self.data_std
        scale = inverse_data_curvature(problem, None if data_std is None else data_std**2)
        step_size = self.step_size * decay / (1 / float(noise) ** 2 + 1 / scale)
        x0 = self._langevin(problem, x0_hat, noise, step_size, generator)

        last = state.step + 1 == state.times.shape[0]
        particles = x0 if last else noised(schedule, x0, state.times[state.step + 1], generator)
        chains = state.log_weights.shape[0]
        with torch.no_grad():
            log_likelihood = problem.log_likelihood(x0).reshape(chains, -1).mean(-1)
        info = {"t": t, "noise": noise, "step_size": step_size, "log_likelihood": log_likelihood}
        return state._replace(particles=particles, step=state.step + 1), info

    def _denoise_by_ode(self, problem: Problem, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``ode_steps`` Euler steps of the probability-flow ODE from ``t`` to 0 (see above)."""
        schedule = problem.prior.schedule
        floor = max(self.ode_noise_min, float(schedule.noise_ratio(torch.zeros((), dtype=t.dtype))))
        ratios = spaced_ratios(noise, floor, self.ode_steps, RHO)
        grid = torch.cat([schedule.time_of_noise_ratio(ratios), t.new_zeros(1)])
        grid[0] = t
        return deterministic_ddim(problem, x_t, grid)

    def _langevin(
        self,
        problem: Problem,
        x0_hat: Tensor,
        noise: Tensor,
        step_size: float,
        generator: torch.Generator,
    ) -> Tensor:
        """``langevin_steps`` steps targeting ``N(x0; x0_hat, noise^2 I) p(y | x0)``."""
        precision = (1.0 / noise**2).to(x0_hat)
        eta = torch.as_tensor(step_size, dtype=x0_hat.dtype, device=x0_hat.device)
        x = x0_hat
        for _ in range(self.langevin_steps):
            drift = self._data_gradient(problem, x) + precision * (x0_hat - x)
            x = langevin_move(x, drift, eta, generator)
        return x

    def _data_gradient(self, problem: Problem, x: Tensor) -> Tensor:
        if self.data_std is None:
            return problem.grad_log_likelihood(x)
        variance = torch.tensor(self.data_std**2, dtype=x.dtype, device=x.device)
        return gaussian_data_gradient(problem.gaussian, x, variance)
