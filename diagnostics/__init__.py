"""What is learned from a run: DataTree conversion (ArviZ 1.x layout), sample distances, scores
against a truth, calibration studies, engine comparisons and plots.

``import diagnostics`` stays light: only the torch-based metrics and scores load with it; the
DataTree functions (``arviz_base``, ``xarray``), calibration studies (``pyro``, the driver),
comparisons and plots (``matplotlib``) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diagnostics.metrics import gaussian_w2, max_sliced_wasserstein, mmd, sliced_wasserstein
from diagnostics.scores import central_intervals, coverage, crps, psnr, ssim

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.calibration import CalibrationStudy, calibration_study, rank_uniformity_test
    from diagnostics.comparison import compare
    from diagnostics.convert import load_datatree, save_datatree, to_datatree
    from diagnostics.calibration_plots import plot_calibration, plot_rank_histograms
    from diagnostics.plots import plot_image_grid, plot_projection, plot_traces
    from diagnostics.simulation import prior_predictive
    from diagnostics.weights import pareto_khat

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
    "central_intervals",
    "crps",
    "pareto_khat",
    "calibration_study",
    "CalibrationStudy",
    "prior_predictive",
    "rank_uniformity_test",
    "compare",
    "plot_image_grid",
    "plot_traces",
    "plot_calibration",
    "plot_rank_histograms",
    "plot_projection",
]

_LAZY = {
    "to_datatree": "diagnostics.convert",
    "save_datatree": "diagnostics.convert",
    "load_datatree": "diagnostics.convert",
    "pareto_khat": "diagnostics.weights",
    "calibration_study": "diagnostics.calibration",
    "CalibrationStudy": "diagnostics.calibration",
    "prior_predictive": "diagnostics.simulation",
    "rank_uniformity_test": "diagnostics.calibration",
    "compare": "diagnostics.comparison",
    "plot_image_grid": "diagnostics.plots",
    "plot_traces": "diagnostics.plots",
    "plot_calibration": "diagnostics.calibration_plots",
    "plot_rank_histograms": "diagnostics.calibration_plots",
    "plot_projection": "diagnostics.plots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
