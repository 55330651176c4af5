r"""Amortized posteriors: one conditional flow trained over many measurements, then sampled for any
new measurement without further fitting (APS, Mammadov, Chung, Ye 2024).

:class:`APS` fits a :class:`~diffpost.models.flows.ConditionalRealNVP` :math:`q_\phi(x \mid y)` by
the reverse KL divergence averaged over measurements, the objective of :class:`~diffpost.posterior.
FlowVI` made amortized:

.. math:: \min_\phi\ \mathbb{E}_{y}\, \mathbb{E}_{x \sim q_\phi(\cdot \mid y)}\big[\log
   q_\phi(x \mid y) - \log p(y \mid x) - \log p_\theta(x)\big],

with :math:`y` drawn from the measurements given to :meth:`APS.fit` (measurements only: no clean
signal is needed), :math:`\log p(y \mid x)` the model's Gaussian likelihood and :math:`\log
p_\theta` the prior's density: its own ``log_prob`` for a Gaussian mixture (``"exact"``) or the
denoising lower bound :func:`~diffpost.models.densities.diffusion_elbo` (``"dsm"``, one NFE and
one VJP per draw and step, the diffusion prior "distilled" into the flow). The measurement enters
every coupling network, standardised by the training measurements' mean and standard deviation.
Once trained, :meth:`AmortizedPosterior.sample` draws for a new measurement in one pass of the
flow, with no denoiser call.

As in the paper, training sees measurements only (no clean signal) and takes batches of 64 (here 64
measurements, one draw each). The paper's architecture sizes, optimiser and prior-term weighting
were not available to us (no official code is public); the rest are our settings for small signals:
a RealNVP of 8 steps with 128 hidden units (FlowVI's official depth is 32), Adam at ``1e-3`` with
the gradient norm clipped at 1 (as FlowVI), 3000 steps. The flow is mode-seeking like FlowVI's, so
its spread is a property of the flow, measured against :class:`~diffpost.posterior.Exact` in
``benchmarks/results/amortized.md``.

References:
    Mammadov, Chung, Ye. Amortized Posterior Sampling with Diffusion Prior Distillation. 2024.
    arXiv:2407.17907.
    Sun, Bouman. Deep Probabilistic Imaging. AAAI 2021 (the per-measurement objective).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffpost.models.densities import diffusion_elbo
from diffpost.models.flows import ConditionalRealNVP
from diffpost.models.priors import GaussianMixture
from diffpost.posterior.engines.common import (
    check_choice,
    check_positive,
    check_positive_integers,
)
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem

__all__ = ["APS", "AmortizedPosterior", "StandardisedMeasurement", "amortized_problem"]


def amortized_problem(name: str, model: Callable, measurements: Tensor, observed: str) -> Problem:
    """The :class:`~diffpost.posterior.Problem` of ``model`` at the first of ``measurements``,
    checked for what an amortized method trains on: at least two measurements ``(M,
    *out_shape)``, the signal as the only latent, one Gaussian observation, no plate.

    Raises:
        ValueError: naming ``name`` and what is wrong.
    """
    if not isinstance(measurements, Tensor) or measurements.dim() < 2:
        raise ValueError(
            f"{name}: measurements must be a tensor (M, *out_shape) holding M measurements; got "
            f"{tuple(getattr(measurements, 'shape', ()))}"
        )
    problem = Problem.from_model(model, **{observed: measurements[0]})
    if problem.gaussian is None or problem.global_latents or problem.plate is not None:
        raise ValueError(
            f"{name} needs a model whose only latent is the signal, observed through one "
            "GaussianObservation, without a plate"
        )
    if measurements.shape[0] < 2:
        raise ValueError(f"{name}: give at least 2 measurements to train on")
    return problem


@dataclass(frozen=True)
class StandardisedMeasurement:
    """APS's context: a measurement flattened and standardised by the training measurements'
    ``centre`` and ``scale`` (each ``(m,)``); ``(n, *out_shape) -> (n, m)``."""

    centre: Tensor
    scale: Tensor

    @property
    def measurement_numel(self) -> int:
        return self.centre.numel()

    def __call__(self, y: Tensor) -> Tensor:
        return (y.reshape(y.shape[0], -1).to(self.centre) - self.centre) / self.scale


@dataclass(frozen=True)
class APS:
    """Amortized posterior sampling by a conditional flow (see the module docstring).

    Attributes:
        num_steps: Adam steps.
        learning_rate: Adam's learning rate.
        batch_size: measurements per step (one flow draw each).
        num_flow_steps: flow steps of two couplings each.
        hidden_features: width of the coupling networks' two hidden layers.
        prior_density: ``"auto"`` (``"exact"`` for Gaussian-mixture priors, ``"dsm"``
            otherwise), ``"exact"`` or ``"dsm"``.
    """

    num_steps: int = 3000
    learning_rate: float = 1e-3
    batch_size: int = 64
    num_flow_steps: int = 8
    hidden_features: int = 128
    prior_density: str = "auto"

    def __post_init__(self):
        check_positive_integers(
            "APS",
            num_steps=self.num_steps,
            batch_size=self.batch_size,
            num_flow_steps=self.num_flow_steps,
            hidden_features=self.hidden_features,
        )
        check_positive("APS", learning_rate=self.learning_rate)
        check_choice("APS", "prior_density", self.prior_density, ("auto", "exact", "dsm"))

    def fit(
        self,
        model: Callable,
        measurements: Tensor,
        *,
        observed: str = "y",
        seed: int = 0,
        callback: Callable[[int, float], None] | None = None,
    ) -> AmortizedPosterior:
        """Train :math:`q_\\phi(x \\mid y)` over ``measurements``.

        Args:
            model: a Pyro model ``model(**{observed: y})`` with one DiffusionPrior site and one
                :class:`~diffpost.models.observations.GaussianObservation` of it.
            measurements: ``(M, *out_shape)`` measurements (at least 2).
            observed: the model's keyword for the measurement.
            seed: seeds the flow's initialisation and every draw.
            callback: ``callback(step, loss)`` after every step.

        Returns:
            The trained :class:`AmortizedPosterior`.

        Raises:
            ValueError: a model without a Gaussian observation, global latents or a plate;
                measurements that are not ``(M, *out_shape)`` (the model names the site and the
                shape it expects); ``"exact"`` without a Gaussian-mixture prior.
        """
        problem = amortized_problem("APS", model, measurements, observed)
        gaussian = problem.gaussian
        density = self._density(problem)
        generator = torch.Generator(device=problem.device).manual_seed(seed)
        dim = int(math.prod(problem.event_shape))
        flat = measurements.reshape(measurements.shape[0], -1).to(problem.dtype)
        centre, scale = flat.mean(0), flat.std(0).clamp_min(1e-8)
        flow = ConditionalRealNVP(
            dim,
            flat.shape[1],
            self.num_flow_steps,
            self.hidden_features,
            torch.Generator().manual_seed(seed),
        ).to(dtype=problem.dtype, device=problem.device)
        optimiser = torch.optim.Adam(flow.parameters(), lr=self.learning_rate)
        losses, start = [], time.perf_counter()
        for step in range(self.num_steps):
            index = torch.randint(
                flat.shape[0], (self.batch_size,), generator=generator, device=flat.device
            )
            y = measurements[index].to(problem.dtype)
            z = torch.randn(
                (self.batch_size, dim), generator=generator, dtype=problem.dtype,
                device=problem.device,
            )  # fmt: skip
            x, log_q = flow.push_forward(z, (flat[index] - centre) / scale)
            signal = x.reshape((self.batch_size,) + tuple(problem.event_shape))
            residual = (y - gaussian.operator(signal)) / gaussian.sigma.to(x)
            log_likelihood = -0.5 * residual.reshape(self.batch_size, -1).pow(2).sum(-1)
            log_prior = self._log_prior(problem, density, signal, generator)
            loss = (log_q - log_likelihood - log_prior).mean()
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            optimiser.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
        flow.requires_grad_(False)
        return AmortizedPosterior(
            network=flow,
            context=StandardisedMeasurement(centre, scale),
            model=model,
            observed=observed,
            event_shape=tuple(problem.event_shape),
            latent_name=problem.latent_name,
            info={
                "method": "APS",
                "engine": repr(self),
                "losses": losses,
                "train_time": time.perf_counter() - start,
                "nfe": problem.nfe,
                "prior_density": density,
                "num_measurements": int(measurements.shape[0]),
            },
        )

    def _density(self, problem: Problem) -> str:
        exact = isinstance(problem.prior, GaussianMixture)
        if self.prior_density == "auto":
            return "exact" if exact else "dsm"
        if self.prior_density == "exact" and not exact:
            raise ValueError(
                "APS: prior_density='exact' needs a Gaussian or GaussianMixture prior; got a "
                f"{type(problem.prior).__name__}: use 'dsm'"
            )
        return self.prior_density

    @staticmethod
    def _log_prior(problem: Problem, density: str, x: Tensor, generator: torch.Generator):
        """:math:`\\log p_\\theta(x)` with its gradient in ``x``: exact, or the denoising bound
        as a surrogate whose gradient is the bound's (its value is not the bound's)."""
        if density == "exact":
            return problem.prior.log_prob(x)
        _, gradient = diffusion_elbo(
            problem.prior, x.detach(), generator, with_gradient=True, calls=problem
        )
        return (gradient * x).reshape(x.shape[0], -1).sum(-1)


@dataclass
class AmortizedPosterior:
    """A trained :math:`q_\\phi(x \\mid y)`: :meth:`sample` draws for any measurement.

    Attributes:
        network: the trained sampler (frozen): ``network.push_forward(z, context)`` maps standard
            normal draws ``z`` ``(B, network.dim)`` and contexts ``(B, c)`` to ``(x, log q)``
            (``log q`` is ``None`` for an implicit sampler). APS: a
            :class:`~diffpost.models.flows.ConditionalRealNVP`; DAVI: an
            :class:`~diffpost.models.implicit.ImplicitGenerator`.
        context: maps measurements ``(n, *out_shape)`` to the network's contexts ``(n, c)``, and
            gives ``measurement_numel``.
        model: the model it was trained for.
        observed: the model's keyword for the measurement.
        event_shape: the signal's shape.
        latent_name: the signal's site name.
        info: ``method``, ``losses`` per step, ``train_time`` in seconds, ``nfe`` (denoiser calls
            in training), ``num_measurements``, and the method's settings.
    """

    network: Any
    context: Callable[[Tensor], Tensor]
    model: Callable
    observed: str
    event_shape: tuple[int, ...]
    latent_name: str
    info: dict[str, Any] = field(default_factory=dict)

    def sample(self, y: Tensor, num_draws: int, *, seed: int = 0) -> ParticleSet:
        """``num_draws`` draws of :math:`q_\\phi(x \\mid y)` as a one-chain
        :class:`~diffpost.posterior.ParticleSet` with uniform weights (no denoiser call).

        Args:
            y: one measurement, the shape of the training ones.
            num_draws: draws.
            seed: seeds the base draws.
        """
        check_positive_integers("AmortizedPosterior.sample", num_draws=num_draws)
        expected = self.context.measurement_numel
        if y.numel() != expected:
            raise ValueError(
                f"AmortizedPosterior.sample: y has {y.numel()} entries; the sampler was trained "
                f"on measurements of {expected}"
            )
        start = time.perf_counter()
        parameter = next(self.network.parameters())
        generator = torch.Generator(device=parameter.device).manual_seed(seed)
        z = torch.randn(
            (num_draws, self.network.dim),
            generator=generator,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        with torch.no_grad():
            context = self.context(y.to(parameter).unsqueeze(0)).expand(num_draws, -1)
            x, _ = self.network.push_forward(z, context)
        values = {self.latent_name: x.reshape((1, num_draws) + tuple(self.event_shape))}
        return ParticleSet(
            values=values,
            log_weights=x.new_zeros(1, num_draws),
            observed={self.observed: y},
            info={
                "engine": self.info.get("method", "amortized"),
                "num_particles": num_draws,
                "num_chains": 1,
                "nfe": 0,
                "vjp": 0,
                "wall_time": time.perf_counter() - start,
                "seed": seed,
                "latent_name": self.latent_name,
                "event_dims": len(self.event_shape),
            },
        )
