r"""SMCDiff: particle filtering for noiseless inpainting (Trippe et al. 2023).

The signal splits into observed (motif) coordinates :math:`M` and the rest :math:`R`; the data is
:math:`y = x_0^M` exactly (a :class:`~diffpost.models.operators.Mask`, :math:`\sigma_y = 0`).
SMCDiff targets :math:`p_\theta(x_0^R \mid x_0^M = y)` in three moves:

1. **Diffuse the observation forward once**, one path per chain shared by all its particles, as a
   Markov chain on the sampling grid :math:`0 = t_0 < t_1 < \dots < t_K` started at
   :math:`y_{t_0} = y`:

   .. math:: y_{t_k} = \frac{\alpha_{t_k}}{\alpha_{t_{k-1}}}\, y_{t_{k-1}}
             + \sqrt{\sigma_{t_k}^2 - \frac{\alpha_{t_k}^2}{\alpha_{t_{k-1}}^2}\sigma_{t_{k-1}}^2}\
             \xi_k,

   so that :math:`y_t \sim \mathcal{N}(\alpha_t y, \sigma_t^2 I)` for any :math:`(\alpha, \sigma)`
   schedule (VP: the code's ``ar_forward_diffusion``, :math:`\sqrt{1-\beta} y + \sqrt\beta \xi`).
2. **Filter backwards** with the observed coordinates replaced by the path: particles
   :math:`x_t = [y_t, x_t^R]`; the DDPM kernel
   :math:`p(x_s \mid x_t) = \mathcal{N}(m(x_t), v I)` with the DDPM mean
   :math:`m = \alpha_s \hat x_0 + \sqrt{\sigma_s^2 - c^2}\, \hat\epsilon`
   (:func:`diffpost.models.samplers.ddim_coefficients` with :math:`\eta = 1`) and, by default
   (``variance="large"``, the official ``ar_reverse_diffusion_distribution``), DDPM's "fixed large"
   variance :math:`v = \sigma_t^2 - (\alpha_t/\alpha_s)^2 \sigma_s^2` (:math:`\beta_t`);
   ``variance="small"`` uses the "posterior" variance :math:`v = c^2` (:math:`\tilde\beta_t`). The
   incremental weight is the kernel's likelihood of the next diffused observation, which depends
   on the parent only,

   .. math:: \log G(x_t) = \sum_{i \in M} \log \mathcal{N}\big(y_s[i];\ m(x_t)[i],\ v\big);

   reweight, resample (below), then move the free coordinates
   :math:`x_s^R = m^R + \sqrt{v}\, z` and set :math:`x_s^M = y_s`.
3. **Output** :math:`x_0 = [y, x_0^R]` with the final weights.

**Resampling.** Official rule (default, ``ess_threshold=None``): residual resampling when the
"departure from uniform" :math:`\sum_i |N W_i - 1|` exceeds ``departure * N`` (0.75 in the code),
weights reset to :math:`1/N`. Passing ``ess_threshold`` switches to the library's ESS rule
(:func:`~diffpost.posterior.engines.smc.core.resample`: resample when ESS <= ``ess_threshold * N``).
Like the official loop, weighting, resampling and moving happen in that order within one step (the
weight depends on the parent only, so this is the fully adapted order: duplicated parents get
independent children).

**Why "fixed large" is the default.** The weight must approximate the true reverse transition of
the observed coordinates, whose variance is :math:`c^2 + (\text{gain})^2 \operatorname{Var}[x_0^M
\mid x_t]`; on a sub-sampled grid near :math:`t = 0` the steps are coarse in noise level and the
small variance :math:`c^2` is far too narrow (an order of magnitude at the second-to-last step of a
100-step VP grid), so the weights are much too peaked. Measured on a 2-D Gaussian prior, one
coordinate observed, 100 steps, 50 chains x 256 particles: ``"large"`` gives the posterior variance
0.443 (exact 0.440) and log-evidence -1.168 (exact -1.164); ``"small"`` gives 0.68 and -13
(1000 steps: 0.442 and -1.69).

**Last step.** For VP schedules the DDPM mean to :math:`t = 0` is :math:`\hat x_0` and the
posterior variance is :math:`c^2 = 0`; a weight with a point-mass kernel is degenerate, so the last
weight always uses the "fixed large" variance :math:`\sigma_{t_1}^2`, while the free coordinates
move with :math:`c` (no noise for VP), as the code does (:math:`z = 0` on its final step). The
official code drops the last weight altogether (``log_impt_weights`` returns 0 at ``t == 0``); we
keep it, since it is the likelihood of :math:`x_0^M = y` under the model's kernel.

**Log-evidence.** The filter's normalising constant estimates the density of the whole diffused
path :math:`p_\theta(y_{t_0}, \dots, y_{t_K})` (including :math:`\log \mathcal{N}(y_{t_K}; 0,
(\alpha^2 + \sigma^2) I)` for the initial draw). Dividing by the forward path's density
:math:`q(y_{t_1:t_K} \mid y)` (known in closed form) gives an estimate of :math:`\log p(y)`, the
density of the observed coordinates. It is consistent **only under the exact-reversal assumption**
(the model's backward chain equals the forward chain, so :math:`p_\theta(y_{0:K}) = p(y)\,
q(y_{1:K} \mid y)`); with a finite number of Gaussian steps it is biased, and it should be read as a
diagnostic, not as an unbiased evidence. The same assumption underlies the consistency of the
particles themselves (Trippe et al., Prop. 1): SMCDiff is asymptotically exact only when the model
is the exact time reversal of the forward process, which Gaussian DDPM kernels only approach as the
steps shrink (a criticism repeated by the MCGDiff and TDS papers).

**Deviations from the official code**, all deliberate: the last weight is kept; the code's weights
drop the Gaussian normalising constants (irrelevant for the particles, needed for the evidence, so
we keep them); the DDIM sub-sequence grid of
:func:`~diffpost.posterior.engines.common.sampling_grid` replaces the code's full chain when
``num_steps`` is smaller than the schedule's training steps; chains are batched.

Defaults: ``variance = "large"`` (code); ``num_steps = 1000`` (the whole training chain of the
library's 1000-step schedules; the code runs every step of its ``Diffuser``, ``T = 512`` by default
there, and the exact-reversal assumption needs small steps); residual resampling with the
departure rule at 0.75 (code); the official example notebook runs 64 particles
(``num_particles`` is the driver's argument).

References:
    Trippe, Yim, Tischer, Baker, Broderick, Barzilay, Jaakkola. Diffusion probabilistic modeling of
    protein backbones in 3D for the motif-scaffolding problem. ICLR 2023. arXiv:2206.04119.
    Official code: github.com/blt2114/ProtDiff_SMCDiff (``inpainting/particle_filter.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.samplers import ddim_coefficients
from diffpost.posterior.engines.common import (
    check_choice,
    check_nonnegative,
    initial_particles,
    sampling_grid,
    uniform_log_weights,
)
from diffpost.posterior.engines.smc.core import (
    SMCEngine,
    SMCState,
    advance,
    check_resampling,
    log_normal,
    particle_noise,
    resample,
    reweight,
    step_times,
    take_ancestors,
)
from diffpost.posterior.problem import Problem
from diffpost.posterior.resampling import ess

__all__ = ["SMCDiff"]


def _forward_path(
    schedule, grid: Tensor, y: Tensor, num_chains: int, generator: torch.Generator
) -> Tensor:
    r"""One forward-diffused path of ``y`` per chain at the grid's times, ``(chains, K + 1, m)``.

    ``path[:, k]`` lives at ``grid[k]`` (decreasing), so ``path[:, -1] = y`` at ``t = 0`` and the
    chain is drawn upwards from there: :math:`y_t = (\alpha_t/\alpha_s) y_s + \sqrt{v_{s \to t}}\,
    \xi`.
    """
    steps = grid.shape[0]
    noise = torch.randn(
        (num_chains, steps - 1, y.shape[-1]), generator=generator, dtype=y.dtype, device=y.device
    )
    path = [y.expand(num_chains, -1)]  # y: (m,), or (chains, m) under a plate
    for k in range(steps - 2, -1, -1):  # times grid[k] > grid[k + 1]
        ratio, std = _forward_transition(schedule, grid[k + 1], grid[k])
        path.append(ratio.to(y) * path[-1] + std.to(y) * noise[:, k])
    return torch.stack(path[::-1], dim=1)


def _forward_transition(schedule, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(alpha_t / alpha_s, std)`` of the forward step :math:`q(x_t \mid x_s)`, ``s < t``."""
    ratio = schedule.alpha(t) / schedule.alpha(s)
    variance = schedule.sigma(t) ** 2 - (ratio * schedule.sigma(s)) ** 2
    return ratio, variance.clamp_min(0.0).sqrt()


@dataclass(frozen=True)
class SMCDiff(SMCEngine, family="smc"):
    """SMCDiff for noiseless inpainting (see the module docstring for the algorithm and choices).

    Attributes:
        num_steps: reverse steps on the DDIM sub-sequence grid (default 1000: the whole chain).
        resampling: resampling scheme (default ``"residual"``, as the official code).
        ess_threshold: ``None`` (default) for the official trigger
            :math:`\\sum_i |N W_i - 1| > \\text{departure}\\, N`; a number in ``[0, 1]`` to resample
            when ESS <= ``ess_threshold * N`` instead.
        departure: threshold of the official trigger, as a fraction of ``N`` (code: 0.75).
        variance: ``"large"`` (default, code: :math:`\\beta_t`) or ``"small"``
            (:math:`\\tilde\\beta_t`, DDIM with eta = 1) for the kernel on all but the last step.
    """

    num_steps: int = 1000
    resampling: str = "residual"
    ess_threshold: float | None = None
    departure: float = 0.75
    variance: str = "large"
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation", "mask", "noiseless"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_steps < 1:
            raise ValueError(f"SMCDiff: num_steps must be >= 1; got {self.num_steps}")
        if self.ess_threshold is not None and (
            isinstance(self.ess_threshold, bool) or not isinstance(self.ess_threshold, (int, float))
        ):
            raise ValueError(
                "SMCDiff: ess_threshold must be None or a number in [0, 1]; got "
                f"{self.ess_threshold!r}"
            )
        check_resampling(
            "SMCDiff", self.resampling, 0.0 if self.ess_threshold is None else self.ess_threshold
        )
        check_choice("SMCDiff", "variance", self.variance, ("large", "small"))
        check_nonnegative("SMCDiff", departure=self.departure)

    # ------------------------------------------------------------------ set-up
    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> SMCState:
        gaussian = problem.gaussian
        operator = gaussian.operator
        dtype, device = problem.dtype, problem.device
        schedule = problem.prior.schedule
        grid = sampling_grid(schedule, self.num_steps, device=device)
        observed = operator.observed.to(device)
        y = gaussian.y_for(num_chains).to(dtype=dtype, device=device)  # per chain under a plate
        y = y.flatten() if gaussian.plate_size is None else y.flatten(1)
        path = _forward_path(schedule, grid, y, num_chains, generator)  # (chains, K + 1, m)

        particles = initial_particles(problem, grid, num_chains * num_particles, generator)
        particles = self._replace(particles, observed, path[:, 0], particles.shape[0] // num_chains)
        log_weights = uniform_log_weights(num_chains, num_particles, particles)
        # evidence of the initial draw of the path's first point under N(0, (alpha^2 + sigma^2) I)
        start = grid[0]
        scale2 = (schedule.alpha(start) ** 2 + schedule.sigma(start) ** 2).to(particles)
        log_evidence = log_normal(path[:, 0], torch.zeros_like(path[:, 0]), scale2).sum(-1)
        constants = {"path": path, "observed": observed}
        return SMCState(particles, log_weights, log_evidence, 0, grid, {}, constants)

    @staticmethod
    def _replace(x: Tensor, observed: Tensor, values: Tensor, num_particles: int) -> Tensor:
        """Set the observed coordinates of every particle to its chain's ``values``
        ``(chains, m)``."""
        flat = x.reshape(x.shape[0], -1).clone()
        flat[:, observed] = values.repeat_interleave(num_particles, dim=0)
        return flat.reshape(x.shape)

    # ------------------------------------------------------------------ one step
    def _resample(self, log_weights: Tensor, generator: torch.Generator):
        """Resampling by the official departure rule or the ESS rule; returns core.resample's
        tuple."""
        if self.ess_threshold is not None:
            return resample(log_weights, self.resampling, float(self.ess_threshold), generator)
        chains, n = log_weights.shape
        current_ess = ess(log_weights)
        triggered = (n * log_weights.exp() - 1).abs().sum(-1) > self.departure * n
        if not bool(triggered.any()):
            identity = torch.arange(chains * n, device=log_weights.device)
            return identity, log_weights, current_ess, triggered
        indices, resampled_weights, _, _ = resample(log_weights, self.resampling, 1.0, generator)
        identity = torch.arange(chains * n, device=log_weights.device).reshape(chains, n)
        indices = torch.where(triggered[:, None], indices.reshape(chains, n), identity).reshape(-1)
        log_weights = torch.where(triggered[:, None], resampled_weights, log_weights)
        return indices, log_weights, current_ess, triggered

    def step(self, problem: Problem, state: SMCState, generator: torch.Generator):
        schedule = problem.prior.schedule
        path, observed = state.constants["path"], state.constants["observed"]
        t, s, last = step_times(state)
        x_t = state.particles
        chains = state.log_weights.shape[0]
        n = x_t.shape[0] // chains  # particles per chain (of this rank in a sharded run)

        x0 = problem.denoise(x_t, t)
        a, b, c = ddim_coefficients(schedule, t, s, 1.0)
        mean = (a.to(x_t) * x0 + b.to(x_t) * epsilon_from_x0(schedule, x_t, x0, t)).reshape(
            x_t.shape[0], -1
        )
        large = (_forward_transition(schedule, s, t)[1] ** 2).to(x_t)  # DDPM "fixed large"
        small = (c**2).to(x_t)  # DDPM "posterior" variance (DDIM, eta = 1)
        weight_variance = large if (self.variance == "large" or last) else small
        move_variance = small if (self.variance == "small" or last) else large
        y_s = path[:, state.step + 1]  # (chains, m)

        # 1. weight each parent by the kernel's likelihood of the next diffused observation
        target = y_s.repeat_interleave(n, dim=0)
        log_g = log_normal(target, mean[:, observed], weight_variance).sum(-1)
        log_weights, log_increment = reweight(state.log_weights, log_g.reshape(chains, n))
        # path-density correction: p(y) = p(y_{0:K}) / q(y_{1:K} | y) under exact reversal
        ratio, std = _forward_transition(schedule, s, t)
        log_forward = log_normal(path[:, state.step], ratio.to(x_t) * y_s, (std**2).to(x_t)).sum(-1)
        log_increment = log_increment - log_forward

        # 2. resampling
        indices, log_weights, current_ess, resampled = self._resample(log_weights, generator)
        (mean,) = take_ancestors(indices, mean)

        # 3. move the free coordinates, pin the observed ones to the path
        if float(move_variance) > 0:
            noise = particle_noise(mean.shape, generator, mean.dtype, mean.device)
            mean = mean + move_variance.sqrt() * noise
        x_s = self._replace(mean.reshape(x_t.shape), observed, y_s, n)
        return advance(state, x_s, log_weights, log_increment, current_ess, resampled)
