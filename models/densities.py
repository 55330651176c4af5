r"""Two estimates of a diffusion model's log-density :math:`\log p_\theta(x)`, for
variational engines (FlowVI's prior term) and for users who score samples under a prior.

Both call the denoiser through ``calls``: an object with the methods ``denoise(x_t, t)`` and
``denoise_with_vjp(x_t, t, objective)`` of :class:`~diffpost.posterior.Problem` (chunked and
counted there), by default :class:`PriorCalls` (the prior's own denoiser, in one call).

Both estimates work in the schedule-free coordinates of Karras et al. (2022): with the noise ratio
:math:`r = \sigma(t) / \alpha(t)` and :math:`\tilde x = x_t / \alpha(t) = x_0 + r \epsilon`, every
schedule has the same marginals :math:`\tilde p_r = p_0 * \mathcal{N}(0, r^2 I)`, and the denoiser
is queried at :math:`x_t = \alpha(t(r))\, \tilde x`, :math:`t(r)` =
:meth:`~diffpost.models.schedules.Schedule.time_of_noise_ratio`. Both integrate over
:math:`r \in [r_{\min}, r_{\max}]` (``noise_min``, ``noise_max``); the reference law at
:math:`r_{\max}` is the library's :math:`\mathcal{N}(0, (1 + r_{\max}^2) I)` (unit data scale, as
:func:`diffpost.models.samplers.initial_noise`). The result is the density of the model's marginal
at :math:`r_{\min}`, which is :math:`\log p_\theta(x)` up to :math:`O(r_{\min}^2)`.

**Probability-flow ODE** (:func:`probability_flow_log_prob`; Song et al. 2021, Sec. 4.3 and App.
D.2; Feng et al. 2023, the "ode" prior). In :math:`s = \log r` the ODE is
:math:`d\tilde x / ds = \tilde x - \hat x_0`, and the instantaneous change of variables gives

.. math:: \log \tilde p_{r_{\min}}(x) = \log \mathcal{N}\big(\tilde x(r_{\max}); 0, (1 + r_{\max}^2)
I\big)
   + \int_{\log r_{\min}}^{\log r_{\max}} \big(d - \alpha \operatorname{tr} J_D\big)\, ds,
   \qquad J_D = \partial D / \partial x_t,

with the trace by Hutchinson's estimator :math:`\operatorname{tr} J \approx u^\top J u`, Rademacher
:math:`u` (one vector-Jacobian product per evaluation; ``num_probes`` independent probes, fixed
along the path as in FFJORD, averaged). The ODE and the integral are solved together by Heun's
method on a grid uniform in :math:`\log r`. Feng et al. use an adaptive Dopri5 (rtol 1e-3, atol
1e-5) from diffrax; a fixed Heun grid keeps the cost known in advance (2 NFEs and 2 VJPs per step;
the test suite measures the error against exact Gaussian-mixture densities). The estimate is
unbiased in the probes for the discretised ODE, hence a noisy but unbiased estimate of its
log-density.

**Denoising lower bound** (:func:`diffusion_elbo`; Song, Durkan, Murray, Ermon 2021, Thm. 1;
Kingma et al. 2021, eq. 17; Feng & Bouman 2024, the "dsm" prior). With :math:`\lambda = -2 \log r`
(the log-SNR) and :math:`\Lambda = \lambda_{\max} - \lambda_{\min}`,

.. math:: -\log \tilde p_{r_{\min}}(x) \le
   \underbrace{\mathrm{KL}\big(\mathcal{N}(x, r_{\max}^2 I) \,\|\, \mathcal{N}(0, (1 + r_{\max}^2)
   I)\big)}_{\text{prior}} + \underbrace{\mathbb{E}\big[-\log \mathcal{N}(x; \hat x_0(\tilde
   x_{r_{\min}}), r_{\min}^2 I)\big]}_{\text{reconstruction}} + \frac{\Lambda}{2}\,
   \mathbb{E}_{\lambda \sim \mathcal{U}, \epsilon} \big[\lVert \hat\epsilon - \epsilon \rVert^2 -
   \lVert \epsilon \rVert^2 + d\big].

The :math:`\lambda`-uniform draw is the importance sampling of Song et al. (:math:`t` drawn with
density :math:`\propto g(t)^2 / \sigma(t)^2`), the same-noise term :math:`-\lVert\epsilon\rVert^2`
(mean :math:`-d`) is the official code's control variate (``probability_bound.py``: "score error"
minus "gradient norm"), and the reconstruction term is its ``eps_offset`` (a Gaussian decoder at the
Tweedie mean). The prior KL is taken in closed form where the official code samples :math:`x_T`.
One draw of :math:`(\lambda, \epsilon)` per particle (``dsm_nt = 1``) by default. The bound is
exact in its :math:`\lambda`-integral and only loose by the reverse process' mismatch, so for an
exact denoiser it sits just below :math:`\log p`; its gradient with respect to ``x`` needs one VJP
through the denoiser (no ODE solve), at least two orders of magnitude cheaper than the ODE (Feng &
Bouman 2024).

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through
    Stochastic Differential Equations. ICLR 2021. arXiv:2011.13456.
    Song, Durkan, Murray, Ermon. Maximum Likelihood Training of Score-Based Diffusion Models.
    NeurIPS 2021. arXiv:2101.09258.
    Kingma, Salimans, Poole, Ho. Variational Diffusion Models. NeurIPS 2021. arXiv:2107.00630.
    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. FFJORD. ICLR 2019 (Hutchinson's estimator).
    Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
    Models. NeurIPS 2022.
    Feng, Smith, Rubinstein, Chang, Bouman, Freeman. Score-Based Diffusion Models as Principled
    Priors for Inverse Imaging. ICCV 2023. arXiv:2304.11751.
    Feng, Bouman. Variational Bayesian Imaging with an Efficient Surrogate Score-based Prior. TMLR
    2024. arXiv:2309.01949. Official code: github.com/berthyf96/score_prior
    (``probability_flow.py``, ``probability_bound.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from diffpost.models.priors import DiffusionPrior
from diffpost.models.schedules import Schedule

__all__ = [
    "DenoiserCalls",
    "PerParticleObjective",
    "PriorCalls",
    "diffusion_elbo",
    "noise_range",
    "probability_flow_log_prob",
]


class DenoiserCalls(Protocol):
    """How the estimates call a prior's denoiser (:class:`~diffpost.posterior.Problem` is one)."""

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor: ...

    def denoise_with_vjp(
        self, x_t: Tensor, t: Tensor, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]: ...


class PriorCalls:
    """A prior's own denoiser as :class:`DenoiserCalls`: the whole batch in one call, uncounted.

    Args:
        prior: the diffusion prior.
    """

    def __init__(self, prior: DiffusionPrior):
        self.prior = prior

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return self.prior.denoise(x_t, t)

    def denoise_with_vjp(
        self, x_t: Tensor, t: Tensor, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(x0, grad)``: the Tweedie mean and the gradient of ``objective(x0).sum()`` in
        ``x_t``, both detached."""
        with torch.enable_grad():
            point = x_t.detach().requires_grad_(True)
            x0 = self.prior.denoise(point, t)
            (grad,) = torch.autograd.grad(objective(x0).sum(), point)
        return x0.detach(), grad


#: the largest noise ratio used where the schedule's own is infinite (rectified flow at t = 1)
_LARGEST_NOISE_RATIO = 1e3
#: size of the table that maps the denoising bound's random noise ratios to times
_TABLE_SIZE = 4096


class PerParticleObjective:
    r"""An objective for :meth:`~diffpost.posterior.Problem.denoise_with_vjp` that also reads
    per-particle tensors.

    ``denoise_with_vjp`` calls its objective on one chunk of ``batch_size`` particles at a time, in
    order; this callable hands ``function(x0, *slices)`` the matching rows of ``tensors`` and
    counts them, so :meth:`check` can confirm that every particle was seen exactly once.

    Args:
        function: ``(x0, *per_particle) -> (n,)``.
        tensors: per-particle tensors with the batch's leading size.
    """

    def __init__(self, function: Callable[..., Tensor], *tensors: Tensor):
        self.function = function
        self.tensors = tensors
        self.position = 0

    def __call__(self, x0: Tensor) -> Tensor:
        stop = self.position + x0.shape[0]
        parts = [tensor[self.position : stop] for tensor in self.tensors]
        self.position = stop
        return self.function(x0, *parts)

    def check(self) -> None:
        """Raise ``RuntimeError`` unless the chunks covered the per-particle tensors exactly."""
        if self.position != self.tensors[0].shape[0]:
            raise RuntimeError(
                f"the denoiser saw {self.position} particles in chunks; {self.tensors[0].shape[0]} "
                "were expected (denoise_with_vjp must visit the chunks once, in order)"
            )


def _vjp_with(
    calls: DenoiserCalls, x_t: Tensor, t: Tensor, function, *tensors
) -> tuple[Tensor, Tensor]:
    objective = PerParticleObjective(function, *tensors)
    x0, grad = calls.denoise_with_vjp(x_t, t, objective)
    objective.check()
    return x0, grad


def noise_range(
    schedule: Schedule, noise_min: float, noise_max: float | None = None
) -> tuple[float, float]:
    r"""The noise ratios :math:`(r_{\min}, r_{\max})` the density estimates integrate over.

    :math:`r_{\min}` is ``noise_min`` raised to the schedule's own ratio at ``t = 0`` (VE keeps
    :math:`\sigma_{\min}`); :math:`r_{\max}` is ``noise_max`` or the ratio at ``t = 1`` (``1e3``
    where that is infinite, as for rectified flow).

    Raises:
        ValueError: ``noise_min <= 0`` or a range that is empty.
    """
    if not noise_min > 0:
        raise ValueError(f"noise_min must be positive; got {noise_min}")
    ends = schedule.noise_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64))
    low = max(noise_min, float(ends[0]))
    if noise_max is None:
        noise_max = float(ends[1]) if math.isfinite(float(ends[1])) else _LARGEST_NOISE_RATIO
    if not noise_max > low:
        raise ValueError(
            f"the noise range is empty: noise_max={noise_max} must exceed noise_min={low} "
            f"(for {schedule!r})"
        )
    return low, noise_max


def _time_and_scale(schedule: Schedule, ratio: Tensor) -> tuple[Tensor, Tensor]:
    """``(t, alpha(t))`` at the noise ratios ``ratio`` (any shape, its device and dtype)."""
    t = schedule.time_of_noise_ratio(ratio).to(ratio)
    return t, schedule.alpha(t).to(ratio)


def _tabulated_times(schedule: Schedule, low: float, high: float, ratios: Tensor) -> Tensor:
    r"""Times of many noise ratios in ``[low, high]``, ``(n,)``: linear interpolation in
    :math:`\log r` between ``_TABLE_SIZE`` exact inverses spread uniformly in :math:`\log r` (a
    bisection per draw would cost ~60 schedule evaluations each)."""
    log_table = torch.linspace(
        math.log(low), math.log(high), _TABLE_SIZE, dtype=ratios.dtype, device=ratios.device
    )
    times = _time_and_scale(schedule, log_table.exp())[0]
    position = torch.log(ratios).clamp(math.log(low), math.log(high))
    index = torch.searchsorted(log_table, position).clamp(1, _TABLE_SIZE - 1)
    fraction = (position - log_table[index - 1]) / (log_table[index] - log_table[index - 1])
    return times[index - 1] + fraction * (times[index] - times[index - 1])


def _flat_sum(value: Tensor) -> Tensor:
    return value.flatten(1).sum(-1)


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    return value.reshape((-1,) + (1,) * (like.dim() - 1))


def probability_flow_log_prob(
    prior: DiffusionPrior,
    x: Tensor,
    generator: torch.Generator,
    *,
    num_steps: int = 100,
    num_probes: int = 16,
    noise_min: float = 2e-3,
    noise_max: float | None = None,
    calls: DenoiserCalls | None = None,
) -> Tensor:
    r"""Estimate :math:`\log p_\theta(x)` by the probability-flow ODE (see the module docstring).

    Costs ``2 * num_steps`` denoiser calls, each with one VJP, on ``num_probes * N`` particles.

    Args:
        prior: the diffusion prior whose denoiser defines the model.
        x: ``(N, *event)`` points (detached).
        generator: draws the Rademacher probes.
        num_steps: Heun steps, uniform in :math:`\log r` (Feng et al.: adaptive Dopri5).
        num_probes: Hutchinson probes per point (Feng et al.: 16).
        noise_min: :math:`r_{\min}`; the smallest noise level the denoiser is trusted at.
        noise_max: :math:`r_{\max}` (default: the schedule's ratio at ``t = 1``).
        calls: how the denoiser is called (default :class:`PriorCalls`; a
            :class:`~diffpost.posterior.Problem` chunks and counts the calls).

    Returns:
        ``(N,)`` estimates, detached.

    Raises:
        ValueError: a non-positive ``num_steps`` or ``num_probes``, or an empty noise range.
    """
    for name, value in (("num_steps", num_steps), ("num_probes", num_probes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    schedule = prior.schedule
    calls = PriorCalls(prior) if calls is None else calls
    low, high = noise_range(schedule, noise_min, noise_max)
    count, dim = x.shape[0], x[0].numel()
    log_ratios = torch.linspace(
        math.log(low), math.log(high), num_steps + 1, dtype=x.dtype, device=x.device
    )
    times, alphas = _time_and_scale(schedule, log_ratios.exp())
    state = x.detach().repeat((num_probes,) + (1,) * (x.dim() - 1))  # probe-major copies
    probes = (
        2.0 * torch.randint(0, 2, state.shape, generator=generator, device=x.device) - 1.0
    ).to(x.dtype)

    def drift_and_divergence(x_tilde: Tensor, index: int) -> tuple[Tensor, Tensor]:
        x0, vjp = _vjp_with(
            calls,
            alphas[index] * x_tilde,
            times[index],
            lambda x0, u: _flat_sum(x0 * u),
            probes,
        )
        trace = _flat_sum(vjp * probes)  # u^T J_D u
        return x_tilde - x0, dim - alphas[index] * trace

    change = state.new_zeros(state.shape[0])
    for index in range(num_steps):
        step = log_ratios[index + 1] - log_ratios[index]
        slope, divergence = drift_and_divergence(state, index)
        predicted = state + step * slope
        slope_next, divergence_next = drift_and_divergence(predicted, index + 1)
        state = state + 0.5 * step * (slope + slope_next)
        change = change + 0.5 * step * (divergence + divergence_next)
    variance = 1.0 + high**2
    terminal = -0.5 * (_flat_sum(state**2) / variance + dim * math.log(2 * math.pi * variance))
    return (terminal + change).reshape(num_probes, count).mean(0).detach()


def diffusion_elbo(
    prior: DiffusionPrior,
    x: Tensor,
    generator: torch.Generator,
    *,
    num_samples: int = 1,
    noise_min: float = 2e-3,
    noise_max: float | None = None,
    with_gradient: bool = False,
    calls: DenoiserCalls | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""A stochastic lower bound of :math:`\log p_\theta(x)` (see the module docstring).

    One denoiser call (with one VJP when ``with_gradient``) on ``2 * num_samples * N`` particles:
    the reconstruction and the diffusion term of every draw go through the denoiser together, each
    at its own time.

    Args:
        prior: the diffusion prior whose denoiser defines the model.
        x: ``(N, *event)`` points (detached).
        generator: draws :math:`\lambda` and :math:`\epsilon`.
        num_samples: draws of :math:`(\lambda, \epsilon)` averaged per point (official ``dsm_nt``:
            1).
        noise_min: :math:`r_{\min}` (the official ``eps``, in noise-ratio units).
        noise_max: :math:`r_{\max}` (default: the schedule's ratio at ``t = 1``).
        calls: how the denoiser is called (default :class:`PriorCalls`; a
            :class:`~diffpost.posterior.Problem` chunks and counts the calls).
        with_gradient: also return :math:`\nabla_x` of the bound.

    Returns:
        The bound ``(N,)``, and its gradient ``(N, *event)`` when ``with_gradient``; detached.

    Raises:
        ValueError: a non-positive ``num_samples``, or an empty noise range.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
    schedule = prior.schedule
    calls = PriorCalls(prior) if calls is None else calls
    low, high = noise_range(schedule, noise_min, noise_max)
    count, dim = x.shape[0], x[0].numel()
    points = x.detach().repeat((num_samples,) + (1,) * (x.dim() - 1))
    draws = points.shape[0]
    log_snr_range = 2.0 * math.log(high / low)  # Lambda
    uniform = torch.rand(draws, generator=generator, dtype=x.dtype, device=x.device)
    drawn = _tabulated_times(schedule, low, high, high * torch.exp(-0.5 * log_snr_range * uniform))
    times = torch.cat([_time_and_scale(schedule, x.new_tensor([low]))[0].expand(draws), drawn])
    # the ratios at the tabulated times (equal to the drawn ones up to the table's 1e-7)
    ratios = schedule.noise_ratio(times).to(x)
    alphas = schedule.alpha(times).to(x)
    noise = torch.randn(
        (2 * draws,) + tuple(x.shape[1:]), generator=generator, dtype=x.dtype, device=x.device
    )
    targets = torch.cat([points, points])
    x_tilde = targets + _per_sample(ratios, targets) * noise
    # -log N(x; x0, r_min^2) and (Lambda/2) ||eps_hat - eps||^2 are both w ||x - x0||^2
    weights = 0.5 * torch.cat([x.new_ones(draws), x.new_full((draws,), log_snr_range)]) / ratios**2

    def weighted_error(x0: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        return weight * _flat_sum((x0 - target) ** 2)

    x_t = _per_sample(alphas, x_tilde) * x_tilde
    if with_gradient:
        x0, vjp = _vjp_with(calls, x_t, times, weighted_error, targets, weights)
    else:
        x0 = calls.denoise(x_t, times)
    errors = weighted_error(x0, targets, weights)
    variance = 1.0 + high**2
    prior_kl = 0.5 * (
        dim * high**2 / variance
        + _flat_sum(points**2) / variance
        - dim
        + dim * math.log(variance / high**2)
    )
    control = 0.5 * log_snr_range * (dim - _flat_sum(noise[draws:] ** 2))
    negative = (
        prior_kl
        + 0.5 * dim * math.log(2 * math.pi * low**2)
        + errors[:draws]
        + errors[draws:]
        + control
    )
    bound = -negative.reshape(num_samples, count).mean(0)
    if not with_gradient:
        return bound
    # d/dx of w ||x - D(alpha (x + r eps))||^2 = 2 w (x - x0) + alpha J_D^T (2 w (x0 - x))
    through = 2.0 * _per_sample(weights, targets) * (targets - x0) + _per_sample(alphas, vjp) * vjp
    negative_grad = points / variance + through[:draws] + through[draws:]
    gradient = -negative_grad.reshape((num_samples, count) + tuple(x.shape[1:])).mean(0)
    return bound, gradient
