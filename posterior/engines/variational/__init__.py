"""Variational engines: sampling turned into optimisation (RED-diff, RSLD, normalising-flow VI),
and the diffusion log-density estimates they share
(:mod:`diffpost.posterior.engines.variational.common`)."""

from diffpost.posterior.engines.variational.common import diffusion_elbo, probability_flow_log_prob
from diffpost.posterior.engines.variational.flow_vi import FlowVI
from diffpost.posterior.engines.variational.red_diff import REDDiff
from diffpost.posterior.engines.variational.rsld import RSLD

__all__ = ["FlowVI", "REDDiff", "RSLD", "diffusion_elbo", "probability_flow_log_prob"]
