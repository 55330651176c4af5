r"""The denoiser contract and adapters from every common network parametrisation.

The library speaks one language: a denoiser is a callable

.. math:: D(x_t, t) = \mathbb{E}[x_0 \mid x_t] \qquad\text{(the Tweedie mean)},

with ``x_t`` of shape ``(N, *event)`` and ``t`` a float or a tensor of shape ``()`` or ``(N,)``,
attached to the :class:`~models.schedules.Schedule` under which ``x_t = alpha(t) x_0 +
sigma(t) eps``. The noise prediction, the score and the probability-flow velocity are derived from
it in exactly one place (:func:`epsilon_from_x0`, :func:`score_from_x0`, :func:`velocity_from_x0`),
and every adapter converts a network *to* this contract:

=============================  ============================================================
adapter                        the wrapped network predicts
=============================  ============================================================
:class:`EpsilonDenoiser`       the noise :math:`\epsilon` (DDPM, DDIM, score SDE VP nets)
:class:`X0Denoiser`            the clean signal :math:`x_0`
:class:`VDenoiser`             :math:`v = \alpha\epsilon - \sigma x_0` (Salimans & Ho 2022)
:class:`ScoreDenoiser`         the score :math:`\nabla \log p_t(x_t)` (NCSN, score SDE)
:class:`VelocityDenoiser`      the flow velocity :math:`\dot\alpha x_0 + \dot\sigma \epsilon`
:class:`DiscreteDDPMDenoiser`  :math:`\epsilon` (or :math:`x_0`, :math:`v`) at integer steps
=============================  ============================================================

All formulas follow from :math:`x_t = \alpha x_0 + \sigma \epsilon` and Tweedie's identity
:math:`\nabla \log p_t(x_t) = (\alpha\, \mathbb{E}[x_0 \mid x_t] - x_t) / \sigma^2`.

References:
    Efron. Tweedie's formula and selection bias. JASA 2011.
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022.
    arXiv:2202.00512.
    Song et al. Score-Based Generative Modeling through SDEs. ICLR 2021. arXiv:2011.13456.
    Lipman et al. Flow Matching for Generative Modeling. ICLR 2023. arXiv:2210.02747.
    Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models. NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.schedules import DiscreteVP, Schedule

__all__ = [
    "Denoiser",
    "EpsilonDenoiser",
    "X0Denoiser",
    "VDenoiser",
    "ScoreDenoiser",
    "VelocityDenoiser",
    "DiscreteDDPMDenoiser",
    "broadcast_time",
    "epsilon_from_x0",
    "score_from_x0",
    "velocity_from_x0",
]

Network = Callable[[Tensor, Tensor], Tensor]


def broadcast_time(t: float | Tensor, x: Tensor) -> Tensor:
    """Times as a tensor of shape ``(N,)`` on ``x``'s device and dtype.

    Args:
        t: a float, a 0-d tensor or a tensor of shape ``(N,)``.
        x: a batch of shape ``(N, *event)``.

    Returns:
        Shape ``(N,)``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(N,)`` coefficient to broadcast against ``x`` of shape ``(N, *event)``."""
    return value.reshape(value.shape + (1,) * (x.dim() - 1))


def _evaluate(function: Callable[[Tensor], Tensor], t: float | Tensor, x: Tensor) -> Tensor:
    """``function(t)`` as a 0-d tensor for a scalar ``t`` (computed once), else ``(N, 1, ...)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return function(t)
    return _per_sample(function(broadcast_time(t, x)), x)


def _coefficients(schedule: Schedule, t: float | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return _evaluate(schedule.alpha, t, x), _evaluate(schedule.sigma, t, x)


def epsilon_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r""":math:`\hat\epsilon = (x_t - \alpha(t)\, \hat x_0) / \sigma(t)`, shape ``(N, *event)``."""
    alpha, sigma = _coefficients(schedule, t, x_t)
    return (x_t - alpha * x0) / sigma


def score_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r""":math:`\nabla \log p_t(x_t) = (\alpha(t)\, \hat x_0 - x_t) / \sigma(t)^2` (Tweedie)."""
    alpha, sigma = _coefficients(schedule, t, x_t)
    return (alpha * x0 - x_t) / sigma**2


def velocity_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r"""Probability-flow ODE velocity :math:`dx_t/dt = \dot\alpha\, \hat x_0 + \dot\sigma\, \hat\epsilon`.

    This is the ODE whose marginals match the diffusion's (Song et al. 2021, eq. 13, written in
    the :math:`(\alpha, \sigma)` parametrisation of Karras et al. 2022, eq. 4).
    """
    alpha_dot = _evaluate(schedule.alpha_derivative, t, x_t)
    sigma_dot = _evaluate(schedule.sigma_derivative, t, x_t)
    return alpha_dot * x0 + sigma_dot * epsilon_from_x0(schedule, x_t, x0, t)


class Denoiser(nn.Module):
    r"""Base class: ``denoiser(x_t, t) -> E[x_0 | x_t]``, with the schedule it is defined under.

    Subclasses implement :meth:`forward`. The derived quantities are methods so that every engine
    gets them from the same formulas.

    Args:
        schedule: the noise schedule of ``x_t``.
    """

    def __init__(self, schedule: Schedule):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a models.schedules.Schedule; got {schedule!r}")
        self.schedule = schedule

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:  # pragma: no cover - abstract
        """Tweedie mean, shape ``(N, *event)``."""
        raise NotImplementedError

    def epsilon(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Noise prediction, shape ``(N, *event)``."""
        return epsilon_from_x0(self.schedule, x_t, self(x_t, t), t)

    def score(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Score of the diffused marginal, shape ``(N, *event)``."""
        return score_from_x0(self.schedule, x_t, self(x_t, t), t)

    def velocity(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Probability-flow velocity, shape ``(N, *event)``."""
        return velocity_from_x0(self.schedule, x_t, self(x_t, t), t)


class _NetworkDenoiser(Denoiser):
    """A denoiser built from a network ``net(x_t, t) -> prediction``; ``t`` reaches it as ``(N,)``.

    ``time_scale`` multiplies ``t`` before the call, for networks trained on ``t * 1000`` (say).
    """

    def __init__(self, net: Network, schedule: Schedule, time_scale: float = 1.0):
        super().__init__(schedule)
        if not callable(net):
            raise ValueError(f"net must be callable as net(x_t, t); got {net!r}")
        self.net = net
        self.time_scale = time_scale

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        prediction = self.net(x_t, t * self.time_scale)
        if prediction.shape != x_t.shape:
            raise ValueError(
                f"{type(self).__name__}: the network returned shape {tuple(prediction.shape)} "
                f"for an input of shape {tuple(x_t.shape)}"
            )
        return prediction


class EpsilonDenoiser(_NetworkDenoiser):
    r"""From a noise predictor: :math:`\hat x_0 = (x_t - \sigma \hat\epsilon) / \alpha`.

    Args:
        net: ``net(x_t, t) -> eps``, shapes ``(N, *event), (N,) -> (N, *event)``.
        schedule: the schedule the network was trained under.
        time_scale: factor applied to ``t`` before calling ``net``.
    """

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (x_t - sigma * self._predict(x_t, broadcast_time(t, x_t))) / alpha


class X0Denoiser(_NetworkDenoiser):
    """From a network that predicts :math:`x_0` directly (the contract itself)."""

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        return self._predict(x_t, broadcast_time(t, x_t))


class VDenoiser(_NetworkDenoiser):
    r"""From a v-prediction network (Salimans & Ho 2022), :math:`v = \alpha\epsilon - \sigma x_0`.

    With :math:`x_t = \alpha x_0 + \sigma\epsilon`:
    :math:`\hat x_0 = (\alpha x_t - \sigma v) / (\alpha^2 + \sigma^2)` (the denominator is 1 on VP).
    """

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (alpha * x_t - sigma * self._predict(x_t, broadcast_time(t, x_t))) / (
            alpha**2 + sigma**2
        )


class ScoreDenoiser(_NetworkDenoiser):
    r"""From a score network: :math:`\hat x_0 = (x_t + \sigma^2 s_\theta(x_t, t)) / \alpha`."""

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (x_t + sigma**2 * self._predict(x_t, broadcast_time(t, x_t))) / alpha


class VelocityDenoiser(_NetworkDenoiser):
    r"""From a flow-matching velocity network :math:`u = \dot\alpha x_0 + \dot\sigma \epsilon`.

    Solving :math:`x_t = \alpha x_0 + \sigma\epsilon` and :math:`u` for :math:`x_0`:
    :math:`\hat x_0 = (\dot\sigma x_t - \sigma u) / (\dot\sigma\alpha - \sigma\dot\alpha)`; for
    rectified flow (:math:`\alpha = 1 - t, \sigma = t`) this is :math:`x_t - t\,u`.
    """

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        alpha_dot = _evaluate(self.schedule.alpha_derivative, t, x_t)
        sigma_dot = _evaluate(self.schedule.sigma_derivative, t, x_t)
        velocity = self._predict(x_t, broadcast_time(t, x_t))
        return (sigma_dot * x_t - sigma * velocity) / (sigma_dot * alpha - sigma * alpha_dot)


class DiscreteDDPMDenoiser(Denoiser):
    r"""From a discrete-time DDPM network ``net(x, n)`` with integer steps ``n = 0..N-1``.

    The network's step ``n`` (diffusers' 0-based convention, noise level
    ``alphas_cumprod[n]``) sits at continuous time :math:`t = (n + 1) / N` of the
    :class:`~models.schedules.DiscreteVP` schedule, so the library only ever sees continuous
    ``t``. Off the grid, the nearest step is used and the conversion to :math:`x_0` uses the
    schedule at the queried ``t`` (exact on the grid, which is where the DDPM/DDIM time grids
    fall).

    Args:
        net: ``net(x_t, n) -> prediction`` with ``n`` a ``long`` tensor of shape ``(N,)``.
        alphas_cumprod: shape ``(N_train,)``, as in a diffusers scheduler.
        prediction: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"`` (diffusers' names).
    """

    def __init__(self, net: Network, alphas_cumprod: Tensor, prediction: str = "epsilon"):
        super().__init__(DiscreteVP(alphas_cumprod))
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction must be 'epsilon', 'sample' or 'v_prediction'; got {prediction!r}"
            )
        if not callable(net):
            raise ValueError(f"net must be callable as net(x_t, n); got {net!r}")
        self.net = net
        self.prediction = prediction

    def step_index(self, t: Tensor) -> Tensor:
        """Nearest training step ``n = round(t N) - 1`` clamped to ``[0, N - 1]``, long ``(N,)``."""
        steps = self.schedule.num_train_steps
        return (torch.round(t * steps) - 1).clamp(0, steps - 1).long()

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        prediction = self.net(x_t, self.step_index(broadcast_time(t, x_t)))
        if prediction.shape != x_t.shape:
            raise ValueError(
                f"{type(self).__name__}: the network returned shape {tuple(prediction.shape)} "
                f"for an input of shape {tuple(x_t.shape)}"
            )
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        if self.prediction == "epsilon":
            return (x_t - sigma * prediction) / alpha
        if self.prediction == "v_prediction":
            return alpha * x_t - sigma * prediction
        return prediction
