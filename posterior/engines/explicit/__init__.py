"""Explicit-approximation engines: guidance by an approximation of :math:`p(y \\mid x_t)` built
from the Tweedie estimate (DPS, ΠGDM, MMPS, DDS) or by the observation in the SVD basis (DDRM,
SNIPS). Unweighted: every particle is one approximate posterior draw (uniform log-weights, no
evidence estimate)."""

from diffpost.posterior.engines.explicit.ddrm import DDRM
from diffpost.posterior.engines.explicit.dds import DDS
from diffpost.posterior.engines.explicit.dps import DPS
from diffpost.posterior.engines.explicit.mmps import MMPS
from diffpost.posterior.engines.explicit.pigdm import PiGDM
from diffpost.posterior.engines.explicit.snips import SNIPS

__all__ = ["DDRM", "DDS", "DPS", "MMPS", "PiGDM", "SNIPS"]
