"""What users declare: schedules, denoisers, priors, operators, observations, ready-made problems.

``models`` never imports ``posterior`` or ``diagnostics``.
"""

from models import denoisers, operators, samplers, schedules
from models.observations import GaussianObservation
from models.priors import DiffusionPrior, Gaussian, GaussianMixture

__all__ = [
    "DiffusionPrior",
    "Gaussian",
    "GaussianMixture",
    "GaussianObservation",
    "denoisers",
    "operators",
    "samplers",
    "schedules",
]
