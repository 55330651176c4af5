"""Hierarchical and blind models: engines that infer the global latents (noise levels, operator
parameters) with the signal, each built around an engine of the signal."""

from diffpost.posterior.engines.base import import_engines

#: every engine of this family, imported from its modules (an engine registers itself with
#: the class keyword ``family=``; nothing to list here)
ENGINES = import_engines(__name__, __path__)
globals().update(ENGINES)
__all__ = list(ENGINES)
