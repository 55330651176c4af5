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

Training without posterior sampling, objectives for :func:`~diffpost.models.training.train`'s
``loss``:

- :class:`AmbientLoss` (Daras et al. 2023) learns from masked images, and
  :class:`AmbientDenoiser` turns its network into a denoiser for the engines;
- :class:`GSURELoss` (Kawar et al. 2024) learns from noisy measurements through entry-wise gains
  (masks with noise, :class:`~diffpost.models.operators.Diagonal`) by generalised Stein unbiased
  risk estimation, down to the noise level of the data, below which
  :class:`NoiseFloorDenoiser` holds it;
- :class:`TweedieLoss` (Daras et al. 2024) learns from noisy images by Tweedie's formula applied
  twice above their noise level and a consistency loss through the model's own sampler below it.

References:
    Rozet, Andry, Lanusse, Louppe. Learning Diffusion Priors from Observations by Expectation
    Maximization. NeurIPS 2024. arXiv:2405.13712 (github.com/francois-rozet/diffusion-priors).
    Daras, Shah, Dagan, Gollakota, Dimakis, Klivans. Ambient Diffusion: Learning Clean
    Distributions from Corrupted Data. NeurIPS 2023. arXiv:2305.19256.
    Kawar, Elata, Michaeli, Elad. GSURE-Based Diffusion Model Training with Corrupted Data.
    TMLR 2024. arXiv:2305.13128 (github.com/bahjat-kawar/gsure-diffusion).
    Daras, Dimakis, Daskalakis. Consistent Diffusion Meets Tweedie: Training Exact Ambient
    Diffusion Models with Noisy Data. ICML 2024. arXiv:2404.10177.
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
from diffpost.models.samplers import ddim_step
from diffpost.models.schedules import Schedule
from diffpost.models.training import diffused, fit_gaussian_mixture, train

__all__ = [
    "Measurements",
    "FitMixture",
    "TrainNetwork",
    "AmbientLoss",
    "AmbientDenoiser",
    "GSURELoss",
    "TweedieLoss",
    "NoiseFloorDenoiser",
]


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


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` values shaped to broadcast against ``like`` ``(N, *event)``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1)).to(like)


def _at_least(schedule: Schedule, t: Tensor, noise_ratio: Tensor) -> Tensor:
    """``t`` raised, example by example, to the time whose :math:`\\sigma/\\alpha` is
    ``noise_ratio`` ``(N,)``: where a loss's data hold no information below their own noise."""
    floor = schedule.time_of_noise_ratio(noise_ratio.to(t))
    return torch.maximum(t, floor)


@dataclass(frozen=True)
class GSURELoss:
    r"""GSURE-diffusion's objective (Kawar et al. 2024): learn :math:`E[x_0 \mid x_t]` from noisy
    linear measurements :math:`y = A x_0 + \sigma_0 e`, for
    :func:`~diffpost.models.training.train`'s ``loss``, in the operator's singular basis
    :math:`A = U \operatorname{diag}(s) V^\top`. Two forms of data:

    - entry-wise gains, one per measurement (``operator=None``): the data are the measurements
      and ``conditions`` their gains :math:`g` (a :class:`~diffpost.models.operators.Diagonal`;
      0/1 gains are masks, with noise), the basis is the pixels, :math:`s = |g|`;
    - one operator with an SVD shared by all measurements (``operator=A``): the data are the
      pseudo-inverse images :math:`A^+ y` (``operator.pinv(y)``), no conditions.

    Shapes: ``train``'s data ``(M, *event)`` (for gains, measurements of the event's shape, as a
    ``Diagonal`` gives them) and conditions ``(M, *event)``; each call returns a scalar.

    On an observed coordinate (:math:`s_k > 0`) the estimate :math:`\hat x_k = \bar y_k / s_k`
    carries noise :math:`\nu_k = \sigma_0 / s_k`; the input is topped up to the diffusion's level,
    :math:`\bar z_k = \hat x_k + (s_t^2 - \nu_k^2)^{1/2} \bar\epsilon_k` with :math:`s_t =
    \sigma(t)/\alpha(t)`, an unobserved coordinate is noise alone, :math:`\bar z_k = s_t
    \bar\epsilon_k`, and the network sees :math:`x_t = \alpha V \bar z`. With :math:`\bar h =
    V^\top D_\theta(x_t, t)` the generalised Stein unbiased estimate of the risk on the observed
    coordinates :math:`P` (weighted by ENSURE's :math:`w`) is

    .. math:: \mathcal L = \sum_{k \in P} w_k \big[(\bar h_k - \hat x_k)^2
              + 2 \nu_k^2\, \partial \bar h_k / \partial \bar z_k\big]
              / \textstyle\sum_{k\in P} w_k ,

    whose expectation is :math:`E \sum_P w_k (\bar h_k - (V^\top x_0)_k)^2` up to a constant, the
    divergence estimated by Hutchinson's trace with one Gaussian probe (a second backward pass).
    Times whose :math:`s_t` lies below an example's largest :math:`\nu` are raised to it (the
    official code's schedule starts at :math:`\sigma_0`): the data say nothing below their noise,
    so sample the trained network through :class:`NoiseFloorDenoiser`.

    Departure: the official code scales the divergence by ``Lambda * (1 - alpha_bar_t)``
    (``Lambda`` = 1e-4 in its CelebA configurations) where the estimator above has
    :math:`2\nu^2`; this follows the estimator, so its minimiser is the clean-data denoiser on
    the observed coordinates (``tests/test_corrupted.py`` checks it in closed form).

    Args:
        sigma: :math:`\sigma_0`, the measurements' noise standard deviation (positive).
        operator: the shared operator (it must have an SVD), or ``None`` for gains.
        weights: with gains, ENSURE's per-entry weights of the event shape, the inverse of how
            often an entry is observed (the official code weighs its MRI lines so); ``None``:
            uniform, as the official code for random masks, where they are constant.

    References:
        Kawar, Elata, Michaeli, Elad. GSURE-Based Diffusion Model Training with Corrupted Data.
        TMLR 2024. arXiv:2305.13128. Eldar. Generalized SURE for exponential families. IEEE TSP
        2009. Aggarwal, Pramanik, John, Jacob. ENSURE. IEEE TMI 2022.
    """

    sigma: float
    operator: LinearOperator | None = None
    weights: Tensor | None = None

    def __post_init__(self):
        if isinstance(self.sigma, bool) or not float(self.sigma) > 0:
            raise ValueError(f"GSURELoss: sigma must be positive; got {self.sigma!r}")
        if self.weights is not None and (
            not isinstance(self.weights, Tensor) or not (self.weights > 0).all()
        ):
            raise ValueError("GSURELoss: weights must be a tensor of positive entries")
        if self.operator is not None:
            if not isinstance(self.operator, LinearOperator) or self.operator.svd() is None:
                raise ValueError(
                    "GSURELoss: operator must be a linear operator with an SVD; got "
                    f"{type(self.operator).__name__}"
                )
            if self.weights is not None:
                raise ValueError("GSURELoss: weights are for gains; a shared operator has none")

    def __repr__(self) -> str:
        weights = None if self.weights is None else tuple(self.weights.shape)
        operator = None if self.operator is None else type(self.operator).__name__
        return f"GSURELoss(sigma={float(self.sigma)!r}, operator={operator}, weights={weights})"

    def __call__(self, denoiser, data, t, noise, condition, generator) -> Tensor:
        shape = data.shape
        if self.operator is None:
            if condition is None or condition.shape != shape:
                raise ValueError(
                    "GSURELoss needs the measurements' gains as train's conditions (0 where an "
                    f"entry is not observed), one per example and of its shape {tuple(shape[1:])}"
                )
            observed = (condition != 0).to(data.dtype).flatten(1)
            gains = torch.where(condition != 0, condition, torch.ones_like(condition)).flatten(1)
            estimate = observed * data.flatten(1) / gains
            nu = observed * float(self.sigma) / gains.abs()
            weights = observed if self.weights is None else observed * self.weights.to(data)
            return self._risk(
                denoiser, t, noise, estimate, nu, weights.flatten(1), generator,
                lambda z: z.reshape(shape), lambda x: x.flatten(1),
            )  # fmt: skip
        if condition is not None:
            raise ValueError(
                "GSURELoss with a shared operator takes no conditions (its data are A.pinv(y))"
            )
        svd = self.operator.svd()
        to_spectral = svd.vt
        estimate = to_spectral(data)
        singular = torch.zeros_like(estimate[0])
        singular[: svd.rank_bound] = svd.singular_values.to(data)
        observed = (singular > 1e-10 * singular.max().clamp_min(1e-300)).to(data.dtype)
        nu = (observed * float(self.sigma) / torch.where(observed > 0, singular, 1.0)).expand_as(
            estimate
        )
        return self._risk(
            denoiser, t, noise, observed * estimate, nu, observed.expand_as(estimate), generator,
            svd.v, to_spectral,
        )  # fmt: skip

    def _risk(
        self, denoiser, t, noise, estimate, nu, weights, generator, to_pixels, to_spectral
    ) -> Tensor:
        """The estimate of the risk in the spectral coordinates ``(N, d)``: ``estimate`` of
        :math:`\\hat x`, ``nu`` its noise, ``weights`` :math:`w` (0 where unobserved)."""
        schedule = denoiser.schedule
        observed = (weights > 0).to(estimate.dtype)
        t = _at_least(schedule, t, nu.amax(1))
        alpha, sigma = schedule(t)
        s = (sigma / alpha).reshape(-1, 1).to(estimate)
        noise = to_spectral(noise)
        top_up = (s**2 - nu**2).clamp_min(0).sqrt()
        z = to_pixels(observed * (estimate + top_up * noise) + (1 - observed) * s * noise)
        x_t = (_per_example(alpha, z) * z).requires_grad_(True)
        h = to_spectral(denoiser(x_t, t))
        probe = observed * torch.randn(
            estimate.shape, generator=generator, dtype=estimate.dtype, device=estimate.device
        )
        # Hutchinson: probe^T diag(w nu^2) (dh/dz) probe, through one vector-Jacobian product
        (pulled,) = torch.autograd.grad((h * weights * nu**2 * probe).sum(), x_t, create_graph=True)
        divergence = alpha.reshape(-1, 1).to(h) * to_spectral(pulled) * probe  # d/dz = a d/dx_t
        risk = weights * (h - estimate) ** 2 + 2 * divergence
        return risk.sum() / weights.sum().clamp_min(1e-12)


@dataclass(frozen=True)
class TweedieLoss:
    r"""Consistent Diffusion meets Tweedie (Daras et al. 2024): learn :math:`E[x_0 \mid x_t]`
    from images with Gaussian noise of a known level, :math:`x_n = x_0 + \sigma_n e`, for
    :func:`~diffpost.models.training.train`'s ``loss`` (the data are the noisy images,
    ``(M, *event)``, no conditions; each call returns a scalar).

    Above the data's level (:math:`s = \sigma(t)/\alpha(t) > \sigma_n`) the input
    :math:`z = x_n + (s^2 - \sigma_n^2)^{1/2}\epsilon`, :math:`x_t = \alpha z`, is exactly
    distributed as the clean data diffused to :math:`t`, and Tweedie's formula applied twice
    gives :math:`E[x_n \mid x_t] = (\sigma_n^2/s^2)\, z + (1 - \sigma_n^2/s^2)\,E[x_0 \mid
    x_t]`; regressing it on :math:`x_n`,

    .. math:: \mathcal L_{\text{Tweedie}} = \lambda(s)\,\big\lVert (\sigma_n^2/s^2)\, z
              + (1 - \sigma_n^2/s^2)\, h_\theta(x_t, t) - x_n \big\rVert^2 ,

    has the clean denoiser as its minimiser (times below :math:`\sigma_n` are raised to it, as
    the official code clamps). Below :math:`\sigma_n` no data exist; the consistency loss asks
    the model to be a martingale along its own reverse process: for the first
    ``consistency_batch`` examples, ``consistency_draws`` runs of ``consistency_steps``
    ancestral (DDPM) steps from :math:`x_t` to a time :math:`t' \sim U(t_{\min}, t)`, without
    gradient, give :math:`x_{t'}^{(k)}` and

    .. math:: \mathcal L_{\text{consistency}} = \lambda(s)\,\big\lVert \tfrac1K \textstyle\sum_k
              h_\theta(x_{t'}^{(k)}, t') - h_\theta(x_t, t) \big\rVert^2 ,

    added with weight ``consistency``. :math:`\lambda(s) = 1/s^2 + 1/\sigma_{\text{data}}^2`
    is the EDM weight the official code uses (:math:`\sigma_{\text{data}} = 0.5`).

    Defaults are the official EDM loss's (``num_consistency_steps=4``, ``num_primes=4``,
    ``consistency_coeff=1``, 4 consistency examples per batch). Departures: the official code
    draws :math:`t'` from its training distribution clamped below :math:`t` and runs its
    sampler; this draws :math:`t'` uniformly below :math:`t` and takes ancestral steps, whose
    law is the model's reverse process that the martingale property is about (a deterministic
    sampler would make every draw equal).

    Args:
        sigma: :math:`\sigma_n`, the data's noise standard deviation (positive), in the data's
            units (the VE level: for a VP schedule, the ratio :math:`\sigma/\alpha`).
        consistency: weight of the consistency loss (0 trains above :math:`\sigma_n` only; then
            sample through :class:`NoiseFloorDenoiser`).
        consistency_steps, consistency_draws, consistency_batch: the sampler's steps, the
            draws averaged, and the examples of each batch given the consistency loss.
        t_min: the smallest :math:`t'`.

    References:
        Daras, Dimakis, Daskalakis. Consistent Diffusion Meets Tweedie. ICML 2024.
        arXiv:2404.10177 (github.com/giannisdaras/ambient-tweedie). Daras, Dagan, Dimakis,
        Daskalakis. Consistent Diffusion Models. NeurIPS 2023. arXiv:2302.09057.
    """

    sigma: float
    consistency: float = 1.0
    consistency_steps: int = 4
    consistency_draws: int = 4
    consistency_batch: int = 4
    t_min: float = 1e-3
    sigma_data: float = 0.5
    unbiased: bool = True

    def __post_init__(self):
        if isinstance(self.sigma, bool) or not float(self.sigma) > 0:
            raise ValueError(f"TweedieLoss: sigma must be positive; got {self.sigma!r}")
        if isinstance(self.consistency, bool) or not float(self.consistency) >= 0:
            raise ValueError(
                f"TweedieLoss: consistency must be non-negative; got {self.consistency!r}"
            )
        for name in ("consistency_steps", "consistency_draws", "consistency_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TweedieLoss: {name} must be a positive integer; got {value!r}")
        if self.unbiased and self.consistency_draws < 2:
            raise ValueError(
                "TweedieLoss: the unbiased consistency estimate needs consistency_draws >= 2; "
                f"got {self.consistency_draws}"
            )
        if not 0 < self.t_min < 1:
            raise ValueError(f"TweedieLoss: t_min must lie in (0, 1); got {self.t_min!r}")

    def __call__(self, denoiser, x_n, t, noise, condition, generator) -> Tensor:
        if condition is not None:
            raise ValueError("TweedieLoss takes no conditions: its data are the noisy images")
        schedule = denoiser.schedule
        sigma_n = float(self.sigma)
        t = _at_least(schedule, t, torch.full_like(t, sigma_n))
        alpha, sigma = schedule(t)
        s = _per_example(sigma / alpha, x_n)
        z = x_n + (s**2 - sigma_n**2).clamp_min(0).sqrt() * noise
        x_t = _per_example(alpha, x_n) * z
        h = denoiser(x_t, t)
        ratio = sigma_n**2 / s**2
        weight = 1 / s**2 + 1 / self.sigma_data**2
        loss = (weight * (ratio * z + (1 - ratio) * h - x_n) ** 2).mean()
        if self.consistency == 0:
            return loss
        m = min(self.consistency_batch, x_n.shape[0])
        repeated = t[:m].repeat_interleave(self.consistency_draws)
        earlier = self.t_min + (repeated - self.t_min) * torch.rand(
            repeated.shape, generator=generator, dtype=t.dtype, device=t.device
        )
        start = x_t[:m].repeat_interleave(self.consistency_draws, 0).detach()
        with torch.no_grad():
            x_early = self._ancestral(denoiser, start, repeated, earlier, generator)
        h_early = denoiser(x_early, earlier).reshape(m, self.consistency_draws, *x_n.shape[1:])
        if self.unbiased:  # two independent halves: E[(a - h)(b - h)] = |E[h'] - h|^2
            half = self.consistency_draws // 2
            first = h_early[:, :half].mean(1) - h[:m]
            second = h_early[:, half:].mean(1) - h[:m]
            mismatch = weight[:m] * first * second
        else:
            mismatch = weight[:m] * (h_early.mean(1) - h[:m]) ** 2
        # added to the first m examples' terms of the batch mean, as the official code does
        return loss + float(self.consistency) * mismatch.sum() / x_n.numel()

    def _ancestral(self, denoiser, x, t, s, generator) -> Tensor:
        """``consistency_steps`` DDPM steps from ``x`` at times ``t`` to ``s`` (both ``(N,)``,
        a uniform grid between them per example)."""
        for k in range(self.consistency_steps):
            now = t + (s - t) * (k / self.consistency_steps)
            after = t + (s - t) * ((k + 1) / self.consistency_steps)
            x = ddim_step(denoiser, x, now, after, generator, eta=1.0)
        return x


class NoiseFloorDenoiser(Denoiser):
    r"""A denoiser trained only down to a noise level :math:`\sigma_f` (by :class:`GSURELoss`,
    or :class:`TweedieLoss` without its consistency term), held there below it: at a time
    whose :math:`s = \sigma(t)/\alpha(t)` is under :math:`\sigma_f` it returns
    :math:`D(\alpha(t_f)\, x_t / \alpha(t), t_f)` with :math:`s(t_f) = \sigma_f`, the network
    at the lowest level it learned on the input at the same signal scale (GSURE-diffusion's
    schedule likewise ends at the data's noise level). Above :math:`\sigma_f` it is ``denoiser``.

    Args:
        denoiser: the trained denoiser.
        noise_level: :math:`\sigma_f`, on the VE scale (the data's noise level).
    """

    def __init__(self, denoiser: Denoiser, noise_level: float):
        super().__init__(denoiser.schedule)
        if isinstance(noise_level, bool) or not float(noise_level) > 0:
            raise ValueError(
                f"NoiseFloorDenoiser: noise_level must be positive; got {noise_level!r}"
            )
        self.denoiser = denoiser
        self.noise_level = float(noise_level)
        self.event_shape = getattr(denoiser, "event_shape", None)
        #: :math:`t_f`, found once (a bisection) rather than at every call
        self.floor_time = float(
            self.schedule.time_of_noise_ratio(torch.tensor(self.noise_level, dtype=torch.float64))
        )

    def forward(self, x_t: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        raised = t.clamp_min(self.floor_time)
        scale = _per_example(self.schedule.alpha(raised) / self.schedule.alpha(t), x_t)
        return self.denoiser(scale * x_t, raised)
