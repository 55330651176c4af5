"""Sequential Monte Carlo engines on one Feynman–Kac core
(:mod:`diffpost.posterior.engines.smc.core`)."""

from diffpost.posterior.engines.smc.fk_steering import FKSteering
from diffpost.posterior.engines.smc.fps import FPS
from diffpost.posterior.engines.smc.mcgdiff import MCGDiff
from diffpost.posterior.engines.smc.smcdiff import SMCDiff
from diffpost.posterior.engines.smc.tds import TDS

__all__ = ["FKSteering", "FPS", "MCGDiff", "SMCDiff", "TDS"]
