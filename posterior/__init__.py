"""How posteriors are inferred: read a Pyro model into a :class:`Problem`, run an engine with
:func:`sample`, get a :class:`ParticleSet` back.

Example::

    result = posterior.sample(model, posterior.Exact(), num_particles=256, num_chains=4, seed=0,
                              model_kwargs={"y": y})
    tree = result.to_datatree()
"""

from diffpost.posterior.driver import draw_layout, sample
from diffpost.posterior.engines import ENGINES, Engine, EngineFailed, EngineState, registry
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem

globals().update(ENGINES)

__all__ = [
    "draw_layout",
    "sample",
    "registry",
    "Problem",
    "ParticleSet",
    "EngineFailed",
    "Engine",
    "EngineState",
    *ENGINES,
]
