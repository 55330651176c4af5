"""Inference engines: one file per algorithm, grouped by family."""

from diffpost.posterior.engines.base import Engine, EngineFailed
from diffpost.posterior.engines.exact import Exact
from diffpost.posterior.engines.explicit import DDRM, DDS, DPS, MMPS, SNIPS, PiGDM
from diffpost.posterior.engines.hierarchical import EM, PMMH, BlindDPS, Gibbs
from diffpost.posterior.engines.langevin import DAPS, DCDP, ScoreALD
from diffpost.posterior.engines.smc import FPS, TDS, FKSteering, MCGDiff, SMCDiff
from diffpost.posterior.engines.variational import RSLD, FlowVI, REDDiff

__all__ = [
    "Engine",
    "EngineFailed",
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
