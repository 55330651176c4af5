"""Side-by-side comparison of several engines' results on one problem: a table and a figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from diffpost.diagnostics import metrics, scores
from diffpost.diagnostics.plots import (
    _channel_mean,
    _image_shape,
    _show,
    _to_display,
    plot_projection,
)
from diffpost.diagnostics.weights import pareto_khat
from diffpost.posterior.particles import ParticleSet

__all__ = ["compare"]


def _reference_draws(reference: ParticleSet | Tensor) -> Tensor:
    if isinstance(reference, ParticleSet):
        reference = reference.get_samples()[reference.latent_name]
    reference = torch.as_tensor(reference).detach()
    if reference.dim() < 2 or reference.shape[0] < 4:
        raise ValueError(
            f"reference must be a ParticleSet or (M, *event) samples with M >= 4; got shape "
            f"{tuple(reference.shape)}"
        )
    return reference.cpu().double()


def _image_shape_or_none(event: tuple[int, ...], image_shape: Sequence[int] | None):
    try:
        return _image_shape(event, image_shape)
    except ValueError:
        if image_shape is not None:
            raise
        return None


def compare(
    results: Mapping[str, ParticleSet],
    truth: Tensor | None = None,
    reference: ParticleSet | Tensor | None = None,
    *,
    image_shape: Sequence[int] | None = None,
    level: float = 0.9,
    data_range: float | None = None,
    seed: int = 0,
):
    """Compare several runs on one problem: a table of costs and accuracies, and a figure.

    Table columns (one row per result, indexed by its name):

    * ``engine``, ``draws`` (equal-weight draws, chains x particles), ``nfe``, ``vjp``,
      ``wall_time`` (from ``info``; NaN when absent);
    * ``ess_fraction``: mean over chains of the final weights' ESS / N; ``pareto_k``: the largest
      Pareto :math:`\\hat k` of the chains' weights (:func:`diffpost.diagnostics.pareto_khat`; NaN
      for uniform weights); ``log_evidence``: log of the mean over chains of the evidence estimates;
    * with ``reference`` (exact posterior samples): ``sw`` (:func:`sliced_wasserstein` between
      ``m`` draws of the result and ``m`` reference draws), ``sw_floor`` (the same between two
      disjoint sets of ``m`` reference draws: the noise floor ``sw`` should be compared with),
      ``mmd`` (Gaussian-kernel :math:`\\mathrm{MMD}^2_u`, one median-heuristic bandwidth taken
      from the reference for all rows) and ``gaussian_w2``, where
      ``m = min(draws, M // 2)`` for ``M`` reference draws (random subsets, seeded);
    * with ``truth``: ``psnr`` and ``ssim`` (images only) of the posterior mean,
      ``coverage`` (fraction of coordinates inside their central ``level`` interval of the
      equal-weight draws: biased low for few draws, about 0.72 at ``level = 0.9`` with 8
      calibrated draws), ``rank_coverage`` (the same level read from the truth's rank among the
      run's independent draws, :meth:`~diffpost.posterior.ParticleSet.independent_draws`:
      ``level`` in expectation for a calibrated posterior with any number of draws,
      :func:`diffpost.diagnostics.rank_coverage`; NaN with a single independent draw, e.g.
      one SMC chain) and ``crps``.

    The figure has one column per result (after ``truth`` and ``reference`` columns when
    given): for image events, the posterior mean (top) and pixel-wise standard deviation
    (bottom); otherwise a scatter of coordinates 0 and 1 over the reference draws.

    Args:
        results: name -> :class:`~diffpost.posterior.ParticleSet` (same problem).
        truth: the ground truth, ``event``-shaped.
        reference: exact posterior samples ``(M, *event)`` or a ParticleSet of them.
        image_shape: ``(H, W)`` or ``(C, H, W)`` for flat image signals.
        level: credibility level of the ``coverage`` and ``rank_coverage`` columns.
        data_range: data range of PSNR and SSIM (default: the truth's range).
        seed: seed of the random subsets and projections.

    Returns:
        ``(table, figure)``: a ``pandas.DataFrame`` and a matplotlib ``Figure``.

    Raises:
        ValueError: no results, results with different event shapes, or a truth or reference
            whose shape does not match.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    if not results:
        raise ValueError("compare needs at least one result")
    draws = {name: _draws_of(name, result) for name, result in results.items()}
    events = {tuple(d.shape[1:]) for d in draws.values()}
    if len(events) != 1:
        raise ValueError(f"results have different event shapes: {sorted(events)}")
    event = events.pop()
    if truth is not None:
        truth = torch.as_tensor(truth).detach().cpu().double()
        if tuple(truth.shape) != event:
            raise ValueError(f"truth has shape {tuple(truth.shape)}; the results' event is {event}")
    generator = torch.Generator().manual_seed(int(seed))
    if reference is not None:
        reference = _reference_draws(reference)
        if tuple(reference.shape[1:]) != event:
            raise ValueError(
                f"reference has event shape {tuple(reference.shape[1:])}; the results' is {event}"
            )
        shuffled = reference[torch.randperm(reference.shape[0], generator=generator)]
        bandwidth = metrics._median_bandwidth(shuffled.flatten(1))
    shape = _image_shape_or_none(event, image_shape)

    rows = []
    for name, result in results.items():
        sample = draws[name]
        khat = pareto_khat(result)
        row = {
            "name": name,
            "engine": result.info.get("engine", "?"),
            "draws": sample.shape[0],
            "nfe": result.info.get("nfe", math.nan),
            "vjp": result.info.get("vjp", math.nan),
            "wall_time": result.info.get("wall_time", math.nan),
            "ess_fraction": float(result.ess().double().mean()) / result.num_draws,
            "pareto_k": float(khat.max()) if np.isfinite(khat).any() else math.nan,
            "log_evidence": _log_mean_exp(result.log_evidence),
        }
        if reference is not None:
            m = min(sample.shape[0], reference.shape[0] // 2)
            mine = sample[torch.randperm(sample.shape[0], generator=generator)[:m]]
            exact, other = shuffled[:m], shuffled[m : 2 * m]
            row["sw"] = metrics.sliced_wasserstein(mine, exact, seed=seed)
            row["sw_floor"] = metrics.sliced_wasserstein(other, exact, seed=seed)
            row["mmd"] = metrics.mmd(mine, exact, bandwidth=bandwidth)
            row["gaussian_w2"] = metrics.gaussian_w2(mine, exact)
        if truth is not None:
            mean = sample.mean(0)
            row["psnr"] = scores.psnr(mean, truth, data_range)
            if shape is not None:
                row["ssim"] = scores.ssim(mean.reshape(shape), truth.reshape(shape), data_range)
            row["coverage"] = scores.coverage(sample, truth, [level])[float(level)]
            row["rank_coverage"] = _rank_coverage(result, truth, level)
            row["crps"] = scores.crps(sample, truth)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("name")

    panels = (["truth"] if truth is not None and shape is not None else []) + (
        ["reference"] if reference is not None else []
    )
    sets = {"reference": reference, **draws} if reference is not None else dict(draws)
    columns = panels + list(draws)
    if shape is not None:
        figure, axes = plt.subplots(
            2, len(columns), figsize=(2.3 * len(columns), 4.8), squeeze=False
        )
        shown = [s.mean(0).reshape(1, -1) for s in sets.values()]
        if truth is not None:
            shown.append(truth.reshape(1, -1))
        vmin = float(torch.cat(shown, 1).min())
        vmax = float(torch.cat(shown, 1).max())
        spreads = {name: s.std(0, correction=0) for name, s in sets.items()}
        top = max(float(v.max()) for v in spreads.values()) or 1.0
        for k, name in enumerate(columns):
            if name == "truth":
                _show(axes[0, k], _to_display(truth[None], shape)[0], "truth", vmin, vmax)
                axes[1, k].set_axis_off()
                continue
            mean = _to_display(sets[name].mean(0)[None], shape)[0]
            _show(axes[0, k], mean, f"{name}\nmean", vmin, vmax)
            image = axes[1, k].imshow(
                _channel_mean(spreads[name], shape), cmap="viridis", vmin=0, vmax=top
            )
            axes[1, k].set_title(f"{name}\nstd", fontsize="small")
            axes[1, k].set_xticks([])
            axes[1, k].set_yticks([])
        figure.colorbar(image, ax=list(axes[1]), fraction=0.02, pad=0.02)
    else:
        columns = list(draws)
        figure, axes = plt.subplots(
            1, len(columns), figsize=(3.5 * len(columns), 3.5), squeeze=False
        )
        for ax, name in zip(axes[0], columns, strict=False):
            plot_projection(
                draws[name],
                reference=reference,
                reference_label="reference",
                truth=truth,
                title=name,
                ax=ax,
            )
    return table, figure


def _draws_of(name: str, result: ParticleSet) -> Tensor:
    if not isinstance(result, ParticleSet):
        raise ValueError(f"results[{name!r}] must be a ParticleSet; got {type(result).__name__}")
    return result.get_samples()[result.latent_name].detach().cpu().double()


def _rank_coverage(result: ParticleSet, truth: Tensor, level: float) -> float:
    independent = result.independent_draws()[result.latent_name].detach().cpu().double()
    if independent.shape[0] < 2:  # one draw's rank carries no information: always `level`
        return math.nan
    return scores.rank_coverage(independent, truth, [level])[float(level)]


def _log_mean_exp(log_evidence: Tensor | None) -> float:
    if log_evidence is None:
        return math.nan
    values = log_evidence.detach().double().cpu()
    return float(torch.logsumexp(values, 0) - math.log(values.numel()))
