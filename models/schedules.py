r"""Noise schedules in continuous time.

Every schedule defines the perturbation kernel

.. math:: q(x_t \mid x_0) = \mathcal{N}(x_t;\ \alpha(t)\, x_0,\ \sigma(t)^2 I),
          \qquad t \in [0, 1],

with ``t = 0`` (nearly) clean and ``t = 1`` (nearly) pure noise. Schedules are stateless
callables: ``schedule(t) -> (alpha, sigma)``; ``t`` may be a Python float or a tensor of any
shape, and the outputs follow its shape, device and dtype.

Families:

- :class:`VP` — variance preserving, :math:`\alpha^2 + \sigma^2 = 1`: the continuous limit of the
  DDPM linear betas (Song et al. 2021, :math:`\beta(t) = 0.1 + 19.9 t`) or the cosine schedule
  (Nichol & Dhariwal 2021).
- :class:`DiscreteVP` — a tabulated :math:`\bar\alpha_n` of a discrete DDPM network, read at
  ``t = n / N``; the bridge that lets discrete networks be queried in continuous time.
- :class:`VE` — variance exploding, :math:`\alpha = 1`,
  :math:`\sigma(t) = \sigma_{\min} (\sigma_{\max} / \sigma_{\min})^t` (Song et al. 2021).
- :class:`EDM` — :math:`\alpha = 1`, :math:`\sigma(t) = \sigma_{\max} t` (Karras et al. 2022);
  their :math:`\rho`-spaced discretisation is :func:`time_grid` with ``kind="karras"``.
- :class:`RectifiedFlow` — :math:`\alpha = 1 - t`, :math:`\sigma = t` (Liu et al. 2023).

References:
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Song et al. Score-Based Generative Modeling through SDEs. ICLR 2021. arXiv:2011.13456.
    Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
    arXiv:2102.09672.
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. arXiv:2010.02502.
    Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models. NeurIPS 2022.
    arXiv:2206.00364.
    Liu, Gong, Liu. Flow Straight and Fast. ICLR 2023. arXiv:2209.03003.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VP",
    "DiscreteVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "ddpm_linear_betas",
    "time_grid",
]


def _as_tensor(t: float | Tensor) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


class Schedule(ABC):
    r"""A noise schedule :math:`t \mapsto (\alpha(t), \sigma(t))` on :math:`[0, 1]`.

    Subclasses implement :meth:`alpha`, :meth:`sigma` and their time derivatives; everything
    else (log-SNR, the noise-to-signal ratio and its inverse) is derived here.
    """

    @abstractmethod
    def alpha(self, t: float | Tensor) -> Tensor:
        """Signal scale :math:`\\alpha(t)`, same shape as ``t``."""

    @abstractmethod
    def sigma(self, t: float | Tensor) -> Tensor:
        """Noise scale :math:`\\sigma(t)`, same shape as ``t``."""

    @abstractmethod
    def alpha_derivative(self, t: float | Tensor) -> Tensor:
        """:math:`d\\alpha / dt`, same shape as ``t``."""

    @abstractmethod
    def sigma_derivative(self, t: float | Tensor) -> Tensor:
        """:math:`d\\sigma / dt`, same shape as ``t``."""

    def __call__(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha(t), self.sigma(t)

    def log_snr(self, t: float | Tensor) -> Tensor:
        r""":math:`\log(\alpha(t)^2 / \sigma(t)^2)`, strictly decreasing in ``t``."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def noise_ratio(self, t: float | Tensor) -> Tensor:
        r""":math:`\sigma(t) / \alpha(t)`, the noise level of the equivalent VE process."""
        return self.sigma(t) / self.alpha(t)

    def time_of_noise_ratio(self, ratio: Tensor, iterations: int = 60) -> Tensor:
        r"""Inverse of :meth:`noise_ratio` by bisection on :math:`[0, 1]`.

        Args:
            ratio: target :math:`\sigma/\alpha` values, any shape.
            iterations: bisection steps (60 reach float64 resolution).

        Returns:
            ``t`` with ``noise_ratio(t) == ratio`` (clamped to ``[0, 1]``), same shape as ``ratio``.
        """
        ratio = _as_tensor(ratio)
        low = torch.zeros_like(ratio)
        high = torch.ones_like(ratio)
        for _ in range(iterations):
            middle = 0.5 * (low + high)
            above = self.noise_ratio(middle) > ratio
            high = torch.where(above, middle, high)
            low = torch.where(above, low, middle)
        return 0.5 * (low + high)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _VariancePreserving(Schedule):
    r"""Shared part of the VP schedules: :math:`\sigma = \sqrt{1 - \alpha^2}` from
    :math:`\log\alpha`.

    Subclasses implement ``log_alpha(t)`` and ``_log_alpha_derivative(t)``.
    """

    @abstractmethod
    def log_alpha(self, t: float | Tensor) -> Tensor:
        r""":math:`\log \alpha(t)`, same shape as ``t``."""

    @abstractmethod
    def _log_alpha_derivative(self, t: Tensor) -> Tensor:
        r""":math:`d \log \alpha / dt`."""

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def alpha_derivative(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        return self.alpha(t) * self._log_alpha_derivative(t)

    def sigma_derivative(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        return -self.alpha(t) * self.alpha_derivative(t) / self.sigma(t)

    def log_snr(self, t: float | Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return 2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))


class VP(_VariancePreserving):
    r"""Variance-preserving schedule, :math:`\alpha(t)^2 + \sigma(t)^2 = 1`.

    ``kind="linear"`` is the continuous limit of the DDPM linear betas :math:`10^{-4} \to 2\cdot
    10^{-2}` over 1000 steps: :math:`\beta(t) = \beta_{\min} + t (\beta_{\max} - \beta_{\min})` with
    :math:`\beta_{\min} = 0.1, \beta_{\max} = 20` (Song et al. 2021, eq. 33) and
    :math:`\log \alpha(t) = -\tfrac12 \int_0^t \beta`.

    ``kind="cosine"`` is Nichol & Dhariwal's :math:`\bar\alpha(t) = f(t)/f(0)`,
    :math:`f(t) = \cos^2\!\big(\tfrac{\pi}{2}\,\tfrac{t\,\tau + s}{1 + s}\big)` with ``s = 0.008``.
    At ``t = 1`` the exact schedule has :math:`\alpha = 0` (infinite noise), which the discrete
    schedule avoids by clipping :math:`\beta_T` to 0.999; we truncate instead at the last
    unclipped discrete step, :math:`\tau = 0.999`, so :math:`\bar\alpha(1) \approx 2.4 \cdot
    10^{-6}`.

    Args:
        kind: ``"linear"`` or ``"cosine"``.
        beta_min: :math:`\beta(0)` for the linear kind.
        beta_max: :math:`\beta(1)` for the linear kind.
        cosine_offset: ``s`` for the cosine kind.
        cosine_end: :math:`\tau` for the cosine kind.
    """

    def __init__(
        self,
        kind: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        cosine_offset: float = 0.008,
        cosine_end: float = 0.999,
    ):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"VP kind must be 'linear' or 'cosine'; got {kind!r}")
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP needs 0 < beta_min < beta_max; got {beta_min}, {beta_max}")
        if not 0 < cosine_end < 1:
            raise ValueError(f"VP cosine_end must lie in (0, 1); got {cosine_end}")
        self.kind = kind
        self.beta_min = beta_min
        self.beta_max = beta_max
        self.cosine_offset = cosine_offset
        self.cosine_end = cosine_end

    def _angle(self, t: Tensor) -> Tensor:
        s = self.cosine_offset
        return 0.5 * math.pi * (t * self.cosine_end + s) / (1 + s)

    def log_alpha(self, t: float | Tensor) -> Tensor:
        r""":math:`\log \alpha(t)`, computed without cancellation."""
        t = _as_tensor(t)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        angle_zero = 0.5 * math.pi * self.cosine_offset / (1 + self.cosine_offset)
        log_alpha = torch.log(torch.cos(self._angle(t))) - math.log(math.cos(angle_zero))
        # Rounding can leave log alpha(0) one ulp above 0, which would make sigma(0) NaN.
        return log_alpha.clamp(max=0.0)

    def _log_alpha_derivative(self, t: Tensor) -> Tensor:
        if self.kind == "linear":
            return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))
        rate = 0.5 * math.pi * self.cosine_end / (1 + self.cosine_offset)
        return -torch.tan(self._angle(t)) * rate


def ddpm_linear_betas(
    num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> Tensor:
    """The DDPM linear betas ``linspace(beta_start, beta_end, num_train_steps)`` in float64."""
    return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)


class DiscreteVP(_VariancePreserving):
    r"""A tabulated discrete VP schedule read in continuous time.

    A discrete DDPM network with :math:`\bar\alpha_1, \dots, \bar\alpha_N` (``alphas_cumprod[n-1]``
    in diffusers' 0-based indexing) is placed at :math:`t_n = n / N`, with :math:`\bar\alpha_0 = 1`
    at ``t = 0``. Between grid points :math:`\log \bar\alpha` is interpolated linearly, so the
    schedule is exact on the grid, continuous and strictly monotone.

    Args:
        alphas_cumprod: :math:`(\bar\alpha_n)_{n=1}^N`, shape ``(N,)``, strictly decreasing in
            ``(0, 1)``.
    """

    def __init__(self, alphas_cumprod: Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if alphas_cumprod.numel() < 1:
            raise ValueError("DiscreteVP needs at least one alphas_cumprod value")
        if not ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all():
            raise ValueError("DiscreteVP alphas_cumprod must lie in (0, 1)")
        if (alphas_cumprod[1:] >= alphas_cumprod[:-1]).any():
            raise ValueError("DiscreteVP alphas_cumprod must be strictly decreasing")
        self.num_train_steps = alphas_cumprod.numel()
        self.alphas_cumprod = alphas_cumprod
        self._log_alpha_grid = 0.5 * torch.cat([alphas_cumprod.new_zeros(1), alphas_cumprod.log()])
        self._memo: dict[tuple[float, torch.dtype], Tensor] = {}  # log_alpha of 0-d CPU times

    @classmethod
    def linear(
        cls, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
    ) -> DiscreteVP:
        """The DDPM schedule of Ho et al.: linear betas, :math:`\\bar\\alpha_n = \\prod (1 -
        \\beta)`."""
        betas = ddpm_linear_betas(num_train_steps, beta_start, beta_end)
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiscreteVP:
        """From per-step betas, shape ``(N,)``."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        grid = self._log_alpha_grid.to(device=t.device, dtype=t.dtype)
        position = t.clamp(0, 1) * self.num_train_steps
        index = position.floor().long().clamp(max=self.num_train_steps - 1)
        slope = grid[index + 1] - grid[index]
        return grid[index], slope, position - index

    def log_alpha(self, t: float | Tensor) -> Tensor:
        r""":math:`\log \alpha(t) = \tfrac12 \log \bar\alpha(t)`.

        A 0-d time on the CPU is looked up in a small memo of earlier times: the engines ask for
        the same grid times a dozen times per step, and the interpolation's ten tensor operations
        cost more than a step's arithmetic on small problems."""
        t = _as_tensor(t)
        if t.dim() or t.device.type != "cpu" or t.requires_grad:
            return self._interpolate(t)
        key = (float(t), t.dtype)
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            value = self._memo[key] = self._interpolate(t)
        return value.clone()

    def _interpolate(self, t: Tensor) -> Tensor:
        start, slope, fraction = self._segment(t)
        return start + slope * fraction

    def _log_alpha_derivative(self, t: Tensor) -> Tensor:
        _, slope, _ = self._segment(t)
        return slope * self.num_train_steps

    def __repr__(self) -> str:
        return f"DiscreteVP(num_train_steps={self.num_train_steps})"


class VE(Schedule):
    r"""Variance-exploding schedule, :math:`\alpha = 1`,
    :math:`\sigma(t) = \sigma_{\min} (\sigma_{\max}/\sigma_{\min})^t` (Song et al. 2021, NCSN++).

    ``t = 0`` keeps the residual noise :math:`\sigma_{\min}`, as in the paper.

    Args:
        sigma_min: :math:`\sigma(0)`.
        sigma_max: :math:`\sigma(1)`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_tensor(t)

    def alpha_derivative(self, t: float | Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma_derivative(self, t: float | Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)


class EDM(Schedule):
    r"""The EDM schedule of Karras et al.: :math:`\alpha = 1`, :math:`\sigma(t) = \sigma_{\max} t`.

    The paper's sampler discretises :math:`\sigma` with :math:`\rho = 7` between
    :math:`\sigma_{\min} = 0.002` and :math:`\sigma_{\max} = 80`:
    ``time_grid(n, "karras", schedule=EDM(), noise_min=0.002)``.

    Args:
        sigma_max: :math:`\sigma(1)`.
    """

    def __init__(self, sigma_max: float = 80.0):
        if not sigma_max > 0:
            raise ValueError(f"EDM needs sigma_max > 0; got {sigma_max}")
        self.sigma_max = sigma_max

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return self.sigma_max * _as_tensor(t)

    def alpha_derivative(self, t: float | Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma_derivative(self, t: float | Tensor) -> Tensor:
        return torch.full_like(_as_tensor(t), self.sigma_max)

    def time_of_noise_ratio(self, ratio: Tensor, iterations: int = 60) -> Tensor:
        return (_as_tensor(ratio) / self.sigma_max).clamp(0, 1)


class RectifiedFlow(Schedule):
    r"""Rectified flow / flow matching interpolation: :math:`\alpha = 1 - t`, :math:`\sigma = t`."""

    def alpha(self, t: float | Tensor) -> Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: float | Tensor) -> Tensor:
        return _as_tensor(t).clone()

    def alpha_derivative(self, t: float | Tensor) -> Tensor:
        return torch.full_like(_as_tensor(t), -1.0)

    def sigma_derivative(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def time_of_noise_ratio(self, ratio: Tensor, iterations: int = 60) -> Tensor:
        r"""Closed-form inverse :math:`t = r / (1 + r)`, with ``t = 1`` at :math:`r = \infty`."""
        ratio = _as_tensor(ratio)
        return torch.where(torch.isinf(ratio), torch.ones_like(ratio), ratio / (1.0 + ratio))


def time_grid(
    num_steps: int,
    kind: str = "uniform",
    *,
    schedule: Schedule | None = None,
    t_max: float = 1.0,
    noise_min: float = 2e-3,
    rho: float = 7.0,
    num_train_steps: int = 1000,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""A decreasing sampling grid :math:`t_K > t_{K-1} > \dots > t_0 = 0`, ``K = num_steps``.

    Samplers walk over consecutive pairs ``(grid[i], grid[i + 1])``, from noise to data.

    Kinds:
        ``"uniform"``: ``linspace(t_max, 0, K + 1)``.
        ``"karras"``: the :math:`\rho`-spacing of Karras et al. (2022, eq. 5) applied to the
        noise ratio :math:`r = \sigma/\alpha` between ``schedule.noise_ratio(t_max)`` and
        ``noise_min``, mapped back to times through the schedule, followed by ``t = 0``.
        ``"ddim"``: the DDIM sub-sequence of a discrete schedule with ``num_train_steps`` steps,
        ``n_i = floor(i N / K) + 1`` for ``i = 0..K-1``, read at :math:`t = n / N` and followed
        by ``t = 0``. When ``K`` divides ``N`` this is DDIM's "uniform" skip ``i (N / K) + 1``
        (Song et al. 2021); otherwise it stays evenly spread over the whole range (diffusers'
        "leading" spacing ``i (N // K)`` would stop near ``t = K (N // K) / N``, e.g. half way
        for ``N = 999, K = 500``).

    Args:
        num_steps: number of sampling steps ``K >= 1``.
        kind: ``"uniform"``, ``"karras"`` or ``"ddim"``.
        schedule: needed for ``"karras"``.
        t_max: first time for ``"uniform"`` and ``"karras"``.
        noise_min: smallest noise ratio for ``"karras"`` (EDM: 0.002).
        rho: Karras exponent.
        num_train_steps: ``N`` for ``"ddim"``.
        dtype: output dtype.
        device: output device.

    Returns:
        Times, shape ``(K + 1,)``, strictly decreasing, ending at exactly 0.

    Raises:
        ValueError: for a non-integer or non-positive ``num_steps``, an unknown ``kind``,
            ``t_max`` outside ``(0, 1]``; for ``"karras"``: no schedule, ``rho <= 0``, an
            infinite noise ratio at ``t_max`` (rectified flow at ``t = 1``: pass ``t_max < 1``),
            or ``noise_min`` outside the schedule's range of noise ratios on ``[0, t_max]``
            (VE cannot go below ``sigma_min``); for ``"ddim"``: ``num_steps > num_train_steps``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"time_grid needs an integer num_steps >= 1; got {num_steps!r}")
    if kind in ("uniform", "karras") and not 0 < t_max <= 1:
        raise ValueError(f"time_grid needs 0 < t_max <= 1; got t_max={t_max}")
    if kind == "uniform":
        return torch.linspace(t_max, 0.0, num_steps + 1, dtype=dtype, device=device)
    if kind == "karras":
        if schedule is None:
            raise ValueError("time_grid(kind='karras') needs the schedule")
        if not rho > 0:
            raise ValueError(f"time_grid(kind='karras') needs rho > 0; got {rho}")
        ratio_max = float(schedule.noise_ratio(torch.tensor(t_max, dtype=torch.float64)))
        ratio_min = float(schedule.noise_ratio(torch.tensor(0.0, dtype=torch.float64)))
        if not math.isfinite(ratio_max):
            raise ValueError(
                f"time_grid(kind='karras'): the noise ratio sigma/alpha of {schedule!r} is "
                f"infinite at t_max={t_max}; pass a t_max < 1"
            )
        if not (0 < noise_min < ratio_max and noise_min >= ratio_min):
            raise ValueError(
                f"time_grid(kind='karras') needs max(0, noise ratio at t=0 ({ratio_min:.4g})) "
                f"<= noise_min < noise ratio at t_max ({ratio_max:.4g}); "
                f"got noise_min={noise_min}"
            )
        fraction = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        high, low = ratio_max ** (1 / rho), noise_min ** (1 / rho)
        ratios = (high + fraction * (low - high)) ** rho
        times = schedule.time_of_noise_ratio(ratios)
        times[0] = t_max
        grid = torch.cat([times, times.new_zeros(1)])
        return grid.to(dtype=dtype, device=device)
    if kind == "ddim":
        if isinstance(num_train_steps, bool) or not isinstance(num_train_steps, int):
            raise ValueError(
                f"time_grid(kind='ddim') needs an integer num_train_steps; got {num_train_steps!r}"
            )
        if num_steps > num_train_steps:
            raise ValueError(
                f"time_grid(kind='ddim') needs num_steps <= num_train_steps ({num_train_steps}); "
                f"got {num_steps}"
            )
        steps = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
        indices = torch.floor(steps * num_train_steps / num_steps) + 1
        grid = torch.cat([indices / num_train_steps, torch.zeros(1, dtype=torch.float64)])
        return grid.to(dtype=dtype, device=device)
    raise ValueError(f"time_grid kind must be 'uniform', 'karras' or 'ddim'; got {kind!r}")
