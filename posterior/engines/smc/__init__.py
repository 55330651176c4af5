"""Sequential Monte Carlo engines on one Feynman–Kac core (:mod:`posterior.engines.smc.core`)."""

from posterior.engines.smc.mcgdiff import MCGDiff

__all__ = ["MCGDiff"]
