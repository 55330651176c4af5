"""Decoupled and Langevin engines: data consistency separated from the reverse diffusion.

- :class:`ScoreALD` — annealed Langevin dynamics with an annealed likelihood (Jalal et al. 2021);
- :class:`DAPS` — decoupled annealing posterior sampling (Zhang et al. 2025);
- :class:`DCDP` — decoupled data consistency with diffusion purification (Li et al. 2024).

They need :math:`\\nabla_x \\log p(y \\mid x)` but no vector-Jacobian product through the denoiser,
so they work with any differentiable likelihood (non-linear operators, Poisson, ...).
"""

from diffpost.posterior.engines.langevin.daps import DAPS
from diffpost.posterior.engines.langevin.dcdp import DCDP
from diffpost.posterior.engines.langevin.score_ald import ScoreALD

__all__ = ["DAPS", "DCDP", "ScoreALD"]
