r"""BlindDPS: two reverse diffusions, an image and its blur kernel, guided by one residual.

For a model with two diffusion-prior sites, an image :math:`x` (the first in model order) and a
kernel :math:`k` (the second) that the forward model combines, e.g.
:math:`y \sim \mathcal{N}(k \circledast x, \sigma^2 I)`, BlindDPS (Chung et al. 2023) runs both
reverse processes at once. At every step, with Tweedie estimates
:math:`\hat x_0 = D_x(x_t, t)` and :math:`\hat k_0 = D_k(k_t, t)`,

.. math:: x_{s} = \text{DDPM}(x_t, \hat x_0) - \zeta_x \nabla_{x_t} \mathcal{L}, \qquad
   k_{s} = \text{DDPM}(k_t, \hat k_0) - \zeta_k \nabla_{k_t} \mathcal{L}, \qquad
   \mathcal{L} = \lVert y - \mathbb{E}[y \mid \hat x_0, \hat k_0] \rVert_2
   + \lambda \lVert \hat k_0 \rVert_1,

the DPS step (:class:`~diffpost.posterior.DPS`) applied to both from the same residual, with
gradients through both denoisers (two NFEs and two VJPs per step). Each prior keeps its own
schedule on the DDPM grid of ``num_steps`` steps.

Defaults (official ``BlindDPS/blind-dps``, ``configs``): 1000 steps, ``scale = kernel_scale =
0.3``. Departures: the official code maps the kernel estimate to [0, 1] and normalises it to sum
one before forming the residual, and adds an L1 penalty of weight 1 on it (``reg_scale = 1``).
Both are specific to its 64x64 kernel images; here the model's own forward map is used as
written (normalise the kernel there if it must sum to one), and ``sparsity`` (:math:`\lambda`)
defaults to 0, the official 1.0 being available.

The model must combine one kernel per particle with one image per particle (broadcasting over a
leading particle dimension; checked before any work), e.g. ``operators.convolve(x, k)`` in a
Normal observation. The result holds both sites.

References:
    Chung, Kim, Kim, Ye. Parallel diffusion models of operator and image for blind inverse
    problems. CVPR 2023. arXiv:2211.10656. Official code: https://github.com/BlindDPS/blind-dps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.samplers import ddim_coefficients, initial_noise
from diffpost.posterior.engines.base import Draws, Engine
from diffpost.posterior.engines.common import (
    check_nonnegative,
    check_positive_integers,
    initial_particles,
    sampling_grid,
    uniform_log_weights,
)
from diffpost.posterior.engines.hierarchical.common import probe_signals
from diffpost.posterior.guidance import residual_norm
from diffpost.posterior.problem import Problem

__all__ = ["BlindDPS", "BlindDPSState"]


class BlindDPSState(NamedTuple):
    """State of :class:`BlindDPS` (``P = chains * N`` particles).

    Attributes:
        particles: ``(P, *image event)`` at ``grid[step]``.
        kernels: ``(P, *kernel event)`` at ``kernel_grid[step]``.
        log_weights: ``(chains, N)``, uniform.
        log_evidence: ``None``.
        step: steps done.
        grid, kernel_grid: the two priors' decreasing time grids, ``(K + 1,)`` float64.
    """

    particles: Tensor
    kernels: Tensor
    log_weights: Tensor
    log_evidence: None
    step: int
    grid: Tensor
    kernel_grid: Tensor


@dataclass(frozen=True)
class BlindDPS(Engine, family="hierarchical"):
    """BlindDPS for an image and a kernel with diffusion priors (see the module docstring).

    Args:
        num_steps: DDPM steps (official: 1000).
        scale: step size on the image's gradient (official: 0.3).
        kernel_scale: step size on the kernel's gradient (official: 0.3).
        sparsity: weight of the L1 norm of the kernel estimate in the loss (official: 1.0).
    """

    uses_noise_level: ClassVar[bool] = False  # the DPS step: the residual norm normalises it

    num_steps: int = 1000
    scale: float = 0.3
    kernel_scale: float = 0.3
    sparsity: float = 0.0
    infers_two_signals: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers("BlindDPS", num_steps=self.num_steps)
        check_nonnegative(
            "BlindDPS", scale=self.scale, kernel_scale=self.kernel_scale, sparsity=self.sparsity
        )

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> BlindDPSState:
        if not problem.likelihood_sites:
            raise ValueError("BlindDPS needs an observed site: the model observes nothing")
        _, kernel_prior = problem.second
        self._check_broadcasting(problem, kernel_prior)
        count = num_chains * num_particles
        grid = sampling_grid(problem.prior.schedule, self.num_steps, device=problem.device)
        kernel_grid = sampling_grid(kernel_prior.schedule, self.num_steps, device=problem.device)
        particles = initial_particles(problem, grid, count, generator)
        kernels = initial_noise(
            kernel_prior.schedule,
            (count,) + tuple(kernel_prior.event_shape),
            generator,
            t_max=float(kernel_grid[0]),
            dtype=particles.dtype,
            device=particles.device,
        )
        log_weights = uniform_log_weights(num_chains, num_particles, particles)
        return BlindDPSState(particles, kernels, log_weights, None, 0, grid, kernel_grid)

    def step(
        self, problem: Problem, state: BlindDPSState, generator: torch.Generator
    ) -> tuple[BlindDPSState, dict[str, Tensor]]:
        _, kernel_prior = problem.second
        t, s = state.grid[state.step], state.grid[state.step + 1]
        tk, sk = state.kernel_grid[state.step], state.kernel_grid[state.step + 1]
        with torch.enable_grad():
            x_t = state.particles.detach().requires_grad_(True)
            k_t = state.kernels.detach().requires_grad_(True)
            x0 = problem.prior.denoise(x_t, t.to(x_t))
            k0 = kernel_prior.denoise(k_t, tk.to(k_t))
            norm = residual_norm(problem.with_second_signal(k0), x0)
            loss = norm.sum() + self.sparsity * k0.abs().flatten(1).sum(1).sum()
            grad_x, grad_k = torch.autograd.grad(loss, [x_t, k_t])
        problem.nfe += 2
        problem.vjp += 2
        x_s = self._ddpm(problem.prior.schedule, x_t.detach(), x0.detach(), t, s, generator)
        k_s = self._ddpm(kernel_prior.schedule, k_t.detach(), k0.detach(), tk, sk, generator)
        chains = state.log_weights.shape[0]
        state = state._replace(
            particles=x_s - self.scale * grad_x,
            kernels=k_s - self.kernel_scale * grad_k,
            step=state.step + 1,
        )
        return state, {"t": s, "residual_norm": norm.detach().reshape(chains, -1).mean(1)}

    def iterations(self, state: BlindDPSState) -> int:
        return state.grid.shape[0] - 1

    def particle_time(self, state: BlindDPSState) -> float:
        return float(state.grid[state.step])

    def draws(self, problem: Problem, state: BlindDPSState, num_chains: int) -> Draws:
        base = super().draws(problem, state, num_chains)
        name, prior = problem.second
        values = dict(base.values)
        values[name] = state.kernels.reshape((num_chains, -1) + tuple(prior.event_shape))
        with torch.no_grad():
            bound = problem.with_second_signal(state.kernels)
            log_likelihood = bound.log_likelihood(state.particles).reshape(num_chains, -1)
        return base._replace(values=values, log_likelihood=log_likelihood)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ddpm(schedule, x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor, generator) -> Tensor:
        """The DDPM ancestral step from ``t`` to ``s`` (DDIM with eta = 1) at estimate ``x0``."""
        a, b, c = (v.to(x_t) for v in ddim_coefficients(schedule, t, s, 1.0))
        x_s = a * x0 + b * epsilon_from_x0(schedule, x_t, x0, t)
        if float(c) > 0:
            noise = torch.randn(x_s.shape, generator=generator, device=x_s.device).to(x_s)
            x_s = x_s + c * noise
        return x_s

    @staticmethod
    def _check_broadcasting(problem: Problem, kernel_prior) -> None:
        """Two images with two kernels must give each pair's likelihood (as evaluated alone)."""
        images = probe_signals(problem)
        size = kernel_prior.event_shape.numel()
        ramp = torch.linspace(0.2, 1.0, size, dtype=problem.dtype, device=problem.device)
        kernels = torch.stack([ramp, ramp.flip(0)]).reshape((2,) + tuple(kernel_prior.event_shape))
        try:
            together = problem.with_second_signal(kernels).log_likelihood(images)
            alone = torch.cat(
                [
                    problem.with_second_signal(kernels[i : i + 1]).log_likelihood(images[i : i + 1])
                    for i in range(2)
                ]
            )
        except (RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"BlindDPS: the model does not accept one {problem.second[0]!r} per particle "
                f"({reason}); write its forward map so that a leading particle dimension of both "
                "signals broadcasts (e.g. operators.convolve(x, k))"
            ) from None
        if not torch.allclose(together, alone, rtol=1e-6, atol=1e-6):
            raise ValueError(
                f"BlindDPS: the model's likelihood differs when {problem.second[0]!r} takes one "
                "value per particle (a broadcasting mismatch): write its forward map so that a "
                "leading particle dimension of both signals broadcasts (e.g. "
                "operators.convolve(x, k))"
            )
