"""How posteriors are inferred: read a Pyro model into a :class:`Problem`, run an engine with
:func:`sample`, get a :class:`ParticleSet` back.

Example::

    result = posterior.sample(model, posterior.Exact(), num_particles=256, num_chains=4, seed=0,
                              model_kwargs={"y": y})
    tree = result.to_datatree()
"""

from diffpost.posterior.amortized import APS, AmortizedPosterior
from diffpost.posterior.davi import DAVI
from diffpost.posterior.driver import draw_layout, sample
from diffpost.posterior.engines import ENGINES, Engine, EngineFailed, EngineState, registry
from diffpost.posterior.learning import EMResult, learn_prior
from diffpost.posterior.many import sample_many
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem
from diffpost.posterior.sharding import Sharding
from diffpost.posterior.tasks import RunsFailed

globals().update(ENGINES)

__all__ = [
    "draw_layout",
    "sample",
    "sample_many",
    "learn_prior",
    "EMResult",
    "registry",
    "Problem",
    "Sharding",
    "ParticleSet",
    "EngineFailed",
    "RunsFailed",
    "Engine",
    "EngineState",
    "APS",
    "AmortizedPosterior",
    "DAVI",
    *ENGINES,
]
