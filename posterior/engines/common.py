"""What every engine family starts from: the sampling grid, the initial particles, uniform weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.samplers import initial_noise
from models.schedules import DiscreteVP, Schedule, time_grid
from posterior.problem import Problem

__all__ = ["initial_particles", "sampling_grid", "uniform_log_weights"]


def sampling_grid(schedule: Schedule, num_steps: int, device=None) -> Tensor:
    """The DDIM sub-sequence grid the SMC papers sample on, float64 ``(num_steps + 1,)``.

    A :class:`~models.schedules.DiscreteVP` uses its own number of training steps; continuous
    schedules use 1000, as the DDPM networks the papers load.
    """
    train_steps = schedule.num_train_steps if isinstance(schedule, DiscreteVP) else 1000
    return time_grid(
        min(num_steps, train_steps), "ddim", num_train_steps=train_steps, device=device
    )


def initial_particles(
    problem: Problem, grid: Tensor, count: int, generator: torch.Generator
) -> Tensor:
    """``count`` draws of the diffusion's reference law at ``grid[0]``, ``(count, *event)``."""
    shape = (count,) + tuple(problem.event_shape)
    return initial_noise(
        problem.prior.schedule,
        shape,
        generator,
        t_max=float(grid[0]),
        dtype=problem.dtype,
        device=problem.device,
    )


def uniform_log_weights(num_chains: int, num_particles: int, like: Tensor) -> Tensor:
    """``(chains, N)`` log-weights all equal to ``-log N``, on ``like``'s device and dtype."""
    return like.new_full((num_chains, num_particles), -math.log(num_particles))
