"""Inference engines: one file per algorithm, grouped by family."""

from posterior.engines.base import Engine, EngineFailed
from posterior.engines.exact import Exact
from posterior.engines.explicit import DDRM, DDS, DPS, MMPS, SNIPS, PiGDM
from posterior.engines.langevin import DAPS, DCDP, ScoreALD
from posterior.engines.smc import FPS, TDS, FKSteering, MCGDiff, SMCDiff
from posterior.engines.variational import RSLD, FlowVI, REDDiff

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
]
