"""Variational engines: sampling turned into optimisation (RED-diff, RSLD, normalising-flow VI)
(their diffusion log-density estimates are in :mod:`diffpost.models.densities`)."""

from diffpost.posterior.engines.base import import_engines

#: every engine of this family, imported from its modules (an engine registers itself with
#: the class keyword ``family=``; nothing to list here)
ENGINES = import_engines(__name__, __path__)
globals().update(ENGINES)
__all__ = list(ENGINES)
