"""Sequential Monte Carlo engines on one Feynman–Kac core
(:mod:`diffpost.posterior.engines.smc.core`)."""

from diffpost.posterior.engines.base import import_engines

#: every engine of this family, imported from its modules (an engine registers itself with
#: the class keyword ``family=``; nothing to list here)
ENGINES = import_engines(__name__, __path__)
globals().update(ENGINES)
__all__ = list(ENGINES)
