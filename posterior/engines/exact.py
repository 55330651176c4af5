"""The closed-form reference engine: exact posterior samples of a Gaussian-mixture prior."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from diffpost.posterior.engines.base import Engine
from diffpost.posterior.problem import Problem

__all__ = ["Exact", "ExactState"]


class ExactState(NamedTuple):
    particles: Tensor  # (chains * N, *event)
    log_weights: Tensor  # (chains, N), uniform
    log_evidence: Tensor  # (chains,), exact log p(y)


@dataclass(frozen=True)
class Exact(Engine, family="exact"):
    r"""Exact posterior sampling for a :class:`~diffpost.models.priors.GaussianMixture` (or
    Gaussian) prior and a linear Gaussian observation :math:`y = A x + \sigma e`, ``sigma = 0``
    included.

    The posterior is the Gaussian mixture of
    :meth:`diffpost.models.priors.GaussianMixture.posterior` (Kalman form); every chain holds
    independent exact draws, uniformly weighted, and the log-evidence is the closed form :math:`\log
    p(y)` (no estimation error). ``init`` draws everything, so ``num_steps`` is 0 (any other value
    is refused).

    References:
        Cardoso, Janati, Le Corff, Moulines. Monte Carlo guided Diffusion for Bayesian linear
        inverse problems. ICLR 2024. arXiv:2308.07983 (appendix, Gaussian-mixture posterior).
    """

    num_steps: int = 0
    requires: ClassVar[frozenset[str]] = frozenset(
        {"exact_prior", "gaussian_observation", "linear"}
    )
    estimates_evidence: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_steps != 0:
            raise ValueError(
                f"Exact draws in init and runs no steps: num_steps must be 0; got {self.num_steps}"
            )

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> ExactState:
        gaussian = problem.gaussian
        prior = problem.prior
        observations = gaussian.y[None] if problem.plate is None else gaussian.y  # (B, *out)
        runs = num_chains // problem.num_problems  # chains of each problem (problem-major)
        particles, log_evidence = [], []
        for index, y in enumerate(observations):
            operator = gaussian.problem_operator(index)  # shared, or one per problem
            posterior = prior.posterior(operator, y, gaussian.sigma)
            particles.append(posterior.sample((runs * num_particles,), generator=generator))
            evidence = prior.log_evidence(operator, y, gaussian.sigma)
            log_evidence.append(evidence.expand(runs))
        particles = torch.cat(particles)
        log_weights = particles.new_full((num_chains, num_particles), -math.log(num_particles))
        return ExactState(particles, log_weights, torch.cat(log_evidence))

    def step(self, problem: Problem, state: ExactState, generator: torch.Generator):
        raise RuntimeError("Exact runs no steps")
