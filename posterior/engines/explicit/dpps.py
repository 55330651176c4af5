r"""DPPS: diffusion posterior proximal sampling (Wu, Zhang, Zhao, Mao, Yu, Qiao; 2024).

DPS's update, but the step's Gaussian noise is not one draw: :math:`K_t` candidates are drawn and
the one whose state is most consistent with the measurement is kept (paper, Algorithm 1; official
``condition_methods.py``, method ``dpps``):

.. math::
    \mu &= a\, \hat x_0 + b\, \hat\epsilon
        - \zeta\, \nabla_{x_t} \big\lVert y - A \hat x_0(x_t) \big\rVert_2, \qquad
    z^\star = \operatorname*{arg\,min}_{z_k,\ k \le K_t}
        \big\lVert \alpha_s y - A(\mu + c z_k - \sigma_s \hat\epsilon) \big\rVert_2, \\
    x_s &= \mu + c\, z^\star, \qquad
    K_t = \big\lfloor \max\big(50\,(1 - e^{-\mathrm{SNR}_t}), 2\big) \big\rfloor, \quad
    \mathrm{SNR}_t = \alpha_t^2 / \sigma_t^2,

with :math:`(a, b, c)` the DDPM ancestral coefficients and :math:`\hat\epsilon` the step's noise
estimate: :math:`\mu + c z_k - \sigma_s \hat\epsilon` stands for :math:`\alpha_s x_0`, and the
selection keeps the candidate nearest to the noised measurement (two at high noise, up to 50 near
the data). The gradient step is DPS's official one (unsquared norm, ``scale`` 1, the DPPS
code's). Draws are chosen, not weighted: the selection narrows the law along the observed
directions, so the draws are not posterior samples even with an exact denoiser.

Defaults (official): 1000 DDPM steps, ``scale = 1``, at most 50 candidates. Departures: the
official code starts from :math:`y` noised to the first time, which needs :math:`y` in the
signal's space and weighs it by 0.006; this starts from the reference noise as every engine of
the family, on the engines' shared grid. Its batch holds one image; here the selection is per
particle.

Linear Gaussian observations with :math:`\sigma_y > 0` (the gradient step, like DPS's, stands for
no density at :math:`\sigma_y = 0`); one NFE and one VJP per step, plus :math:`K_t` operator
applications. The engine does not read :math:`\sigma_y` (``uses_noise_level = False``).

References:
    Wu, Zhang, Zhao, Mao, Yu, Qiao. Diffusion Posterior Proximal Sampling for Image Restoration.
    ACM Multimedia 2024. arXiv:2402.16907. Official code: github.com/74587887/DPPS_code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffpost.models.schedules import Schedule
from diffpost.posterior.engines.common import check_nonnegative, check_positive_integers
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    advance,
    chain_mean,
    dps_mean,
)
from diffpost.posterior.problem import Problem

__all__ = ["DPPS"]


def candidate_count(schedule: Schedule, t: Tensor, most: int) -> int:
    r""":math:`K_t = \lfloor \max(K (1 - e^{-\mathrm{SNR}_t}), 2) \rfloor`, with ``most``
    :math:`= K` (official 50) and :math:`\mathrm{SNR}_t = \alpha_t^2 / \sigma_t^2` (infinite at
    ``t = 0``)."""
    alpha, sigma = (float(v) for v in schedule(t))
    snr = math.inf if sigma == 0 else alpha**2 / sigma**2
    return int(max(most * (1 - math.exp(-snr)), 2))


#: candidates are drawn in blocks of at most this many entries (``block * n * d``)
CANDIDATE_BLOCK_ENTRIES = 2**22


def most_consistent_noise(
    operator, target: Tensor, c: Tensor, like: Tensor, count: int, generator: torch.Generator
) -> Tensor:
    r"""Of ``count`` standard normal draws :math:`z_k` shaped like ``like`` ``(n, *event)``, per
    particle the one that minimises :math:`\lVert r - c A z_k \rVert_2`, with ``target`` the
    residual :math:`r` ``(n, *out)``. Drawn in blocks of candidates (at most
    :data:`CANDIDATE_BLOCK_ENTRIES` entries at a time), the best kept across blocks."""
    n = like.shape[0]
    block = max(1, CANDIDATE_BLOCK_ENTRIES // like.numel())
    best, best_distance = None, None
    for start in range(0, count, block):
        k = min(block, count - start)
        z = torch.randn(
            (k,) + tuple(like.shape), generator=generator, dtype=like.dtype, device=like.device
        )
        images = operator(z.flatten(0, 1)).reshape((k, n, -1))
        distance = (target.reshape(1, n, -1) - c * images).norm(dim=-1)  # (k, n)
        distance, index = distance.min(dim=0)
        z = z[index, torch.arange(n, device=like.device)]
        if best is None:
            best, best_distance = z, distance
            continue
        closer = (distance < best_distance).reshape((-1,) + (1,) * (z.dim() - 1))
        best, best_distance = torch.where(closer, z, best), torch.minimum(distance, best_distance)
    return best


@dataclass(frozen=True)
class DPPS(ExplicitEngine, family="explicit"):
    """DPS with the most data-consistent of several noise candidates (see the module docstring).

    Attributes:
        num_steps: DDPM steps (official: 1000).
        scale: :math:`\\zeta`, the step on the gradient of the residual norm (official: 1).
        max_candidates: :math:`K`, the candidates at high signal-to-noise (official: 50; at least
            2 are drawn at every step).

    Per-step statistics: ``t``, ``residual_norm`` (chain mean of :math:`\\lVert y - A \\hat x_0
    \\rVert` before the step) and ``candidates`` (:math:`K_t`).
    """

    num_steps: int = 1000
    scale: float = 1.0
    max_candidates: int = 50
    requires: ClassVar[frozenset[str]] = frozenset({"linear", "finite_likelihood"})
    uses_noise_level: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive_integers("DPPS", max_candidates=self.max_candidates)
        check_nonnegative("DPPS", scale=self.scale)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        operator = problem.gaussian.operator
        t, s = state.grid[state.step], state.grid[state.step + 1]
        x_t = state.particles

        guided = dps_mean(problem, x_t, t, s, self.scale)
        x_s, c = guided.mean, guided.noise_scale
        count = candidate_count(schedule, t, self.max_candidates)
        if float(c) > 0:
            alpha_s, sigma_s = (v.to(x_t) for v in schedule(s))
            # the candidates' residuals alpha_s y - A(x_s + c z - sigma_s eps), A linear
            target = alpha_s * problem.gaussian.y_for(x_t.shape[0]).to(x_t)
            target = target - operator(x_s - sigma_s * guided.epsilon)
            x_s = x_s + c * most_consistent_noise(operator, target, c, x_t, count, generator)
        return advance(
            state,
            x_s,
            residual_norm=chain_mean(guided.residual_norm, state),
            candidates=float(count),
        )
