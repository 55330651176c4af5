"""What every engine family starts from: the sampling grid, the initial particles, uniform weights,
and the checks of its settings."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpost.models.samplers import initial_noise
from diffpost.models.schedules import DiscreteVP, Schedule, time_grid
from diffpost.posterior.problem import Problem

__all__ = [
    "check_positive",
    "check_positive_integers",
    "check_unit_interval",
    "initial_particles",
    "rotated_observation",
    "sampling_grid",
    "uniform_log_weights",
]


def rotated_observation(gaussian, svd, n: int, dtype: torch.dtype) -> Tensor:
    """:math:`U^\top y` of the observation: ``(m,)`` without a plate; with a plate of ``B``
    problems, one row per particle (or chain) of ``n`` problem-major ones, ``(n, m)``.

    Args:
        gaussian: the problem's :class:`~diffpost.posterior.problem.GaussianStructure`.
        svd: its operator's SVD.
        n: rows (particles or chains).
    """
    if gaussian.plate_size is None:
        return svd.ut(gaussian.y.to(dtype)[None])[0]
    return svd.ut(gaussian.y.to(dtype)).repeat_interleave(n // gaussian.plate_size, dim=0)


def sampling_grid(schedule: Schedule, num_steps: int, device=None) -> Tensor:
    """The DDIM sub-sequence grid the SMC papers sample on, float64 ``(num_steps + 1,)``.

    A :class:`~diffpost.models.schedules.DiscreteVP` uses its own number of training steps;
    continuous schedules use 1000, as the DDPM networks the papers load.
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


def check_positive_integers(engine: str, **values: int) -> None:
    """Raise ``ValueError`` naming the engine and the field when a value is not an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{engine}: {name} must be a positive integer; got {value!r}")


def check_positive(engine: str, **values: float) -> None:
    """Raise ``ValueError`` naming the engine and the field when a value is not finite and > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        ):
            raise ValueError(f"{engine}: {name} must be a positive number; got {value!r}")


def check_unit_interval(engine: str, **values: float) -> None:
    """Raise ``ValueError`` naming the engine and the field when a value is not a number in [0,
    1]."""
    for name, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{engine}: {name} must lie in [0, 1]; got {value!r}")
