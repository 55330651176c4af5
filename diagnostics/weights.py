r"""Diagnostics of importance weights: the Pareto :math:`\hat k` of each chain's weights.

The final weights of a weighted engine (SMC, importance sampling) are ratios of densities; their
right tail tells whether weighted averages have finite variance. Pareto-smoothed importance
sampling (PSIS) fits a generalised Pareto distribution to the largest weights; its shape
:math:`\hat k` reads (Vehtari et al. 2024): below 0.5 the weights are fine; below
:math:`\min(1 - 1/\log_{10} S, 0.7)` estimates are still reliable with ``S`` draws; above 0.7
weighted averages are dominated by a few particles and cannot be trusted (the ESS can look fine
while :math:`\hat k` already warns).

References:
    Vehtari, Simpson, Gelman, Yao, Gabry. Pareto smoothed importance sampling. JMLR 25, 2024.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from diffpost.posterior.particles import ParticleSet

__all__ = ["pareto_khat"]


#: fewest draws per chain for which ArviZ's ``psislw`` fits a tail (it needs
#: ``ceil(min(0.2 n, 3 sqrt(n))) >= 5`` tail draws)
MIN_DRAWS = 21


def pareto_khat(result: ParticleSet | xr.DataTree) -> np.ndarray:
    r"""Pareto :math:`\hat k` of the raw log-weights of each chain (PSIS, via ArviZ).

    Runs ``(-log_weight).azstats.psislw(dim="draw")`` of ``arviz_stats`` on the raw particles'
    normalised log-weights (``ParticleSet.log_weights``, or ``sample_stats.log_weight`` of a
    tree from :func:`diffpost.diagnostics.to_datatree`).

    Args:
        result: a :class:`~diffpost.posterior.ParticleSet` or its ``DataTree``.

    Returns:
        ``(chains,)`` float array of :math:`\hat k`; ``-inf`` for a chain whose weights are all
        equal (nothing to smooth: an unweighted engine, or weights just resampled); NaN for
        every chain when there are fewer than :data:`MIN_DRAWS` draws per chain (too few to
        fit a tail).

    Raises:
        ValueError: a tree without ``sample_stats.log_weight``.
    """
    if isinstance(result, ParticleSet):
        log_weights = result.log_weights.detach().double().cpu().numpy()
    else:
        if "sample_stats" not in result.children or "log_weight" not in result["sample_stats"]:
            raise ValueError(
                "the tree has no sample_stats.log_weight (use diagnostics.to_datatree)"
            )
        log_weights = np.asarray(result["sample_stats"]["log_weight"].transpose("chain", "draw"))
    khat = np.full(log_weights.shape[0], -np.inf)
    if log_weights.shape[1] < MIN_DRAWS:
        return np.full(log_weights.shape[0], np.nan)
    spread = log_weights.max(1) - log_weights.min(1)
    varying = spread > 1e-12 * np.maximum(1.0, np.abs(log_weights).max(1))
    if varying.any():
        khat[varying] = [chain_khat(row) for row in log_weights[varying]]
    return khat


def chain_khat(log_weights: np.ndarray) -> float:
    r"""ArviZ's Pareto :math:`\hat k` of one chain's log-weights ``(draws,)``; NaN where it
    cannot fit a tail (e.g. "All tail values are the same" for nearly uniform, tied weights).

    ``arviz_stats``' ``psislw`` takes log-likelihood-like values, the importance weights being
    :math:`\exp(-\text{ary})` (as in PSIS-LOO, where the ratios are :math:`1 / p(y_i \mid
    \theta)`); the log-weights are therefore passed negated.
    """
    import arviz_stats  # noqa: F401  (registers the ``azstats`` accessor)

    try:
        _, k = xr.DataArray(-log_weights, dims=("draw",)).azstats.psislw(dim="draw")
    except ValueError:
        return float("nan")
    return float(k)
