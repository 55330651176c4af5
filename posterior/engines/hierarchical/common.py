"""What the hierarchical mechanisms share: checking the inner engine, running it at fixed values
of the global latents, and drawing one particle of a weighted run."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Draws, Engine, run
from diffpost.posterior.problem import Problem

__all__ = [
    "InnerRun",
    "check_differentiable",
    "check_inner",
    "draw_one",
    "probe_signals",
    "run_inner",
]


class InnerRun(NamedTuple):
    """One run of the inner engine with the global latents fixed.

    Attributes:
        problem: the problem at those values (its own NFE and VJP counts).
        state: the inner engine's final state.
        draws: its result (one chain).
    """

    problem: Problem
    state: Any
    draws: Draws


def check_inner(
    mechanism: str, problem: Problem, inner: Any, *, evidence: bool = False, in_place: bool = False
) -> None:
    """Refuse, before any work, an inner engine the mechanism cannot use on ``problem``.

    The inner engine must be an engine of the signal (not a hierarchical mechanism), it must
    handle the problem at a typical value of the global latents (``T(0)``, see
    :meth:`~diffpost.posterior.Problem.typical_globals`), and, where asked, estimate the
    evidence (``evidence``) or keep its particles in place between steps (``in_place``).

    Raises:
        ValueError: naming the mechanism, the inner engine and what is missing.
    """
    if not isinstance(inner, Engine):
        raise ValueError(
            f"{mechanism}: inner must be an engine instance (e.g. posterior.MCGDiff()); got "
            f"{inner!r}"
        )
    name = type(inner).__name__
    if inner.infers_globals:
        raise ValueError(f"{mechanism}: the inner engine {name} is itself a hierarchical mechanism")
    if evidence and not inner.estimates_evidence:
        raise ValueError(
            f"{mechanism} scores every proposal by the inner engine's log-evidence, and {name} "
            "does not estimate it; use Exact, MCGDiff, TDS, FKSteering or SMCDiff"
        )
    if in_place and inner.reorders_particles:
        raise ValueError(
            f"{mechanism} keeps one value of the global latents per particle, and {name} "
            "resamples its particles; use an engine that keeps them in place (DPS, DAPS, "
            "ScoreALD, DCDP, ...)"
        )
    typical = problem.typical_globals()
    if in_place:  # one value per particle: no linear structure to offer
        typical = {name: torch.stack([value, value]) for name, value in typical.items()}
    problem.with_globals(typical).require(inner)


def run_inner(
    problem: Problem,
    values: dict[str, Tensor],
    engine: Engine,
    num_particles: int,
    generator: torch.Generator,
) -> InnerRun:
    """Run ``engine`` (one chain of ``num_particles``) with the global latents at ``values`` (one
    value each), counting its denoiser calls in ``problem``."""
    fixed = problem.with_globals(values)
    fixed.require(engine)
    state, _ = run(engine, fixed, 1, num_particles, generator)
    problem.nfe += fixed.nfe
    problem.vjp += fixed.vjp
    return InnerRun(fixed, state, engine.draws(fixed, state, 1))


def draw_one(log_weights: Tensor, generator: torch.Generator) -> int:
    """The index of one particle drawn by its weight, from ``(N,)`` normalised log-weights."""
    weights = log_weights.exp()
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def probe_signals(problem: Problem) -> Tensor:
    """Two distinct, non-zero signals ``(2, *event)`` to probe a model with (a zero signal would
    hide an operator parameter: ``A(0) = 0`` whatever ``A``)."""
    size = math.prod(problem.event_shape)
    ramp = torch.linspace(-1.0, 1.0, size, dtype=problem.dtype, device=problem.device)
    return torch.stack([ramp, 0.5 - ramp.flip(0)]).reshape((2,) + tuple(problem.event_shape))


def check_differentiable(mechanism: str, problem: Problem) -> None:
    """Refuse a model whose likelihood does not depend differentiably on its global latents (an
    operator that detaches the parameters it is built from would leave a gradient method at its
    starting point, silently).

    Raises:
        ValueError: naming the mechanism and the global latents.
    """
    space = problem.global_space
    z = space.unconstrain({n: v[None] for n, v in problem.typical_globals().items()})
    with torch.enable_grad():
        variable = z.requires_grad_(True)
        values, _ = space.constrain(variable)
        _, log_likelihood = problem.log_joint_globals(
            probe_signals(problem), {n: v[0] for n, v in values.items()}
        )
        gradient = None
        if log_likelihood.requires_grad:
            (gradient,) = torch.autograd.grad(log_likelihood.sum(), variable, allow_unused=True)
    if gradient is None:
        raise ValueError(
            f"{mechanism} follows the gradient of log p(y | x, theta) in the global latents "
            f"{space.names}, and the model's likelihood does not depend differentiably on them "
            "(an operator built from them that detaches its parameters?); use posterior.PMMH, "
            "which needs no gradient"
        )
