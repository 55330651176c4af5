r"""Unconditional reverse-diffusion samplers over a decreasing time grid.

Each sampler walks consecutive pairs ``(t, s)`` of a grid from
:func:`diffpost.models.schedules.time_grid` (``t > s``, the last ``s = 0``) and reads like its
paper:

- :func:`ddim_step` — DDIM (Song et al. 2021, eq. 12) in the :math:`(\alpha, \sigma)` form:
  :math:`x_s = \alpha_s \hat x_0 + \sqrt{\sigma_s^2 - c^2}\, \hat\epsilon + c\, z` with
  :math:`c = \eta\, \sigma_s \sqrt{1 - \alpha_{t|s}^2 \sigma_s^2 / \sigma_t^2}`,
  :math:`\alpha_{t|s} = \alpha_t / \alpha_s`. With :math:`\eta = 1`, ``c`` is the standard deviation
  of the forward-process posterior :math:`q(x_s \mid x_t, x_0)` and the step is DDPM's ancestral
  step (Ho et al. 2020, eq. 7; Kingma et al. 2021, eq. 28); :math:`\eta = 0` is deterministic DDIM.
- :func:`euler_step` and :func:`heun_step` — the probability-flow ODE
  :math:`dx/dt = \dot\alpha \hat x_0 + \dot\sigma \hat\epsilon` with Euler or Heun's method
  (Karras et al. 2022, Algorithm 1: no correction on the final step to :math:`t = 0`).

References:
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. arXiv:2010.02502.
    Kingma, Salimans, Poole, Ho. Variational Diffusion Models. NeurIPS 2021. arXiv:2107.00630.
    Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models. NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffpost.models.denoisers import Denoiser, epsilon_from_x0, velocity_from_x0
from diffpost.models.schedules import Schedule, time_grid

__all__ = [
    "SAMPLERS",
    "ddim_coefficients",
    "ddim_step",
    "default_grid",
    "euler_step",
    "heun_step",
    "initial_noise",
    "initial_noise_scale",
    "sample",
]

#: sampler name -> (default number of steps, default grid kind, default eta)
SAMPLERS: dict[str, tuple[int, str, float]] = {
    "ddpm": (1000, "uniform", 1.0),
    "ddim": (100, "uniform", 0.0),
    "euler": (500, "uniform", 0.0),
    "heun": (50, "karras", 0.0),
}


def initial_noise(
    schedule: Schedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    t_max: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    r"""Draw :math:`x_{t_{\max}} \sim \mathcal{N}(0, (\alpha^2 + \sigma^2) I)` (VP: N(0, I); VE and
    EDM: :math:`N(0, \sigma_{\max}^2 I)`), the reference law of the noised data at unit data
        scale."""
    scale = initial_noise_scale(schedule, t_max)
    return scale * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def initial_noise_scale(schedule: Schedule, t_max: float = 1.0) -> float:
    r""":math:`\sqrt{\alpha^2 + \sigma^2}` at ``t_max``: the standard deviation of
    :func:`initial_noise`."""
    t = torch.tensor(t_max, dtype=torch.float64)
    return float(torch.sqrt(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2))


def ddim_coefficients(
    schedule: Schedule, t: Tensor, s: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Coefficients of :math:`x_s = a\, \hat x_0 + b\, \hat\epsilon + c\, z` for one DDIM step.

    Args:
        schedule: the noise schedule.
        t: current time (0-d tensor).
        s: next time, ``s < t`` (0-d tensor).
        eta: 0 for deterministic DDIM, 1 for DDPM ancestral sampling.

    Returns:
        ``(a, b, c)`` as 0-d tensors.
    """
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    retained = ((alpha_t / alpha_s) * sigma_s / sigma_t) ** 2
    c = eta * sigma_s * torch.sqrt((1.0 - retained).clamp_min(0.0))
    b = torch.sqrt((sigma_s**2 - c**2).clamp_min(0.0))
    return alpha_s, b, c


def ddim_step(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
    generator: torch.Generator,
    eta: float = 0.0,
) -> Tensor:
    """One DDIM step from ``t`` to ``s``; ``eta = 1`` is DDPM ancestral sampling.

    Args:
        denoiser: the Tweedie denoiser.
        x_t: ``(N, *event)``.
        t: current time (0-d tensor, or ``(N,)``: one per example).
        s: next time, ``s < t`` (shaped like ``t``).
        generator: source of the step's noise.
        eta: stochasticity.

    Returns:
        ``x_s``, shape ``(N, *event)``.
    """
    x0 = denoiser(x_t, t)
    a, b, c = (
        v.to(x_t).reshape(v.shape + (1,) * (x_t.dim() - v.dim()))
        for v in ddim_coefficients(denoiser.schedule, t, s, eta)
    )
    x_s = a * x0 + b * epsilon_from_x0(denoiser.schedule, x_t, x0, t)
    if eta > 0 and bool((c > 0).any()):
        x_s = x_s + c * torch.randn(
            x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device
        )
    return x_s


def euler_step(denoiser: Denoiser, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One Euler step of the probability-flow ODE from ``t`` to ``s``, ``(N, *event)``."""
    return x_t + (s - t).to(x_t) * velocity_from_x0(denoiser.schedule, x_t, denoiser(x_t, t), t)


def heun_step(denoiser: Denoiser, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One Heun step of the probability-flow ODE; plain Euler when ``s = 0`` (Karras et al.)."""
    schedule = denoiser.schedule
    slope = velocity_from_x0(schedule, x_t, denoiser(x_t, t), t)
    x_euler = x_t + (s - t).to(x_t) * slope
    if float(s) == 0.0:
        return x_euler
    slope_next = velocity_from_x0(schedule, x_euler, denoiser(x_euler, s), s)
    return x_t + (s - t).to(x_t) * 0.5 * (slope + slope_next)


def default_grid(schedule: Schedule, num_steps: int, kind: str) -> Tensor:
    """The sampler's grid: ``kind`` when the schedule allows it, else uniform.

    The Karras grid needs a finite noise ratio at ``t = 1`` and one below its ``noise_min`` at
    ``t = 0``; rectified flow (infinite ratio at 1) and VE (ratio ``sigma_min`` at 0) fall back to
    the uniform grid.
    """
    if kind == "karras":
        ends = schedule.noise_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64))
        if not (torch.isfinite(ends[1]) and ends[0] < 2e-3):
            kind = "uniform"
    return time_grid(num_steps, kind, schedule=schedule)


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    eta: float | None = None,
    grid: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Draw unconditional samples by reverse diffusion.

    Args:
        denoiser: the Tweedie denoiser with its schedule.
        shape: ``(N, *event)``.
        generator: the only source of randomness.
        sampler: ``"ddpm"`` (ancestral), ``"ddim"`` (with ``eta``), ``"euler"`` or ``"heun"``.
        num_steps: number of steps (default per sampler: :data:`SAMPLERS`).
        eta: DDIM stochasticity (ignored by the ODE samplers).
        grid: an explicit decreasing time grid ending at 0, overriding ``num_steps``.
        dtype: dtype of the samples.
        device: device of the samples.
        callback: called as ``callback(step, t, x)`` after each step.

    Returns:
        Samples of shape ``shape``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {sampler!r}")
    default_steps, kind, default_eta = SAMPLERS[sampler]
    eta = default_eta if eta is None else eta
    if sampler == "ddpm" and eta != 1.0:
        raise ValueError(
            "the 'ddpm' sampler is DDIM with eta = 1; use sampler='ddim' for other eta"
        )
    if grid is None:
        grid = default_grid(denoiser.schedule, num_steps or default_steps, kind)
    grid = grid.to(dtype=torch.float64)
    x = initial_noise(
        denoiser.schedule, shape, generator, t_max=float(grid[0]), dtype=dtype, device=device
    )
    for step, (t, s) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        t, s = t.to(device=x.device), s.to(device=x.device)
        if sampler in ("ddpm", "ddim"):
            x = ddim_step(denoiser, x, t, s, generator, eta)
        elif sampler == "euler":
            x = euler_step(denoiser, x, t, s)
        else:
            x = heun_step(denoiser, x, t, s)
        if callback is not None:
            callback(step, s, x)
    return x
