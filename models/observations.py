r"""Observation distributions that keep their forward model.

:class:`GaussianObservation` is :math:`y \sim \mathcal{N}(A(x), \sigma^2 I)` over the operator's
output shape, as a Pyro distribution that also exposes ``operator``, ``x`` and ``sigma``: the
structure that SVD-based engines (MCGDiff, FPS, SMCDiff, DDRM, Exact) read. Any other Pyro
distribution works at an observed site for the engines that only need :math:`\log p(y \mid x)`.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from diffpost.models.operators.base import Operator

__all__ = ["GaussianObservation"]


class GaussianObservation(TorchDistribution):
    r""":math:`y = A(x) + \sigma e`, :math:`e \sim \mathcal{N}(0, I)`, event shape
    ``operator.out_shape``.

    ``sigma = 0`` declares a noiseless measurement: sampling returns :math:`A(x)`, and engines
    built for it (Exact, SMCDiff, MCGDiff, DDRM) accept it, while engines that need a finite
    log-likelihood refuse it with a clear error (its ``log_prob`` raises).

    Args:
        operator: the forward model.
        x: the signal, shape ``(*batch, *operator.in_shape)``.
        sigma: noise standard deviation, non-negative: a scalar, a tensor broadcastable to
            ``operator.out_shape`` (one per measurement), or one with ``x``'s batch dims in front
            (one per particle, e.g. ``sigma[..., None]`` for a ``(N,)`` global latent); it must
            broadcast to ``(*batch, *out_shape)`` without enlarging it.
        validate_args: Pyro's validation flag.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, operator: Operator, x: Tensor, sigma: float | Tensor, validate_args=None):
        if not isinstance(operator, Operator):
            raise ValueError(
                "GaussianObservation needs a models.operators.Operator; got "
                f"{type(operator).__name__}"
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"GaussianObservation: x must be a torch.Tensor; got {type(x).__name__}"
            )
        if isinstance(sigma, (str, bytes, bool)) or sigma is None:
            raise TypeError(
                f"GaussianObservation: sigma must be a number or a tensor; got {sigma!r}"
            )
        try:
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"GaussianObservation: sigma must be a number or a tensor; got "
                f"{type(sigma).__name__} ({error})"
            ) from error
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError(f"sigma must be finite and non-negative; got {sigma.tolist()}")
        self.mean_value = operator(x)
        out_shape = tuple(operator.out_shape)
        batch_shape = self.mean_value.shape[: self.mean_value.dim() - len(out_shape)]
        full = tuple(batch_shape) + out_shape
        try:
            fits = torch.broadcast_shapes(sigma.shape, full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"sigma of shape {tuple(sigma.shape)} does not broadcast to the observation's "
                f"shape {full} (batch {tuple(batch_shape)}, output {out_shape}): give one value, "
                "one per measurement (the output shape), or one per particle with trailing "
                "singleton dims (e.g. sigma[..., None])"
            )
        self.operator = operator
        self.x = x
        self.sigma = sigma
        super().__init__(batch_shape, operator.out_shape, validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def noiseless(self) -> bool:
        """True when every noise standard deviation is zero."""
        return bool((self.sigma == 0).all())

    @property
    def mean(self) -> Tensor:
        return self.mean_value

    @property
    def variance(self) -> Tensor:
        return (self.sigma**2).expand(self.mean_value.shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussianObservation, _instance)
        new.__dict__.update(self.__dict__)
        shape = torch.Size(batch_shape) + self.event_shape
        new.mean_value = self.mean_value.expand(shape)
        TorchDistribution.__init__(
            new, torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        return new

    def rsample(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(
            shape, generator=generator, dtype=self.mean_value.dtype, device=self.mean_value.device
        )
        return self.mean_value.expand(shape) + self.sigma * noise

    def sample(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def log_prob(self, value: Tensor) -> Tensor:
        r""":math:`\log \mathcal{N}(y; A(x), \sigma^2 I)` summed over the event, shape ``batch``."""
        if (self.sigma == 0).any():
            raise ValueError(
                "a noiseless GaussianObservation (sigma = 0) has no finite log-density; use an "
                "engine built for noiseless measurements (Exact, SMCDiff, MCGDiff, DDRM)"
            )
        if self._validate_args:
            self._validate_sample(value)
        variance = (self.sigma**2).expand(self.batch_shape + self.event_shape)
        residual = value - self.mean_value
        event_dims = tuple(range(-len(self.event_shape), 0))
        quadratic = (residual**2 / variance).sum(event_dims)
        normaliser = variance.log().sum(event_dims) + math.prod(self.event_shape) * math.log(
            2 * math.pi
        )
        return -0.5 * (quadratic + normaliser)
