r"""The posterior covariance of a denoiser, :math:`\operatorname{Cov}[x_0 \mid x_t]`, as a diagonal
per time fitted to data by maximum likelihood (Peng et al. 2024).

Guidance of the ΠGDM / moment-matching kind approximates :math:`p(x_0 \mid x_t)` by
:math:`\mathcal{N}(\hat x_0(x_t), \Sigma_t)`; ΠGDM takes :math:`\Sigma_t = r_t^2 I` with the
:math:`r_t^2` of a unit Gaussian. Peng et al. show that the best :math:`\Sigma_t` among those that
depend on :math:`t` only is the maximum-likelihood one: under :math:`x_0 \mid x_t \sim
\mathcal{N}(D(x_t, t), \operatorname{diag}(v_t))` with :math:`x_0` from the data and :math:`x_t =
\alpha_t x_0 + \sigma_t \epsilon`,

.. math:: \hat v_{t,i} = \frac{1}{N} \sum_{n=1}^{N}
    \big(x_{0,i}^{(n)} - D(\alpha_t x_0^{(n)} + \sigma_t \epsilon^{(n)}, t)_i\big)^2,

the denoiser's mean squared error per coordinate (their "analytic" estimate is its mean over the
coordinates, ``isotropic=True``). For a Gaussian prior :math:`\mathcal{N}(\mu, C)` it converges to
the diagonal of :math:`(C^{-1} + (\alpha_t / \sigma_t)^2 I)^{-1}`, the exact posterior covariance,
which does not depend on :math:`x_t`.

:class:`PosteriorVariance` stores :math:`\hat v_t` on a grid of times and interpolates linearly in
:math:`\log(\sigma_t / \alpha_t)`; below the grid's smallest noise ratio :math:`\rho_0` it scales
as :math:`\hat v_{t_0} (\rho_t / \rho_0)^2` (the small-noise limit :math:`v_t \to \rho_t^2`), above
the largest it is held.

References:
    Peng, Zheng, Dai, Xiao, Li, Zou, Xiong. Improving Diffusion Models for Inverse Problems Using
    Optimal Posterior Covariance. ICML 2024. arXiv:2402.02149. Official code:
    github.com/xypeng9903/k-diffusion-inverse-problems (``analytic_variance.py``).
    Bao, Li, Zhu, Zhang. Analytic-DPM. ICLR 2022 (the mean-squared-error form of the optimal
    variance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffpost.models.denoisers import Denoiser
from diffpost.models.schedules import Schedule

__all__ = ["PosteriorVariance"]


class PosteriorVariance:
    r"""A diagonal :math:`\operatorname{Var}[x_0 \mid x_t]` per time, ``variance(t) -> (*event)``.

    Args:
        schedule: the diffusion's schedule.
        times: ``(K,)`` float64 times of the fit, increasing in noise ratio.
        variances: ``(K, *event)`` fitted variances at those times (non-negative).
    """

    def __init__(self, schedule: Schedule, times: Tensor, variances: Tensor):
        times = torch.as_tensor(times, dtype=torch.float64)
        ratios = schedule.noise_ratio(times)
        if times.dim() != 1 or variances.shape[0] != times.shape[0] or times.shape[0] < 2:
            raise ValueError(
                f"PosteriorVariance: times must be (K,) with K >= 2 and variances (K, *event); "
                f"got {tuple(times.shape)} and {tuple(variances.shape)}"
            )
        if not bool((ratios[1:] > ratios[:-1]).all()) or not bool((ratios > 0).all()):
            raise ValueError("PosteriorVariance: times must have increasing, positive noise ratios")
        if not bool(torch.isfinite(ratios).all()):
            raise ValueError("PosteriorVariance: times must have finite noise ratios (alpha > 0)")
        if not bool((variances >= 0).all()):
            raise ValueError("PosteriorVariance: variances must be >= 0")
        self.schedule = schedule
        self.times = times
        self.log_ratios = ratios.log()
        self.variances = variances

    @classmethod
    def fit(
        cls,
        denoiser: Denoiser,
        data: Tensor,
        *,
        num_times: int = 64,
        noise_draws: int = 1,
        isotropic: bool = False,
        generator: torch.Generator | None = None,
    ) -> PosteriorVariance:
        r"""Maximum-likelihood :math:`\hat v_t` (the module docstring) at ``num_times`` times.

        The times are spread geometrically in the noise ratio :math:`\sigma_t / \alpha_t` between
        the schedule's ratios at ``t = 1e-3`` and at the largest time with :math:`\alpha_t \ge
        10^{-3}`.

        Args:
            denoiser: the Tweedie denoiser :math:`D(x_t, t)` (its ``schedule`` is used).
            data: ``(N, *event)`` draws of the data :math:`x_0`.
            num_times: grid size :math:`K \ge 2`.
            noise_draws: draws of :math:`\epsilon` per data point and time.
            isotropic: average over the coordinates (the paper's "analytic" variance).
            generator: source of :math:`\epsilon`.

        Returns:
            The fitted :class:`PosteriorVariance`, variances ``(K, *event)``.
        """
        if num_times < 2 or noise_draws < 1:
            raise ValueError(
                f"PosteriorVariance.fit: num_times must be >= 2 and noise_draws >= 1; got "
                f"{num_times} and {noise_draws}"
            )
        schedule = denoiser.schedule
        times = _fit_times(schedule, num_times)
        variances = []
        with torch.no_grad():
            for t in times:
                alpha, sigma = (v.to(data) for v in schedule(t))
                squared = torch.zeros_like(data[0])
                for _ in range(noise_draws):
                    noise = torch.randn(
                        data.shape, generator=generator, dtype=data.dtype, device=data.device
                    )
                    x0 = denoiser(alpha * data + sigma * noise, t.to(data))
                    squared = squared + ((data - x0) ** 2).mean(0)
                variance = squared / noise_draws
                variances.append(variance.mean().expand_as(variance) if isotropic else variance)
        return cls(schedule, times, torch.stack(variances))

    def __call__(self, t: float | Tensor) -> Tensor:
        """The variance at time ``t`` (0-d) of the fit's schedule, ``(*event)`` in the fit's
        dtype."""
        return self.at_noise_ratio(
            self.schedule.noise_ratio(torch.as_tensor(t, dtype=torch.float64))
        )

    def at_noise_ratio(self, ratio: float | Tensor) -> Tensor:
        r"""The variance at the noise ratio :math:`\rho = \sigma_t / \alpha_t` (0-d), ``(*event)``.

        :math:`\operatorname{Var}[x_0 \mid x_t]` depends on the time only through
        :math:`\rho` (:math:`x_t / \alpha_t = x_0 + \rho\, \epsilon`), so a fit made on one
        schedule serves a prior of the same data on any other: engines ask by their own
        schedule's ratio."""
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        if bool(torch.isinf(ratio)) or float(ratio.log()) >= float(self.log_ratios[-1]):
            return self.variances[-1]
        if float(ratio) <= 0:
            return torch.zeros_like(self.variances[0])
        log_ratio = ratio.log()
        if float(log_ratio) <= float(self.log_ratios[0]):
            scale = torch.exp(2 * (log_ratio - self.log_ratios[0]))
            return self.variances[0] * scale.to(self.variances)
        upper = int(torch.searchsorted(self.log_ratios, log_ratio))
        low, high = self.log_ratios[upper - 1], self.log_ratios[upper]
        weight = ((log_ratio - low) / (high - low)).to(self.variances)
        return (1 - weight) * self.variances[upper - 1] + weight * self.variances[upper]

    def __repr__(self) -> str:
        return (
            f"PosteriorVariance({len(self.times)} times, event {tuple(self.variances.shape[1:])})"
        )


def _fit_times(schedule: Schedule, num_times: int) -> Tensor:
    """``num_times`` times geometric in the noise ratio over the schedule's usable range."""
    grid = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    alpha = schedule.alpha(grid)
    usable = grid[(alpha >= 1e-3) & (grid >= 1e-3)]
    ends = schedule.noise_ratio(torch.stack([usable[0], usable[-1]]))
    ratios = torch.exp(torch.linspace(float(ends[0].log()), float(ends[1].log()), num_times))
    return schedule.time_of_noise_ratio(ratios.to(torch.float64))
