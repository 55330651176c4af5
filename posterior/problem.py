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
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import LinearOperator, Operator
from diffpost.models.operators.basic import Mask
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.posterior.latents import (
    GlobalLatent,
    GlobalSpace,
    classify_globals,
    describe_distribution,
    leading_count,
    run_until_globals_seen,
    site_log_prob,
)

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


class _SetLatents(Messenger):
    """Give the signal's site its value (a placeholder or the particles) without running its
    sampler, and the global latents theirs.

    Args:
        signal: ``(name, prior) -> value`` for the DiffusionPrior site.
        globals_: ``(site) -> value or None`` for every other latent site (``None``: leave it).
    """

    def __init__(
        self,
        signal: Callable[[str, DiffusionPrior], Tensor],
        globals_: Callable[[dict], Tensor | None] | None = None,
    ):
        super().__init__()
        self.signal = signal
        self.globals_ = globals_

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if isinstance(msg["fn"], DiffusionPrior):
            msg["value"] = self.signal(msg["name"], msg["fn"])
        elif self.globals_ is not None:
            value = self.globals_(msg)
            if value is not None:
                msg["value"] = value


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


class Problem:
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
        """Read the model with the global latents at ``bound`` (one value each; ``None``: at a
        typical point); ``known`` skips their classification (already done by the caller)."""

        def placeholder(name: str, prior: DiffusionPrior, value: float = 0.0) -> Tensor:
            return torch.full(prior.shape(), value, dtype=prior.dtype, device=prior.device)

        def globals_at(shift: float):
            def value(msg) -> Tensor | None:
                if bound is not None and msg["name"] in bound:
                    return bound[msg["name"]]
                fn = msg["fn"]
                if fn.support.is_discrete:
                    return None  # refused below; never sampled with the global RNG
                try:
                    transform = biject_to(fn.support)
                except NotImplementedError:
                    return None  # refused below
                shape = transform.inverse_shape(fn.shape())
                return transform(torch.full(shape, shift, dtype=torch.get_default_dtype()))

            return value

        def read(signal_value: float = 0.0, shift: float = 0.0):
            with torch.no_grad():
                messenger = _SetLatents(
                    lambda n, p: placeholder(n, p, signal_value), globals_at(shift)
                )
                trace = poutine.trace(messenger(model)).get_trace(*args, **kwargs)
            return prune_subsample_sites(trace)

        trace = read()
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
                f"the model has {len(priors)} DiffusionPrior sites ({names}); one signal latent is "
                "supported (a second diffusion prior, e.g. for a blur kernel, is not yet)"
            )
        prior_site = priors[0]
        prior: DiffusionPrior = prior_site["fn"]
        if prior.batch_shape:
            raise ValueError(
                f"the prior at site {prior_site['name']!r} has batch shape "
                f"{tuple(prior.batch_shape)}; declare one signal (engines add the particle "
                "dimension themselves)"
            )
        others = [
            s
            for s in sites
            if s is not prior_site and not _is_deterministic(s) and not s["is_observed"]
        ]
        if known is None:
            known = classify_globals(others, trace, prior_site, read)
        for site in others:  # bound values: the same sites as the unbound model's
            if site["name"] not in known:
                raise ValueError(f"latent site {site['name']!r} appeared at new global values")
        observed, likelihood_sites = {}, []
        for site in sites:
            name = site["name"]
            if not site["is_observed"] or _is_deterministic(site):
                continue
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
        if (known and bound is None) or len(likelihood_sites) != 1:
            pass  # free global latents: the structure depends on them
        elif likelihood_sites[0] in observed:
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
            known,
            bound,
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
            parts.append(f"{describe_distribution(self._trace_fn(name))} at site {name!r}")
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
        return self._trace(x, values).nodes[name]["fn"]

    def require(self, engine: Any) -> None:
        """Raise ``ValueError`` naming the engine, the missing capabilities and the observation.

        A problem with free global latents is refused to every engine that does not infer them
        (``infers_globals``), and such an engine is refused a problem without any.
        """
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

    # ------------------------------------------------------------------ global latents
    @property
    def global_space(self) -> GlobalSpace:
        """The global latents as one unconstrained vector (see
        :class:`~diffpost.posterior.latents.GlobalSpace`)."""
        return GlobalSpace(list(self.global_latents.values()))

    def typical_globals(self) -> dict[str, Tensor]:
        """One point of each global latent's support (``T(0)``), on the prior's dtype and
        device."""
        like = torch.zeros((), dtype=self.dtype, device=self.device)
        return {name: latent.typical_value(like) for name, latent in self.global_latents.items()}

    def with_globals(self, values: dict[str, Tensor]) -> Problem:
        """This problem with its global latents fixed: an ordinary problem of the signal.

        Args:
            values: every global latent's value, either ``(*shape)`` (one value for all
                particles: the problem is read again at it, so its linear-Gaussian structure,
                e.g. an operator built from a kernel width, is available to every engine) or
                ``(P, *shape)`` with the same ``P`` for all (one value per particle: likelihood
                calls then take exactly ``P`` particles, and no linear structure is offered).

        Raises:
            ValueError: a missing, unknown or misshapen global latent, or ``batch_size`` smaller
                than ``P`` (per-particle values are evaluated in one chunk).
        """
        if not self.global_latents:
            raise ValueError("with_globals: the model has no global latents")
        missing = sorted(set(self.global_latents) - set(values))
        unknown = sorted(set(values) - set(self.global_latents))
        if missing or unknown:
            raise ValueError(
                f"with_globals needs exactly the global latents {sorted(self.global_latents)}; "
                f"missing {missing}, unknown {unknown}"
            )
        values = {
            name: torch.as_tensor(value, dtype=self.dtype, device=self.device)
            for name, value in values.items()
        }
        counts = set()
        for name, latent in self.global_latents.items():
            shape = tuple(values[name].shape)
            if shape == tuple(latent.shape):
                counts.add(None)
            elif len(shape) == len(latent.shape) + 1 and shape[1:] == tuple(latent.shape):
                counts.add(shape[0])
            else:
                raise ValueError(
                    f"global latent {name!r} has shape {tuple(latent.shape)}; got a value of "
                    f"shape {shape} (expected that shape, or (P, *shape) for one per particle)"
                )
        if len(counts) != 1:
            raise ValueError(
                "with_globals: give every global latent one value, or every one P values with "
                f"the same P; got leading sizes {sorted(map(str, counts))}"
            )
        (count,) = counts
        if count is None:
            return self._read(
                self.model,
                self.model_args,
                self.model_kwargs,
                self.batch_size,
                self.global_latents,
                values,
            )
        if self.batch_size is not None and self.batch_size < count:
            raise ValueError(
                f"one value of the global latents per particle is evaluated in one chunk of "
                f"{count} particles; batch_size={self.batch_size} is smaller"
            )
        problem = self._read(
            self.model,
            self.model_args,
            self.model_kwargs,
            self.batch_size,
            self.global_latents,
            {name: value[0] for name, value in values.items()},
        )
        problem.gaussian, problem.bound, problem.particle_count = None, values, count
        return problem

    def log_prior_globals(self, values: dict[str, Tensor]) -> Tensor:
        r""":math:`\log p(\theta)` of global-latent values: 0-d for one value each, ``(P,)`` for
        ``(P, *shape)`` values. The model runs only until its last global latent (a latent may
        depend on another), so the observation need not accept per-particle values."""
        count = leading_count(values, self.global_latents)
        placeholder = torch.zeros(self.prior.shape(), dtype=self.dtype, device=self.device)
        _, total = run_until_globals_seen(
            self.model,
            self.model_args,
            self.model_kwargs,
            set(self.global_latents),
            placeholder,
            values,
        )
        return total if count is not None else total.reshape(())

    def log_joint_globals(self, x: Tensor, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        r"""``(log p(theta), log p(y | x, theta))`` for particles ``x`` ``(N, *event)``.

        With one value per global latent, :math:`\log p(\theta)` is 0-d and the likelihood
        ``(N,)``; with ``(N, *shape)`` values both are ``(N,)``. Differentiable in ``x`` and the
        values (one chunk; no ``batch_size``).
        """
        self._check_particles(x, finite=True)
        trace = self._trace(x, values)
        count = leading_count(values, self.global_latents)
        log_prior = sum(site_log_prob(trace.nodes[name]) for name in self.global_latents)
        if count is None:
            log_prior = log_prior.reshape(())
        return log_prior, self._likelihood_of_trace(trace, x.shape[0])

    def check_particle_broadcasting(self, x: Tensor, values: dict[str, Tensor]) -> None:
        """Check that the model broadcasts one global-latent value per particle.

        The likelihood of two particles, each with its own global values, must equal the
        likelihood of each evaluated alone: a model that combines a ``(P,)`` noise level with
        a ``(P, m)`` mean by right-aligned broadcasting (e.g. ``Normal(A(x), sigma)`` without
        ``sigma[..., None]``) fails, and is refused here instead of giving wrong values.

        Args:
            x: two particles ``(2, *event)``.
            values: two values of each global latent, ``(2, *shape)``.

        Raises:
            ValueError: naming the global latents, with what to change.
        """
        names = sorted(self.global_latents)
        try:
            together = self.log_joint_globals(x, values)
            alone = [
                self.log_joint_globals(x[i : i + 1], {n: v[i] for n, v in values.items()})
                for i in range(2)
            ]
        except (RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"the model does not accept one value of the global latents {names} per "
                f"particle ({reason}); write it so that a value with a leading particle "
                "dimension broadcasts (e.g. sigma[..., None] against an event of shape (m,)), "
                "or use posterior.PMMH or posterior.EM, which give every run one value"
            ) from None
        for k, part in enumerate(("prior", "likelihood")):
            expected = torch.cat([a[k].reshape(-1) for a in alone])
            if not torch.allclose(together[k].reshape(-1), expected, rtol=1e-6, atol=1e-6):
                raise ValueError(
                    f"the model's {part} differs when the global latents {names} take one value "
                    "per particle (a broadcasting mismatch, e.g. a (P,) noise level against a "
                    "(P, m) mean aligned from the right): write it so that a leading particle "
                    "dimension broadcasts (e.g. sigma[..., None]), or use posterior.PMMH or "
                    "posterior.EM, which give every run one value"
                )

    def sample_globals(self, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``count`` draws of the global latents from their prior, ``{name: (count, *shape)}``.

        Pyro's distributions draw with the global random number generator; it is seeded from
        ``generator`` inside ``torch.random.fork_rng``, so the result is reproducible and the
        caller's global generator is left as it was.
        """
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        placeholder = torch.zeros(self.prior.shape(), dtype=self.dtype, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        draws: dict[str, list[Tensor]] = {name: [] for name in self.global_latents}
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.no_grad():
                for _ in range(count):
                    values, _ = run_until_globals_seen(
                        self.model,
                        self.model_args,
                        self.model_kwargs,
                        set(self.global_latents),
                        placeholder,
                    )
                    for name, value in values.items():
                        draws[name].append(value.to(dtype=self.dtype, device=self.device))
        return {name: torch.stack(parts) for name, parts in draws.items()}

    # ------------------------------------------------------------------ likelihood
    def _trace(self, x: Tensor, values: dict[str, Tensor] | None = None):
        """Trace the model with the signal at ``x`` and the global latents at ``values`` (default:
        the bound ones)."""
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
        messenger = _SetLatents(
            lambda name, prior: x, None if values is None else lambda msg: values.get(msg["name"])
        )
        return prune_subsample_sites(
            poutine.trace(messenger(self.model)).get_trace(*self.model_args, **self.model_kwargs)
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
        return self._likelihood_of_trace(self._trace(x), x.shape[0])

    def _likelihood_of_trace(self, trace, count: int) -> Tensor:
        """The observed sites' total ``log p`` in a trace of ``count`` particles, ``(count,)``."""
        total = 0.0
        for name in self.likelihood_sites:
            site = trace.nodes[name]
            log_prob = site["fn"].log_prob(site["value"])
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
