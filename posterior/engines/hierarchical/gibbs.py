r"""Gibbs: the global latents updated along the signal's reverse trajectory, per particle.

GibbsDDRM (Murata et al. 2023) samples a blur kernel jointly with the image by inserting, after
every step of the reverse diffusion, Langevin updates of the kernel given the current Tweedie
estimate :math:`\hat x_0`. This engine generalises it to any global latents and to any engine of
the signal that keeps its particles in place (no resampling) and knows their diffusion time
(the explicit family: DPS, ...). Each particle :math:`i` carries its own :math:`\theta_i`, and
after every step of the inner engine (run with each particle's :math:`\theta_i`):

1. :math:`\hat x_0^{(i)} = D(x_t^{(i)}, t)`, the Tweedie estimate at the particles' time (one
   extra NFE per step; the particles themselves at :math:`t = 0`);
2. ``theta_steps`` Metropolis-adjusted Langevin (MALA) steps on :math:`z_i = T^{-1}(\theta_i)`
   targeting :math:`\log p(\theta) + \log |J_T(z)| + \log p(y \mid \hat x_0^{(i)}, \theta)`, with
   one step size for all particles adapted by Robbins–Monro steps towards an acceptance of 0.574
   (Roberts & Rosenthal 1998).

At the last step the target is :math:`p(\theta \mid y, x_0)`, the exact full conditional; along
the way it is Jensen's approximation :math:`p(y \mid x_t, \theta) \approx p(y \mid \hat x_0,
\theta)`, as in DPS. The result is therefore approximate twice over (the inner engine's own
approximation and this one): the measured bias against exact posteriors is stated in the README
and in ``tests/test_hierarchical.py``. Initial :math:`\theta_i`: prior draws.

Departures from GibbsDDRM: its updates are unadjusted Langevin steps with a fixed step size on
the kernel; ours are MALA steps with an adapted step size, which keep :math:`\theta` inside its
full conditional whatever its scale.

The model must accept one value of the global latents per particle (a ``(P,)`` noise level
broadcast against a ``(P, m)`` mean as ``sigma[..., None]``); this is checked before any work.
Every likelihood evaluation then takes all particles at once (no ``batch_size`` chunking).

References:
    Murata, Saito, Lai, Takida, Uesaka, Mitsufuji, Ermon. GibbsDDRM: A partially collapsed Gibbs
    sampler for solving blind inverse problems with denoising diffusion restoration. ICML 2023.
    arXiv:2301.12686.
    Roberts, Rosenthal. Optimal scaling of discrete approximations to Langevin diffusions. JRSS B
    60(1), 1998.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Draws, Engine
from diffpost.posterior.engines.common import check_positive, check_positive_integers
from diffpost.posterior.engines.explicit.dps import DPS
from diffpost.posterior.engines.hierarchical.common import (
    check_differentiable,
    check_inner,
    probe_signals,
)
from diffpost.posterior.problem import Problem

__all__ = ["Gibbs", "GibbsState"]

#: MALA's optimal acceptance rate (Roberts & Rosenthal 1998)
MALA_ACCEPTANCE = 0.574


class GibbsState(NamedTuple):
    """State of :class:`Gibbs` (``P = chains * N`` particles, ``D`` unconstrained entries).

    Attributes:
        particles, log_weights, log_evidence: the inner engine's.
        inner: the inner engine's state.
        z: ``(P, D)`` each particle's unconstrained global latents.
        log_step: the MALA step size's logarithm.
        updates: MALA steps taken (for the adaptation's gain).
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor | None
    inner: Any
    z: Tensor
    log_step: float
    updates: int


@dataclass(frozen=True)
class Gibbs(Engine, family="hierarchical"):
    """Gibbs updates of the global latents along any in-place engine's trajectory (see the module
    docstring).

    Args:
        inner: the engine of the signal; it must keep its particles in place and know their time
            (the explicit family). Default ``DPS()``. Its steps are the steps that run.
        num_steps: 0 (set the number of steps on the inner engine).
        theta_steps: MALA steps on the global latents after every inner step.
        step_size: the initial MALA step size in the unconstrained space.
    """

    inner: Engine = field(default_factory=DPS)
    num_steps: int = field(default=0, kw_only=True)
    theta_steps: int = field(default=5, kw_only=True)
    step_size: float = field(default=0.01, kw_only=True)
    infers_globals: ClassVar[bool] = True

    @property
    def independent_particles(self) -> bool:  # type: ignore[override]
        """As the inner engine's particles."""
        return self.inner.independent_particles

    def __post_init__(self):
        super().__post_init__()
        if self.num_steps != 0:
            raise ValueError(
                "Gibbs runs the steps of its inner engine: set num_steps there (e.g. "
                f"Gibbs(DPS(num_steps=...))); got num_steps={self.num_steps}"
            )
        check_positive_integers("Gibbs", theta_steps=self.theta_steps)
        check_positive("Gibbs", step_size=self.step_size)

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["inner"] = {"engine": self.inner.name, **self.inner.config()}
        return config

    def iterations(self, state: GibbsState) -> int:
        return self.inner.iterations(state.inner)

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> GibbsState:
        check_inner("Gibbs", problem, self.inner, in_place=True)
        count = num_chains * num_particles
        values = problem.sample_globals(count, generator)
        pair = values if count >= 2 else problem.sample_globals(2, generator)
        problem.check_particle_broadcasting(
            probe_signals(problem), {n: v[:2] for n, v in pair.items()}
        )
        check_differentiable("Gibbs", problem)
        bound = self._bind(problem, values)
        inner = self.inner.init(bound, num_chains, num_particles, generator)
        self._count(problem, bound)
        if self.inner.particle_time(inner) is None:
            raise ValueError(
                f"Gibbs needs the diffusion time of the inner engine's particles; "
                f"{self.inner.name} does not give it"
            )
        z = problem.global_space.unconstrain(values)
        return GibbsState(
            inner.particles,
            inner.log_weights,
            inner.log_evidence,
            inner,
            z,
            math.log(self.step_size),
            0,
        )

    def step(
        self, problem: Problem, state: GibbsState, generator: torch.Generator
    ) -> tuple[GibbsState, dict[str, Tensor]]:
        space = problem.global_space
        values, _ = space.constrain(state.z)
        bound = self._bind(problem, values)
        inner, info = self.inner.step(bound, state.inner, generator)
        t = self.inner.particle_time(inner)
        x0 = inner.particles if t <= 0 else bound.denoise(inner.particles, t)
        self._count(problem, bound)
        z, log_step, updates = state.z, state.log_step, state.updates
        acceptance = []
        for _ in range(self.theta_steps):
            z, accepted = self._mala(problem, z, x0, math.exp(log_step), generator)
            updates += 1
            log_step += updates**-0.6 * (float(accepted.mean()) - MALA_ACCEPTANCE)
            acceptance.append(accepted)
        chains = inner.log_weights.shape[0]
        info = dict(info)
        info["theta_acceptance"] = torch.stack(acceptance).mean(0).reshape(chains, -1).mean(1)
        info["theta_step_size"] = math.exp(log_step)
        state = GibbsState(
            inner.particles, inner.log_weights, inner.log_evidence, inner, z, log_step, updates
        )
        return state, info

    def draws(self, problem: Problem, state: GibbsState, num_chains: int) -> Draws:
        base = super().draws(problem, state, num_chains)
        values, _ = problem.global_space.constrain(state.z)
        out = dict(base.values)
        for name, value in values.items():
            out[name] = value.reshape((num_chains, -1) + tuple(value.shape[1:]))
        bound = self._bind(problem, values)
        with torch.no_grad():
            log_likelihood = bound.log_likelihood(state.particles).reshape(num_chains, -1)
        return base._replace(values=out, log_likelihood=log_likelihood)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _bind(problem: Problem, values: dict[str, Tensor]) -> Problem:
        return problem.with_globals({n: v.detach() for n, v in values.items()})

    @staticmethod
    def _count(problem: Problem, bound: Problem) -> None:
        problem.nfe += bound.nfe
        problem.vjp += bound.vjp

    @staticmethod
    def _log_target(problem: Problem, z: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``(log target (P,), its gradient in z (P, D))``."""
        with torch.enable_grad():
            variable = z.detach().requires_grad_(True)
            values, log_jacobian = problem.global_space.constrain(variable)
            log_prior, log_likelihood = problem.log_joint_globals(x0, values)
            target = log_prior + log_jacobian + log_likelihood
            (gradient,) = torch.autograd.grad(target.sum(), variable)
        return target.detach(), gradient

    def _mala(
        self, problem: Problem, z: Tensor, x0: Tensor, step: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """One MALA step per particle: ``(new z, accepted (P,) as 0/1)``."""
        target, gradient = self._log_target(problem, z, x0)
        noise = torch.randn(z.shape, generator=generator, device=z.device).to(z)
        proposal = z + step * gradient + math.sqrt(2 * step) * noise
        proposal_target, proposal_gradient = self._log_target(problem, proposal, x0)
        forward = -((proposal - z - step * gradient) ** 2).sum(1) / (4 * step)
        backward = -((z - proposal - step * proposal_gradient) ** 2).sum(1) / (4 * step)
        log_alpha = proposal_target - target + backward - forward
        log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf).clamp(max=0)
        uniform = torch.rand(log_alpha.shape, generator=generator, device=z.device).to(z)
        accept = uniform.log() < log_alpha
        return torch.where(accept[:, None], proposal, z), accept.to(z.dtype)
