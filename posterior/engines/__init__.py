"""Inference engines: one file per algorithm, grouped by family."""

from posterior.engines.base import Engine, EngineFailed
from posterior.engines.exact import Exact
from posterior.engines.smc import FPS, TDS, FKSteering, MCGDiff, SMCDiff

__all__ = ["Engine", "EngineFailed", "Exact", "FKSteering", "FPS", "MCGDiff", "SMCDiff", "TDS"]
