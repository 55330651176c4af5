"""What users declare: schedules, denoisers, priors, operators, observations, ready-made problems,
the shipped priors (``zoo``), the training utility (``training``) and what learning a prior from
corrupted measurements needs (``corrupted``).

``models`` never imports ``posterior`` or ``diagnostics``. ``zoo``, ``training``, ``corrupted``,
``covariance``, ``networks``, ``patches``, ``problems`` and ``flows`` are imported on first use, so
that ``import models`` stays fast.
"""

import importlib

from diffpost.models import denoisers, densities, operators, samplers, schedules
from diffpost.models.observations import GaussianObservation
from diffpost.models.priors import DiffusionPrior, Gaussian, GaussianMixture

_LAZY_MODULES = (
    "corrupted",
    "covariance",
    "flows",
    "networks",
    "patches",
    "problems",
    "training",
    "zoo",
)

__all__ = [
    "DiffusionPrior",
    "Gaussian",
    "GaussianMixture",
    "GaussianObservation",
    "corrupted",
    "covariance",
    "densities",
    "denoisers",
    "flows",
    "networks",
    "operators",
    "patches",
    "problems",
    "samplers",
    "schedules",
    "training",
    "zoo",
]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'models' has no attribute {name!r}")
