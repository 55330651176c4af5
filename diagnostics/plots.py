"""Plots of particle sets (matplotlib).

* :func:`plot_image_grid`: truth, measurement, posterior mean, pixel-wise standard deviation,
  credible-interval width and a few posterior samples of an image problem;
* :func:`plot_traces`: ESS and running log-evidence over the steps of a run;
* :func:`plot_projection`: two coordinates of posterior draws over reference draws.

ArviZ's own plots work on :func:`diffpost.diagnostics.to_datatree` trees
(``arviz_plots.plot_trace``, ``plot_ess``, ``plot_ppc_dist`` with ``forward=``). Calibration plots
are in :mod:`diffpost.diagnostics.calibration_plots`. Every function returns the matplotlib
``Figure`` and draws into a new one (:func:`plot_projection` can also draw into given axes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from diffpost.diagnostics.scores import central_intervals
from diffpost.posterior.particles import ParticleSet

__all__ = [
    "plot_image_grid",
    "plot_traces",
    "plot_projection",
]

# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _draws(result: ParticleSet | Tensor) -> Tensor:
    """Equal-weight draws ``(S, *event)`` of the latent, as a detached CPU float64 tensor."""
    if isinstance(result, ParticleSet):
        draws = result.get_samples()[result.latent_name]
    else:
        draws = torch.as_tensor(result)
    if draws.dim() < 2 or draws.shape[0] < 1:
        raise ValueError(
            f"result must be a ParticleSet or a (S, *event) tensor of samples; got shape "
            f"{tuple(draws.shape)}"
        )
    return draws.detach().cpu().double()


def _image_shape(event: tuple[int, ...], image_shape: Sequence[int] | None) -> tuple[int, ...]:
    """The ``(H, W)`` or ``(C, H, W)`` shape in which to show a signal of shape ``event``."""
    shape = tuple(event) if image_shape is None else tuple(int(n) for n in image_shape)
    if image_shape is not None and math.prod(shape) != math.prod(event):
        raise ValueError(
            f"image_shape {shape} has {math.prod(shape)} entries; the samples have event shape "
            f"{tuple(event)} ({math.prod(event)} entries)"
        )
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        return shape
    raise ValueError(
        f"cannot show event shape {tuple(event)} as an image: need (H, W), (1, H, W) or "
        "(3, H, W); pass image_shape to reshape a flat signal"
    )


def _to_display(images: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """``(n, *anything)`` -> ``(n, H, W)`` (grey) or ``(n, H, W, 3)`` (RGB) numpy."""
    images = images.reshape((images.shape[0],) + shape)
    if len(shape) == 3:
        images = images[:, 0] if shape[0] == 1 else images.permute(0, 2, 3, 1)
    return images.numpy()


def _channel_mean(maps: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A per-pixel map of an image-shaped statistic, averaged over colour channels."""
    maps = maps.reshape(shape)
    if len(shape) == 3:
        maps = maps.mean(0)
    return maps.numpy()


def _show(ax, image: np.ndarray, title: str, vmin: float, vmax: float) -> None:
    if image.ndim == 3:  # RGB: rescale to [0, 1] with the shared range
        image = np.clip((image - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        ax.imshow(image)
    else:
        cmap = plt.get_cmap("gray").with_extremes(bad="tab:red")  # NaN: e.g. unobserved pixels
        ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_grid(
    result: ParticleSet | Tensor,
    truth: Tensor | None = None,
    measurement: Tensor | None = None,
    num_samples: int = 4,
    image_shape: Sequence[int] | None = None,
    level: float = 0.9,
) -> Figure:
    """Truth, measurement, posterior mean, pixel-wise std, credible-interval width and samples.

    The top row shows the truth and the measurement (when given), the posterior mean, the
    pixel-wise posterior standard deviation and the width of the central ``level`` credible
    interval (both with colour bars, averaged over colour channels); the bottom row shows the
    first ``num_samples`` equal-weight draws. Truth, mean and samples share one grey (or RGB)
    range.

    Args:
        result: a :class:`~diffpost.posterior.ParticleSet` (its equal-weight draws of the latent) or
            a ``(S, *event)`` tensor of samples.
        truth: the ground truth, ``event``-shaped (or any shape with as many entries).
        measurement: an image-shaped view of the measurement: a tensor with as many entries as
            the image (e.g. ``operator.adjoint(y)`` for inpainting), or any ``(h, w)`` /
            ``(C, h, w)`` image such as a low-resolution measurement. NaN entries (e.g. the
            unobserved pixels of an inpainting problem) are drawn in red.
        num_samples: number of draws shown (at most ``S``).
        image_shape: ``(H, W)`` or ``(C, H, W)`` to reshape flat signals (``C`` 1 or 3).
        level: credibility level of the interval-width map.

    Returns:
        The figure; axes titles are ``"truth"``, ``"measurement"``, ``"posterior mean"``,
        ``"posterior std"``, ``f"{level:.0%} interval width"`` and ``"sample k"``.

    Raises:
        ValueError: a shape that cannot be shown as an image, a measurement that is not
            image-shaped, ``num_samples < 0`` or ``level`` outside ``(0, 1)``.
    """
    draws = _draws(result)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer; got {num_samples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    shape = _image_shape(tuple(draws.shape[1:]), image_shape)
    num_samples = min(num_samples, draws.shape[0])

    panels: list[tuple[str, np.ndarray, str]] = []  # (title, image, kind)
    shown = [draws.mean(0)[None]]
    if truth is not None:
        truth = torch.as_tensor(truth).detach().cpu().double()
        if truth.numel() != math.prod(shape):
            raise ValueError(
                f"truth has {truth.numel()} entries; the images have {math.prod(shape)}"
            )
        panels.append(("truth", _to_display(truth[None], shape)[0], "signal"))
        shown.append(truth.reshape(1, -1))
    if measurement is not None:
        measurement = torch.as_tensor(measurement).detach().cpu().double()
        if measurement.numel() == math.prod(shape):
            view = _to_display(measurement[None], shape)[0]
        elif measurement.dim() == 2 or (measurement.dim() == 3 and measurement.shape[0] in (1, 3)):
            view = _to_display(measurement[None], tuple(measurement.shape))[0]
        else:
            raise ValueError(
                f"measurement of shape {tuple(measurement.shape)} is not an image: pass an "
                "image-shaped view, e.g. operator.adjoint(y) for a Mask"
            )
        panels.append(("measurement", view, "measurement"))
    panels.append(("posterior mean", _to_display(draws.mean(0)[None], shape)[0], "signal"))
    std = draws.std(0, correction=0) if draws.shape[0] > 1 else torch.zeros_like(draws[0])
    panels.append(("posterior std", _channel_mean(std, shape), "spread"))
    lower, upper = central_intervals(draws, [level])
    panels.append(
        (f"{level:.0%} interval width", _channel_mean(upper[0] - lower[0], shape), "spread")
    )

    signal = torch.cat([s.flatten(1) for s in shown + [draws[:num_samples]]])
    vmin, vmax = float(signal.min()), float(signal.max())
    columns = max(len(panels), num_samples)
    rows = 2 if num_samples else 1
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows), squeeze=False)
    for ax, (title, image, kind) in zip(axes[0], panels, strict=False):
        if kind == "spread":
            im = ax.imshow(image, cmap="viridis")
            ax.set_title(title, fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
            figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        elif kind == "measurement":
            _show(ax, image, title, float(np.nanmin(image)), float(np.nanmax(image)))
        else:
            _show(ax, image, title, vmin, vmax)
    samples = _to_display(draws[:num_samples], shape) if num_samples else []
    for k, image in enumerate(samples):
        _show(axes[1, k], image, f"sample {k + 1}", vmin, vmax)
    for ax in axes.flat:
        if not ax.get_title():
            figure.delaxes(ax)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------
# per-step traces
# --------------------------------------------------------------------------------------------


def plot_traces(result: ParticleSet) -> Figure:
    """ESS and running log-evidence over the steps of a run, one line per chain.

    Panels (those whose statistics the engine recorded): ``"ESS / N"`` (``stats["ess"]``
    divided by the particles per chain, with the steps that resampled marked by dots when
    ``stats["resampled"]`` exists) and ``"log-evidence"`` (cumulative sum of
    ``stats["log_evidence_increment"]``; a dashed line at the final estimate
    ``result.log_evidence`` of each chain when known).

    Args:
        result: a :class:`~diffpost.posterior.ParticleSet` of a weighted (SMC) engine.

    Returns:
        The figure, one axes per panel, x-axis ``"step"``.

    Raises:
        ValueError: the run recorded neither ``ess`` nor ``log_evidence_increment``.
    """
    stats = result.stats
    panels = [name for name in ("ess", "log_evidence_increment") if name in stats]
    if not panels:
        raise ValueError(
            f"{result.info.get('engine', 'this run')} recorded no per-step 'ess' or "
            f"'log_evidence_increment' statistics (it has {sorted(stats)}): nothing to trace"
        )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=False):
        values = stats[name].detach().cpu().double()
        steps = np.arange(1, values.shape[1] + 1)
        if name == "ess":
            values = values / result.num_draws
            ax.set_title("ESS / N", fontsize="small")
            ax.set_ylim(0, 1.05)
        else:
            values = values.cumsum(1)
            ax.set_title("log-evidence", fontsize="small")
        for chain, line in enumerate(values.numpy()):
            (drawn,) = ax.plot(steps, line, lw=1, label=f"chain {chain}")
            if name == "ess" and "resampled" in stats:
                flags = stats["resampled"][chain].detach().cpu().bool().numpy()
                ax.plot(steps[flags], line[flags], ".", color=drawn.get_color(), ms=4)
            if name != "ess" and result.log_evidence is not None:
                final = float(result.log_evidence[chain])
                ax.axhline(final, color=drawn.get_color(), ls="--", lw=0.8)
        ax.set_xlabel("step")
        if values.shape[0] <= 8:
            ax.legend(fontsize="x-small")
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------
# scatter of two coordinates
# --------------------------------------------------------------------------------------------


def plot_projection(
    draws: Tensor,
    *,
    reference: Tensor | None = None,
    reference_label: str = "prior",
    truth: Tensor | None = None,
    coordinates: tuple[int, int] = (0, 1),
    title: str | None = None,
    ax=None,
) -> Figure:
    """Scatter two coordinates of posterior draws over reference (e.g. prior) draws.

    Args:
        draws: ``(n, *event)`` posterior draws (flattened to ``(n, d)``).
        reference: ``(m, *event)`` draws shown in grey underneath, e.g. from the prior.
        reference_label: their legend label.
        truth: ``event``-shaped ground truth, shown as a star.
        coordinates: the two flat coordinates to show.
        title: axes title.
        ax: axes to draw into (a new figure when ``None``).

    Returns:
        The figure.
    """
    first, second = coordinates
    if ax is None:
        figure, ax = plt.subplots(figsize=(5, 5))
    else:
        figure = ax.figure
    flat = draws.detach().flatten(1).cpu().double()
    if reference is not None:
        ref = reference.detach().flatten(1).cpu().double()
        ax.scatter(
            ref[:, first], ref[:, second], s=2, c="0.75", label=reference_label, rasterized=True
        )
    ax.scatter(
        flat[:, first],
        flat[:, second],
        s=3,
        alpha=0.5,
        c="tab:blue",
        label="posterior",
        rasterized=True,
    )
    if truth is not None:
        point = torch.as_tensor(truth).detach().flatten().cpu().double()
        ax.scatter(
            [point[first]],
            [point[second]],
            marker="*",
            s=200,
            c="tab:red",
            edgecolors="k",
            label="truth",
        )
    ax.set_xlabel(f"x[{first}]")
    ax.set_ylabel(f"x[{second}]")
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title, fontsize="small")
    return figure
