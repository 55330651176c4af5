r"""DAVI: diffusion prior-based amortized variational inference (Lee, Park, Kong, Kim; ECCV 2024).

An implicit sampler :math:`\hat x = I_\phi(c + h z)` (:class:`~diffpost.models.implicit.
ImplicitGenerator`; :math:`c = A^+ y` the measurement brought to the signal's space, :math:`h z`
injected noise) is trained over many measurements by the reverse KL divergence to the posterior,
whose prior part is the integral KL divergence of Diff-Instruct: the KL between the generator's
outputs and the prior, both diffused to a time :math:`t`, whose gradient needs the score of the
diffused outputs. An auxiliary network :math:`D_\psi = D_\theta + g_\psi`, started at the prior's
Tweedie mean :math:`D_\theta`, learns it by denoising score matching on the outputs, in
alternation with the generator:

.. math::
    \psi &\leftarrow \psi - \eta_\psi \nabla_\psi\, \mathbb{E}\,
        \big\lVert \tfrac{\alpha_t}{\sigma_t} \big(D_\psi(x_t, t) - \hat x\big) \big\rVert^2,
    \qquad x_t = \alpha_t\, \mathrm{sg}(\hat x) + \sigma_t \epsilon, \\
    \phi &\leftarrow \phi - \eta_\phi \nabla_\phi\, \mathbb{E}\Big[
        \tfrac{1}{2} \big\lVert (y - A \hat x) / \sigma_y \big\rVert^2
        + \lambda\, \mathrm{sg}\Big(\tfrac{\alpha_t}{\sigma_t}
          \big(D_\psi(x_t, t) - D_\theta(x_t, t)\big)\Big)^{\!\top} \hat x \Big],

:math:`t` uniform on the schedule's times (the official ``UniformSampler``), one draw of
:math:`(y, z, t, \epsilon)` per batch entry, one denoiser call per entry and step (shared by both
updates). The weight :math:`\alpha_t / \sigma_t` is the official one (the prior term is the
difference of the two noise predictions, :math:`\hat\epsilon_\theta - \hat\epsilon_\psi`). After
training, a draw is one pass of the generator, with no denoiser call.

**Auxiliary score** (``auxiliary``): ``"unconditional"`` (default, official) learns the score of
*all* outputs pooled over measurements, so the KL it measures is between that pool and the prior,
not between :math:`q_\phi(\cdot \mid y)` and the prior for each :math:`y`; ``"conditional"`` also
reads :math:`c`, the per-measurement form. Both are measured in ``benchmarks/results/amortized.md``
(digits mixture) and ``davi_training.md`` (4-D Gaussian, by training length).

**Departures.** The official training (``mlvlab/DAVI``) also uses clean images: the generator's
training input is a bridge between the clean image and the measurement, an MSE to the clean image
is added, and a PatchGAN discriminator; none is part of the variational objective, and none is
applied here (measurements only, as APS). The official data term is an unnormalised mean squared
residual with a per-task weight (0.01-1); here it is the likelihood's own
:math:`\lVert (y - A\hat x)/\sigma_y \rVert^2 / 2`, with ``prior_weight`` :math:`\lambda = 1`.
Networks are MLPs on flat vectors (:mod:`diffpost.models.implicit`), not UNets initialised from the
prior's network; Adam at ``1e-3`` for both, 3000 steps of 64 (the official AdamW at ``1e-4``,
batches of 8-12 per GPU, 100 epochs, EMA 0.9999, are for UNets on images); ``h = 0.1`` (official
for most tasks).

References:
    Lee, Park, Kong, Kim. Diffusion Prior-Based Amortized Variational Inference for Noisy Inverse
    Problems. ECCV 2024. arXiv:2407.16125. Official code: github.com/mlvlab/DAVI.
    Luo, Hu, Zhang, Sun, Li, Zhang. Diff-Instruct: A Universal Approach for Transferring
    Knowledge From Pre-trained Diffusion Models. NeurIPS 2023 (the integral KL).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffpost.models.implicit import AuxiliaryDenoiser, ImplicitGenerator
from diffpost.models.training import training_times
from diffpost.posterior.amortized import AmortizedPosterior, amortized_problem
from diffpost.posterior.engines.common import (
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_integers,
)
from diffpost.posterior.guidance import measurement_inverse
from diffpost.posterior.problem import Problem

__all__ = ["DAVI", "PseudoInverseMeasurement"]


@dataclass(frozen=True)
class PseudoInverseMeasurement:
    """DAVI's context: :math:`c = A^+ y` flattened (:func:`~diffpost.posterior.guidance.
    measurement_inverse`, the directions the noise swamps left at zero); ``(n, *out_shape) ->
    (n, d)``."""

    problem: Problem

    @property
    def measurement_numel(self) -> int:
        return self.problem.gaussian.y.numel()

    def __call__(self, y: Tensor) -> Tensor:
        shape = (y.shape[0],) + tuple(self.problem.gaussian.y.shape)  # a flat y is accepted too
        y = y.to(dtype=self.problem.dtype, device=self.problem.device).reshape(shape)
        return measurement_inverse(self.problem, y).reshape(y.shape[0], -1)


@dataclass(frozen=True)
class DAVI:
    """Amortized variational inference with an implicit sampler (see the module docstring).

    Attributes:
        num_steps: alternating steps (one auxiliary, one generator update each).
        learning_rate: Adam's learning rate for the generator and the auxiliary network.
        batch_size: measurements per step (one draw each).
        hidden_features: width of both MLPs' two hidden layers.
        noise_scale: :math:`h`, the generator's injected noise (official 0.1).
        prior_weight: :math:`\\lambda`, the weight of the integral KL against the likelihood.
        auxiliary: ``"unconditional"`` (official) or ``"conditional"``.
        t_min: smallest diffusion time drawn (continuous schedules).
    """

    num_steps: int = 3000
    learning_rate: float = 1e-3
    batch_size: int = 64
    hidden_features: int = 256
    noise_scale: float = 0.1
    prior_weight: float = 1.0
    auxiliary: str = "unconditional"
    t_min: float = 1e-3

    def __post_init__(self):
        check_positive_integers(
            "DAVI",
            num_steps=self.num_steps,
            batch_size=self.batch_size,
            hidden_features=self.hidden_features,
        )
        check_positive("DAVI", learning_rate=self.learning_rate, noise_scale=self.noise_scale)
        check_nonnegative("DAVI", prior_weight=self.prior_weight)
        check_choice("DAVI", "auxiliary", self.auxiliary, ("unconditional", "conditional"))
        if not 0 < self.t_min < 1:
            raise ValueError(f"DAVI: t_min must lie in (0, 1); got {self.t_min!r}")

    def fit(
        self,
        model: Callable,
        measurements: Tensor,
        *,
        observed: str = "y",
        seed: int = 0,
        callback: Callable[[int, float], None] | None = None,
    ) -> AmortizedPosterior:
        """Train the generator over ``measurements``.

        Args:
            model: a Pyro model ``model(**{observed: y})`` with one DiffusionPrior site and one
                linear :class:`~diffpost.models.observations.GaussianObservation` of it.
            measurements: ``(M, *out_shape)`` measurements (at least 2).
            observed: the model's keyword for the measurement.
            seed: seeds both networks' initialisation and every draw.
            callback: ``callback(step, loss)`` after every step (``loss``: the mean data term).

        Returns:
            The trained :class:`~diffpost.posterior.AmortizedPosterior`; its ``info["losses"]``
            are the steps' mean data terms :math:`\\tfrac12 \\lVert (y - A\\hat x)/\\sigma_y
            \\rVert^2` (the prior term's surrogate has no meaningful value) and
            ``info["auxiliary_losses"]`` the auxiliary network's denoising losses.

        Raises:
            ValueError: as :class:`~diffpost.posterior.APS`, and for a non-linear operator.
        """
        problem = amortized_problem("DAVI", model, measurements, observed)
        if "linear" not in problem.capabilities:
            raise ValueError("DAVI needs a linear operator (its input is A^+ y)")
        gaussian, schedule = problem.gaussian, problem.prior.schedule
        dim, event = int(math.prod(problem.event_shape)), tuple(problem.event_shape)
        context = PseudoInverseMeasurement(problem)
        contexts = context(measurements)
        generator = torch.Generator(device=problem.device).manual_seed(seed)
        sampler = ImplicitGenerator(
            dim, self.hidden_features, self.noise_scale, torch.Generator().manual_seed(seed)
        ).to(dtype=problem.dtype, device=problem.device)
        conditional = self.auxiliary == "conditional"
        auxiliary = AuxiliaryDenoiser(
            dim,
            dim if conditional else 0,
            self.hidden_features,
            torch.Generator().manual_seed(seed + 1),
        ).to(dtype=problem.dtype, device=problem.device)
        sampler_optimiser = torch.optim.Adam(sampler.parameters(), lr=self.learning_rate)
        auxiliary_optimiser = torch.optim.Adam(auxiliary.parameters(), lr=self.learning_rate)
        losses, auxiliary_losses, start = [], [], time.perf_counter()
        n = self.batch_size
        for step in range(self.num_steps):
            index = torch.randint(
                measurements.shape[0], (n,), generator=generator, device=contexts.device
            )
            y, c = measurements[index].to(contexts), contexts[index]
            z = torch.randn((n, dim), generator=generator, dtype=c.dtype, device=c.device)
            x_hat, _ = sampler.push_forward(z, c)

            t = training_times(schedule, n, self.t_min, generator, c)
            alpha, sigma = (v.to(c).unsqueeze(-1) for v in schedule(t))
            epsilon = torch.randn((n, dim), generator=generator, dtype=c.dtype, device=c.device)
            x_t = alpha * x_hat.detach() + sigma * epsilon
            teacher = problem.denoise(x_t.reshape((n,) + event), t).reshape(n, dim)
            given = c if conditional else None

            correction = auxiliary(x_t, t, given)
            auxiliary_loss = (
                (alpha / sigma * (teacher + correction - x_hat.detach())).pow(2).sum(-1).mean()
            )
            auxiliary_optimiser.zero_grad()
            auxiliary_loss.backward()
            torch.nn.utils.clip_grad_norm_(auxiliary.parameters(), 1.0)
            auxiliary_optimiser.step()

            with torch.no_grad():  # D_psi - D_theta = g_psi, after the auxiliary step
                prior_direction = alpha / sigma * auxiliary(x_t, t, given)
            residual = (y - gaussian.operator(x_hat.reshape((n,) + event))) / gaussian.sigma.to(c)
            data_term = 0.5 * residual.reshape(n, -1).pow(2).sum(-1)
            prior_term = (prior_direction * x_hat).sum(-1)
            loss = (data_term + self.prior_weight * prior_term).mean()
            sampler_optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sampler.parameters(), 1.0)
            sampler_optimiser.step()
            losses.append(float(data_term.detach().mean()))
            auxiliary_losses.append(float(auxiliary_loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
        sampler.requires_grad_(False)
        return AmortizedPosterior(
            network=sampler,
            context=context,
            model=model,
            observed=observed,
            event_shape=event,
            latent_name=problem.latent_name,
            info={
                "method": "DAVI",
                "engine": repr(self),
                "losses": losses,
                "auxiliary_losses": auxiliary_losses,
                "train_time": time.perf_counter() - start,
                "nfe": problem.nfe,
                "num_measurements": int(measurements.shape[0]),
            },
        )
