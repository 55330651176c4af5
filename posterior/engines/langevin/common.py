r"""What the decoupled / Langevin engines (Score-ALD, DAPS, DCDP) share.

All three walk a decreasing list of *noise levels* rather than a diffusion's own kernel. A level is
a noise ratio :math:`\beta = \sigma(t) / \alpha(t)` (the noise of the equivalent variance-exploding
process :math:`x_t / \alpha(t) = x_0 + \beta\, \epsilon`), so that the same engine runs on every
:class:`~diffpost.models.schedules.Schedule`: :func:`noise_levels` spaces the levels as the papers
do (geometric for NCSN-style annealing, Karras' :math:`\rho`-polynomial for EDM-style annealing),
clamped to the ratios the schedule can reach, and maps them to times.

References:
    Song, Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. NeurIPS
    2019 (annealed Langevin dynamics over geometric noise levels).
    Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
    Models. NeurIPS 2022 (eq. 5, the :math:`\rho`-spacing of noise levels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.samplers import ddim_coefficients
from diffpost.models.schedules import Schedule
from diffpost.posterior.engines.common import operator_gain, uniform_log_weights
from diffpost.posterior.problem import Problem

__all__ = [
    "AnnealingState",
    "deterministic_ddim",
    "inverse_data_curvature",
    "langevin_move",
    "noise_levels",
    "noised",
    "spaced_ratios",
]


class AnnealingState(NamedTuple):
    """State of an engine that walks a list of noise levels.

    Attributes:
        particles: ``(chains * N, *event)``; what they are between levels is engine-specific.
        log_weights: ``(chains, N)``, uniform (these engines do not weight).
        log_evidence: always ``None``.
        step: index of the next level in ``times``.
        times: the levels' diffusion times, float64, decreasing, one per driver step.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    step: int
    times: Tensor

    @classmethod
    def start(
        cls, particles: Tensor, times: Tensor, num_chains: int, num_particles: int
    ) -> AnnealingState:
        """The state before the first level: ``particles`` with uniform weights."""
        log_weights = uniform_log_weights(num_chains, num_particles, particles)
        return cls(particles, log_weights, None, 0, times)


def spaced_ratios(high: Tensor, low: float, num: int, rho: float | None) -> Tensor:
    r"""``num`` noise ratios from ``high`` down to ``low``, ``(*high.shape, num)``.

    ``rho = None`` spaces them geometrically (NCSN, Song & Ermon 2019); a number spaces them as
    Karras et al. (2022, eq. 5): :math:`(h^{1/\rho} + \tfrac{i}{n-1} (l^{1/\rho} -
    h^{1/\rho}))^\rho`. With ``num = 1`` the only ratio is ``high``.
    """
    fraction = torch.linspace(0, 1, num, dtype=torch.float64, device=high.device)
    high = high.to(torch.float64)[..., None]
    if rho is None:
        return high * (low / high) ** fraction
    return (high ** (1 / rho) + fraction * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def noise_levels(
    engine: str,
    schedule: Schedule,
    num: int,
    noise_max: float,
    noise_min: float,
    rho: float | None,
) -> tuple[Tensor, Tensor]:
    r"""The annealing levels of an engine: ``(ratios, times)``, both float64 ``(num,)``, decreasing.

    The requested range ``[noise_min, noise_max]`` is clamped to what ``schedule`` reaches on
    ``[0, 1]`` (e.g. VE's :math:`\sigma_{\min}` from below, a VP schedule's finite
    :math:`\sigma(1)/\alpha(1)` from above; rectified flow has no upper bound).

    Raises:
        ValueError: the clamped range is empty.
    """
    ends = schedule.noise_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64))
    high = min(noise_max, float(ends[1]))
    low = max(noise_min, float(ends[0]))
    if not high > low:
        raise ValueError(
            f"{engine}: the noise range [{noise_min:g}, {noise_max:g}] does not meet the range "
            f"[{float(ends[0]):.4g}, {float(ends[1]):.4g}] of noise ratios sigma/alpha of "
            f"{schedule!r}"
        )
    ratios = spaced_ratios(torch.tensor(high, dtype=torch.float64), low, num, rho)
    return ratios, schedule.time_of_noise_ratio(ratios)


def langevin_move(
    x: Tensor, drift: Tensor, step_size: Tensor, generator: torch.Generator
) -> Tensor:
    r"""One unadjusted Langevin step :math:`x + \eta\, \nabla \log \pi(x) + \sqrt{2\eta}\, \xi`.

    Args:
        x: ``(n, *event)``.
        drift: :math:`\nabla \log \pi(x)`, shape of ``x``.
        step_size: :math:`\eta`, a 0-d tensor or one per particle broadcastable to ``x``.
        generator: source of :math:`\xi \sim \mathcal{N}(0, I)`.
    """
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + step_size * drift + torch.sqrt(2 * step_size) * noise


def inverse_data_curvature(problem: Problem, variance: float | None = None) -> float:
    r"""The inverse of the data term's largest curvature, :math:`v / \lVert A \rVert^2`: the unit
    of data-term step sizes.

    Args:
        problem: the problem.
        variance: the data term's variance :math:`v` (with the operator's gain); default the
            model's own data term, :math:`1 / \lambda_{\max}` of
            :meth:`~diffpost.posterior.Problem.likelihood_curvature` (for a GaussianObservation,
            the smallest noise variance over :math:`\lVert A \rVert^2`; for other likelihoods
            estimated by power iteration at ``x = 0``).
    """
    if variance is None:
        return 1.0 / problem.likelihood_curvature()
    return variance / operator_gain(problem)


def deterministic_ddim(problem: Problem, x_t: Tensor, grid: Tensor) -> Tensor:
    r"""Deterministic DDIM (``eta = 0``) along a decreasing ``grid`` of times, one NFE per interval.

    :math:`x_s = \alpha_s \hat x_0 + \sigma_s \hat\epsilon`: the Euler step of the
    probability-flow ODE in the variance-exploding variable :math:`x_t / \alpha_t` (EDM's Euler
    sampler), written for any schedule (Song, Meng, Ermon 2021, eq. 12; Karras et al. 2022).

    Args:
        problem: the problem, whose counted :meth:`~diffpost.posterior.Problem.denoise` is used.
        x_t: ``(n, *event)`` at time ``grid[0]``.
        grid: float64 ``(K + 1,)``, decreasing.

    Returns:
        ``(n, *event)`` at time ``grid[-1]`` (the denoiser output when it is 0 on a VP schedule).
    """
    schedule = problem.prior.schedule
    x = x_t
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        x0 = problem.denoise(x, t)
        a, b, _ = (v.to(x) for v in ddim_coefficients(schedule, t, s, 0.0))
        x = a * x0 + b * epsilon_from_x0(schedule, x, x0, t)
    return x


def noised(schedule: Schedule, x0: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
    r"""A draw of the forward kernel :math:`x_t = \alpha(t) x_0 + \sigma(t) \epsilon`, ``x0``'s
    shape."""
    alpha, sigma = (v.to(x0) for v in schedule(t))
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return alpha * x0 + sigma * noise
