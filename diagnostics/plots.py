"""Plots of particle sets (matplotlib)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["plot_projection"]


def plot_projection(
    draws: Tensor,
    *,
    reference: Tensor | None = None,
    truth: Tensor | None = None,
    coordinates: tuple[int, int] = (0, 1),
    title: str | None = None,
    ax=None,
) -> Figure:
    """Scatter two coordinates of posterior draws over reference (e.g. prior) draws.

    Args:
        draws: ``(n, *event)`` posterior draws (flattened to ``(n, d)``).
        reference: ``(m, *event)`` draws shown in grey underneath, e.g. from the prior.
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
        ax.scatter(ref[:, first], ref[:, second], s=2, c="0.75", label="prior", rasterized=True)
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
