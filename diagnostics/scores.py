r"""Scores of posterior samples against a known truth: image quality of the posterior mean
(PSNR, SSIM), per-coordinate coverage of central credible intervals, and the continuous ranked
probability score (CRPS).

Samples are ``(S, *event)`` tensors of equal-weight posterior draws (e.g.
``result.get_samples()["x"]``), truths are ``event``-shaped. Every function returns Python floats
(or a dict of them) unless told otherwise.

References:
    Wang, Bovik, Sheikh, Simoncelli. Image quality assessment: from error visibility to
    structural similarity. IEEE Transactions on Image Processing 13(4), 2004.
    Gneiting, Raftery. Strictly proper scoring rules, prediction, and estimation. Journal of the
    American Statistical Association 102(477), 2007.
    Hersbach. Decomposition of the continuous ranked probability score for ensemble prediction
    systems. Weather and Forecasting 15(5), 2000.
    Czado, Gneiting, Held. Predictive model assessment for count data. Biometrics 65(4), 2009
    (the randomised PIT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "psnr",
    "ssim",
    "coverage",
    "rank_coverage",
    "crps",
    "central_intervals",
    "quantiles",
]


def _tensor(value: Any, name: str) -> Tensor:
    """``value`` as a detached floating tensor (float64 for integer or half inputs)."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    value = value.detach()
    if value.is_complex():
        raise ValueError(f"{name} must be real; got dtype {value.dtype}")
    if not value.is_floating_point() or value.dtype in (torch.float16, torch.bfloat16):
        value = value.double()
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return value


def _samples_and_truth(samples: Any, truth: Any) -> tuple[Tensor, Tensor]:
    """``samples`` as ``(S, d)`` and ``truth`` as ``(d,)`` on the samples' device and dtype."""
    samples = _tensor(samples, "samples")
    truth = _tensor(truth, "truth")
    if samples.dim() < 1 or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have shape (S, *event) with S >= 1; got {tuple(samples.shape)}"
        )
    if tuple(samples.shape[1:]) != tuple(truth.shape):
        raise ValueError(
            f"samples have event shape {tuple(samples.shape[1:])} but truth has shape "
            f"{tuple(truth.shape)}"
        )
    dtype = torch.promote_types(samples.dtype, truth.dtype)
    flat = samples.to(dtype).reshape(samples.shape[0], -1)
    return flat, truth.to(device=samples.device, dtype=dtype).reshape(-1)


def _check_levels(levels: Sequence[float]) -> list[float]:
    levels = [float(level) for level in levels]
    if not levels or any(not 0 < level < 1 for level in levels):
        raise ValueError(f"levels must be a non-empty list of numbers in (0, 1); got {levels}")
    return levels


# --------------------------------------------------------------------------------------------
# image quality of a point estimate
# --------------------------------------------------------------------------------------------


def _data_range(truth: Tensor, data_range: float | None) -> float:
    if data_range is None:
        data_range = float(truth.max() - truth.min())
        if data_range == 0:
            raise ValueError(
                "truth is constant, so the default data_range (its max - min) is 0: pass data_range"
            )
    elif not data_range > 0:
        raise ValueError(f"data_range must be positive; got {data_range}")
    return float(data_range)


def psnr(estimate: Any, truth: Any, data_range: float | None = None) -> float:
    r"""Peak signal-to-noise ratio of an estimate (e.g. the posterior mean), in dB.

    .. math:: \mathrm{PSNR} = 10 \log_{10} \frac{R^2}{\frac1d \lVert \hat x - x \rVert^2}

    Args:
        estimate: ``event``-shaped estimate.
        truth: ``event``-shaped ground truth.
        data_range: the range :math:`R` of valid values, e.g. ``1.0`` for images in ``[0, 1]``,
            ``2.0`` in ``[-1, 1]``. Default: the truth's ``max - min`` (which differs from
            scikit-image's dtype-based default; pass it explicitly to compare with papers).

    Returns:
        The PSNR in dB (``inf`` for a perfect estimate).

    Raises:
        ValueError: shapes differ, non-finite values, a non-positive ``data_range`` or a constant
            truth without ``data_range``.
    """
    estimate, truth = _samples_and_truth(_tensor(estimate, "estimate")[None], truth)
    peak = _data_range(truth, data_range)
    mse = float((estimate[0] - truth).double().pow(2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def _filter(image: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' filtering of ``(C, H, W)`` by the 1-D ``window`` along rows and columns."""
    size = window.numel()
    channels = image.shape[0]
    rows = window.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    columns = window.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    out = F.conv2d(image[None], rows, groups=channels)
    return F.conv2d(out, columns, groups=channels)[0]


def ssim(
    estimate: Any,
    truth: Any,
    data_range: float | None = None,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
) -> float:
    r"""Structural similarity index (Wang et al. 2004) of an image estimate.

    With local means, variances and covariance taken under a normalised Gaussian window
    (``window_size`` x ``window_size``, standard deviation ``sigma``; the paper's 11 and 1.5),

    .. math::
        \mathrm{SSIM}(x, y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
        {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (0.01 R)^2,\ C_2 = (0.03 R)^2,

    averaged over every window position fully inside the image ('valid' filtering, as in the
    paper's reference code) and over channels. Local (co)variances are the window-weighted
    population ones. An image smaller than the window uses the largest odd window that fits
    (e.g. 7 for 8 x 8 digits), keeping ``sigma``.

    Args:
        estimate: ``(H, W)`` or ``(C, H, W)`` image, e.g. the posterior mean.
        truth: the ground truth, same shape.
        data_range: the range :math:`R` of valid values (default: the truth's ``max - min``).
        window_size: side of the Gaussian window (odd).
        sigma: its standard deviation in pixels.

    Returns:
        The mean SSIM, in ``[-1, 1]`` (1 for identical images).

    Raises:
        ValueError: not a 2-D or 3-D image, shapes differ, non-finite values, an even or
            non-positive ``window_size``, a non-positive ``sigma`` or ``data_range``.
    """
    estimate = _tensor(estimate, "estimate")
    truth = _tensor(truth, "truth")
    if truth.dim() not in (2, 3):
        raise ValueError(
            f"ssim needs (H, W) or (C, H, W) images; got shape {tuple(truth.shape)} (reshape "
            "flat vectors to the image first)"
        )
    if estimate.shape != truth.shape:
        raise ValueError(
            f"estimate has shape {tuple(estimate.shape)} but truth has {tuple(truth.shape)}"
        )
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer; got {window_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma}")
    peak = _data_range(truth, data_range)
    dtype = torch.promote_types(torch.promote_types(estimate.dtype, truth.dtype), torch.float64)
    x = estimate.to(dtype)
    y = truth.to(device=x.device, dtype=dtype)
    if x.dim() == 2:
        x, y = x[None], y[None]
    fits = min(x.shape[-2:])
    size = min(window_size, fits if fits % 2 == 1 else fits - 1)
    window = _gaussian_window(size, sigma, x)
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(index.mean())


# --------------------------------------------------------------------------------------------
# uncertainty: credible intervals, coverage, CRPS
# --------------------------------------------------------------------------------------------


def quantiles(samples: Tensor, probs: Sequence[float] | Tensor) -> Tensor:
    """Empirical quantiles along the first dim, with linear interpolation (numpy's default).

    Works for any size (``torch.quantile`` refuses inputs above 16M entries).

    Args:
        samples: ``(S, *event)`` floating tensor.
        probs: ``(P,)`` probabilities in ``[0, 1]``.

    Returns:
        ``(P, *event)`` quantiles.
    """
    probs = torch.as_tensor(probs, dtype=samples.dtype, device=samples.device).reshape(-1)
    ordered = torch.sort(samples, dim=0).values
    position = probs * (samples.shape[0] - 1)
    below = position.floor().long()
    above = position.ceil().long()
    fraction = (position - below).reshape((-1,) + (1,) * (samples.dim() - 1))
    return ordered[below] + fraction * (ordered[above] - ordered[below])


def central_intervals(samples: Any, levels: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Central (equal-tailed) credible intervals per coordinate.

    The interval at level ``q`` runs from the ``(1 - q) / 2`` to the ``(1 + q) / 2`` empirical
    quantile (linear interpolation; ArviZ's ``eti``).

    Args:
        samples: ``(S, *event)`` equal-weight draws.
        levels: ``(Q,)`` credibility levels in ``(0, 1)``.

    Returns:
        ``(lower, upper)``, each ``(Q, *event)``.
    """
    levels = _check_levels(levels)
    samples = _tensor(samples, "samples")
    if samples.dim() < 1 or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have shape (S, *event) with S >= 1; got {tuple(samples.shape)}"
        )
    q = torch.tensor(levels, dtype=samples.dtype, device=samples.device)
    bounds = quantiles(samples, torch.cat([(1 - q) / 2, (1 + q) / 2]))
    return bounds[: len(levels)], bounds[len(levels) :]


def coverage(
    samples: Any, truth: Any, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> dict[float, float]:
    """Fraction of coordinates (pixels) whose central credible interval contains the truth.

    For one posterior this is a per-pixel check of the error bars: with a calibrated posterior
    and independent coordinates the fraction is close to the level; the frequentist statement
    (over many observations) is what :func:`diffpost.diagnostics.calibration_study` tests.

    Args:
        samples: ``(S, *event)`` equal-weight posterior draws.
        truth: ``event``-shaped ground truth.
        levels: credibility levels in ``(0, 1)``.

    Returns:
        ``{level: fraction}``, fractions in ``[0, 1]``.

    Raises:
        ValueError: shapes differ, non-finite values or levels outside ``(0, 1)``.
    """
    samples, truth = _samples_and_truth(samples, truth)
    lower, upper = central_intervals(samples, levels)
    inside = (lower <= truth) & (truth <= upper)  # (Q, d)
    return {
        float(level): float(frac)
        for level, frac in zip(levels, inside.double().mean(1), strict=True)
    }


def rank_coverage(
    samples: Any, truth: Any, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> dict[float, float]:
    r"""Coverage of central intervals read from the truth's rank among the draws: unbiased for
    any number of draws.

    With ``S`` draws the empirical interval between the :math:`(1 \mp q)/2` quantiles covers a
    calibrated posterior's truth less often than ``q`` (about 0.72 for ``q = 0.9`` and ``S = 8``;
    :func:`coverage`). Here each coordinate's truth gets its randomised probability integral
    transform :math:`u \sim \mathcal U[r_<, r_\le + 1] / (S + 1)`, with :math:`r_<` and
    :math:`r_\le` the numbers of draws below and at most the truth, which is exactly uniform on
    ``[0, 1]`` when the truth is exchangeable with the draws; the returned fraction is the mean over
    coordinates of :math:`P(|u - 1/2| \le q / 2)` (computed, not drawn). It is ``q`` in
    expectation for a calibrated posterior, below for one too narrow or shifted, above for one too
    wide.

    Args:
        samples: ``(S, *event)`` equal-weight posterior draws (independent of each other).
        truth: ``event``-shaped ground truth.
        levels: credibility levels in ``(0, 1)``.

    Returns:
        ``{level: fraction}``, fractions in ``[0, 1]``.

    Raises:
        ValueError: shapes differ, non-finite values or levels outside ``(0, 1)``.
    """
    levels = _check_levels(levels)
    samples, truth = _samples_and_truth(samples, truth)
    count = samples.shape[0]
    below = (samples < truth).sum(0).to(samples.dtype)  # (d,)
    at_most = (samples <= truth).sum(0).to(samples.dtype)
    low, high = below / (count + 1), (at_most + 1) / (count + 1)  # u ~ U[low, high]
    out = {}
    for level in levels:
        a, b = (1 - level) / 2, (1 + level) / 2
        overlap = high.clamp(max=b) - low.clamp(min=a)
        out[float(level)] = float((overlap.clamp_min(0) / (high - low)).mean())
    return out


def crps(samples: Any, truth: Any, reduction: str = "mean") -> float | Tensor:
    r"""Continuous ranked probability score of the sample distribution, per coordinate.

    The ensemble (energy) form of Gneiting & Raftery (2007, eq. 21) for the empirical
    distribution of the ``S`` samples :math:`x_i` at the truth :math:`y`:

    .. math::
        \mathrm{CRPS} = \frac1S \sum_i |x_i - y| - \frac{1}{2S^2} \sum_{i,j} |x_i - x_j|,

    with the pair sum computed from the sorted samples,
    :math:`\sum_{i,j}|x_i - x_j| = 2\sum_k (2k - S - 1)\, x_{(k)}`. Lower is better; it is in the
    units of the signal and equals the absolute error for a point mass. For a Gaussian
    :math:`\mathcal N(\mu, s^2)` the exact value is
    :math:`s\,[z(2\Phi(z) - 1) + 2\varphi(z) - 1/\sqrt\pi]`, :math:`z = (y - \mu)/s`.

    Args:
        samples: ``(S, *event)`` equal-weight posterior draws.
        truth: ``event``-shaped ground truth.
        reduction: ``"mean"`` (a float, the mean over coordinates) or ``"none"`` (a tensor
            ``event``).

    Returns:
        The CRPS.

    Raises:
        ValueError: shapes differ, non-finite values, an unknown ``reduction``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    event = tuple(_tensor(truth, "truth").shape)
    samples, truth = _samples_and_truth(samples, truth)
    count = samples.shape[0]
    ordered = torch.sort(samples, dim=0).values
    rank = torch.arange(1, count + 1, dtype=samples.dtype, device=samples.device)[:, None]
    pair_sum = 2 * ((2 * rank - count - 1) * ordered).sum(0)
    score = (samples - truth).abs().mean(0) - pair_sum / (2 * count**2)
    if reduction == "none":
        return score.reshape(event)
    return float(score.mean())
