r"""Learning a prior from corrupted measurements only: the data set and the M-steps.

A data set of measurements :math:`y_i = A_i x_i + \sigma e_i` of signals nobody observed clean
(:class:`Measurements`; per-measurement operators such as a random mask per image) is what
:func:`diffpost.posterior.learn_prior` fits a prior to by Monte Carlo expectation-maximisation
(Rozet et al. 2024): each round samples every measurement's posterior under the current prior
with an engine (E-step), then refits the prior to those draws (M-step). The M-steps are here:

- :class:`FitMixture`: maximum likelihood in the Gaussian-mixture family
  (:func:`~diffpost.models.training.fit_gaussian_mixture`), which makes the loop checkable
  against closed forms (the Exact engine samples the E-step);
- :class:`TrainNetwork`: denoising score matching (:func:`~diffpost.models.training.train`) on
  the E-step's draws, warm-started from the previous round's network, as in the paper.

Training without posterior sampling: :class:`AmbientLoss` (Daras et al. 2023) learns from masked
images directly, for :func:`~diffpost.models.training.train`, and :class:`AmbientDenoiser` turns
the network into a denoiser for the engines.

References:
    Rozet, Andry, Lanusse, Louppe. Learning Diffusion Priors from Observations by Expectation
    Maximization. NeurIPS 2024. arXiv:2405.13712 (github.com/francois-rozet/diffusion-priors).
    Daras, Shah, Dagan, Gollakota, Dimakis, Klivans. Ambient Diffusion: Learning Clean
    Distributions from Corrupted Data. NeurIPS 2023. arXiv:2305.19256.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import Denoiser
from diffpost.models.operators.base import LinearOperator
from diffpost.models.operators.compose import PerProblem
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.models.training import diffused, fit_gaussian_mixture, train

__all__ = ["Measurements", "FitMixture", "TrainNetwork", "AmbientLoss", "AmbientDenoiser"]


class Measurements(NamedTuple):
    r"""A data set of linear Gaussian measurements :math:`y_i = A_i x_i + \sigma e_i`.

    Attributes:
        y: the measurements, shape ``(M, *out_shape)``.
        operator: one :class:`~diffpost.models.operators.LinearOperator` shared by all of them,
            or a :class:`~diffpost.models.operators.PerProblem` of ``M`` linear operators (one
            per measurement, e.g. ``PerProblem([Diagonal(mask) for mask in masks])``).
        sigma: the noise standard deviation (a positive number).
    """

    y: Tensor
    operator: LinearOperator
    sigma: float

    @property
    def count(self) -> int:
        """The number of measurements ``M``."""
        return self.y.shape[0]

    def select(self, start: int, stop: int) -> Measurements:
        """Measurements ``start .. stop - 1`` (their own operators for a ``PerProblem``)."""
        operator = self.operator
        if isinstance(operator, PerProblem):
            operator = PerProblem(operator.operators[start:stop])
        return Measurements(self.y[start:stop], operator, self.sigma)


@dataclass(frozen=True)
class FitMixture:
    """M-step: the maximum-likelihood Gaussian mixture of the E-step's draws
    (:func:`~diffpost.models.training.fit_gaussian_mixture`, full covariances), with the
    previous prior's schedule. EM iterations start from the previous prior when it is a mixture
    of as many components (k-means otherwise): restarting each round from k-means lets the
    stochastic E-step's noise flip the fit between local optima (measured: two components
    merged at round 11 of a 3-component problem, and the fit jumped back and forth after).

    Args:
        components: number of components ``K`` (1 gives a Gaussian).
        regularisation: added to every covariance's diagonal.
        iterations: EM iterations of the fit.
    """

    components: int = 1
    regularisation: float = 1e-2
    iterations: int = 200

    def __call__(self, prior, samples: Tensor, *, seed: int, checkpoint: Path | None):
        return fit_gaussian_mixture(
            samples,
            self.components,
            schedule=getattr(prior, "schedule", None),
            regularisation=self.regularisation,
            iterations=self.iterations,
            seed=seed % 2**31,
            initial=prior
            if isinstance(prior, GaussianMixture) and prior.means.shape[0] == self.components
            else None,
        )

    def state(self, prior: GaussianMixture) -> dict:
        return {
            "weights": prior.weights,
            "means": prior.means,
            "covariances": prior.covariances,
            "event_shape": tuple(prior.event_shape),
        }

    def load(self, state: dict, like) -> GaussianMixture:
        return GaussianMixture(
            state["weights"],
            state["means"],
            state["covariances"],
            getattr(like, "schedule", None),
            event_shape=state["event_shape"],
        )


@dataclass(frozen=True)
class TrainNetwork:
    """M-step: denoising score matching of a network on the E-step's draws
    (:func:`~diffpost.models.training.train`), warm-started from the previous round's weights
    (from ``denoiser``'s own weights when the previous prior's network has another
    architecture, e.g. the Gaussian of the first rounds), with a
    fresh optimiser and learning-rate schedule each round. The new prior is the EMA network in a
    :class:`~diffpost.models.priors.DiffusionPrior` with ``sampler`` and ``sampler_steps``.

    Args:
        denoiser: the network adapter to train (e.g. ``VDenoiser(UNet(...), VP("cosine"))``);
            never modified (each round trains a copy).
        num_steps: optimiser steps per round.
        batch_size, learning_rate, warmup_steps, ema_decay: as for
            :func:`~diffpost.models.training.train`.
        sampler, sampler_steps: the returned prior's unconditional sampler.
    """

    denoiser: Denoiser
    num_steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    sampler: str = "ddpm"
    sampler_steps: int | None = None

    def __post_init__(self):
        if not hasattr(self.denoiser, "network_target"):
            raise ValueError(
                "TrainNetwork needs a network adapter from models.denoisers (VDenoiser, "
                f"EpsilonDenoiser, ...); got {type(self.denoiser).__name__}"
            )
        for name in ("num_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainNetwork: {name} must be a positive integer; got {value!r}")

    def _start(self, prior) -> Denoiser:
        """A copy of ``denoiser``, with the previous prior's weights when its network has the
        same architecture (same adapter type, parameter names and shapes)."""
        network = copy.deepcopy(self.denoiser)
        previous = getattr(prior, "denoiser", None)
        if type(previous) is type(network):
            mine, theirs = network.state_dict(), previous.state_dict()
            if mine.keys() == theirs.keys() and all(
                mine[key].shape == theirs[key].shape for key in mine
            ):
                network.load_state_dict(theirs)
        return network.requires_grad_(True)

    def __call__(self, prior, samples: Tensor, *, seed: int, checkpoint: Path | None):
        result = train(
            self._start(prior),
            samples,
            num_steps=self.num_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=min(self.warmup_steps, self.num_steps),
            ema_decay=self.ema_decay,
            seed=seed,
            checkpoint=checkpoint,
            progress=False,
        )
        return self._prior(result.denoiser.requires_grad_(False), tuple(samples.shape[1:]))

    def _prior(self, denoiser: Denoiser, event_shape: tuple[int, ...]) -> DiffusionPrior:
        denoiser.event_shape = event_shape
        return DiffusionPrior(
            denoiser, event_shape, sampler=self.sampler, num_steps=self.sampler_steps
        )

    def state(self, prior: DiffusionPrior) -> dict:
        return {"network": prior.denoiser.state_dict(), "event_shape": tuple(prior.event_shape)}

    def load(self, state: dict, like) -> DiffusionPrior:
        network = copy.deepcopy(self.denoiser)
        network.load_state_dict(state["network"])
        return self._prior(network.eval().requires_grad_(False), tuple(state["event_shape"]))


@dataclass(frozen=True)
class AmbientLoss:
    r"""Ambient Diffusion's objective (Daras et al. 2023): learn :math:`E[x_0 \mid \tilde A x_t,
    \tilde A]` from masked images only, for :func:`~diffpost.models.training.train`'s ``loss``.

    The data are the zero-filled measurements :math:`y = A x_0` (``data``) and their 0/1 masks
    :math:`A` (``conditions``). Each step hides every observed pixel again with probability
    ``further`` (:math:`\tilde A = B A`), gives the network :math:`\tilde A x_t` with
    :math:`x_t = \alpha y + \sigma \epsilon` (only the entries :math:`\tilde A` keeps, which are
    those of :math:`\alpha x_0 + \sigma\epsilon`) and the mask :math:`\tilde A` as a condition
    channel, and scores its estimate :math:`h` on every pixel :math:`A` observed:

    .. math:: \mathcal L = \lVert A\,(h_\theta(\tilde A x_t, \tilde A, t) - x_0) \rVert^2
              / \lVert A \rVert_1 .

    Since the network cannot tell which of the hidden pixels :math:`A` observed, it must predict
    all of them, and the minimiser is :math:`E[x_0 \mid \tilde A x_t, \tilde A]` for every pixel
    that some mask observes (the paper's Theorem). The network needs one condition channel per
    image channel (``UNet(condition_channels=C)``); the paper's parametrisation predicts
    :math:`x_0` (:class:`~diffpost.models.denoisers.X0Denoiser`), and any adapter works since
    the loss is on its :math:`\hat x_0`. Sample with :class:`AmbientDenoiser`.

    Args:
        further: :math:`\delta`, the probability of hiding an observed pixel again (0.1, the
            official code's ``delta_probability`` default). Heavier corruption needs more: on
            half-masked 8x8 digits 0.1 collapsed the samples to one or two classes and 0.5 did
            not (``benchmarks/results/corrupted_training.md``).

    References:
        Daras, Shah, Dagan, Gollakota, Dimakis, Klivans. Ambient Diffusion: Learning Clean
        Distributions from Corrupted Data. NeurIPS 2023. arXiv:2305.19256.
    """

    further: float = 0.1

    def __post_init__(self):
        if isinstance(self.further, bool) or not 0 < self.further < 1:
            raise ValueError(f"AmbientLoss: further must lie in (0, 1); got {self.further!r}")

    def __call__(self, denoiser, y, t, noise, condition, generator) -> Tensor:
        if condition is None or condition.shape != y.shape:
            raise ValueError(
                "AmbientLoss needs the measurements' 0/1 masks as train's conditions, one per "
                f"example and of its shape {tuple(y.shape[1:])}"
            )
        kept = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        hidden_again = condition * (kept >= self.further).to(y.dtype)
        x_t = diffused(denoiser.schedule, y, t, noise)
        estimate = denoiser(hidden_again * x_t, t, hidden_again)
        return (condition * (estimate - y) ** 2).sum() / condition.sum().clamp_min(1)


class AmbientDenoiser(Denoiser):
    r"""The sampling side of Ambient Diffusion: a network trained with :class:`AmbientLoss` used
    as an ordinary denoiser through one fixed mask, :math:`D(x_t, t) = h_\theta(\tilde A x_t,
    \tilde A, t)` (the paper's fixed-mask sampler), so that a
    :class:`~diffpost.models.priors.DiffusionPrior` on it runs with every engine.

    Args:
        denoiser: the adapter trained with :class:`AmbientLoss`.
        mask: the fixed 0/1 mask :math:`\tilde A`, of the event shape; the paper draws it from
            the training distribution of :math:`\tilde A` (each pixel kept with probability
            ``keep * (1 - further)``).

    References:
        Daras et al. Ambient Diffusion. NeurIPS 2023 (section 3.3, fixed-mask sampling).
    """

    def __init__(self, denoiser: Denoiser, mask: Tensor):
        super().__init__(denoiser.schedule)
        mask = torch.as_tensor(mask)
        if mask.dim() == 0 or not ((mask == 0) | (mask == 1)).all():
            raise ValueError("AmbientDenoiser: mask must be a 0/1 tensor of the event shape")
        self.denoiser = denoiser
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.event_shape = tuple(mask.shape)

    def forward(self, x_t: Tensor, t) -> Tensor:
        mask = self.mask.to(x_t).expand_as(x_t)
        return self.denoiser(mask * x_t, t, mask)
