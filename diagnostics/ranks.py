r"""Rank statistics of simulation-based calibration: the scalar summaries of a study, the rank of
the truth among posterior draws, and the chi-square test of their uniformity (see
:mod:`diffpost.diagnostics.calibration`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SUMMARIES", "rank_uniformity_test", "ranks_of_truth", "Summaries", "check_summaries"]

#: the summaries a study can use, in the order their columns appear
SUMMARIES = ("coordinates", "projections", "log_likelihood", "tarp")


def rank_uniformity_test(ranks: Tensor, num_draws: int, num_bins: int) -> Tensor:
    r"""Chi-square p-values of the uniformity of ranks on :math:`\{0, \dots, L\}`, per column.

    Rank :math:`r` falls in bin :math:`\lfloor r B / (L + 1) \rfloor`, whose probability under
    the uniform is its number of ranks over :math:`L + 1` (exactly :math:`1/B` when :math:`B`
    divides :math:`L + 1`). Pearson's statistic
    :math:`X^2 = \sum_b (O_b - T p_b)^2 / (T p_b)` has :math:`B - 1` degrees of freedom; the
    p-value is the regularised upper incomplete gamma :math:`Q((B-1)/2, X^2/2)`. The chi-square
    approximation wants :math:`T p_b \gtrsim 5`.

    Args:
        ranks: ``(T, K)`` integer ranks in ``[0, L]``.
        num_draws: :math:`L`.
        num_bins: :math:`B`, between 2 and :math:`L + 1`.

    Returns:
        ``(K,)`` float64 p-values.
    """
    if not 2 <= num_bins <= num_draws + 1:
        raise ValueError(
            f"num_bins must be in [2, num_draws + 1 = {num_draws + 1}]; got {num_bins}"
        )
    ranks = ranks.long().cpu()
    if ranks.dim() != 2 or (ranks < 0).any() or (ranks > num_draws).any():
        raise ValueError(f"ranks must be a (T, K) integer tensor with values in [0, {num_draws}]")
    trials = ranks.shape[0]
    bins = ranks * num_bins // (num_draws + 1)  # (T, K)
    counts = torch.zeros(num_bins, ranks.shape[1], dtype=torch.float64)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
    per_bin = torch.bincount(torch.arange(num_draws + 1) * num_bins // (num_draws + 1))
    expected = trials * per_bin.double()[:, None] / (num_draws + 1)
    statistic = ((counts - expected) ** 2 / expected).sum(0)
    dof = torch.tensor((num_bins - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2)


def ranks_of_truth(values: Tensor, truth: Tensor, generator: torch.Generator) -> Tensor:
    """Draws strictly below the truth plus a uniform share of the ties, ``(L, K), (K,) -> (K,)``."""
    below = (values < truth).sum(0)
    ties = (values == truth).sum(0)
    if bool(ties.any()):
        uniform = torch.rand(ties.shape, generator=generator, dtype=torch.float64)
        below = below + (uniform * (ties.cpu() + 1)).floor().long().to(below.device)
    return below


def check_summaries(summaries: Sequence[str] | None) -> list[str] | None:
    """The requested summaries in :data:`SUMMARIES` order (``None`` stays ``None``)."""
    if summaries is None:
        return None
    if isinstance(summaries, str):
        summaries = [summaries]
    unknown = sorted(set(summaries) - set(SUMMARIES))
    if unknown or not summaries:
        raise ValueError(
            f"summaries must be a non-empty subset of {SUMMARIES}; got {list(summaries)}"
        )
    return [s for s in SUMMARIES if s in summaries]


@dataclass
class Summaries:
    """The scalar summaries :math:`f_k` of a study, evaluated on draws and truth of one trial.

    Attributes:
        used: the kinds in use, in :data:`SUMMARIES` order.
        coordinates: flat indices ranked by ``"coordinates"``.
        directions: ``(d, P)`` unit vectors of ``"projections"``.
        low, scale: TARP's per-coordinate normalisation ``(x - low) / scale`` (``(d,)`` each).
        references: ``(T, d)`` TARP reference points in the normalised unit box.
    """

    used: list[str]
    coordinates: list[int]
    directions: Tensor | None = None
    low: Tensor | None = None
    scale: Tensor | None = None
    references: Tensor | None = None

    @classmethod
    def build(
        cls,
        used: list[str],
        truths: Tensor,
        coordinates: Sequence[int] | None,
        num_projections: int,
        generator: torch.Generator,
    ) -> Summaries:
        """Draw the directions and reference points for flat truths ``(T, d)``."""
        num_trials, dim = truths.shape
        coordinates = list(range(dim)) if coordinates is None else [int(i) for i in coordinates]
        if "coordinates" in used and (
            not coordinates or min(coordinates) < 0 or max(coordinates) >= dim
        ):
            raise ValueError(
                f"coordinates must be non-empty flat indices in [0, {dim}); got {coordinates}"
            )
        summaries = cls(used, coordinates)
        if "projections" in used:
            theta = torch.randn(dim, num_projections, generator=generator, dtype=torch.float64)
            theta = theta / theta.norm(dim=0, keepdim=True)
            summaries.directions = theta.to(device=truths.device, dtype=truths.dtype)
        if "tarp" in used:
            summaries.low = truths.min(0).values
            summaries.scale = truths.max(0).values - summaries.low + 1e-10  # as the tarp code
            references = torch.rand(num_trials, dim, generator=generator, dtype=torch.float64)
            summaries.references = references.to(device=truths.device, dtype=truths.dtype)
        return summaries

    def columns(self) -> tuple[list[str], list[str]]:
        """``(names, kinds)`` of the summaries, one entry per column."""
        names, kinds = [], []
        if "coordinates" in self.used:
            names += [f"x[{i}]" for i in self.coordinates]
            kinds += ["coordinates"] * len(self.coordinates)
        if self.directions is not None:
            names += [f"projection[{j}]" for j in range(self.directions.shape[1])]
            kinds += ["projections"] * self.directions.shape[1]
        for kind in ("log_likelihood", "tarp"):
            if kind in self.used:
                names.append(kind)
                kinds.append(kind)
        return names, kinds

    def __call__(
        self,
        draws: Tensor,
        truth: Tensor,
        trial: int,
        log_likelihood: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(values, target)``: the summaries of the flat draws ``(L, d)``, ``(L, K)``, and of
        the flat truth ``(d,)``, ``(K,)``. ``log_likelihood`` maps flat signals to
        :math:`\log p(y_i \mid x)`."""
        both = torch.cat([draws, truth[None]])  # the truth is the last row
        values = []
        if "coordinates" in self.used:
            values.append(both[:, self.coordinates])
        if self.directions is not None:
            values.append(both @ self.directions)
        if "log_likelihood" in self.used:
            values.append(log_likelihood(both)[:, None])
        if self.references is not None:
            normalised = (both - self.low) / self.scale
            values.append((normalised - self.references[trial]).norm(dim=1, keepdim=True))
        values = torch.cat(values, dim=1)
        return values[:-1], values[-1]
