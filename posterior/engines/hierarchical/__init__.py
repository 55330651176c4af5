"""Hierarchical and blind models: engines that infer the global latents (noise levels, operator
parameters) with the signal, each built around an engine of the signal."""

from diffpost.posterior.engines.hierarchical.blind_dps import BlindDPS
from diffpost.posterior.engines.hierarchical.em import EM
from diffpost.posterior.engines.hierarchical.gibbs import Gibbs
from diffpost.posterior.engines.hierarchical.pmmh import PMMH

__all__ = ["BlindDPS", "EM", "Gibbs", "PMMH"]
