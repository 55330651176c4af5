"""Read an inverse problem out of a Pyro model.

:meth:`Problem.from_model` traces the model once, *without* running the diffusion prior's sampler,
finds exactly one :class:`~diffpost.models.priors.DiffusionPrior` latent site and the observed
sites, and offers what engines need: the prior and its denoiser (chunked and counted),
``log p(y | x)`` for a batch of particles and its gradient, and the linear-Gaussian structure when
the model has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.distributions import Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import LinearOperator, Operator
from diffpost.models.operators.basic import Mask
from diffpost.models.priors import DiffusionPrior, GaussianMixture

__all__ = ["Problem", "GaussianStructure", "CAPABILITIES", "NonFiniteParticles"]

#: capability -> what an engine that requires it is told when the problem lacks it
CAPABILITIES: dict[str, str] = {
    "gaussian_observation": "a GaussianObservation of the latent at a single observed site",
    "linear": "a linear operator (GaussianObservation with a LinearOperator)",
    "svd": "a linear operator with an SVD",
    "mask": "a Mask operator (inpainting)",
    "noiseless": "a noiseless observation (sigma = 0)",
    "finite_likelihood": "a finite log-likelihood (sigma > 0, or a non-Gaussian observation)",
    "exact_prior": "a Gaussian or GaussianMixture prior (exact posterior)",
}


class NonFiniteParticles(ArithmeticError):
    """Particles with NaN or infinite entries were passed to the likelihood.

    Raised before they reach the model's distributions (whose argument validation would
    otherwise fail with an unrelated message); :func:`diffpost.posterior.sample` turns it into
    :class:`~diffpost.posterior.engines.base.EngineFailed` with the step.
    """


@dataclass(frozen=True)
class GaussianStructure:
    """A single observed site ``y ~ GaussianObservation(operator, x, sigma)`` of the latent ``x``.

    Attributes:
        site: the observed site's name.
        operator: the forward model.
        sigma: noise standard deviation (0-d or broadcastable to ``operator.out_shape``).
        y: the observation, shape ``operator.out_shape``.
    """

    site: str
    operator: Operator
    sigma: Tensor
    y: Tensor

    @property
    def noiseless(self) -> bool:
        return bool((self.sigma == 0).all())


class _LatentValue(Messenger):
    """Give the prior's site a value (a placeholder or the particles) without running its
    sampler."""

    def __init__(self, value_fn: Callable[[str, DiffusionPrior], Tensor]):
        super().__init__()
        self.value_fn = value_fn

    def _pyro_sample(self, msg):
        if isinstance(msg["fn"], DiffusionPrior) and not msg["is_observed"]:
            msg["value"] = self.value_fn(msg["name"], msg["fn"])


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


class Problem:
    """An inverse problem read from a Pyro model: one diffusion-prior latent, observed sites.

    Build it with :meth:`from_model`. Attributes:
        latent_name: the prior site's name.
        prior: the :class:`~diffpost.models.priors.DiffusionPrior`.
        observed: observed site name -> observed value.
        gaussian: the :class:`GaussianStructure`, or ``None``.
        batch_size: chunk size of denoiser and likelihood calls (``None``: one chunk).
        nfe: denoiser calls so far (each call evaluates every particle passed to it once).
        vjp: vector-Jacobian products through the denoiser so far.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple,
        model_kwargs: dict[str, Any],
        latent_name: str,
        prior: DiffusionPrior,
        observed: dict[str, Tensor],
        likelihood_sites: list[str],
        gaussian: GaussianStructure | None,
        batch_size: int | None,
    ):
        self.model = model
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self.latent_name = latent_name
        self.prior = prior
        self.observed = observed
        self.likelihood_sites = likelihood_sites
        self.gaussian = gaussian
        self.batch_size = batch_size
        self.nfe = 0
        self.vjp = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Callable, *args, batch_size: int | None = None, **kwargs) -> Problem:
        """Trace ``model(*args, **kwargs)`` once and classify its sites.

        Raises:
            ValueError: no DiffusionPrior site or more than one; another latent site (named);
                an observed value with NaN/inf or a shape that does not match its distribution;
                a prior with a batch shape; an observation on another device than the prior.
        """
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")

        def placeholder(name: str, prior: DiffusionPrior) -> Tensor:
            return torch.zeros(prior.shape(), dtype=prior.dtype, device=prior.device)

        with torch.no_grad():
            trace = poutine.trace(_LatentValue(placeholder)(model)).get_trace(*args, **kwargs)
        trace = prune_subsample_sites(trace)
        sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
        priors = [s for s in sites if isinstance(s["fn"], DiffusionPrior) and not s["is_observed"]]
        if not priors:
            raise ValueError(
                "the model has no DiffusionPrior latent site: declare the unknown as "
                "pyro.sample(name, prior) with prior a models.DiffusionPrior (or GaussianMixture)"
            )
        if len(priors) > 1:
            names = ", ".join(repr(s["name"]) for s in priors)
            raise ValueError(
                f"the model has {len(priors)} DiffusionPrior sites ({names}); exactly one is "
                "supported"
            )
        prior_site = priors[0]
        prior: DiffusionPrior = prior_site["fn"]
        if prior.batch_shape:
            raise ValueError(
                f"the prior at site {prior_site['name']!r} has batch shape "
                f"{tuple(prior.batch_shape)}; "
                "declare one signal (engines add the particle dimension themselves)"
            )
        observed, likelihood_sites = {}, []
        for site in sites:
            name = site["name"]
            if site is prior_site or _is_deterministic(site):
                continue
            if not site["is_observed"]:
                raise ValueError(
                    f"latent site {name!r} ({type(site['fn']).__name__}) besides the prior "
                    f"{prior_site['name']!r}: blind and hierarchical models are not supported yet; "
                    "if it is a measurement, pass its value (e.g. model_kwargs={"
                    f"'{name}': y"
                    "})"
                )
            likelihood_sites.append(name)
            if site["infer"].get("is_auxiliary"):  # pyro.factor: a likelihood term without data
                continue
            value = site["value"]
            expected = tuple(site["fn"].shape())
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"observed site {name!r} has value of shape {tuple(value.shape)}; its "
                    f"distribution {type(site['fn']).__name__} expects {expected}"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"observed site {name!r} contains NaN or inf")
            if value.device != prior.device:
                raise ValueError(
                    f"observed site {name!r} is on {value.device} but the prior is on "
                    f"{prior.device}; move the observation to the prior's device"
                )
            observed[name] = value
        gaussian = None
        if len(likelihood_sites) == 1 and likelihood_sites[0] in observed:
            site = trace.nodes[likelihood_sites[0]]
            fn = site["fn"]
            if isinstance(fn, GaussianObservation) and fn.x is prior_site["value"]:
                gaussian = GaussianStructure(site["name"], fn.operator, fn.sigma, site["value"])
        return cls(
            model,
            args,
            kwargs,
            prior_site["name"],
            prior,
            observed,
            likelihood_sites,
            gaussian,
            batch_size,
        )

    # ------------------------------------------------------------------ description
    @property
    def event_shape(self) -> torch.Size:
        return self.prior.event_shape

    @property
    def device(self) -> torch.device:
        return self.prior.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    @property
    def capabilities(self) -> set[str]:
        """What this problem offers, among :data:`CAPABILITIES`."""
        found = set()
        if isinstance(self.prior, GaussianMixture):
            found.add("exact_prior")
        gaussian = self.gaussian
        if gaussian is not None:
            found.add("gaussian_observation")
            if gaussian.noiseless:
                found.add("noiseless")
            elif bool((gaussian.sigma > 0).all()):
                found.add("finite_likelihood")
            if isinstance(gaussian.operator, LinearOperator):
                found.add("linear")
                if gaussian.operator.svd() is not None:
                    found.add("svd")
                if isinstance(gaussian.operator, Mask):
                    found.add("mask")
        elif self.likelihood_sites:
            found.add("finite_likelihood")
        return found

    def describe_observation(self) -> str:
        """A short description of the observed sites, for error messages."""
        if self.gaussian is not None:
            operator = type(self.gaussian.operator).__name__
            sigma = self._sigma_text()
            return f"GaussianObservation({operator}, sigma={sigma}) at site {self.gaussian.site!r}"
        parts = []
        for name in self.likelihood_sites:
            fn, event_dims = self._trace_fn(name), 0
            while isinstance(fn, Independent):  # name the distribution, not its wrapper
                fn, event_dims = fn.base_dist, event_dims + fn.reinterpreted_batch_ndims
            wrapped = f".to_event({event_dims})" if event_dims else ""
            parts.append(f"{type(fn).__name__}{wrapped} at site {name!r}")
        return ", ".join(parts) or "no observed site"

    def _sigma_text(self) -> str:
        sigma = self.gaussian.sigma
        return f"{float(sigma):.3g}" if sigma.numel() == 1 else f"tensor{tuple(sigma.shape)}"

    def _trace_fn(self, name: str):
        trace = self._trace(torch.zeros(self.prior.shape(), dtype=self.dtype, device=self.device))
        return trace.nodes[name]["fn"]

    def require(self, engine: Any) -> None:
        """Raise ``ValueError`` naming the engine, the missing capabilities and the observation."""
        missing = set(getattr(engine, "requires", ())) - self.capabilities
        if "gaussian_observation" in missing:  # the structure the others refine is absent
            missing -= {"linear", "svd", "mask", "noiseless"}
        elif "linear" in missing:
            missing -= {"svd", "mask"}
        missing = sorted(missing)
        if missing:
            needs = "; ".join(CAPABILITIES[c] for c in missing)
            raise ValueError(
                f"{type(engine).__name__} needs {needs}; the model has "
                f"{self.describe_observation()} "
                f"and a {type(self.prior).__name__} prior at site {self.latent_name!r}"
            )

    # ------------------------------------------------------------------ likelihood
    def _trace(self, x: Tensor):
        def particles(name: str, prior: DiffusionPrior) -> Tensor:
            return x

        return prune_subsample_sites(
            poutine.trace(_LatentValue(particles)(self.model)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        )

    def _chunks(self, n: int) -> list[slice]:
        size = self.batch_size or max(n, 1)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _check_particles(self, x: Tensor, finite: bool = False) -> None:
        event = tuple(self.event_shape)
        if x.dim() != len(event) + 1 or tuple(x.shape[1:]) != event:
            raise ValueError(
                f"particles must have shape (N, {', '.join(map(str, event))}); got {tuple(x.shape)}"
            )
        if finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteParticles("non-finite particles reached the likelihood")

    def _log_likelihood_chunk(self, x: Tensor) -> Tensor:
        gaussian = self.gaussian
        if gaussian is not None:
            return GaussianObservation(gaussian.operator, x, gaussian.sigma).log_prob(gaussian.y)
        trace = self._trace(x)
        total = x.new_zeros(x.shape[0])
        for name in self.likelihood_sites:
            site = trace.nodes[name]
            log_prob = site["fn"].log_prob(site["value"])
            if log_prob.shape != (x.shape[0],):
                raise ValueError(
                    f"observed site {name!r}: log_prob has shape {tuple(log_prob.shape)} for "
                    f"{x.shape[0]} particles; the model must broadcast over a leading particle "
                    "dimension (declare the observation with .to_event(k), no plate over "
                    "measurements)"
                )
            total = total + log_prob * site["scale"]
        return total

    def log_likelihood(self, x: Tensor) -> Tensor:
        r""":math:`\\log p(y \\mid x)` summed over observed sites, ``(N, *event) -> (N,)``
        (chunked).

        Raises:
            ValueError: the observation is noiseless (degenerate density).
            NonFiniteParticles: ``x`` has NaN or infinite entries.
        """
        self._check_particles(x, finite=True)
        if "finite_likelihood" not in self.capabilities:
            raise ValueError(
                f"the likelihood is degenerate for {self.describe_observation()}: a noiseless "
                "observation has no finite log-density"
            )
        return torch.cat(
            [self._log_likelihood_chunk(x[chunk]) for chunk in self._chunks(x.shape[0])]
        )

    def grad_log_likelihood(self, x: Tensor) -> Tensor:
        r""":math:`\\nabla_x \\log p(y \\mid x)`, ``(N, *event) -> (N, *event)`` (chunked)."""
        self._check_particles(x, finite=True)
        if "finite_likelihood" not in self.capabilities:
            self.log_likelihood(x)  # raises the explanatory error
        grads = []
        for chunk in self._chunks(x.shape[0]):
            with torch.enable_grad():
                part = x[chunk].detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self._log_likelihood_chunk(part).sum(), part)
            grads.append(grad)
        return torch.cat(grads)

    # ------------------------------------------------------------------ denoiser
    def denoise(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Tweedie mean ``(N, *event) -> (N, *event)``, chunked by ``batch_size``, counted as one
        NFE.

        Args:
            x_t: noisy particles.
            t: scalar or ``(N,)`` times.
        """
        self._check_particles(x_t)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        self.nfe += 1
        with torch.no_grad():
            parts = [
                self.prior.denoise(x_t[chunk], t if t.dim() == 0 else t[chunk])
                for chunk in self._chunks(x_t.shape[0])
            ]
        return torch.cat(parts)

    def denoise_with_vjp(
        self, x_t: Tensor, t: float | Tensor, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""Tweedie mean and the gradient of a per-particle objective of it through the denoiser.

        Computes :math:`\hat x_0 = D(x_t, t)` and :math:`\nabla_{x_t} f(D(x_t, t))` for
        ``objective`` :math:`f: (n, *event) \to (n,)`, one chunk of ``batch_size`` particles at a
        time, so a large batch never holds all activations at once. Counted as one NFE and one VJP.

        Args:
            x_t: ``(N, *event)``.
            t: scalar or ``(N,)``.
            objective: per-particle scalar, e.g. ``problem.log_likelihood``.

        Returns:
            ``(x0, grad)``, both ``(N, *event)`` and detached.
        """
        self._check_particles(x_t)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        self.nfe += 1
        self.vjp += 1
        estimates, grads = [], []
        for chunk in self._chunks(x_t.shape[0]):
            with torch.enable_grad():
                part = x_t[chunk].detach().requires_grad_(True)
                x0 = self.prior.denoise(part, t if t.dim() == 0 else t[chunk])
                value = objective(x0)
                if value.shape != (part.shape[0],):
                    raise ValueError(
                        "the objective must return one value per particle; got "
                        f"{tuple(value.shape)}"
                    )
                (grad,) = torch.autograd.grad(value.sum(), part)
            estimates.append(x0.detach())
            grads.append(grad)
        return torch.cat(estimates), torch.cat(grads)

    def __repr__(self) -> str:
        return (
            f"Problem(latent={self.latent_name!r}: "
            f"{type(self.prior).__name__}{tuple(self.event_shape)}, "
            f"observation={self.describe_observation()})"
        )
