"""Inference engines: one file per algorithm, grouped by family.

Every engine registers itself with the class keyword ``family=`` (``class MCGDiff(SMCEngine,
family="smc")``); :func:`registry` lists them, and this package, its family packages and
:mod:`diffpost.posterior` export them by name. Adding an engine is adding its file.
"""

from diffpost.posterior.engines.base import (
    FAMILIES,
    Engine,
    EngineFailed,
    EngineState,
    import_engines,
    registry,
)

import_engines(__name__, __path__)
#: every registered engine, name -> class (:func:`registry` order)
ENGINES = registry()
globals().update(ENGINES)

__all__ = ["FAMILIES", "Engine", "EngineFailed", "EngineState", "registry", *ENGINES]
