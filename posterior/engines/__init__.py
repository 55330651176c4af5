"""Inference engines: one file per algorithm, grouped by family."""

from posterior.engines.base import Engine, EngineFailed
from posterior.engines.exact import Exact

__all__ = ["Engine", "EngineFailed", "Exact"]
