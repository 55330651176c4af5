"""Plots of calibration studies (matplotlib): coverage curves, p-values and rank histograms of a
:class:`~diffpost.diagnostics.calibration.CalibrationStudy`. ArviZ's PIT-ECDF plot works on
:meth:`CalibrationStudy.to_datatree` (``arviz_plots.plot_ecdf_pit``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from diffpost.diagnostics.calibration import CalibrationStudy

__all__ = ["plot_calibration", "plot_rank_histograms"]

_KIND_LABELS = {
    "coordinates": "coordinates",
    "projections": "random projections",
    "log_likelihood": "log-likelihood",
    "tarp": "TARP (ECP)",
}
_KIND_COLORS = {
    "coordinates": "tab:blue",
    "projections": "tab:orange",
    "log_likelihood": "tab:green",
    "tarp": "tab:red",
}


def plot_calibration(study: CalibrationStudy, alpha: float = 0.01) -> Figure:
    """Coverage against nominal level, and the rank-uniformity p-values, of a calibration study.

    Left: for each kind of summary, the mean over its summaries of the fraction of trials whose
    central credible interval contains the truth, against the nominal level (shaded: the range
    over the summaries of that kind; TARP: its expected coverage probability), with the
    diagonal and a 95% binomial band for ``T`` trials. Right: every summary's chi-square
    p-value (sorted, log scale) and the Bonferroni threshold ``alpha / K``.

    Args:
        study: a :class:`~diffpost.diagnostics.calibration.CalibrationStudy`.
        alpha: family-wise level of the threshold line.

    Returns:
        The figure with two axes, titled ``"coverage"`` and ``"rank uniformity"``.
    """
    levels = study.levels.double().numpy()
    coverage = study.coverage.double().numpy()
    kinds = np.array(study.kinds)
    trials = study.num_trials
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    grid = np.linspace(0, 1, 101)
    band = 1.96 * np.sqrt(grid * (1 - grid) / trials)
    left.fill_between(
        grid, grid - band, grid + band, color="0.85", label=f"95% band, {trials} trials"
    )
    left.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
    for kind in dict.fromkeys(study.kinds):
        columns = coverage[:, kinds == kind]
        color = _KIND_COLORS[kind]
        left.plot(levels, columns.mean(1), color=color, marker=".", label=_KIND_LABELS[kind])
        if columns.shape[1] > 1:
            left.fill_between(levels, columns.min(1), columns.max(1), color=color, alpha=0.15)
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.set_xlabel("nominal level")
    left.set_ylabel("empirical coverage")
    left.set_title("coverage", fontsize="small")
    left.legend(fontsize="x-small", loc="upper left")

    p_values = study.p_values.numpy()
    order = np.argsort(p_values)
    floor = np.finfo(float).tiny
    for kind in dict.fromkeys(study.kinds):
        positions = np.nonzero(kinds[order] == kind)[0]
        right.scatter(
            positions,
            np.maximum(p_values[order][positions], floor),
            s=12,
            color=_KIND_COLORS[kind],
            label=_KIND_LABELS[kind],
        )
    right.axhline(alpha / len(p_values), color="k", ls="--", lw=0.8, label=f"{alpha:g} / K")
    right.set_yscale("log")
    right.set_xlabel("summary (sorted by p-value)")
    right.set_ylabel("chi-square p-value")
    verdict = "passed" if study.passed(alpha) else "failed"
    right.set_title(f"rank uniformity ({verdict} at {alpha:g})", fontsize="small")
    right.legend(fontsize="x-small", loc="lower right")
    figure.tight_layout()
    return figure


def _binomial_interval(
    trials: int, probability: np.ndarray, mass: float
) -> tuple[np.ndarray, np.ndarray]:
    """Central ``mass`` interval of Binomial(trials, p) counts for each ``p`` (exact quantiles)."""
    k = torch.arange(trials + 1, dtype=torch.float64)[:, None]
    p = torch.as_tensor(probability, dtype=torch.float64)[None]
    log_pmf = (
        torch.lgamma(torch.tensor(trials + 1.0))
        - torch.lgamma(k + 1)
        - torch.lgamma(trials - k + 1)
        + k * p.log()
        + (trials - k) * torch.log1p(-p)
    )
    cdf = log_pmf.exp().cumsum(0)  # (trials + 1, bins)
    low = (cdf < (1 - mass) / 2).sum(0)  # first k with cdf >= (1 - mass) / 2
    high = (cdf < (1 + mass) / 2).sum(0)
    return low.double().numpy(), high.double().numpy()


def plot_rank_histograms(
    study: CalibrationStudy, max_panels: int = 12, kinds: Sequence[str] | None = None
) -> Figure:
    """Rank histograms of a calibration study (Talts et al. 2018, figure 2).

    One panel per summary, the ``max_panels`` with the smallest p-values first (the most
    informative), each with ``study.num_bins`` bars, the expected count (line) and the central
    99% interval of a bin's count under uniformity (band: binomial quantiles).

    Args:
        study: a :class:`~diffpost.diagnostics.calibration.CalibrationStudy`.
        max_panels: most panels drawn.
        kinds: only summaries of these kinds (default all).

    Returns:
        The figure; each axes is titled with the summary's name and p-value.
    """
    if isinstance(max_panels, bool) or not isinstance(max_panels, int) or max_panels < 1:
        raise ValueError(f"max_panels must be a positive integer; got {max_panels!r}")
    columns = study.columns(kinds)
    p_values = study.p_values
    chosen = sorted(columns, key=lambda k: float(p_values[k]))[:max_panels]
    bins = study.num_bins
    draws = study.num_draws
    trials = study.num_trials
    per_bin = np.bincount(np.arange(draws + 1) * bins // (draws + 1), minlength=bins)
    probability = per_bin / (draws + 1)
    low, high = _binomial_interval(trials, probability, 0.99)
    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(3 * ncols, 2.4 * nrows), squeeze=False, sharey=True
    )
    edges = np.arange(bins + 1)
    for ax, column in zip(axes.flat, chosen, strict=False):
        counts = np.bincount((study.ranks[:, column].numpy() * bins) // (draws + 1), minlength=bins)
        ax.fill_between(
            edges, np.r_[low, low[-1]], np.r_[high, high[-1]], step="post", color="0.85"
        )
        ax.bar(edges[:-1], counts, width=1, align="edge", color="tab:blue", alpha=0.8)
        ax.step(
            edges,
            np.r_[trials * probability, trials * probability[-1]],
            where="post",
            color="k",
            lw=0.8,
        )
        ax.set_title(
            f"{study.summaries[column]} (p = {float(p_values[column]):.2g})", fontsize="small"
        )
        ax.set_xticks([0, bins])
        ax.set_xticklabels(["0", str(draws)])
    for ax in list(axes.flat)[len(chosen) :]:
        figure.delaxes(ax)
    figure.supxlabel("rank of the truth among the posterior draws", fontsize="small")
    figure.tight_layout()
    return figure
