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
  :func:`~diffpost.posterior.engines.variational.common.diffusion_elbo` (Feng & Bouman 2024, the
  official default ``optim.prior = 'dsm'``), whose gradient in :math:`x` costs one NFE and one VJP
  per step; the default for learned priors. The objective is then a lower bound of the ELBO;
- ``"ode"``: the probability-flow ODE density
  :func:`~diffpost.posterior.engines.variational.common.probability_flow_log_prob` (Feng et al.
  2023). The paper back-propagates through the ODE solve (diffrax ``BacksolveAdjoint``, a double
  backward through the Hutchinson estimator); the library's denoiser entry point offers first-order
  VJPs only, so the gradient of :math:`\mathbb{E}_q[\log p_\theta]` is the score-function identity
  :math:`\mathbb{E}_q[(\log p_\theta(x) - b)\, \nabla_\phi \log q_\phi(x)]` with a leave-one-out
  baseline :math:`b` (unbiased, noisier; the data and entropy terms keep their reparameterised
  gradients). ``2 * ode_steps`` NFEs and VJPs per step: small problems only.

**Flow** (official ``realnvp_model.py``, rebuilt from Pyro's transforms). ``num_flow_steps`` steps,
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

**Chains and draws.** Each chain fits its own flow (the flows train together, one optimiser over all
parameters: Adam and the clipping act per flow, so the fits are independent). The particles are
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

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import DenseNN
from torch import Tensor, nn

from diffpost.models.priors import GaussianMixture
from diffpost.posterior.engines.base import Engine, EngineFailed
from diffpost.posterior.engines.common import uniform_log_weights
from diffpost.posterior.engines.variational.common import diffusion_elbo, probability_flow_log_prob
from diffpost.posterior.problem import Problem

__all__ = ["FlowVI", "FlowVIState", "RealNVP", "PRIOR_DENSITIES"]

PRIOR_DENSITIES = ("auto", "exact", "dsm", "ode")

#: standard deviation of the coupling networks' hidden weights at initialisation (official init_std)
_INIT_STD = 0.05


class RealNVP(nn.Module):
    """A RealNVP flow on flat vectors of size ``dim`` built from Pyro's transforms.

    Args:
        dim: the flattened signal size (at least 2).
        num_flow_steps: flow steps of two couplings each.
        hidden_features: width of the coupling networks' two hidden layers.
        generator: draws the fixed permutations and the initial hidden weights.
    """

    def __init__(
        self, dim: int, num_flow_steps: int, hidden_features: int, generator: torch.Generator
    ):
        super().__init__()
        self.dim = dim
        split = dim // 2
        couplings = []
        for _ in range(2 * num_flow_steps):
            # DenseNN initialises itself from the global RNG: leave it as it was (weights redrawn
            # below)
            with torch.random.fork_rng(devices=[]):
                network = DenseNN(
                    split,
                    [hidden_features, hidden_features],
                    [dim - split, dim - split],
                    nonlinearity=nn.LeakyReLU(0.01),
                )
            *hidden, output = [m for m in network.modules() if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for layer in hidden:
                    layer.weight.copy_(
                        torch.randn(layer.weight.shape, generator=generator) * _INIT_STD
                    )
                    layer.bias.zero_()
                output.weight.zero_()
                output.bias.zero_()
            couplings.append(T.AffineCoupling(split, network))
        self.couplings = nn.ModuleList(couplings)
        reversal = torch.arange(dim - 1, -1, -1)
        self.register_buffer("reversal", reversal)
        self.register_buffer(
            "permutations",
            torch.stack([torch.randperm(dim, generator=generator) for _ in range(num_flow_steps)]),
        )
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def transforms(self) -> list[T.Transform]:
        """The flow's bijections, base to output, on ``(..., dim)``."""
        parts: list[T.Transform] = []
        for index, permutation in enumerate(self.permutations):
            first, second = self.couplings[2 * index], self.couplings[2 * index + 1]
            parts += [first, T.Permute(self.reversal), second, T.Permute(self.reversal)]
            parts.append(T.Permute(permutation))
        parts.append(T.AffineTransform(self.loc, self.log_scale.exp(), event_dim=1, cache_size=1))
        return parts

    def base(self) -> dist.Distribution:
        """The standard normal base distribution on ``(dim,)``."""
        zeros = self.loc.new_zeros(self.dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def push_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log q(x))`` for base draws ``z`` of shape ``(B, dim)``, differentiable in the
        parameters."""
        log_q = self.base().log_prob(z)
        x = z
        for part in self.transforms():
            y = part(x)
            log_q = log_q - part.log_abs_det_jacobian(x, y)
            x = y
        return x, log_q

    def distribution(self, event_shape: tuple[int, ...]) -> dist.TransformedDistribution:
        """The fitted :math:`q` as a Pyro distribution over signals of shape ``event_shape``."""
        reshape = T.ReshapeTransform((self.dim,), tuple(event_shape))
        return dist.TransformedDistribution(self.base(), self.transforms() + [reshape])


class FlowVIState(NamedTuple):
    """State of :class:`FlowVI`.

    Attributes:
        particles: ``(chains * N, *event)`` draws of the flows (at ``init``, then after the last
            step).
        log_weights: ``(chains, N)``, uniform.
        log_evidence: ``None``.
        flows: one :class:`RealNVP` per chain.
        optimizer: Adam over every flow's parameters.
        scheduler: the linear learning-rate warm-up.
        prior_density: the resolved ``"exact"``, ``"dsm"`` or ``"ode"``.
        step: number of optimiser steps taken.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: None
    flows: nn.ModuleList
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    prior_density: str
    step: int


@dataclass(frozen=True)
class FlowVI(Engine):
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
        optimizer = torch.optim.Adam(flows.parameters(), lr=self.learning_rate, betas=(0.9, 0.999))
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0
        )
        return FlowVIState(
            particles=self._draw(problem, flows, num_particles, generator),
            log_weights=uniform_log_weights(num_chains, num_particles, flows[0].loc),
            log_evidence=None,
            flows=flows,
            optimizer=optimizer,
            scheduler=scheduler,
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

    def _draw(
        self, problem: Problem, flows: nn.ModuleList, count: int, generator: torch.Generator
    ) -> Tensor:
        with torch.no_grad():
            z = self._base_draws(flows, count, generator)
            x = torch.cat([flow.push_forward(z[c])[0] for c, flow in enumerate(flows)])
        return x.reshape((-1,) + tuple(problem.event_shape))

    def _prior_terms(
        self, problem: Problem, state: FlowVIState, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``(log_prior, surrogate)``: the estimate of :math:`\\log p_\\theta(x)` per draw
        (detached) and a per-draw term whose gradient in the flow parameters is that of
        :math:`-\\log p_\\theta`."""
        if state.prior_density == "exact":
            log_prior = problem.prior.log_prob(x)
            return log_prior.detach(), -log_prior
        if state.prior_density == "dsm":
            log_prior, gradient = diffusion_elbo(
                problem,
                x.detach(),
                generator,
                num_samples=self.num_time_samples,
                noise_min=self.noise_min,
                with_gradient=True,
            )
            return log_prior, -(gradient * x).flatten(1).sum(-1)
        log_prior = probability_flow_log_prob(
            problem,
            x.detach(),
            generator,
            num_steps=self.ode_steps,
            num_probes=self.num_probes,
            noise_min=self.noise_min,
        )
        # score-function gradient of -E_q[log p] with a leave-one-out baseline, per chain
        chains = len(state.flows)
        values = log_prior.reshape(chains, -1)
        baseline = (values.sum(-1, keepdim=True) - values) / (values.shape[-1] - 1)
        log_q_detached_x = torch.cat(
            [
                flow.distribution((flow.dim,)).log_prob(part.detach())
                for flow, part in zip(
                    state.flows, x.flatten(1).reshape(chains, -1, x[0].numel()), strict=True
                )
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
            pushed = [flow.push_forward(z[c]) for c, flow in enumerate(flows)]
            x = torch.cat([draws for draws, _ in pushed]).reshape((-1,) + event)
            log_q = torch.cat([log_q for _, log_q in pushed])
            log_likelihood = problem.log_likelihood(x)
            log_prior, prior_surrogate = self._prior_terms(problem, state, x, generator)
            surrogate = (-log_likelihood + prior_surrogate + log_q).reshape(chains, -1).mean(-1)
            state.optimizer.zero_grad(set_to_none=True)
            surrogate.sum().backward()
        elbo = (log_likelihood.detach() + log_prior - log_q.detach()).reshape(chains, -1).mean(-1)
        if not bool(torch.isfinite(elbo).all()):
            raise EngineFailed(self.name, state.step + 1, None, "non-finite ELBO estimate")
        if self.gradient_clip is not None:
            for flow in flows:
                nn.utils.clip_grad_norm_(flow.parameters(), self.gradient_clip)
        state.optimizer.step()
        state.scheduler.step()
        step = state.step + 1
        particles = state.particles
        if step == self.num_steps:
            particles = self._draw(problem, flows, state.log_weights.shape[1], generator)
        info = {
            "loss": -elbo,
            "elbo": elbo,
            "log_prior": log_prior.reshape(chains, -1).mean(-1),
        }
        return state._replace(particles=particles, step=step), info

    def fitted(self, problem: Problem, state: FlowVIState) -> dict[str, Any]:
        """``{"flow": [q_chain, ...]}``: each chain's fitted flow as a Pyro distribution over
        signals of the prior's event shape (``sample``, ``log_prob``)."""
        event = tuple(problem.event_shape)
        return {"flow": [flow.distribution(event) for flow in state.flows]}
