r"""EM: the global latents by maximisation, the signal by an engine run at each estimate.

Expectation–maximisation for a model with global latents :math:`\theta` and a signal :math:`x`
with a diffusion prior (Fast Diffusion EM, Laroche et al. 2024, for blind deblurring; here for
any global latents and any engine of the signal). Round :math:`k`:

- **E-step**: run the inner engine with :math:`\theta_k` fixed, giving weighted draws
  :math:`(x_i, w_i)` of :math:`p(x \mid y, \theta_k)`;
- **M-step**: :math:`\theta_{k+1} = \arg\max_\theta \sum_i w_i \log p(y \mid x_i, \theta)
  + \log p(\theta)`, by L-BFGS (``m_steps`` iterations, strong Wolfe line search) in the
  unconstrained space :math:`z = T^{-1}(\theta)`, warm-started at :math:`\theta_k`.

With exact E-steps this is MAP-EM: each round does not decrease
:math:`\log p(y \mid \theta) + \log p(\theta)`, and its fixed points are the stationary points of
the marginal posterior density :math:`p(\theta \mid y)` (Dempster, Laird & Rubin 1977): EM
estimates its mode, not its spread. With Monte Carlo E-steps (a finite number of particles) the
estimate fluctuates around it (Wei & Tanner 1990); more particles shrink the fluctuation. Each
chain starts at its own prior draw of :math:`\theta`, so chains that end apart reveal several
modes.

Departure from Fast Diffusion EM: its M-step is a closed-form kernel update with a
plug-and-play kernel regulariser; ours maximises the model's own :math:`\log p(y \mid x, \theta)
+ \log p(\theta)`, so the prior on :math:`\theta` plays the regulariser's role for any operator.

**Result**: the last E-step's draws (``num_chains`` chains of ``num_particles``) with each
chain's final :math:`\theta` as the global latents' value of every draw, and the last E-step's
log-evidence where the inner engine estimates it. The per-round statistics hold the estimate of
every global latent (``theta_<name>``) and the M-step objective.

References:
    Laroche, Almansa, Coupeté, Tassano. Fast Diffusion EM: a diffusion model for blind inverse
    problems with application to deconvolution. WACV 2024. arXiv:2309.00287.
    Dempster, Laird, Rubin. Maximum likelihood from incomplete data via the EM algorithm. JRSS B
    39(1), 1977.
    Wei, Tanner. A Monte Carlo implementation of the EM algorithm. JASA 85(411), 1990.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Draws, Engine
from diffpost.posterior.engines.common import check_positive_integers
from diffpost.posterior.engines.hierarchical.common import check_inner, run_inner
from diffpost.posterior.engines.smc.mcgdiff import MCGDiff
from diffpost.posterior.problem import Problem

__all__ = ["EM", "EMState"]


class EMState(NamedTuple):
    """State of :class:`EM` (``C`` chains of ``N`` particles, ``D`` unconstrained entries).

    Attributes:
        particles: ``(C * N, *event)``, the last E-step's draws.
        log_weights: ``(C, N)``, their normalised weights.
        log_evidence: ``(C,)`` the last E-step's estimate, or ``None``.
        z: ``(C, D)`` the current unconstrained estimates.
        step: rounds done.
        num_particles: particles of every E-step.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor | None
    z: Tensor
    step: int
    num_particles: int


@dataclass(frozen=True)
class EM(Engine):
    """Monte Carlo EM for the global latents (see the module docstring).

    Args:
        inner: the engine of every E-step. Default ``MCGDiff()``.
        num_steps: EM rounds.
        m_steps: L-BFGS iterations of every M-step.
    """

    inner: Engine = field(default_factory=MCGDiff)
    num_steps: int = field(default=20, kw_only=True)
    m_steps: int = field(default=50, kw_only=True)
    infers_globals: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers("EM", num_steps=self.num_steps, m_steps=self.m_steps)

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["inner"] = {"engine": self.inner.name, **self.inner.config()}
        return config

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> EMState:
        check_inner("EM", problem, self.inner)
        z = problem.global_space.unconstrain(problem.sample_globals(num_chains, generator))
        return self._expectation(problem, z, num_particles, generator, step=0)

    def step(
        self, problem: Problem, state: EMState, generator: torch.Generator
    ) -> tuple[EMState, dict[str, Tensor]]:
        chains = state.z.shape[0]
        particles = state.particles.reshape((chains, -1) + tuple(problem.event_shape))
        maximised = [
            self._maximise(problem, state.z[c], particles[c], state.log_weights[c])
            for c in range(chains)
        ]
        z = torch.stack([m[0] for m in maximised])
        new = self._expectation(problem, z, state.num_particles, generator, step=state.step + 1)
        values, _ = problem.global_space.constrain(z)
        info = {f"theta_{name}": value for name, value in values.items()}
        info["objective"] = torch.stack([m[1] for m in maximised])
        return new, info

    def draws(self, problem: Problem, state: EMState, num_chains: int) -> Draws:
        base = super().draws(problem, state, num_chains)
        values, _ = problem.global_space.constrain(state.z)
        out = dict(base.values)
        draws = base.log_weights.shape[1]
        for name, value in values.items():
            out[name] = value[:, None].expand((num_chains, draws) + tuple(value.shape[1:]))
        log_likelihood = None
        fixed = [
            problem.with_globals({n: v[c] for n, v in values.items()}) for c in range(num_chains)
        ]
        if all("finite_likelihood" in f.capabilities for f in fixed):
            signal = base.values[problem.latent_name]
            with torch.no_grad():
                log_likelihood = torch.stack(
                    [f.log_likelihood(signal[c]) for c, f in enumerate(fixed)]
                )
        return base._replace(values=out, log_likelihood=log_likelihood)

    # ------------------------------------------------------------------ helpers
    def _expectation(
        self,
        problem: Problem,
        z: Tensor,
        num_particles: int,
        generator: torch.Generator,
        step: int,
    ) -> EMState:
        """Run the inner engine at each chain's estimate."""
        values, _ = problem.global_space.constrain(z)
        runs = [
            run_inner(
                problem, {n: v[c] for n, v in values.items()}, self.inner, num_particles, generator
            )
            for c in range(z.shape[0])
        ]
        latent = problem.latent_name
        particles = torch.cat([r.draws.values[latent][0] for r in runs])
        log_weights = torch.cat([r.draws.log_weights for r in runs])
        evidence = [r.draws.log_evidence for r in runs]
        log_evidence = None if any(e is None for e in evidence) else torch.cat(evidence)
        return EMState(particles, log_weights, log_evidence, z, step, num_particles)

    def _maximise(
        self, problem: Problem, z: Tensor, particles: Tensor, log_weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The M-step of one chain: ``(new z (D,), the objective there)``."""
        space = problem.global_space
        weights = (log_weights - log_weights.logsumexp(0)).exp().detach()
        variable = z.detach().clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS(
            [variable], max_iter=self.m_steps, line_search_fn="strong_wolfe"
        )

        def objective() -> Tensor:
            values, _ = space.constrain(variable[None])
            log_prior, log_likelihood = problem.log_joint_globals(
                particles, {n: v[0] for n, v in values.items()}
            )
            return -(log_prior + (weights * log_likelihood).sum())

        def closure() -> Tensor:
            optimiser.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
            final = -objective().detach()
        return variable.detach(), final
