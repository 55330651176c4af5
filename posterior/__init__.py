"""How posteriors are inferred: read a Pyro model into a :class:`Problem`, run an engine with
:func:`sample`, get a :class:`ParticleSet` back.

Example::

    result = posterior.sample(model, posterior.Exact(), num_particles=256, num_chains=4, seed=0,
                              model_kwargs={"y": y})
    tree = result.to_datatree()
"""

from diffpost.posterior.driver import draw_layout, sample
from diffpost.posterior.engines import (
    DAPS,
    DCDP,
    DDRM,
    DDS,
    DPS,
    EM,
    FPS,
    MMPS,
    PMMH,
    RSLD,
    SNIPS,
    TDS,
    BlindDPS,
    Engine,
    EngineFailed,
    Exact,
    FKSteering,
    FlowVI,
    Gibbs,
    MCGDiff,
    PiGDM,
    REDDiff,
    ScoreALD,
    SMCDiff,
)
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem

__all__ = [
    "draw_layout",
    "sample",
    "Problem",
    "ParticleSet",
    "EngineFailed",
    "Engine",
    "Exact",
    "FKSteering",
    "FPS",
    "MCGDiff",
    "SMCDiff",
    "TDS",
    "DDRM",
    "DDS",
    "DPS",
    "MMPS",
    "PiGDM",
    "SNIPS",
    "DAPS",
    "DCDP",
    "ScoreALD",
    "FlowVI",
    "REDDiff",
    "RSLD",
    "PMMH",
    "Gibbs",
    "EM",
    "BlindDPS",
]
