r"""Resampling schemes and weight helpers, vectorised over chains.

Every resampler has the signature ``resample(log_weights, generator) -> ancestors`` with
``log_weights`` of shape ``(chains, N)`` (normalised or not) and ``ancestors`` a ``long`` tensor
``(chains, N)`` of indices into each chain's particles. All are unbiased: the expected number of
copies of particle ``i`` is ``N W_i``.

References:
    Douc, Cappé, Moulines. Comparison of resampling schemes for particle filtering. ISPA 2005.
    Chopin, Papaspiliopoulos. An Introduction to Sequential Monte Carlo. Springer 2020, ch. 9.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "normalize_log_weights",
    "ess",
    "multinomial",
    "systematic",
    "stratified",
    "residual",
    "RESAMPLERS",
]


def normalize_log_weights(log_weights: Tensor) -> Tensor:
    """Subtract the per-chain ``logsumexp`` so that ``exp`` sums to one over the last dim."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def ess(log_weights: Tensor) -> Tensor:
    r"""Effective sample size :math:`1 / \sum_i W_i^2` per chain, ``(chains, N) -> (chains,)``.

    Computed in log space, :math:`\exp(2\,\mathrm{lse}(\ell) - \mathrm{lse}(2\ell))`, so
    unnormalised log-weights are fine.
    """
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def _weights(log_weights: Tensor) -> Tensor:
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be (chains, N); got shape {tuple(log_weights.shape)}")
    if torch.isnan(log_weights).any():
        raise ValueError("log_weights contain NaN")
    return normalize_log_weights(log_weights).exp()


def _inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Indices ``i`` with ``cumsum(W)[i-1] <= u < cumsum(W)[i]`` for sorted ``u`` in [0, 1)."""
    cumulative = weights.cumsum(-1)
    cumulative = cumulative / cumulative[..., -1:]
    return torch.searchsorted(cumulative, uniforms, right=True).clamp(max=weights.shape[-1] - 1)


def multinomial(log_weights: Tensor, generator: torch.Generator) -> Tensor:
    """``N`` independent draws from ``Categorical(W)`` per chain."""
    weights = _weights(log_weights)
    return torch.multinomial(weights, weights.shape[-1], replacement=True, generator=generator)


def systematic(log_weights: Tensor, generator: torch.Generator) -> Tensor:
    """One uniform ``u`` per chain, points ``(u + i) / N``."""
    weights = _weights(log_weights)
    chains, n = weights.shape
    offset = torch.rand(chains, 1, generator=generator, device=weights.device, dtype=weights.dtype)
    grid = torch.arange(n, device=weights.device, dtype=weights.dtype)
    return _inverse_cdf(weights, (grid + offset) / n)


def stratified(log_weights: Tensor, generator: torch.Generator) -> Tensor:
    """One uniform per stratum, points ``(u_i + i) / N``."""
    weights = _weights(log_weights)
    chains, n = weights.shape
    offsets = torch.rand(chains, n, generator=generator, device=weights.device, dtype=weights.dtype)
    grid = torch.arange(n, device=weights.device, dtype=weights.dtype)
    return _inverse_cdf(weights, (grid + offsets) / n)


def residual(log_weights: Tensor, generator: torch.Generator) -> Tensor:
    """``floor(N W_i)`` deterministic copies, the remaining slots multinomial on the residuals."""
    weights = _weights(log_weights)
    chains, n = weights.shape
    copies = torch.floor(n * weights).long()
    remainder = n - copies.sum(-1)  # (chains,)
    residual_weights = (n * weights - copies).clamp_min(0)
    # chains with no remainder get a dummy uniform row (never used: its slots are all taken)
    residual_weights = torch.where(
        remainder[:, None] > 0, residual_weights, torch.ones_like(residual_weights)
    )
    extra = torch.multinomial(residual_weights, n, replacement=True, generator=generator)
    index = torch.arange(n, device=weights.device).expand(chains, n)
    deterministic = torch.repeat_interleave(index.flatten(), copies.flatten())
    counts = copies.sum(-1)
    ancestors = torch.empty(chains, n, dtype=torch.long, device=weights.device)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(n, device=weights.device).expand(chains, n)
    from_copies = positions < counts[:, None]
    copy_index = (starts[:, None] + positions).clamp(max=max(deterministic.numel() - 1, 0))
    if deterministic.numel():
        ancestors = torch.where(from_copies, deterministic[copy_index], extra)
    else:
        ancestors = extra
    return ancestors


RESAMPLERS = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
}


def log_mean_weight(log_weights: Tensor) -> Tensor:
    """``log(mean(exp(log_weights)))`` per chain: the evidence increment of incremental weights."""
    return torch.logsumexp(log_weights, -1) - math.log(log_weights.shape[-1])
