r"""The Feynman–Kac machinery shared by the SMC engines.

Every SMC engine here is a reverse-time particle filter over a decreasing time grid
:math:`t_K > \dots > t_0 = 0`. One step from ``t`` to ``s`` does, for each chain independently:

1. **reweight**: add incremental log-weights :math:`\log G` to the normalised log-weights; the
   log-evidence grows by :math:`\log \sum_i W_i G_i` (:func:`reweight`);
2. **resample** when the ESS falls below ``ess_threshold * N`` (:func:`resample`): the ancestors'
   indices, flattened over chains, select the particles (and anything cached per particle);
3. **propose**: move the (resampled) particles to time ``s``.

Auxiliary filters (MCGDiff, FPS), whose weight depends on the parent only, reweight and resample
before proposing; the others (TDS, SMCDiff, FK steering) reweight after proposing and resample at
the start of the next step. Both orders are compositions of the same two functions, and both keep
the same statistics per step: ``ess`` (before resampling), ``resampled``, ``t`` and
``log_evidence_increment``.

Engines draw their particles' noise with :func:`particle_noise` and move resampled particles with
:func:`take_ancestors`; with :func:`reweight` these are the only places a run sharded over
processes (:mod:`diffpost.posterior.sharding`) differs from one process, so every SMC engine
shards without code of its own.

References:
    Chopin, Papaspiliopoulos. An Introduction to Sequential Monte Carlo. Springer 2020, ch. 10.
    Del Moral. Feynman–Kac Formulae. Springer 2004.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.models.operators.base import SVD
from diffpost.posterior.engines.base import Draws, Engine
from diffpost.posterior.problem import Problem
from diffpost.posterior.resampling import RESAMPLERS, ess, normalize_log_weights
from diffpost.posterior.sharding import current_shard, particle_noise, take_ancestors

__all__ = [
    "SMCEngine",
    "advance",
    "SMCState",
    "check_resampling",
    "finish_step",
    "log_normal",
    "particle_noise",
    "propose_with_head",
    "resample",
    "reweight",
    "step_times",
    "take_ancestors",
]


class SMCState(NamedTuple):
    """State of a reverse-time particle filter.

    Attributes:
        particles: ``(chains * N, *event)`` at time ``grid[step]``.
        log_weights: ``(chains, N)``, normalised per chain.
        log_evidence: ``(chains,)`` running estimate of ``log p(y)``.
        step: index into ``grid`` of the particles' time.
        grid: the decreasing time grid, ``(K + 1,)`` float64.
        cache: per-particle tensors ``(chains * N, ...)`` carried between steps (resampled with
            the particles), e.g. the last denoiser output.
        constants: per-run quantities computed once in ``init`` (the rotated observation, the
            noise levels of the observed coordinates, ...).
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor
    step: int
    grid: Tensor
    cache: dict[str, Tensor]
    constants: dict[str, Tensor]


@dataclass(frozen=True)
class SMCEngine(Engine):
    """Base of the SMC engines: one driver iteration per interval of the state's time grid."""

    reorders_particles: ClassVar[bool] = True
    estimates_evidence: ClassVar[bool] = True
    independent_particles: ClassVar[bool] = False  # resampled particles share ancestors

    def iterations(self, state: SMCState) -> int:
        return state.grid.shape[0] - 1

    def draws(self, problem: Problem, state: SMCState, num_chains: int) -> Draws:
        """The final particles (gathered from every rank of a sharded run) and their weights."""
        shard = current_shard()
        if shard is not None:
            state = state._replace(particles=shard.gather_rows(state.particles))
        return super().draws(problem, state, num_chains)


def step_times(state: SMCState) -> tuple[Tensor, Tensor, bool]:
    """``(t, s, last)``: the current time, the next one, and whether ``s`` ends the grid."""
    return state.grid[state.step], state.grid[state.step + 1], state.step + 2 == state.grid.shape[0]


def log_normal(value: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """Elementwise :math:`\\log \\mathcal{N}(value; mean, variance)` (broadcasting)."""
    return -0.5 * ((value - mean) ** 2 / variance + torch.log(2 * math.pi * variance))


def propose_with_head(
    svd: SVD,
    mean: Tensor,
    kernel_std: Tensor,
    mean_head: Tensor,
    head_mean: Tensor,
    head_std: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    r"""Draw :math:`x = V z` whose leading SVD coordinates follow their own Gaussian.

    The free coordinates follow the kernel :math:`\mathcal{N}(V^\top \mu, \kappa^2 I)`; the first
    ``k`` (the observed ones, conditioned by the caller) follow
    :math:`\mathcal{N}(\text{head\_mean}, \text{head\_std}^2)`. One kernel draw in pixel space
    plus a correction in the span of :math:`V_{:, :k}`, so a step costs ``O(n d k)`` instead of two
    full rotations ``O(n d^2)`` when the operator offers thin SVD maps (dense matrices, masks).

    Args:
        svd: the operator's SVD.
        mean: kernel mean :math:`\mu`, ``(n, *event)``.
        kernel_std: kernel standard deviation :math:`\kappa` (0-d).
        mean_head: :math:`V_{:, :k}^\top \mu`, ``(n, k)``.
        head_mean, head_std: the leading coordinates' law, ``(n, k)`` and ``(k,)`` (or
        broadcastable).
        generator: random stream.

    Returns:
        ``(x, head)``: the particles ``(n, *event)`` and their leading coordinates ``(n, k)``.
    """
    noise = particle_noise(mean.shape, generator, mean.dtype, mean.device)
    noise_head = svd.vt_head(noise, mean_head.shape[1])  # standard normal: V is orthogonal
    head = head_mean + head_std * noise_head
    correction = svd.v_head(head - mean_head - kernel_std * noise_head, tuple(mean.shape[1:]))
    return mean + kernel_std * noise + correction, head


def check_resampling(engine_name: str, scheme: str, ess_threshold: float) -> None:
    """Validate an engine's resampling fields (``ValueError`` naming the engine)."""
    if scheme not in RESAMPLERS:
        raise ValueError(
            f"{engine_name}: resampling must be one of {sorted(RESAMPLERS)}; got {scheme!r}"
        )
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"{engine_name}: ess_threshold must lie in [0, 1]; got {ess_threshold}")


def reweight(log_weights: Tensor, log_increments: Tensor) -> tuple[Tensor, Tensor]:
    r"""Multiply normalised weights by incremental ones.

    Args:
        log_weights: ``(chains, N)`` normalised.
        log_increments: ``(chains, N)`` incremental log-weights :math:`\log G_i` (in a sharded
            run, this rank's ``(chains, N/R)``, gathered here).

    Returns:
        ``(new_log_weights, log_evidence_increment)``: normalised ``(chains, N)`` and
        :math:`\log \sum_i W_i G_i` per chain ``(chains,)``.
    """
    shard = current_shard()
    if shard is not None:
        log_increments = shard.gather_columns(log_increments)
    unnormalised = log_weights + log_increments
    # a NaN increment is a bug upstream; -inf everywhere is handled by the driver (collapse)
    return normalize_log_weights(unnormalised), torch.logsumexp(unnormalised, -1)


def resample(
    log_weights: Tensor, scheme: str, ess_threshold: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Resample the chains whose ESS is at most ``ess_threshold * N``.

    ``ess_threshold = 1`` resamples at every step, ``0`` never.

    Args:
        log_weights: ``(chains, N)`` normalised.
        scheme: ``"multinomial"``, ``"systematic"``, ``"stratified"`` or ``"residual"``.
        ess_threshold: fraction of ``N``.
        generator: source of randomness.

    Returns:
        ``(indices, log_weights, ess, resampled)``: flat ancestor indices ``(chains * N,)`` into
        the stacked particles (the identity for chains not resampled), the new log-weights
        ``(chains, N)``, the ESS before resampling ``(chains,)`` and the flags ``(chains,)``.
    """
    chains, n = log_weights.shape
    current_ess = ess(log_weights)
    resampled = current_ess <= ess_threshold * n * (1 + 1e-9)
    identity = torch.arange(n, device=log_weights.device).expand(chains, n)
    if bool(resampled.any()):
        finite = torch.where(torch.isfinite(log_weights).any(-1, keepdim=True), log_weights, 0.0)
        ancestors = RESAMPLERS[scheme](finite, generator)
        ancestors = torch.where(resampled[:, None], ancestors, identity)
        log_weights = torch.where(
            resampled[:, None], torch.full_like(log_weights, -math.log(n)), log_weights
        )
    else:
        ancestors = identity
    offsets = torch.arange(chains, device=log_weights.device)[:, None] * n
    return (ancestors + offsets).reshape(-1), log_weights, current_ess, resampled


def finish_step(
    state: SMCState,
    particles: Tensor,
    log_weights: Tensor,
    log_increments: Tensor,
    ess: Tensor,
    resampled: Tensor,
    cache: dict[str, Tensor],
) -> tuple[SMCState, dict[str, Tensor]]:
    """Reweight proposed particles and return the next state with the step's statistics.

    For the filters that weight *after* proposing (TDS, FK steering).

    Args:
        state: the state the step started from.
        particles: proposed particles ``(chains * N, *event)`` at the next grid time.
        log_weights: normalised log-weights after resampling ``(chains, N)``.
        log_increments: incremental log-weights of the proposed particles ``(chains * N,)``.
        ess: ESS before resampling ``(chains,)``.
        resampled: resampling flags ``(chains,)``.
        cache: per-particle tensors for the next step.
    """
    chains = log_weights.shape[0]
    log_weights, log_increment = reweight(log_weights, log_increments.reshape(chains, -1))
    return advance(state, particles, log_weights, log_increment, ess, resampled, cache)


def advance(
    state: SMCState,
    particles: Tensor,
    log_weights: Tensor,
    log_increment: Tensor,
    ess: Tensor,
    resampled: Tensor,
    cache: dict[str, Tensor] | None = None,
) -> tuple[SMCState, dict[str, Tensor]]:
    """The next state and the step's statistics, once the step has reweighted its particles.

    Args:
        state: the state the step started from.
        particles: particles ``(chains * N, *event)`` at the next grid time.
        log_weights: their normalised log-weights ``(chains, N)``.
        log_increment: the step's log-evidence increment ``(chains,)`` (added to the running
            estimate unless the engine keeps none). The recorded statistic of the first step
            also carries the initial weighting's increment (the state's log-evidence before any
            step: TDS and FK steering weight the initial particles), so the recorded increments
            always sum to the final log-evidence.
        ess: ESS before resampling ``(chains,)``.
        resampled: resampling flags ``(chains,)``.
        cache: per-particle tensors for the next step (default: keep the current cache).
    """
    log_evidence = None if state.log_evidence is None else state.log_evidence + log_increment
    recorded = log_increment
    if state.step == 0 and state.log_evidence is not None:
        recorded = log_evidence
    info = {
        "t": state.grid[state.step + 1],
        "ess": ess,
        "resampled": resampled,
        "log_evidence_increment": recorded,
    }
    new_state = state._replace(
        particles=particles,
        log_weights=log_weights,
        log_evidence=log_evidence,
        step=state.step + 1,
        cache=state.cache if cache is None else cache,
    )
    return new_state, info
