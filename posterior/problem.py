"""Read an inverse problem out of a Pyro model.

:meth:`Problem.from_model` traces the model once, *without* running the diffusion prior's sampler,
finds exactly one :class:`~diffpost.models.priors.DiffusionPrior` latent site and the observed
sites, and offers what engines need: the prior and its denoiser (chunked and counted),
``log p(y | x)`` for a batch of particles and its gradient, and the linear-Gaussian structure when
the model has it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import LinearOperator
from diffpost.models.operators.basic import Mask
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.posterior.latents import (
    GlobalLatent,
    describe_distribution,
)
from diffpost.posterior.problem_globals import GlobalLatentMethods
from diffpost.posterior.reading import GaussianStructure, SetLatents, read_model

__all__ = ["Problem", "GaussianStructure", "CAPABILITIES", "NonFiniteParticles"]

#: capability -> what an engine that requires it is told when the problem lacks it
CAPABILITIES: dict[str, str] = {
    "gaussian_observation": "a GaussianObservation of the latent itself at every observed site",
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


class Problem(GlobalLatentMethods):
    """An inverse problem read from a Pyro model: a diffusion-prior signal, optional global latents
    and observed sites.

    Build it with :meth:`from_model`. Attributes:
        latent_name: the prior site's name.
        prior: the :class:`~diffpost.models.priors.DiffusionPrior`.
        global_latents: name -> :class:`~diffpost.posterior.latents.GlobalLatent`, the model's
            other continuous latents (noise levels, operator parameters, ...), in model order.
        bound: the global latents' values this problem is read at (``None`` when they are free):
            name -> ``(*shape)`` (one value for every particle) or ``(P, *shape)`` (one per
            particle, see :meth:`with_globals`).
        second: ``(name, prior)`` of a second DiffusionPrior site (a blur kernel with a learned
            prior, as in BlindDPS), or ``None``; the first DiffusionPrior site in model order is
            the signal.
        second_value: the second signal's values, one per particle ``(P, *event)``, once bound
            (:meth:`with_second_signal`).
        plate: ``(name, B)`` of a plate over ``B`` independent problems around the signal and
            the observations, or ``None``. Particles of a plated problem are problem-major:
            ``(B * K, *event)``, rows ``b * K .. (b + 1) * K`` belong to problem ``b``, and
            every observation has a leading ``(B,)``.
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
        global_latents: dict[str, GlobalLatent] | None = None,
        bound: dict[str, Tensor] | None = None,
        particle_count: int | None = None,
        plate: tuple[str, int] | None = None,
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
        self.global_latents = dict(global_latents or {})
        self.bound = bound
        self.particle_count = particle_count
        self.plate = plate
        self.second: tuple[str, DiffusionPrior] | None = None
        self.second_value: Tensor | None = None
        self.nfe = 0
        self.vjp = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Callable, *args, batch_size: int | None = None, **kwargs) -> Problem:
        """Trace ``model(*args, **kwargs)`` and classify its sites.

        The DiffusionPrior site is the signal; every other latent site is a global latent (a
        continuous distribution of at most :data:`~diffpost.posterior.latents.MAX_GLOBAL_SIZE`
        entries, outside any plate, on which the signal's prior does not depend and which does
        not depend on the signal); observed sites are the likelihood.

        Raises:
            ValueError: no DiffusionPrior site or more than one; a latent site that cannot be a
                global latent (named, with the reason); an observed value with NaN/inf or a
                shape that does not match its distribution; a prior with a batch shape; an
                observation on another device than the prior.
        """
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")
        return cls._read(model, args, kwargs, batch_size, None, None)

    @classmethod
    def _read(
        cls,
        model: Callable,
        args: tuple,
        kwargs: dict[str, Any],
        batch_size: int | None,
        known: dict[str, GlobalLatent] | None,
        bound: dict[str, Tensor] | None,
    ) -> Problem:
        """A problem read by :func:`~diffpost.posterior.reading.read_model`."""
        reading = read_model(model, args, kwargs, batch_size, known, bound)
        problem = cls(
            model,
            args,
            kwargs,
            reading.latent_name,
            reading.prior,
            reading.observed,
            reading.likelihood_sites,
            reading.gaussian,
            batch_size,
            reading.global_latents,
            bound,
            plate=reading.plate,
        )
        problem.second = reading.second
        return problem

    # ------------------------------------------------------------------ description
    @property
    def num_problems(self) -> int:
        """``B``, the plate's size (1 without a plate)."""
        return 1 if self.plate is None else self.plate[1]

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
            operator = getattr(self.gaussian.operator, "display_name", None)
            operator = operator or type(self.gaussian.operator).__name__
            sigma = self._sigma_text()
            where = self.gaussian.site
            where = f"sites {where}" if ", " in where else f"site {where!r}"
            return f"GaussianObservation({operator}, sigma={sigma}) at {where}"
        parts = []
        for name in self.likelihood_sites:
            fn = self._trace_fn(name)
            text = f"{describe_distribution(fn)} at site {name!r}"
            if isinstance(fn, GaussianObservation) and not self.global_latents and not self.second:
                text += (
                    f" whose x is not the signal {self.latent_name!r} itself (a transformed "
                    "signal, or next to a non-Gaussian site): the linear structure needs "
                    f"GaussianObservation(A, {self.latent_name}, sigma) with the latent passed "
                    "unchanged at every observed site"
                )
            parts.append(text)
        return ", ".join(parts) or "no observed site"

    def _sigma_text(self) -> str:
        sigma = self.gaussian.sigma
        return f"{float(sigma):.3g}" if sigma.numel() == 1 else f"tensor{tuple(sigma.shape)}"

    def _trace_fn(self, name: str):
        x = torch.zeros(self.prior.shape(), dtype=self.dtype, device=self.device)
        values = None
        if self.global_latents and (self.bound is None or self.particle_count is not None):
            values = {  # one value of each global latent, for a description
                n: (v[0] if self.bound is not None else v)
                for n, v in (self.bound or self.typical_globals()).items()
            }
        second = None
        if self.second is not None:
            second = torch.zeros(self.second[1].shape(), dtype=self.dtype, device=self.device)
        return self._trace(x, values, second).nodes[name]["fn"]

    def require(self, engine: Any) -> None:
        """Raise ``ValueError`` naming the engine, the missing capabilities and the observation.

        A problem with free global latents is refused to every engine that does not infer them
        (``infers_globals``), and such an engine is refused a problem without any.
        """
        pair = bool(getattr(engine, "infers_two_signals", False))
        if self.second is not None and self.second_value is None and not pair:
            raise ValueError(
                f"the model has two DiffusionPrior sites ({self.latent_name!r}, "
                f"{self.second[0]!r}): {type(engine).__name__} infers one signal; use "
                "posterior.BlindDPS"
            )
        if pair and self.second is None:
            raise ValueError(
                f"{type(engine).__name__} infers two signals, but the model has one "
                f"DiffusionPrior site ({self.latent_name!r})"
            )
        infers = bool(getattr(engine, "infers_globals", False))
        free = sorted(self.global_latents) if self.bound is None else []
        if free and not infers:
            raise ValueError(
                f"the model has global latent site(s) {free} besides the signal "
                f"{self.latent_name!r}: {type(engine).__name__} infers the signal only. Wrap it "
                "in a mechanism that infers them too (posterior.PMMH, posterior.Gibbs, "
                "posterior.EM), or fix them (pyro.poutine.condition, or pass their values)"
            )
        if infers and not free:
            raise ValueError(
                f"{type(engine).__name__} infers global latents, but the model has none besides "
                f"the signal {self.latent_name!r}: run its inner engine directly"
            )
        missing = set(getattr(engine, "requires", ())) - self.capabilities
        if "gaussian_observation" in missing:  # the structure the others refine is absent
            missing -= {"linear", "svd", "mask", "noiseless"}
        elif "linear" in missing:
            missing -= {"svd", "mask"}
        missing = sorted(missing)
        if missing:
            needs = "; ".join(CAPABILITIES[c] for c in missing)
            if self.particle_count is not None:
                raise ValueError(
                    f"{type(engine).__name__} needs {needs}; with one value of the global "
                    f"latents {sorted(self.global_latents)} per particle the observation "
                    f"({self.describe_observation()}) has no single linear structure: use an "
                    "engine that needs only the likelihood (DPS, DAPS, ScoreALD, DCDP, ...)"
                )
            raise ValueError(
                f"{type(engine).__name__} needs {needs}; the model has "
                f"{self.describe_observation()} "
                f"and a {type(self.prior).__name__} prior at site {self.latent_name!r}"
            )

    # ------------------------------------------------------------------ likelihood
    def _trace(
        self, x: Tensor, values: dict[str, Tensor] | None = None, second: Tensor | None = None
    ):
        """Trace the model with the signal at ``x``, the global latents at ``values`` (default:
        the bound ones) and the second signal at ``second`` (default: its bound values)."""
        if values is None:
            values = self.bound
            if self.particle_count is not None and x.shape[0] != self.particle_count:
                raise ValueError(
                    f"this problem holds one value of the global latents for each of "
                    f"{self.particle_count} particles; got {x.shape[0]} particles"
                )
        if values is None and self.global_latents:
            raise ValueError(
                f"the global latents {sorted(self.global_latents)} are free: fix them with "
                "with_globals before evaluating the likelihood"
            )
        if second is None and self.second is not None:
            if self.second_value is None:
                raise ValueError(
                    f"the second signal {self.second[0]!r} is free: bind it with "
                    "with_second_signal before evaluating the likelihood"
                )
            second = self.second_value
            if x.shape[0] != second.shape[0]:
                raise ValueError(
                    f"this problem holds one value of {self.second[0]!r} for each of "
                    f"{second.shape[0]} particles; got {x.shape[0]} particles"
                )

        def signal(name: str, prior: DiffusionPrior) -> Tensor:
            return x if name == self.latent_name else second

        messenger = SetLatents(
            signal, None if values is None else lambda msg: values.get(msg["name"])
        )
        return prune_subsample_sites(
            poutine.trace(messenger(self.model)).get_trace(*self.model_args, **self.model_kwargs)
        )

    def chunks(self, n: int) -> list[slice | Tensor]:
        """Index sets that split ``n`` particles into chunks of at most ``batch_size``.

        Without a plate: consecutive slices. With a plate of ``B`` problems, each chunk holds the
        same rows ``k0 .. k1`` of every problem (a ``long`` index tensor, problem-major), so a
        chunk is itself a plated batch of ``B * (k1 - k0)`` particles, and holds at least ``B``
        particles. :meth:`join_chunks` puts per-chunk results back in order.
        """
        size = self.batch_size or max(n, 1)
        if self.plate is None:
            return [slice(start, min(start + size, n)) for start in range(0, n, size)]
        count = self.num_problems
        rows = n // count
        per_chunk = max(1, size // count)
        if per_chunk >= rows:
            return [slice(0, n)]
        offsets = torch.arange(count).mul_(rows)[:, None]
        return [
            (offsets + torch.arange(start, min(start + per_chunk, rows))[None]).flatten()
            for start in range(0, rows, per_chunk)
        ]

    def join_chunks(self, parts: list[Tensor], chunks: list[slice | Tensor]) -> Tensor:
        """Per-chunk results (leading dim the chunk's particles) -> ``(n, ...)`` in order (one
        chunk's result is returned as it is, not copied)."""
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        if all(isinstance(chunk, slice) for chunk in chunks):
            return joined
        order = torch.cat([chunk for chunk in chunks]).to(joined.device)
        result = torch.empty_like(joined)
        result[order] = joined
        return result

    def _check_particles(self, x: Tensor, finite: bool = False) -> None:
        event = tuple(self.event_shape)
        if x.dim() != len(event) + 1 or tuple(x.shape[1:]) != event:
            raise ValueError(
                f"particles must have shape (N, {', '.join(map(str, event))}); got {tuple(x.shape)}"
            )
        if x.shape[0] % self.num_problems:
            raise ValueError(
                f"{x.shape[0]} particles cannot be split among the {self.num_problems} problems "
                f"of plate {self.plate[0]!r}: give B * K particles, problem-major"
            )
        if finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteParticles("non-finite particles reached the likelihood")

    def _log_likelihood_chunk(self, x: Tensor) -> Tensor:
        gaussian = self.gaussian
        if gaussian is not None:
            return gaussian.log_likelihood(x)
        return self._likelihood_of_trace(self.trace_signal(x), x.shape[0])

    def trace_signal(self, x: Tensor):
        """The model's trace with the signal at the particles ``x`` ``(n, *event)``.

        With a plate of ``B`` problems the particles are passed as ``(n / B, B, *event)`` (the
        plate is the rightmost batch dim), so every site's batch shape is ``(n / B, B)``; see
        :meth:`site_rows` for per-particle rows.
        """
        if self.plate is None:
            return self._trace(x)
        rows = x.shape[0] // self.num_problems
        plated = x.reshape(self.num_problems, rows, *x.shape[1:]).transpose(0, 1)
        return self._trace(plated)

    def site_rows(self, value: Tensor, count: int) -> Tensor:
        """A per-particle quantity of a :meth:`trace_signal` trace, as ``(count, ...)`` rows in
        the particles' order (problem-major under a plate)."""
        if self.plate is None:
            return value
        return value.transpose(0, 1).reshape(count, *value.shape[2:])

    def _likelihood_of_trace(self, trace, count: int) -> Tensor:
        """The observed sites' total ``log p`` in a trace of ``count`` particles, ``(count,)``."""
        total = 0.0
        for name in self.likelihood_sites:
            site = trace.nodes[name]
            log_prob = site["fn"].log_prob(site["value"])
            if self.plate is not None and log_prob.shape == (
                count // self.num_problems,
                self.num_problems,
            ):
                log_prob = self.site_rows(log_prob, count)
            if log_prob.shape != (count,):
                raise ValueError(
                    f"observed site {name!r}: log_prob has shape {tuple(log_prob.shape)} for "
                    f"{count} particles; the model must broadcast over a leading particle "
                    "dimension (declare the observation with .to_event(k), no plate over "
                    "measurements)"
                )
            total = total + log_prob * site["scale"]
        if isinstance(total, float):
            raise ValueError("the model has no observed site: there is no likelihood")
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
        chunks = self.chunks(x.shape[0])
        return self.join_chunks([self._log_likelihood_chunk(x[chunk]) for chunk in chunks], chunks)

    def grad_log_likelihood(self, x: Tensor) -> Tensor:
        r""":math:`\\nabla_x \\log p(y \\mid x)`, ``(N, *event) -> (N, *event)`` (chunked)."""
        self._check_particles(x, finite=True)
        if "finite_likelihood" not in self.capabilities:
            self.log_likelihood(x)  # raises the explanatory error
        grads = []
        chunks = self.chunks(x.shape[0])
        for chunk in chunks:
            with torch.enable_grad():
                part = x[chunk].detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self._log_likelihood_chunk(part).sum(), part)
            grads.append(grad)
        return self.join_chunks(grads, chunks)

    def likelihood_curvature(self, iterations: int = 30) -> float:
        r"""The largest curvature of the data term, :math:`\lambda_{\max}(-\nabla^2_x \log
        p(y \mid x))`, the unit of data-term step sizes (cached).

        With a linear GaussianObservation: :math:`\lVert A \rVert_2^2 / \min \sigma^2`
        (non-linear operators taken as 1-Lipschitz, as
        :class:`~diffpost.models.operators.PhaseRetrieval` is). Otherwise: power iteration
        (``iterations`` Hessian-vector products through the model, no denoiser call) at the probe
        point ``x = 0``, from a fixed random start; e.g. ``Normal(A(x), 0.3)`` gives
        :math:`\lVert A \rVert^2 / 0.09` as the structured form does.

        Raises:
            ValueError: the likelihood is degenerate (noiseless observation).
        """
        cached = getattr(self, "_likelihood_curvature", None)
        if cached is not None:
            return cached
        gaussian = self.gaussian
        if gaussian is not None:
            operator = gaussian.operator
            gain = operator.norm() ** 2 if isinstance(operator, LinearOperator) else 1.0
            if gaussian.noiseless:
                self.log_likelihood(torch.zeros((self.num_problems, *self.event_shape)))  # raises
            curvature = gain / float(gaussian.sigma.min()) ** 2
        else:
            shape = (self.num_problems, *self.event_shape)
            probe = torch.zeros(shape, dtype=self.dtype, device=self.device)
            generator = torch.Generator().manual_seed(0)
            direction = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
            curvature = 0.0
            for _ in range(iterations):
                direction = direction / direction.flatten().norm().clamp_min(1e-300)
                with torch.enable_grad():
                    x = probe.clone().requires_grad_(True)
                    (gradient,) = torch.autograd.grad(
                        self.log_likelihood(x).sum(), x, create_graph=True
                    )
                    (product,) = torch.autograd.grad((gradient * direction).sum(), x)
                direction = -product.detach()
                previous, curvature = curvature, float(direction.flatten().norm())
                if abs(curvature - previous) <= 1e-6 * curvature:
                    break
        self._likelihood_curvature = max(curvature, 1e-12)
        return self._likelihood_curvature

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
        size = self.batch_size or max(x_t.shape[0], 1)  # no per-problem data: plain slices
        chunks = [slice(start, start + size) for start in range(0, x_t.shape[0], size)]
        with torch.no_grad():
            parts = [
                self.prior.denoise(x_t[chunk], t if t.dim() == 0 else t[chunk]) for chunk in chunks
            ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

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
        chunks = self.chunks(x_t.shape[0])
        for chunk in chunks:
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
        return self.join_chunks(estimates, chunks), self.join_chunks(grads, chunks)

    def __repr__(self) -> str:
        return (
            f"Problem(latent={self.latent_name!r}: "
            f"{type(self.prior).__name__}{tuple(self.event_shape)}, "
            f"observation={self.describe_observation()})"
        )
