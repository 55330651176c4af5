"""What every engine family starts from: the sampling grid, the initial particles, uniform weights,
and the checks of its settings."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from diffpost.models.covariance import PosteriorVariance
from diffpost.models.operators.base import LinearOperator
from diffpost.models.samplers import initial_noise_scale
from diffpost.models.schedules import EDM, DiscreteVP, Schedule, time_grid
from diffpost.posterior.problem import GaussianStructure, Problem
from diffpost.posterior.sharding import current_shard, particle_noise

__all__ = [
    "check_choice",
    "check_nonnegative",
    "check_positive",
    "check_positive_integers",
    "check_posterior_variance",
    "check_unit_interval",
    "flow_time",
    "gaussian_data_gradient",
    "initial_particles",
    "operator_gain",
    "rotated_observation",
    "sampling_grid",
    "squared_noise_level",
    "uniform_log_weights",
]


def rotated_observation(gaussian, svd, n: int, dtype: torch.dtype) -> Tensor:
    r""":math:`U^\top y` of the observation: ``(m,)`` without a plate; with a plate of ``B``
    problems, one row per particle (or chain) of ``n`` problem-major ones, ``(n, m)``.

    Args:
        gaussian: the problem's :class:`~diffpost.posterior.problem.GaussianStructure`.
        svd: its operator's SVD.
        n: rows (particles or chains).
    """
    if gaussian.plate_size is None:
        return svd.ut(gaussian.y.to(dtype)[None])[0]
    return svd.ut(gaussian.y.to(dtype)).repeat_interleave(n // gaussian.plate_size, dim=0)


#: smallest noise level of the EDM grid (Karras et al. 2022, Table 1: sigma_min = 0.002)
EDM_NOISE_MIN = 0.002


def sampling_grid(schedule: Schedule, num_steps: int, device=None) -> Tensor:
    r"""The sampling grid of the grid-based engines, float64 ``(num_steps + 1,)``, chosen for the
    schedule.

    - :class:`~diffpost.models.schedules.EDM` (noise linear in ``t``): Karras et al.'s
      :math:`\rho = 7` spacing of the noise level down to 0.002 (2022, eq. 5 and Table 1), then
      ``t = 0``. The DDIM grid, uniform in ``t``, would jump from :math:`\sigma = 1.68` to 0.08
      in its last steps at 50 steps; measured on a Gaussian problem, it left MCGDiff, TDS and
      DDRM with 0.42, 0.43 and 0.14 of the exact posterior variance, against 0.94, 0.95 and 0.68
      on VP (``benchmarks/results/schedule_grids.md``).
    - every other schedule: the DDIM sub-sequence the SMC papers sample on (Song et al. 2021),
      of the schedule's own training steps for a :class:`~diffpost.models.schedules.DiscreteVP`
      and of 1000 otherwise (VP, VE, whose noise is already geometric in ``t``, and rectified
      flow, for which a uniform grid in ``t`` is the usual one).

    Warns:
        UserWarning: ``num_steps`` above the training steps of a DDIM grid, which caps it (e.g.
        REDDiff's 1000 on a 999-step network): the steps that run are said, not silently fewer.
    """
    if isinstance(schedule, EDM):
        return time_grid(
            num_steps, "karras", schedule=schedule, noise_min=EDM_NOISE_MIN, device=device
        )
    train_steps = schedule.num_train_steps if isinstance(schedule, DiscreteVP) else 1000
    if num_steps > train_steps:
        warnings.warn(
            f"num_steps={num_steps} exceeds the {train_steps} steps of the DDIM grid of this "
            f"{type(schedule).__name__} schedule; running {train_steps} steps",
            UserWarning,
            stacklevel=3,
        )
        num_steps = train_steps
    return time_grid(num_steps, "ddim", num_train_steps=train_steps, device=device)


def initial_particles(
    problem: Problem, grid: Tensor, count: int, generator: torch.Generator, flat: bool = False
) -> Tensor:
    """``count`` draws of the diffusion's reference law at ``grid[0]``, ``(count, *event)``, or
    ``(count, d)`` when ``flat``.

    In a run sharded over processes (:mod:`diffpost.posterior.sharding`), ``count`` is the whole
    run's ``chains * N`` and the result this rank's rows of it.
    """
    event = (int(torch.Size(problem.event_shape).numel()),) if flat else tuple(problem.event_shape)
    shard = current_shard()
    rows = count if shard is None else shard.local_count(count)
    scale = initial_noise_scale(problem.prior.schedule, float(grid[0]))
    shape = (rows,) + event
    return scale * particle_noise(shape, generator, problem.dtype, problem.device)


def uniform_log_weights(num_chains: int, num_particles: int, like: Tensor) -> Tensor:
    """``(chains, N)`` log-weights all equal to ``-log N``, on ``like``'s device and dtype."""
    return like.new_full((num_chains, num_particles), -math.log(num_particles))


def operator_gain(problem: Problem) -> float:
    r""":math:`\lVert A \rVert_2^2` of a linear GaussianObservation's operator
    (:meth:`~diffpost.models.operators.base.LinearOperator.norm`), 1 otherwise.

    A Gaussian data term of variance :math:`v` has largest curvature :math:`\lVert A
    \rVert^2 / v`; step sizes are set against it. Non-linear operators are taken as 1-Lipschitz
    (as :class:`~diffpost.models.operators.PhaseRetrieval` is), other likelihoods as of unit
    curvature.
    """
    gaussian = problem.gaussian
    if gaussian is not None and isinstance(gaussian.operator, LinearOperator):
        return gaussian.operator.norm() ** 2
    return 1.0


def gaussian_data_gradient(gaussian: GaussianStructure, x: Tensor, variance: Tensor) -> Tensor:
    r""":math:`\nabla_x \big[-\tfrac12 \sum_j (y_j - A(x)_j)^2 / v_j\big] = J_A(x)^\top ((y - A(x))
    / v)`.

    The gradient of a Gaussian data term whose variance ``v`` is not (only) the observation's own,
    e.g. Score-ALD's annealed :math:`\sigma_y^2 + \gamma_t^2` or DAPS' :math:`\tau^2`. For a linear
    operator this is :math:`A^\top (y - A x) / v`; otherwise one vector-Jacobian product through
    the operator (never through the denoiser).

    Args:
        gaussian: the observation's structure (operator and ``y``).
        x: ``(n, *event)``.
        variance: broadcastable to the operator's output shape (a 0-d tensor for a scalar).

    Returns:
        ``(n, *event)``.
    """
    operator = gaussian.operator
    if isinstance(operator, LinearOperator):
        return operator.adjoint((gaussian.y_for(x.shape[0]) - operator(x)) / variance)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        residual = gaussian.y_for(x.shape[0]) - operator(x)
        objective = -0.5 * (residual**2 / variance).sum()
        (gradient,) = torch.autograd.grad(objective, x)
    return gradient


def squared_noise_level(gaussian: GaussianStructure, offset: float = 0.0) -> Tensor:
    r""":math:`\sum_j (\sigma_{y,j} + \text{offset})^2` over one measurement's entries: the
    squared residual norm a fit reaches at the noise level, where SITCOM and FLAIR stop fitting
    (0-d; the largest over a plate's problems)."""
    size = int(math.prod(gaussian.operator.out_shape))
    sigma = gaussian.sigma
    if sigma.numel() == 1:
        return size * (sigma.reshape(()) + offset) ** 2
    return ((sigma + offset) ** 2).expand(gaussian.y.shape).reshape(-1, size).sum(-1).max()


def flow_time(schedule: Schedule, t: Tensor) -> Tensor:
    r""":math:`\rho_t = \sigma_t / (\alpha_t + \sigma_t)`: the time of the rectified flow whose
    noise-to-signal ratio is the schedule's at ``t`` (``t`` itself on rectified flow; 0-d). The
    flow engines (FlowDPS, FLAIR) weigh by it, so that they run on every schedule."""
    alpha, sigma = schedule(t)
    return sigma / (alpha + sigma)


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


def check_nonnegative(engine: str, **values: float) -> None:
    """Raise ``ValueError`` naming the engine and the field when a value is not finite and >= 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"{engine}: {name} must be a finite number >= 0; got {value!r}")


def check_posterior_variance(engine: str, value: object) -> None:
    """Raise ``ValueError`` naming the engine unless ``value`` is ``None`` or a fitted
    :class:`~diffpost.models.covariance.PosteriorVariance`."""
    if value is not None and not isinstance(value, PosteriorVariance):
        raise ValueError(
            f"{engine}: posterior_variance must be a PosteriorVariance (PosteriorVariance.fit); "
            f"got {type(value).__name__}"
        )


def check_unit_interval(engine: str, **values: float) -> None:
    """Raise ``ValueError`` naming the engine and the field when a value is not a number in [0,
    1]."""
    for name, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{engine}: {name} must lie in [0, 1]; got {value!r}")


def check_choice(engine: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the engine and the field when ``value`` is not one of
    ``choices``."""
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(choice) for choice in choices)
        raise ValueError(f"{engine}: {name} must be {options}; got {value!r}")
