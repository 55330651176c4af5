r"""PMMH: particle marginal Metropolis–Hastings over the global latents, an SMC engine inside.

For a model with global latents :math:`\theta` (noise level, kernel width, operator gain) and a
signal :math:`x` with a diffusion prior, the target is
:math:`p(\theta, x \mid y) \propto p(\theta)\, p(x)\, p(y \mid x, \theta)`. PMMH (Andrieu, Doucet
& Holenstein 2010, section 2.4.2) runs a Metropolis–Hastings chain on
:math:`z = T^{-1}(\theta)` (:math:`T` = ``biject_to(support)``, as Pyro's and NumPyro's HMC) whose
acceptance ratio replaces the intractable :math:`p(y \mid \theta)` by the unbiased estimate
:math:`\hat p(y \mid \theta)` of an SMC run of the signal at :math:`\theta`:

.. math:: \alpha = \min\Big\{1, \frac{\hat p(y \mid \theta')\, p(\theta')\, |J_T(z')|}
   {\hat p(y \mid \theta)\, p(\theta)\, |J_T(z)|}\Big\},

and on acceptance keeps one particle :math:`x'` of that run, drawn by its weight. Whatever the
number of particles, the chain's stationary law is the exact joint posterior (Andrieu et al.,
Theorem 4) of the model the inner engine samples: with ``Exact`` inside, the posterior itself;
with MCGDiff, TDS, FK steering or SMCDiff, the posterior of their discretised diffusion. The
estimate's noise only slows the chain: it sticks when the standard deviation of
:math:`\log \hat p` passes about 1.5 (Doucet et al. 2015), which more particles fix; the
``log_evidence`` statistic records every proposal's estimate.

**Proposal**: a Gaussian random walk in :math:`z`, adapted during ``warmup`` iterations and then
frozen, so that the kept draws come from one fixed MH kernel. Its covariance is
:math:`\lambda^2 (2.38^2 / D)\, \hat\Sigma` with :math:`\hat\Sigma` the chain's running empirical
covariance (Haario et al. 2001), started from :math:`0.1^2` times the prior's (256 prior draws),
and :math:`\log\lambda` moved by Robbins–Monro steps :math:`k^{-0.6}(\alpha_k - \alpha^*)`
towards ``target_acceptance`` (Andrieu & Thoms 2008, Algorithm 4); :math:`\alpha^*` defaults to
0.44 for one global entry and 0.234 for more (Roberts & Rosenthal 2001). Each chain starts at a
prior draw of :math:`\theta`.

**Sizes**: ``num_chains`` independent MH chains (ArviZ's chains); ``num_particles`` particles in
every inner run (one chain of them); ``num_steps`` kept iterations per chain (the draws) after
``warmup``. Cost: ``(1 + warmup + num_steps) * num_chains`` inner runs, one after another.

References:
    Andrieu, Doucet, Holenstein. Particle Markov chain Monte Carlo methods. JRSS B 72(3), 2010.
    Haario, Saksman, Tamminen. An adaptive Metropolis algorithm. Bernoulli 7(2), 2001.
    Andrieu, Thoms. A tutorial on adaptive MCMC. Statistics and Computing 18, 2008.
    Roberts, Rosenthal. Optimal scaling for various Metropolis–Hastings algorithms. Statistical
    Science 16(4), 2001.
    Doucet, Pitt, Deligiannidis, Kohn. Efficient implementation of Markov chain Monte Carlo when
    using an unbiased likelihood estimator. Biometrika 102(2), 2015.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Draws, Engine
from diffpost.posterior.engines.common import check_positive_integers
from diffpost.posterior.engines.hierarchical.common import check_inner, draw_one, run_inner
from diffpost.posterior.engines.smc.mcgdiff import MCGDiff
from diffpost.posterior.problem import Problem

__all__ = ["PMMH", "PMMHState"]

#: prior draws that set the initial proposal covariance
PRIOR_DRAWS = 256


class PMMHState(NamedTuple):
    """State of :class:`PMMH` (``C`` chains, ``D`` unconstrained global entries).

    Attributes:
        particles: ``(C, *event)``, each chain's current signal draw.
        log_weights: ``(C, 1)``, zeros.
        log_evidence: ``None``.
        z: ``(C, D)`` current unconstrained global latents.
        log_target: ``(C,)`` :math:`\\log \\hat p(y \\mid \\theta) + \\log p(\\theta) + \\log|J|`.
        log_likelihood: ``(C,)`` :math:`\\log p(y \\mid x, \\theta)` of the current draw.
        step: iterations done.
        log_scale: ``(C,)`` the proposal's :math:`\\log \\lambda`.
        mean, cov: ``(C, D)``, ``(C, D, D)`` the running estimates of the proposal.
        kept_x, kept_z, kept_log_likelihood: ``(C, k, ...)`` the draws kept after warm-up.
        num_particles: particles of every inner run.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    z: Tensor
    log_target: Tensor
    log_likelihood: Tensor
    step: int
    log_scale: Tensor
    mean: Tensor
    cov: Tensor
    kept_x: Tensor
    kept_z: Tensor
    kept_log_likelihood: Tensor
    num_particles: int


@dataclass(frozen=True)
class PMMH(Engine, family="hierarchical"):
    """Particle marginal Metropolis–Hastings on the global latents (see the module docstring).

    Args:
        inner: the engine run at every proposal; it must estimate the evidence (``Exact``,
            ``MCGDiff``, ``TDS``, ``FKSteering``, ``SMCDiff``). Default ``MCGDiff()``.
        num_steps: MH iterations kept per chain (the draws), after ``warmup``.
        warmup: adaptation iterations, discarded.
        target_acceptance: the acceptance rate the warm-up aims at; ``None``: 0.44 for one
            global entry, 0.234 for more.
    """

    inner: Engine = field(default_factory=MCGDiff)
    num_steps: int = field(default=1000, kw_only=True)
    warmup: int = field(default=500, kw_only=True)
    target_acceptance: float | None = field(default=None, kw_only=True)
    infers_globals: ClassVar[bool] = True
    independent_particles: ClassVar[bool] = False  # draws of a Metropolis-Hastings chain

    def __post_init__(self):
        super().__post_init__()
        check_positive_integers("PMMH", num_steps=self.num_steps)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"PMMH: warmup must be a non-negative integer; got {self.warmup!r}")
        target = self.target_acceptance
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1
        ):
            raise ValueError(f"PMMH: target_acceptance must lie in (0, 1); got {target!r}")

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["inner"] = {"engine": self.inner.name, **self.inner.config()}
        return config

    def iterations(self, state: PMMHState) -> int:
        return self.warmup + self.num_steps

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> PMMHState:
        check_inner("PMMH", problem, self.inner, evidence=True)
        space = problem.global_space
        prior = space.unconstrain(problem.sample_globals(max(num_chains, PRIOR_DRAWS), generator))
        z = prior[:num_chains]
        log_target, x, log_likelihood, _ = self._score(problem, z, num_particles, generator)
        cov = torch.diag_embed(prior.var(0).clamp_min(1e-12) * 0.1**2 * space.dim / 2.38**2)
        empty = z.new_zeros((num_chains, 0))
        return PMMHState(
            particles=x,
            log_weights=z.new_zeros((num_chains, 1)),
            log_evidence=None,
            z=z,
            log_target=log_target,
            log_likelihood=log_likelihood,
            step=0,
            log_scale=z.new_zeros(num_chains),
            mean=z.clone(),
            cov=cov.expand(num_chains, -1, -1).clone(),
            kept_x=x.new_zeros((num_chains, 0) + tuple(x.shape[1:])),
            kept_z=z.new_zeros((num_chains, 0, space.dim)),
            kept_log_likelihood=empty,
            num_particles=num_particles,
        )

    def step(
        self, problem: Problem, state: PMMHState, generator: torch.Generator
    ) -> tuple[PMMHState, dict[str, Tensor]]:
        proposal = state.z + self._random_walk(state, generator)
        log_target, x, log_likelihood, log_evidence = self._score(
            problem, proposal, state.num_particles, generator
        )
        log_alpha = torch.nan_to_num(log_target - state.log_target, nan=-math.inf).clamp(max=0)
        uniform = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device)
        accept = uniform.to(log_alpha).log() < log_alpha
        event = (-1,) + (1,) * (x.dim() - 1)
        state = state._replace(
            z=torch.where(accept[:, None], proposal, state.z),
            log_target=torch.where(accept, log_target, state.log_target),
            particles=torch.where(accept.reshape(event), x, state.particles),
            log_likelihood=torch.where(accept, log_likelihood, state.log_likelihood),
            step=state.step + 1,
        )
        if state.step <= self.warmup:
            state = self._adapt(state, log_alpha.exp(), state.step)
        else:
            state = state._replace(
                kept_x=torch.cat([state.kept_x, state.particles[:, None]], 1),
                kept_z=torch.cat([state.kept_z, state.z[:, None]], 1),
                kept_log_likelihood=torch.cat(
                    [state.kept_log_likelihood, state.log_likelihood[:, None]], 1
                ),
            )
        info = {
            "acceptance": log_alpha.exp(),
            "accepted": accept.to(log_alpha.dtype),
            "log_evidence": log_evidence,
            "proposal_scale": state.log_scale.exp(),
            "warmup": float(state.step <= self.warmup),
        }
        return state, info

    def draws(self, problem: Problem, state: PMMHState, num_chains: int) -> Draws:
        chains, kept = state.kept_z.shape[:2]
        values, _ = problem.global_space.constrain(state.kept_z.flatten(0, 1))
        out = {problem.latent_name: state.kept_x}
        for name, value in values.items():
            out[name] = value.reshape((chains, kept) + tuple(value.shape[1:]))
        log_likelihood = state.kept_log_likelihood
        return Draws(
            values=out,
            log_weights=state.kept_z.new_full((chains, kept), -math.log(kept)),
            log_likelihood=None if torch.isnan(log_likelihood).any() else log_likelihood,
        )

    # ------------------------------------------------------------------ helpers
    def _score(
        self, problem: Problem, z: Tensor, num_particles: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run the inner engine at each chain's values ``z`` ``(C, D)``: ``(log target, one
        signal draw per chain, its log-likelihood, the log-evidence estimate)``."""
        values, log_jacobian = problem.global_space.constrain(z)
        log_prior = problem.log_prior_globals(values)
        evidence, draws, likelihoods = [], [], []
        for chain in range(z.shape[0]):
            inner = run_inner(
                problem,
                {name: value[chain] for name, value in values.items()},
                self.inner,
                num_particles,
                generator,
            )
            signal = inner.draws.values[inner.problem.latent_name][0]
            pick = draw_one(inner.draws.log_weights[0], generator)
            evidence.append(inner.draws.log_evidence.reshape(()))
            draws.append(signal[pick])
            likelihoods.append(_log_likelihood_or_nan(inner.problem, signal[pick]))
        log_evidence = torch.stack(evidence).to(z)
        log_target = log_evidence + log_prior.to(z) + log_jacobian
        return log_target, torch.stack(draws), torch.stack(likelihoods).to(z), log_evidence

    def _random_walk(self, state: PMMHState, generator: torch.Generator) -> Tensor:
        """One Gaussian step per chain with covariance ``lambda^2 (2.38^2 / D) cov``."""
        dim = state.z.shape[1]
        scale = (2 * state.log_scale).exp() * 2.38**2 / dim
        identity = torch.eye(dim, dtype=state.z.dtype, device=state.z.device)
        factor = torch.linalg.cholesky(scale[:, None, None] * state.cov + 1e-12 * identity)
        noise = torch.randn(state.z.shape, generator=generator, device=state.z.device)
        return (factor @ noise.to(state.z)[..., None])[..., 0]

    def _adapt(self, state: PMMHState, alpha: Tensor, k: int) -> PMMHState:
        """Robbins–Monro step on the scale, running mean and covariance of the chain."""
        dim = state.z.shape[1]
        target = self.target_acceptance or (0.44 if dim == 1 else 0.234)
        gain = 1.0 / (k + 1)
        delta = state.z - state.mean
        mean = state.mean + gain * delta
        outer = delta[:, :, None] * (state.z - mean)[:, None, :]
        return state._replace(
            log_scale=state.log_scale + k**-0.6 * (alpha - target),
            mean=mean,
            cov=state.cov + gain * (outer - state.cov),
        )


def _log_likelihood_or_nan(problem: Problem, x: Tensor) -> Tensor:
    """``log p(y | x)`` of one draw at the run's global values (NaN for a noiseless
    observation, which has no density)."""
    if "finite_likelihood" not in problem.capabilities:
        return x.new_tensor(float("nan"))
    with torch.no_grad():
        return problem.log_likelihood(x[None])[0]
