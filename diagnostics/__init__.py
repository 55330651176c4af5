"""What is learned from a run: DataTree conversion (ArviZ 1.x layout), sample distances, scores
against a truth, calibration studies, engine comparisons and plots.

``import diagnostics`` stays light: only the torch-based metrics and scores load with it; the
DataTree functions (``arviz_base``, ``xarray``), calibration studies (``pyro``, the driver),
comparisons and plots (``matplotlib``) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffpost.diagnostics.metrics import (
    gaussian_w2,
    max_sliced_wasserstein,
    mmd,
    sliced_wasserstein,
)
from diffpost.diagnostics.scores import (
    central_intervals,
    coverage,
    crps,
    psnr,
    rank_coverage,
    ssim,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffpost.diagnostics.calibration import (
        CalibrationStudy,
        calibration_study,
        rank_uniformity_test,
    )
    from diffpost.diagnostics.calibration_plots import plot_calibration, plot_rank_histograms
    from diffpost.diagnostics.comparison import compare
    from diffpost.diagnostics.convert import load_datatree, save_datatree, to_datatree
    from diffpost.diagnostics.plots import plot_image_grid, plot_projection, plot_traces
    from diffpost.diagnostics.reference import ReferenceNotConverged, nuts_reference
    from diffpost.diagnostics.simulation import prior_predictive
    from diffpost.diagnostics.weights import pareto_khat

__all__ = [
    "to_datatree",
    "save_datatree",
    "load_datatree",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "gaussian_w2",
    "mmd",
    "psnr",
    "ssim",
    "coverage",
    "rank_coverage",
    "central_intervals",
    "crps",
    "pareto_khat",
    "calibration_study",
    "CalibrationStudy",
    "prior_predictive",
    "rank_uniformity_test",
    "compare",
    "nuts_reference",
    "ReferenceNotConverged",
    "plot_image_grid",
    "plot_traces",
    "plot_calibration",
    "plot_rank_histograms",
    "plot_projection",
]

_LAZY = {
    "to_datatree": "diffpost.diagnostics.convert",
    "save_datatree": "diffpost.diagnostics.convert",
    "load_datatree": "diffpost.diagnostics.convert",
    "pareto_khat": "diffpost.diagnostics.weights",
    "calibration_study": "diffpost.diagnostics.calibration",
    "CalibrationStudy": "diffpost.diagnostics.calibration",
    "prior_predictive": "diffpost.diagnostics.simulation",
    "rank_uniformity_test": "diffpost.diagnostics.calibration",
    "compare": "diffpost.diagnostics.comparison",
    "nuts_reference": "diffpost.diagnostics.reference",
    "ReferenceNotConverged": "diffpost.diagnostics.reference",
    "plot_image_grid": "diffpost.diagnostics.plots",
    "plot_traces": "diffpost.diagnostics.plots",
    "plot_calibration": "diffpost.diagnostics.calibration_plots",
    "plot_rank_histograms": "diffpost.diagnostics.calibration_plots",
    "plot_projection": "diffpost.diagnostics.plots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
