r"""FlowDPS: flow-driven posterior sampling (Kim, Kim, Ye; 2025).

The flow's step splits into a clean estimate and a noise estimate; only the clean one is pulled
to the data, by gradient steps that skip the network (no VJP), and the noise estimate is mixed
with fresh noise (paper, Algorithm 1; official ``sd3_sampler.py``, ``FlowDPS``):

.. math::
    \hat x_0 &= D(x_t, t), \quad \hat\epsilon = \frac{x_t - \alpha_t \hat x_0}{\sigma_t}, \quad
    x_0^{(k+1)} = x_0^{(k)} + \frac{\gamma}{\lVert A \rVert^2}\, J_A^\top\big(y - A(x_0^{(k)})\big),
    \quad x_0^{(0)} = \hat x_0, \\
    \bar x_0 &= (1 - \rho_t)\, \hat x_0 + \rho_t\, x_0^{(K)}, \qquad
    x_s = \alpha_s \bar x_0
        + \sigma_s \big(\sqrt{\rho_s}\, \hat\epsilon + \sqrt{1 - \rho_s}\, z\big),

with :math:`\rho_t = \sigma_t / (\alpha_t + \sigma_t)`, the rectified-flow time (on the
:class:`~diffpost.models.schedules.RectifiedFlow` schedule :math:`\rho_t = t`, and the update is the
official one: the data-consistent estimate weighs :math:`t`, strong at high noise and vanishing
near the data, and the stochastic part keeps :math:`\sqrt{s}` of the estimated noise). The last
step returns :math:`\bar x_0`.

**Departures.** The official code takes :math:`K = 3` steps of fixed length 15 along the
normalised gradient of :math:`\lVert A^\top y - A^\top A\, \mathcal{D}(z) \rVert_2` in the
latent space of Stable Diffusion 3 (:math:`\mathcal{D}` its VAE decoder), a length with no
counterpart outside that space. This engine takes :math:`K` gradient steps on :math:`\tfrac12
\lVert y - A x \rVert^2` of size :math:`\gamma / \lVert A \rVert^2` (default :math:`\gamma = 1`:
each step solves the data term along the operator's largest singular direction), which pulls the
estimate towards :math:`\{A x = y\}` as the official steps do without depending on the signal's
dimension. The grid is the engines' shared one (uniform in :math:`t` on rectified flow; the
official one is shifted towards high noise with SD3's shift 4), from the reference noise; no
classifier-free guidance (there is no condition).

Defaults: 28 steps and :math:`K = 3` (official). The step reads the residual, not
:math:`\sigma_y` (``uses_noise_level = False``); one NFE per step, no VJP through the network.

References:
    Kim, Kim, Ye. FlowDPS: Flow-Driven Posterior Sampling for Inverse Problems. 2025.
    arXiv:2503.08136. Official code: github.com/FlowDPS-Inverse/FlowDPS (``sd3_sampler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.posterior.engines.common import (
    check_positive,
    check_positive_integers,
    flow_time,
    gaussian_data_gradient,
    operator_gain,
)
from diffpost.posterior.engines.explicit.common import (
    ExplicitEngine,
    ExplicitState,
    advance,
    chain_mean,
    gaussian_noise,
)
from diffpost.posterior.guidance import residual_norm
from diffpost.posterior.problem import Problem

__all__ = ["FlowDPS"]


@dataclass(frozen=True)
class FlowDPS(ExplicitEngine, family="explicit"):
    """Flow-driven posterior sampling (see the module docstring).

    Attributes:
        num_steps: flow steps (official: 28).
        data_steps: :math:`K`, gradient steps on the clean estimate per flow step (official: 3).
        step_size: :math:`\\gamma`, each gradient step in units of :math:`1 / \\lVert A \\rVert^2`
            (default 1; see the module docstring for the official rule).

    Per-step statistics: ``t`` and ``residual_norm`` (chain mean of :math:`\\lVert y -
    A(\\hat x_0) \\rVert` before the data steps).
    """

    num_steps: int = 28
    data_steps: int = 3
    step_size: float = 1.0
    requires: ClassVar[frozenset[str]] = frozenset({"gaussian_observation"})
    uses_noise_level: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._check_num_steps()
        check_positive_integers("FlowDPS", data_steps=self.data_steps)
        check_positive("FlowDPS", step_size=self.step_size)

    def step(self, problem: Problem, state: ExplicitState, generator: torch.Generator):
        schedule = problem.prior.schedule
        t, s = state.grid[state.step], state.grid[state.step + 1]
        x_t = state.particles

        x0 = problem.denoise(x_t, t)
        epsilon = epsilon_from_x0(schedule, x_t, x0, t)
        consistent = x0
        unit = torch.ones((), dtype=x_t.dtype, device=x_t.device)
        for _ in range(self.data_steps):
            step = self.step_size / operator_gain(problem)
            consistent = consistent + step * gaussian_data_gradient(
                problem.gaussian, consistent, unit
            )
        rho_t, rho_s = (flow_time(schedule, v).to(x_t) for v in (t, s))
        blended = (1 - rho_t) * x0 + rho_t * consistent
        alpha_s, sigma_s = (v.to(x_t) for v in schedule(s))
        noise = rho_s.sqrt() * epsilon + (1 - rho_s).sqrt() * gaussian_noise(x_t, generator)
        x_s = alpha_s * blended + sigma_s * noise
        return advance(state, x_s, residual_norm=chain_mean(residual_norm(problem, x0), state))
