r"""Normalising-flow variational inference with a diffusion prior (Feng et al., ICCV 2023; Feng &
Bouman, TMLR 2024), the "Deep Probabilistic Imaging" objective of Sun & Bouman (2021).

A RealNVP flow :math:`x = G_\phi(z)`, :math:`z \sim \mathcal{N}(0, I)`, is fitted to the posterior
by minimising the reverse KL divergence up to :math:`\log p(y)`, i.e. maximising the ELBO

.. math:: \mathcal{L}(\phi) = \mathbb{E}_{z}\big[\log p(y \mid G_\phi(z)) + \log p_\theta(G_\phi(z))
   - \log q_\phi(G_\phi(z))\big] \le \log p(y),
   \qquad \log q_\phi(x) = \log \mathcal{N}(z; 0, I) - \log\lvert\det \partial G_\phi / \partial
   z\rvert,

by Adam on reparameterised draws (``batch_size`` per step; the official weights of the data, prior
and entropy terms are all 1). The prior log-density :math:`\log p_\theta` is

- ``"exact"``: the prior's own ``log_prob`` where it has one
  (:class:`~diffpost.models.priors.GaussianMixture`, :class:`~diffpost.models.priors.Gaussian`); the
  default for those priors, and the set-up of the RealNVP baseline of Cardoso et al. (2024);
- ``"dsm"``: the denoising lower bound
  :func:`~diffpost.models.densities.diffusion_elbo` (Feng & Bouman 2024, the
  official default ``optim.prior = 'dsm'``), whose gradient in :math:`x` costs one NFE and one VJP
  per step; the default for learned priors. The objective is then a lower bound of the ELBO;
- ``"ode"``: the probability-flow ODE density
  :func:`~diffpost.models.densities.probability_flow_log_prob` (Feng et al.
  2023). The paper back-propagates through the ODE solve (diffrax ``BacksolveAdjoint``, a double
  backward through the Hutchinson estimator); the library's denoiser entry point offers first-order
  VJPs only, so the gradient of :math:`\mathbb{E}_q[\log p_\theta]` is the score-function identity
  :math:`\mathbb{E}_q[(\log p_\theta(x) - b)\, \nabla_\phi \log q_\phi(x)]` with a leave-one-out
  baseline :math:`b` (unbiased, noisier; the data and entropy terms keep their reparameterised
  gradients). ``2 * ode_steps`` NFEs and VJPs per step: small problems only.

**Flow** (:class:`~diffpost.models.flows.RealNVP`: official ``realnvp_model.py``, rebuilt from
Pyro's transforms). ``num_flow_steps`` steps,
each an :class:`~pyro.distributions.transforms.AffineCoupling` of one half of the coordinates given
the other, a reversal, a coupling of the other half and a reversal, then a fixed random permutation
(official ``permute='random'``); a final learnable elementwise affine map. Coupling networks are
Pyro's ``DenseNN`` with two hidden layers of ``hidden_features`` units (default: the official width
:math:`d / 8` (``seqfrac = 4``), at least 128, the width of the RealNVP baseline of Cardoso et al.),
leaky-ReLU activations, hidden weights drawn from :math:`\mathcal{N}(0, 0.05^2)` (official
``init_std``) and a zero-initialised output layer (official ``ZeroFC``), so the untrained flow is
the identity and :math:`q = \mathcal{N}(0, I)`. Not reproduced: the official ActNorm layers
(data-dependent initialisation needs data, which VI does not have; the final affine map plays their
role), the batch-norm inside the coupling networks, the ``tanh`` bound on log-scales (Pyro clamps
them to ``[-5, 3]``), and the optional softplus output.

**Optimisation** (official ``configs/dpi_config.py``): Adam (betas 0.9, 0.999), learning rate
``1e-5`` after a linear warm-up from 0 over 5000 steps, global gradient-norm clipping at 1 (per
flow), 20000 steps of 64 draws. These are image-scale settings; on small problems (the
Gaussian-mixture benchmark) the RealNVP baseline of Cardoso et al. uses 200 steps of 10 draws at
learning rate ``1e-3``, 10 couplings of 128 units.

**State.** The flows (:class:`~diffpost.models.flows.RealNVP`, one per chain) are kept for their
architecture only; their parameters and Adam's moment estimates are tensors of the state, the flows
are called with them through :func:`torch.func.functional_call`, and ``step`` returns new ones:
nothing in a state is updated in place, so a state can be stepped again (the same seed gives the
same fit).

**Chains and draws.** Each chain fits its own flow (Adam and the clipping act per flow, so the fits
are independent). The particles are
``N`` draws of each chain's fitted flow, taken at ``init`` and again after the last step (callbacks
during the run see the initial draws); :meth:`FlowVI.fitted` returns the flows as Pyro distributions
(``result.fitted["flow"][chain].sample((n,))``) for more draws. The flow's reverse KL is
mode-seeking: a flow can miss a posterior mode, and its draws are exact samples of :math:`q`, not of
the posterior.

Per-step statistics (``(chains,)``, means over the step's draws): ``loss`` = :math:`-` the estimated
ELBO, ``elbo``, and ``log_prior`` (the estimate of :math:`\mathbb{E}_q \log p_\theta`).

References:
    Sun, Bouman. Deep Probabilistic Imaging: Uncertainty Quantification and Multi-modal Solution
    Characterization for Computational Imaging. AAAI 2021. arXiv:2010.14462.
    Feng, Smith, Rubinstein, Chang, Bouman, Freeman. Score-Based Diffusion Models as Principled
    Priors for Inverse Imaging. ICCV 2023. arXiv:2304.11751.
    Feng, Bouman. Variational Bayesian Imaging with an Efficient Surrogate Score-based Prior. TMLR
    2024. arXiv:2309.01949.
    Official code: github.com/berthyf96/score_prior (``posterior_sampling/realnvp_model.py``,
    ``posterior_sampling/losses.py``, ``configs/dpi_config.py``).
    Dinh, Sohl-Dickstein, Bengio. Density Estimation using Real NVP. ICLR 2017.
    Cardoso, Janati, Le Corff, Moulines. Monte Carlo guided Diffusion for Bayesian linear inverse
    problems. ICLR 2024 (the RealNVP baseline of the Gaussian-mixture benchmark).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffpost.models.densities import diffusion_elbo, probability_flow_log_prob
from diffpost.models.flows import RealNVP
from diffpost.models.priors import GaussianMixture
from diffpost.posterior.engines.base import Engine, EngineFailed
from diffpost.posterior.engines.common import uniform_log_weights
from diffpost.posterior.engines.variational.common import AdamMoments
from diffpost.posterior.problem import Problem

__all__ = ["FlowVI", "FlowVIState", "PRIOR_DENSITIES"]

PRIOR_DENSITIES = ("auto", "exact", "dsm", "ode")


class FlowVIState(NamedTuple):
    """State of :class:`FlowVI`.

    Attributes:
        particles: ``(chains * N, *event)`` draws of the flows (at ``init``, then after the last
            step).
        log_weights: ``(chains, N)``, uniform.
        log_evidence: ``None``.
        flows: one :class:`~diffpost.models.flows.RealNVP` per chain: the architecture and the
            initial parameters, never updated (the flows are called with ``parameters``).
        parameters: name in ``flows`` -> the current value of that parameter.
        adam: name -> Adam's moment estimates of that parameter's gradient.
        prior_density: the resolved ``"exact"``, ``"dsm"`` or ``"ode"``.
        step: number of optimiser steps taken.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    flows: nn.ModuleList
    parameters: dict[str, Tensor]
    adam: dict[str, AdamMoments]
    prior_density: str
    step: int


@dataclass(frozen=True)
class FlowVI(Engine, family="variational"):
    """Normalising-flow VI with a diffusion prior (see the module docstring).

    Attributes:
        num_steps: optimiser steps (official: 20000).
        prior_density: ``"auto"`` (``"exact"`` for Gaussian-mixture priors, ``"dsm"`` otherwise),
            ``"exact"``, ``"dsm"`` or ``"ode"``.
        batch_size: flow draws per chain and step (official: 64).
        learning_rate: Adam's rate after warm-up (official: 1e-5).
        warmup_steps: linear warm-up from 0 (official: 5000; 0 for none).
        gradient_clip: maximal gradient norm per flow (official: 1.0), or ``None``.
        num_flow_steps: flow steps of two couplings each (official ``n_flow``: 32).
        hidden_features: coupling networks' width (``None``: ``max(d // 8, 128)``).
        num_time_samples: draws of the denoising bound per point (official ``dsm_nt``: 1).
        ode_steps: Heun steps of the ODE density (``"ode"`` only).
        num_probes: Hutchinson probes of the ODE density (official: 16).
        noise_min: smallest noise ratio :math:`\\sigma / \\alpha` of the ``"dsm"`` and ``"ode"``
            densities.
    """

    num_steps: int = 20000
    prior_density: str = "auto"
    batch_size: int = 64
    learning_rate: float = 1e-5
    warmup_steps: int = 5000
    gradient_clip: float | None = 1.0
    num_flow_steps: int = 32
    hidden_features: int | None = None
    num_time_samples: int = 1
    ode_steps: int = 100
    num_probes: int = 16
    noise_min: float = 2e-3
    requires: ClassVar[frozenset[str]] = frozenset({"finite_likelihood"})

    def __post_init__(self):
        super().__post_init__()
        positive_integers = {
            "num_steps": self.num_steps,
            "batch_size": self.batch_size,
            "num_flow_steps": self.num_flow_steps,
            "num_time_samples": self.num_time_samples,
            "ode_steps": self.ode_steps,
            "num_probes": self.num_probes,
        }
        if self.hidden_features is not None:
            positive_integers["hidden_features"] = self.hidden_features
        for field, value in positive_integers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer; got {value!r}")
        if self.prior_density not in PRIOR_DENSITIES:
            raise ValueError(
                f"{self.name}: prior_density must be one of {PRIOR_DENSITIES}; got "
                f"{self.prior_density!r}"
            )
        if self.prior_density == "ode" and self.batch_size < 2:
            raise ValueError(
                f"{self.name}: the 'ode' prior's leave-one-out baseline needs batch_size >= 2; "
                f"got {self.batch_size}"
            )
        if not self.learning_rate > 0:
            raise ValueError(
                f"{self.name}: learning_rate must be positive; got {self.learning_rate}"
            )
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(
                f"{self.name}: warmup_steps must be a non-negative integer; got "
                f"{self.warmup_steps!r}"
            )
        if self.gradient_clip is not None and not self.gradient_clip > 0:
            raise ValueError(
                f"{self.name}: gradient_clip must be positive or None; got {self.gradient_clip}"
            )
        if not self.noise_min > 0:
            raise ValueError(f"{self.name}: noise_min must be positive; got {self.noise_min}")

    def _resolve_prior_density(self, problem: Problem) -> str:
        exact = isinstance(problem.prior, GaussianMixture)
        if self.prior_density == "auto":
            return "exact" if exact else "dsm"
        if self.prior_density == "exact" and not exact:
            raise ValueError(
                f"{self.name}(prior_density='exact') needs a prior with an exact density (Gaussian "
                f"or GaussianMixture); got a {type(problem.prior).__name__}: use 'dsm' or 'ode'"
            )
        return self.prior_density

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ) -> FlowVIState:
        dim = math.prod(problem.event_shape)
        if dim < 2:
            raise ValueError(
                f"{self.name}: a coupling flow needs a signal of at least 2 entries; the prior's "
                f"event shape is {tuple(problem.event_shape)}"
            )
        prior_density = self._resolve_prior_density(problem)
        hidden = self.hidden_features or max(dim // 8, 128)
        cpu = torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        )
        flows = nn.ModuleList(
            RealNVP(dim, self.num_flow_steps, hidden, cpu) for _ in range(num_chains)
        ).to(dtype=problem.dtype, device=problem.device)
        parameters = {name: value.detach() for name, value in flows.named_parameters()}
        return FlowVIState(
            particles=self._draw(problem, flows, parameters, num_particles, generator),
            log_weights=uniform_log_weights(num_chains, num_particles, flows[0].loc),
            log_evidence=None,
            flows=flows,
            parameters=parameters,
            adam={name: AdamMoments.zeros_like(value) for name, value in parameters.items()},
            prior_density=prior_density,
            step=0,
        )

    @staticmethod
    def _base_draws(flows: nn.ModuleList, count: int, generator: torch.Generator) -> Tensor:
        reference = flows[0].loc
        return torch.randn(
            (len(flows), count, flows[0].dim),
            generator=generator,
            dtype=reference.dtype,
            device=reference.device,
        )

    @staticmethod
    def _call(
        flows: nn.ModuleList, parameters: dict[str, Tensor], chain: int, *args, **kwargs
    ) -> Any:
        """Chain ``chain``'s flow called with its entries of ``parameters``."""
        prefix = f"{chain}."
        own = {k[len(prefix) :]: v for k, v in parameters.items() if k.startswith(prefix)}
        return functional_call(flows[chain], own, args, kwargs)

    def _draw(
        self,
        problem: Problem,
        flows: nn.ModuleList,
        parameters: dict[str, Tensor],
        count: int,
        generator: torch.Generator,
    ) -> Tensor:
        with torch.no_grad():
            z = self._base_draws(flows, count, generator)
            x = torch.cat([self._call(flows, parameters, c, z[c])[0] for c in range(len(flows))])
        return x.reshape((-1,) + tuple(problem.event_shape))

    def _learning_rate(self, step: int) -> float:
        """The rate of optimiser step ``step`` (from 0): linear warm-up from 0, as the official
        schedule (and ``LambdaLR(lambda s: min(1, s / warmup))``)."""
        if self.warmup_steps == 0:
            return self.learning_rate
        return self.learning_rate * min(1.0, step / self.warmup_steps)

    def _clipped(self, gradients: dict[str, Tensor], chains: int) -> dict[str, Tensor]:
        """The gradients with each flow's global norm clipped at ``gradient_clip`` (as
        ``torch.nn.utils.clip_grad_norm_`` per flow)."""
        if self.gradient_clip is None:
            return gradients
        clipped = dict(gradients)
        for chain in range(chains):
            names = [name for name in gradients if name.startswith(f"{chain}.")]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(gradients[name]) for name in names])
            )
            scale = (self.gradient_clip / (norm + 1e-6)).clamp(max=1.0)
            for name in names:
                clipped[name] = gradients[name] * scale
        return clipped

    def _prior_terms(
        self,
        problem: Problem,
        state: FlowVIState,
        parameters: dict[str, Tensor],
        x: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """``(log_prior, surrogate)``: the estimate of :math:`\\log p_\\theta(x)` per draw
        (detached) and a per-draw term whose gradient in the flow parameters is that of
        :math:`-\\log p_\\theta`."""
        if state.prior_density == "exact":
            log_prior = problem.prior.log_prob(x)
            return log_prior.detach(), -log_prior
        if state.prior_density == "dsm":
            log_prior, gradient = diffusion_elbo(
                problem.prior,
                x.detach(),
                generator,
                num_samples=self.num_time_samples,
                noise_min=self.noise_min,
                with_gradient=True,
                calls=problem,
            )
            return log_prior, -(gradient * x).flatten(1).sum(-1)
        log_prior = probability_flow_log_prob(
            problem.prior,
            x.detach(),
            generator,
            num_steps=self.ode_steps,
            num_probes=self.num_probes,
            noise_min=self.noise_min,
            calls=problem,
        )
        # score-function gradient of -E_q[log p] with a leave-one-out baseline, per chain
        chains = len(state.flows)
        values = log_prior.reshape(chains, -1)
        baseline = (values.sum(-1, keepdim=True) - values) / (values.shape[-1] - 1)
        parts = x.detach().flatten(1).reshape(chains, -1, x[0].numel())
        log_q_detached_x = torch.cat(
            [
                self._call(state.flows, parameters, c, parts[c], log_density=True)
                for c in range(chains)
            ]
        )
        return log_prior, -((values - baseline).reshape(-1) * log_q_detached_x)

    def step(
        self, problem: Problem, state: FlowVIState, generator: torch.Generator
    ) -> tuple[FlowVIState, dict[str, Tensor]]:
        flows = state.flows
        chains = len(flows)
        event = tuple(problem.event_shape)
        z = self._base_draws(flows, self.batch_size, generator)
        with torch.enable_grad():
            parameters = {k: v.detach().requires_grad_(True) for k, v in state.parameters.items()}
            pushed = [self._call(flows, parameters, c, z[c]) for c in range(chains)]
            x = torch.cat([draws for draws, _ in pushed]).reshape((-1,) + event)
            log_q = torch.cat([log_q for _, log_q in pushed])
            log_likelihood = problem.log_likelihood(x)
            log_prior, prior_surrogate = self._prior_terms(problem, state, parameters, x, generator)
            surrogate = (-log_likelihood + prior_surrogate + log_q).reshape(chains, -1).mean(-1)
            gradients = torch.autograd.grad(
                surrogate.sum(), list(parameters.values()), allow_unused=True
            )
        elbo = (log_likelihood.detach() + log_prior - log_q.detach()).reshape(chains, -1).mean(-1)
        if not bool(torch.isfinite(elbo).all()):
            raise EngineFailed(self.name, state.step + 1, None, "non-finite ELBO estimate")
        gradients = {
            name: torch.zeros_like(value) if gradient is None else gradient
            for (name, value), gradient in zip(parameters.items(), gradients, strict=True)
        }
        rate, betas = self._learning_rate(state.step), (0.9, 0.999)
        updated, adam = {}, {}
        for name, gradient in self._clipped(gradients, chains).items():
            update, adam[name] = state.adam[name].update(gradient, state.step + 1, rate, betas)
            updated[name] = state.parameters[name] + update
        step = state.step + 1
        particles = state.particles
        if step == self.num_steps:
            count = state.log_weights.shape[1]
            particles = self._draw(problem, flows, updated, count, generator)
        info = {
            "loss": -elbo,
            "elbo": elbo,
            "log_prior": log_prior.reshape(chains, -1).mean(-1),
        }
        return state._replace(particles=particles, parameters=updated, adam=adam, step=step), info

    def fitted(self, problem: Problem, state: FlowVIState) -> dict[str, Any]:
        """``{"flow": [q_chain, ...]}``: each chain's fitted flow as a Pyro distribution over
        signals of the prior's event shape (``sample``, ``log_prob``)."""
        event = tuple(problem.event_shape)
        flows = copy.deepcopy(state.flows)
        with torch.no_grad():
            for name, value in flows.named_parameters():
                value.copy_(state.parameters[name])
        return {"flow": [flow.distribution(event) for flow in flows]}
