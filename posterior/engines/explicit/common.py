r"""What the explicit-approximation engines share: their state, their loop over a time grid, and
the observation in the SVD basis.

Every engine of this family moves one unweighted cloud of particles down a decreasing time grid
:math:`t_K > \dots > t_0` (one driver iteration per interval); all particles of all chains form
one batch. The log-weights stay uniform and there is no evidence estimate.

The SVD-based engines (DDRM, SNIPS) work in the spectral coordinates of
:math:`A = U \operatorname{diag}(s) V^\top`: :math:`\bar x = V^\top x` and :math:`\bar y_i = (U^\top
y)_i / s_i` on the observed coordinates, so that :math:`\bar y_i = \bar x_{0,i} + (\sigma_y / s_i)
e_i`; :func:`spectral_observation` computes these once per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import epsilon_from_x0
from diffpost.models.operators.base import SVD, conjugate_gradient
from diffpost.models.samplers import ddim_coefficients
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.engines.common import (
    initial_particles,
    rotated_observation,
    sampling_grid,
    uniform_log_weights,
)
from diffpost.posterior.guidance import denoise_with_residual_gradient
from diffpost.posterior.problem import Problem

__all__ = [
    "ExplicitEngine",
    "ExplicitState",
    "GuidedMean",
    "SpectralObservation",
    "advance",
    "chain_mean",
    "dps_mean",
    "add_gaussian_noise",
    "gaussian_noise",
    "initial_state",
    "noised_measurement_projection",
    "per_particle_norm",
    "proximal_data_step",
    "scalar_noise_level",
    "spectral_observation",
]


class ExplicitState(NamedTuple):
    """State of an unweighted reverse-time sampler.

    Attributes:
        particles: ``(chains * N, *event)`` at time ``grid[step]``.
        log_weights: ``(chains, N)``, uniform (``-log N``).
        log_evidence: always ``None``.
        step: index into ``grid`` of the particles' time.
        grid: the decreasing time grid, ``(K + 1,)`` float64.
        constants: per-run quantities computed once in ``init``.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    step: int
    grid: Tensor
    constants: dict[str, Any]


@dataclass(frozen=True)
class ExplicitEngine(Engine):
    """Base of the explicit-approximation engines: one iteration per interval of the grid."""

    def iterations(self, state: ExplicitState) -> int:
        return state.grid.shape[0] - 1

    def particle_time(self, state: ExplicitState) -> float:
        return float(state.grid[state.step])

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> ExplicitState:
        """Draws of the diffusion's reference law at the first time of the engines' shared grid
        (:func:`~diffpost.posterior.engines.common.sampling_grid` with ``num_steps``); engines
        that start elsewhere (DDRM, PiGDM, SNIPS) override it."""
        if not problem.likelihood_sites:
            raise ValueError(f"{self.name} needs an observed site: the model observes nothing")
        grid = sampling_grid(problem.prior.schedule, self.num_steps, device=problem.device)
        return initial_state(problem, grid, num_chains, num_particles, generator)

    def _check_num_steps(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"{self.name}: num_steps must be >= 1; got {self.num_steps}")


def initial_state(
    problem: Problem,
    grid: Tensor,
    num_chains: int,
    num_particles: int,
    generator: torch.Generator,
    *,
    particles: Tensor | None = None,
    constants: dict[str, Any] | None = None,
) -> ExplicitState:
    """The state at ``grid[0]``: the given particles, or draws of the diffusion's reference law."""
    if particles is None:
        particles = initial_particles(problem, grid, num_chains * num_particles, generator)
    log_weights = uniform_log_weights(num_chains, num_particles, particles)
    return ExplicitState(particles, log_weights, None, 0, grid, constants or {})


def advance(
    state: ExplicitState, particles: Tensor, **statistics: Tensor | float
) -> tuple[ExplicitState, dict[str, Tensor | float]]:
    """The next state, and the step's statistics with the time reached, ``t``."""
    info = {"t": state.grid[state.step + 1], **statistics}
    return state._replace(particles=particles, step=state.step + 1), info


def chain_mean(values: Tensor, state: ExplicitState) -> Tensor:
    """Per-chain mean of a per-particle statistic, ``(chains * N,) -> (chains,)``."""
    return values.reshape(state.log_weights.shape).mean(-1)


class GuidedMean(NamedTuple):
    """DPS's update before its noise (:func:`dps_mean`).

    Attributes:
        mean: ``(n, *event)``, the ancestral step's mean moved down the residual's gradient.
        noise_scale: 0-d, the ancestral step's noise standard deviation :math:`c`.
        epsilon: ``(n, *event)``, the noise estimate :math:`\\hat\\epsilon` at ``t``.
        residual_norm: ``(n,)``, :math:`\\lVert y - \\mathbb{E}[y \\mid \\hat x_0] \\rVert`.
    """

    mean: Tensor
    noise_scale: Tensor
    epsilon: Tensor
    residual_norm: Tensor


def dps_mean(problem: Problem, x_t: Tensor, t: Tensor, s: Tensor, scale: float) -> GuidedMean:
    r"""DPS's official update from ``t`` to ``s`` without its noise: :math:`a \hat x_0 + b
    \hat\epsilon - \zeta \nabla_{x_t} \lVert y - \mathbb{E}[y \mid \hat x_0(x_t)] \rVert_2`,
    with :math:`(a, b, c)` the DDPM ancestral coefficients (one NFE, one VJP). DPS adds
    :math:`c z`; MCG then projects, DPPS picks :math:`z` among candidates.

    Args:
        problem: the problem (any likelihood with a residual).
        x_t: ``(n, *event)`` at time ``t``.
        t, s: 0-d times, ``s < t``.
        scale: :math:`\zeta`.
    """
    schedule = problem.prior.schedule
    x0, norm, grad = denoise_with_residual_gradient(problem, x_t, t)
    epsilon = epsilon_from_x0(schedule, x_t, x0, t)
    a, b, c = (v.to(x_t) for v in ddim_coefficients(schedule, t, s, 1.0))
    mean = (x0 * a).addcmul_(epsilon, b).sub_(grad, alpha=scale)  # a x0 + b eps - scale grad
    return GuidedMean(mean, c, epsilon, norm)


def gaussian_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal draws shaped like ``like``, on its device and dtype."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def add_gaussian_noise(x: Tensor, scale: Tensor | float, generator: torch.Generator) -> Tensor:
    """``x + scale * z`` with ``z`` standard normal shaped like ``x`` ``(n, *event)`` (one fused
    pass); ``scale`` a number or a tensor that broadcasts against ``x``."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return torch.addcmul(x, gaussian_noise(x, generator), scale)


def proximal_data_step(
    problem: Problem,
    x0: Tensor,
    weight: Tensor | float | None,
    max_iterations: int,
    *,
    closed_form: bool = False,
) -> Tensor:
    r"""The estimate :math:`\hat x_0` pulled to the data: conjugate gradients from :math:`\hat x_0`
    on :math:`\min_x \tfrac12 \lVert x - \hat x_0\rVert^2 + \tfrac12 \sum_i w_i (y - A x)_i^2`,
    i.e. :math:`(I + A^\top W A)(x - \hat x_0) = A^\top W (y - A \hat x_0)`, and for noiseless
    data on :math:`A^\top A (x - \hat x_0) = A^\top (y - A \hat x_0)` (from zero: the smallest
    correction, the projection onto :math:`\{A x = y\}` when converged). DDS stops after a few
    iterations; DiffPIR runs to convergence (relative tolerance 1e-6).

    With ``closed_form`` the converged point is computed directly where the operator has an SVD
    :math:`A = U \operatorname{diag}(s) V^\top` and the weight is one number:
    :math:`x - \hat x_0 = V \operatorname{diag}\big(w s / (1 + w s^2)\big) U^\top r` on the
    :math:`r = \min(m, d)` leading coordinates (:meth:`~diffpost.models.operators.SVD.v_head`, thin
    where the operator offers it), and :math:`A^+ r` for noiseless data; otherwise by CG as above.

    Args:
        problem: a linear Gaussian problem.
        x0: ``(n, *event)``.
        weight: :math:`w`, a number or a tensor broadcastable to the measurements ``(n, m)``
            (``None`` for noiseless data).
        max_iterations: the CG iteration cap.
        closed_form: solve to the exact point through the SVD where there is one.

    Returns:
        The refined estimate, ``(n, *event)``.
    """
    gaussian = problem.gaussian
    operator = gaussian.operator
    residual = gaussian.y_for(x0.shape[0]).to(x0) - operator(x0)
    decomposition = operator.svd() if closed_form else None
    if decomposition is not None and gaussian.noiseless:
        return x0 + operator.pinv(residual)
    if decomposition is not None and torch.as_tensor(weight).numel() == 1:
        s = decomposition.singular_values.to(x0)
        w = torch.as_tensor(weight).to(x0).reshape(())
        coordinates = decomposition.ut(residual)[:, : s.shape[0]] * (w * s / (1 + w * s**2))
        return x0 + decomposition.v_head(coordinates, tuple(x0.shape[1:]))
    if gaussian.noiseless:
        normal = lambda v: operator.adjoint(operator(v))  # noqa: E731
        rhs = operator.adjoint(residual)
    else:
        normal = lambda v: v + operator.adjoint(weight * operator(v))  # noqa: E731
        rhs = operator.adjoint(weight * residual)
    return x0 + conjugate_gradient(normal, rhs, max_iterations=max_iterations)


def per_particle_norm(v: Tensor) -> Tensor:
    """:math:`\\lVert v_i \\rVert` over every axis but the first, ``(n, 1, ..., 1)`` to broadcast
    against ``v`` of shape ``(n, *event)``."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1).reshape((-1,) + (1,) * (v.dim() - 1))


def noised_measurement_projection(
    problem: Problem,
    x: Tensor,
    t: Tensor,
    generator: torch.Generator,
    weight: float = 1.0,
) -> Tensor:
    r"""``x`` moved towards the measurement noised to time ``t``: :math:`x + \lambda A^+ (y_t - A
    x)` with :math:`y_t = \alpha_t y + \sigma_t A z`, :math:`z \sim \mathcal N(0, I)` in the
    signal space.

    At :math:`\lambda = 1` the observed part of ``x`` (the row space of :math:`A`) is replaced by
    that of :math:`\alpha_t A^+ y + \sigma_t z`, a draw of :math:`x_t`'s observed part given
    :math:`x_0` with :math:`A x_0 = y`; the rest of ``x`` is kept. This is the data-consistency
    step of score-SDE inverse solvers (Song et al. 2022: :math:`\lambda` their ``coeff``, the
    noise drawn in image space and carried to the measurement space) and of MCG (Chung et al.
    2022, for masks :math:`\alpha_t y + \sigma_t z`, the noised measurement ``q_sample``).
    :math:`A^+` is the operator's :meth:`~diffpost.models.operators.base.LinearOperator.pinv`
    (closed form with an SVD, conjugate gradients otherwise). The observation's own noise is not
    modelled: :math:`y` is treated as :math:`A x_0`.

    Args:
        problem: a problem with a linear Gaussian observation.
        x: ``(n, *event)`` at time ``t``.
        t: 0-d time of the noise added to the measurement.
        generator: source of :math:`z`.
        weight: :math:`\lambda \in [0, 1]`.

    Returns:
        ``(n, *event)``.
    """
    gaussian = problem.gaussian
    operator = gaussian.operator
    alpha, sigma = (v.to(x) for v in problem.prior.schedule(t))
    noised_y = alpha * gaussian.y_for(x.shape[0]).to(x)
    if float(sigma) > 0:
        noised_y = noised_y + sigma * operator(gaussian_noise(x, generator))
    return x + weight * operator.pinv(noised_y - operator(x))


def scalar_noise_level(problem: Problem, engine_name: str) -> float:
    """The observation's single noise standard deviation (``ValueError`` if one per measurement)."""
    sigma = problem.gaussian.sigma
    if sigma.numel() > 1 and not bool((sigma == sigma.flatten()[0]).all()):
        raise ValueError(
            f"{engine_name} needs one noise level for all measurements; got per-measurement sigma"
        )
    return float(sigma.flatten()[0])


class SpectralObservation(NamedTuple):
    r"""The observation in the SVD basis, every vector over the ``d`` signal coordinates.

    Attributes:
        svd: the operator's :class:`~diffpost.models.operators.SVD`.
        singular_values: ``(d,)``, zero on unobserved coordinates (and beyond the rank).
        observed: ``(d,)`` boolean, :math:`s_i > 0`.
        rotated_y: ``(d,)``, :math:`(U^\top y)_i` on the first ``min(m, d)`` coordinates, 0 after
            (``(n, d)``, one row per particle, under a plate).
        y_bar: ``(d,)``, :math:`(U^\top y)_i / s_i` where observed, 0 elsewhere (likewise).
        sigma: the noise standard deviation :math:`\sigma_y`.
    """

    svd: SVD
    singular_values: Tensor
    observed: Tensor
    rotated_y: Tensor
    y_bar: Tensor
    sigma: float


def spectral_observation(problem: Problem, engine_name: str, n: int) -> SpectralObservation:
    """:class:`SpectralObservation` of a linear Gaussian problem with an SVD, for ``n``
    particles (``rotated_y`` and ``y_bar`` are ``(n, d)``, one row per particle, under a plate).

    Singular values at or below ``1e-10`` times the largest are treated as zero (unobserved).
    """
    gaussian = problem.gaussian
    svd = gaussian.operator.svd()
    dtype, device = problem.dtype, problem.device
    d = svd.vt(torch.zeros((1,) + tuple(problem.event_shape), dtype=dtype, device=device)).shape[1]
    rank = svd.rank_bound
    singular_values = torch.zeros(d, dtype=dtype, device=device)
    singular_values[:rank] = svd.singular_values.to(dtype=dtype, device=device)
    singular_values = torch.where(
        singular_values > 1e-10 * singular_values.max().clamp_min(1e-300), singular_values, 0.0
    )
    observed = singular_values > 0
    full = rotated_observation(gaussian, svd, n, dtype)  # (m,) or (n, m)
    rotated_y = torch.zeros(full.shape[:-1] + (d,), dtype=dtype, device=device)
    rotated_y[..., :rank] = full[..., :rank]
    y_bar = torch.where(observed, rotated_y / torch.where(observed, singular_values, 1.0), 0.0)
    return SpectralObservation(
        svd, singular_values, observed, rotated_y, y_bar, scalar_noise_level(problem, engine_name)
    )
