"""Sequential Monte Carlo engines on one Feynman–Kac core (:mod:`posterior.engines.smc.core`)."""

from posterior.engines.smc.fk_steering import FKSteering
from posterior.engines.smc.fps import FPS
from posterior.engines.smc.mcgdiff import MCGDiff
from posterior.engines.smc.smcdiff import SMCDiff
from posterior.engines.smc.tds import TDS

__all__ = ["FKSteering", "FPS", "MCGDiff", "SMCDiff", "TDS"]
