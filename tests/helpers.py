"""Small helpers shared by the engine tests."""

import pyro

from diffpost.models import GaussianObservation
from diffpost.models.schedules import EDM, VE, VP, DiscreteVP, RectifiedFlow, Schedule


def gaussian_model(prior, operator, sigma):
    """The Pyro model ``x ~ prior``, ``y ~ GaussianObservation(operator, x, sigma)``."""

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    return model


def all_schedules() -> dict[str, Schedule]:
    """One fresh instance of every schedule family, by name."""
    return {
        "vp_linear": VP("linear"),
        "vp_cosine": VP("cosine"),
        "discrete_linear": DiscreteVP.linear(),
        "ve": VE(),
        "edm": EDM(),
        "rectified_flow": RectifiedFlow(),
    }
