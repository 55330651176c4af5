"""Small helpers shared by the engine tests."""

import pyro

from models import GaussianObservation


def gaussian_model(prior, operator, sigma):
    """The Pyro model ``x ~ prior``, ``y ~ GaussianObservation(operator, x, sigma)``."""

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    return model
