"""Decoupled and Langevin engines: data consistency separated from the reverse diffusion.

- :class:`ScoreALD` — annealed Langevin dynamics with an annealed likelihood (Jalal et al. 2021);
- :class:`DAPS` — decoupled annealing posterior sampling (Zhang et al. 2025);
- :class:`DCDP` — decoupled data consistency with diffusion purification (Li et al. 2024).

They need :math:`\\nabla_x \\log p(y \\mid x)` but no vector-Jacobian product through the denoiser,
so they work with any differentiable likelihood (non-linear operators, Poisson, ...).
"""

from diffpost.posterior.engines.base import import_engines

#: every engine of this family, imported from its modules (an engine registers itself with
#: the class keyword ``family=``; nothing to list here)
ENGINES = import_engines(__name__, __path__)
globals().update(ENGINES)
__all__ = list(ENGINES)
