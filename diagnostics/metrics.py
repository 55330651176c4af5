r"""Distances between sample sets: sliced, max-sliced and Gaussian Wasserstein, and MMD.

Every function takes two sample sets ``a`` ``(n, *event)`` and ``b`` ``(m, *event)`` (tensors or
arrays; each sample is flattened to a vector of ``d = prod(event)`` entries) and returns a Python
float. They are used to compare an engine's samples with exact posterior samples; report them next
to the *noise floor*, the same distance between two independent exact sample sets, since every
empirical distance is biased upwards by finite samples.

References:
    Bonneel, Rabin, Peyré, Pfister. Sliced and Radon Wasserstein barycenters of measures.
    Journal of Mathematical Imaging and Vision 51, 2015.
    Deshpande, Hu, Sun, Pyrros, Siddiqui, Koyejo, Zhao, Forsyth, Schwing. Max-sliced Wasserstein
    distance and its use for GANs. CVPR 2019.
    Dowson, Landau. The Fréchet distance between multivariate normal distributions. Journal of
    Multivariate Analysis 12, 1982.
    Gretton, Borgwardt, Rasch, Schölkopf, Smola. A kernel two-sample test. JMLR 13, 2012.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "max_sliced_wasserstein", "gaussian_w2", "mmd"]


def _as_samples(value: Any, name: str) -> Tensor:
    """``value`` as a floating tensor ``(n, d)``; ValueError naming ``name`` if unusable."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    value = value.detach()
    if value.dim() == 0:
        raise ValueError(f"{name} must have shape (n, *event); got a scalar")
    if value.is_complex():
        raise ValueError(f"{name} must be real; got dtype {value.dtype}")
    if not value.is_floating_point() or value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    value = value.reshape(value.shape[0], math.prod(value.shape[1:]))
    if value.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples; got {value.shape[0]}")
    if value.shape[1] == 0:
        raise ValueError(f"{name} has an empty event shape")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return value


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    """Both sets as ``(n, d)`` and ``(m, d)`` on ``a``'s device, in their promoted dtype."""
    a = _as_samples(a, "a")
    b = _as_samples(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must have the same event size; got a with {a.shape[1]} entries per sample "
            f"and b with {b.shape[1]}"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def _directions(dim: int, num_projections: int, seed: int, like: Tensor) -> Tensor:
    """``num_projections`` uniform unit vectors in R^dim, as columns ``(dim, L)``.

    Drawn in float64 on the CPU from a ``torch.Generator`` seeded by ``seed``, so the same seed
    gives the same directions on every device and dtype.
    """
    if int(num_projections) < 1:
        raise ValueError(f"num_projections must be >= 1; got {num_projections}")
    generator = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(dim, int(num_projections), generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return theta.to(device=like.device, dtype=like.dtype)


def _projected_wpp(a: Tensor, b: Tensor, theta: Tensor, p: float) -> Tensor:
    r"""Per direction, :math:`W_p^p` between the 1-D empirical measures of ``a θ`` and ``b θ``.

    With quantile functions :math:`Q_a, Q_b`,
    :math:`W_p^p = \int_0^1 |Q_a(u) - Q_b(u)|^p du`. Both are step functions, constant between
    consecutive levels of the merged grid :math:`\{i/n\} \cup \{j/m\}`, so the integral is an
    exact finite sum. The levels are handled as integers in units of ``1 / (n m)`` (no rounding).
    For ``n == m`` this is the mean of ``|sort(a θ) - sort(b θ)|^p``.

    Args:
        a: ``(n, d)``. b: ``(m, d)``. theta: ``(d, L)`` unit directions. p: order, ``>= 1``.

    Returns:
        ``(L,)`` values of :math:`W_p^p`.
    """
    # (L, n) and (L, m): each direction's projections contiguous, so the sorts are fast
    pa = torch.sort(theta.T @ a.T, dim=1).values
    pb = torch.sort(theta.T @ b.T, dim=1).values
    n, m = pa.shape[1], pb.shape[1]
    if n == m:
        return _power(pa - pb, p).mean(1)
    device = pa.device
    levels = torch.cat(
        [
            torch.arange(1, n + 1, device=device, dtype=torch.int64) * m,
            torch.arange(1, m + 1, device=device, dtype=torch.int64) * n,
        ]
    )
    levels = torch.unique(levels)  # sorted, ends at n * m
    widths = torch.diff(levels, prepend=levels.new_zeros(1)).to(pa.dtype) / (n * m)
    # on (levels[k-1], levels[k]] the quantile of a is its ceil(u n)-th smallest value
    index_a = (levels + m - 1) // m - 1
    index_b = (levels + n - 1) // n - 1
    gaps = _power(pa[:, index_a] - pb[:, index_b], p)  # (L, K)
    return gaps @ widths


def _power(diff: Tensor, p: float) -> Tensor:
    """``|diff|^p``, with the common ``p = 1, 2`` without a general ``pow``."""
    if p == 2:
        return diff.square()
    if p == 1:
        return diff.abs()
    return diff.abs().pow(p)


def _check_p(p: float) -> float:
    p = float(p)
    if not p >= 1:
        raise ValueError(f"p must be >= 1; got {p}")
    return p


def sliced_wasserstein(
    a: Tensor, b: Tensor, num_projections: int = 256, seed: int = 0, p: float = 2
) -> float:
    r"""Sliced p-Wasserstein distance between two empirical measures (Bonneel et al. 2015).

    .. math::
        SW_p(a, b) = \Big(\frac{1}{L}\sum_{l=1}^{L}
            W_p^p(\theta_l^\top a, \theta_l^\top b)\Big)^{1/p}

    with ``L = num_projections`` random unit directions :math:`\theta_l` (uniform on the sphere)
    and the 1-D distances computed exactly: by sorting when ``n == m``, by integrating the gap
    between the two quantile functions over the merged grid of cumulative levels otherwise. For
    Gaussians :math:`N(0, I)` and :math:`N(\mu, I)` in ``d`` dims,
    :math:`SW_2 = \lVert\mu\rVert / \sqrt{d}`.

    Args:
        a: samples ``(n, *event)``, flattened to ``(n, d)``.
        b: samples ``(m, *event)`` with the same ``prod(event) = d``; moved to ``a``'s device.
        num_projections: number ``L`` of random directions.
        seed: seed of the ``torch.Generator`` that draws the directions (on the CPU, so the
            same seed gives the same directions on every device).
        p: order of the distance, ``>= 1``.

    Returns:
        :math:`SW_p` as a Python float.

    Raises:
        ValueError: event sizes differ, fewer than 2 samples, non-finite values (naming ``a`` or
            ``b``), ``p < 1`` or ``num_projections < 1``.
    """
    p = _check_p(p)
    a, b = _pair(a, b)
    theta = _directions(a.shape[1], num_projections, seed, a)
    wpp = _projected_wpp(a, b, theta, p)
    return float(wpp.mean().clamp_min(0).pow(1 / p))


def max_sliced_wasserstein(
    a: Tensor, b: Tensor, num_projections: int = 256, seed: int = 0, p: float = 2
) -> float:
    r"""Max-sliced p-Wasserstein distance over random directions (Deshpande et al. 2019).

    .. math:: \max_{l} W_p(\theta_l^\top a, \theta_l^\top b)

    over the same ``num_projections`` random unit directions as :func:`sliced_wasserstein` with
    the same ``seed``. Deshpande et al. maximise over the whole sphere; the maximum over random
    directions is a lower bound of that, and approaches it as ``num_projections`` grows (slowly
    in high dimension).

    Args:
        a: samples ``(n, *event)``, flattened to ``(n, d)``.
        b: samples ``(m, *event)`` with the same ``d``.
        num_projections: number of random directions.
        seed: seed of the directions' generator.
        p: order of the distance, ``>= 1``.

    Returns:
        The largest per-direction :math:`W_p`, as a Python float.

    Raises:
        ValueError: as :func:`sliced_wasserstein`.
    """
    p = _check_p(p)
    a, b = _pair(a, b)
    theta = _directions(a.shape[1], num_projections, seed, a)
    wpp = _projected_wpp(a, b, theta, p)
    return float(wpp.max().clamp_min(0).pow(1 / p))


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, via ``eigh``."""
    matrix = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def gaussian_w2(a: Tensor, b: Tensor) -> float:
    r"""2-Wasserstein distance between Gaussian fits of two sample sets (Dowson & Landau 1982).

    With the sample means :math:`\mu_a, \mu_b` and (unbiased) covariances :math:`\Sigma_a,
    \Sigma_b`,

    .. math::
        W_2^2 = \lVert\mu_a - \mu_b\rVert^2 + \operatorname{tr}\big(\Sigma_a + \Sigma_b
        - 2 (\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2})^{1/2}\big),

    the matrix square roots being symmetric (``eigh``, negative round-off eigenvalues clamped
    to 0). Computed in float64. This is the Fréchet distance behind FID; it sees only the first
    two moments.

    Args:
        a: samples ``(n, *event)``, flattened to ``(n, d)``.
        b: samples ``(m, *event)`` with the same ``d``.

    Returns:
        :math:`W_2` between :math:`N(\mu_a, \Sigma_a)` and :math:`N(\mu_b, \Sigma_b)`, a float.

    Raises:
        ValueError: event sizes differ, fewer than 2 samples, non-finite values.
    """
    a, b = _pair(a, b)
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a = torch.atleast_2d(torch.cov(a.T))
    cov_b = torch.atleast_2d(torch.cov(b.T))
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    squared = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(squared.clamp_min(0).sqrt())


KERNELS = ("gaussian", "imq")


def _kernel(squared_distances: Tensor, kernel: str, bandwidth: float) -> Tensor:
    if kernel == "gaussian":
        return torch.exp(-squared_distances / (2 * bandwidth**2))
    return torch.rsqrt(1 + squared_distances / bandwidth**2)


def _median_bandwidth(pooled: Tensor, max_points: int = 2000) -> float:
    """Median pairwise distance of (at most ``max_points`` evenly spaced rows of) ``pooled``."""
    stride = max(1, pooled.shape[0] // max_points)
    points = pooled[::stride]
    distances = torch.cdist(points, points)
    upper = torch.triu_indices(points.shape[0], points.shape[0], offset=1, device=points.device)
    return float(distances[upper[0], upper[1]].median())


def mmd(
    a: Tensor,
    b: Tensor,
    kernel: str = "gaussian",
    bandwidth: float | None = None,
    squared: bool = True,
) -> float:
    r"""Maximum mean discrepancy between two sample sets: the unbiased U-statistic of
    Gretton et al. (2012, eq. 3).

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{1}{n(n-1)}\sum_{i \ne j} k(a_i, a_j)
        + \frac{1}{m(m-1)}\sum_{i \ne j} k(b_i, b_j) - \frac{2}{nm}\sum_{i,j} k(a_i, b_j)

    with the kernel

    * ``"gaussian"``: :math:`k(u, v) = \exp(-\lVert u - v\rVert^2 / 2h^2)`;
    * ``"imq"`` (inverse multiquadric): :math:`k(u, v) = (1 + \lVert u - v\rVert^2 / h^2)^{-1/2}`,

    both characteristic. The default bandwidth :math:`h` is the median heuristic: the median
    pairwise Euclidean distance of the pooled samples (at most 2000 of them, evenly spaced). Pass
    a fixed ``bandwidth`` to compare values across runs. The estimate is unbiased and can be
    slightly negative when the two distributions agree; its scale depends on ``d``, the kernel
    and the bandwidth, so report it next to the noise floor (two independent reference sets).
    Memory grows as ``(n + m)^2``.

    For Gaussians :math:`\mathcal N(\mu_a, s^2 I)` and :math:`\mathcal N(\mu_b, s^2 I)` in ``d``
    dims and the Gaussian kernel,
    :math:`\mathrm{MMD}^2 = 2 r^{d/2} (1 - \exp(-\lVert\mu_a - \mu_b\rVert^2 / 2(h^2 + 2s^2)))`,
    :math:`r = h^2 / (h^2 + 2s^2)`.

    Args:
        a: samples ``(n, *event)``, flattened to ``(n, d)``.
        b: samples ``(m, *event)`` with the same ``d``.
        kernel: ``"gaussian"`` or ``"imq"``.
        bandwidth: kernel scale :math:`h` (default: median heuristic).
        squared: return :math:`\widehat{\mathrm{MMD}}^2_u` (default); otherwise its square root,
            with negative estimates clamped to 0.

    Returns:
        The estimate as a Python float.

    Raises:
        ValueError: event sizes differ, fewer than 2 samples, non-finite values, an unknown
            kernel or a non-positive bandwidth.

    References:
        Gretton, Borgwardt, Rasch, Schölkopf, Smola. A kernel two-sample test. JMLR 13, 2012.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    a, b = _pair(a, b)
    a, b = a.double(), b.double()
    if bandwidth is None:
        bandwidth = _median_bandwidth(torch.cat([a, b]))
        if bandwidth == 0:
            raise ValueError("the median pairwise distance is 0: pass a positive bandwidth")
    elif not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive; got {bandwidth}")
    n, m = a.shape[0], b.shape[0]
    k_aa = _kernel(torch.cdist(a, a).square(), kernel, bandwidth)
    k_bb = _kernel(torch.cdist(b, b).square(), kernel, bandwidth)
    k_ab = _kernel(torch.cdist(a, b).square(), kernel, bandwidth)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    value = float(within_a + within_b - 2 * k_ab.mean())
    return value if squared else math.sqrt(max(value, 0.0))
