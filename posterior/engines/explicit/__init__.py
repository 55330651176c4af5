"""Explicit-approximation engines: guidance by an approximation of :math:`p(y \\mid x_t)` built
from the Tweedie estimate (DPS, DSG, DPPS, ΠGDM, MMPS, DDS, DiffPIR), by projections onto the
noised measurement (MCG, ScoreSDE), by the observation in the SVD basis (DDRM, SNIPS), or, for
flows, by steering the clean estimate (FlowChef, FlowDPS). Unweighted: every particle is one
approximate posterior draw (uniform log-weights, no evidence estimate)."""

from diffpost.posterior.engines.base import import_engines

#: every engine of this family, imported from its modules (an engine registers itself with
#: the class keyword ``family=``; nothing to list here)
ENGINES = import_engines(__name__, __path__)
globals().update(ENGINES)
__all__ = list(ENGINES)
