"""The methods of :class:`~diffpost.posterior.Problem` for global latents and a second signal:
fixing them (:meth:`with_globals`, :meth:`with_second_signal`), their densities, prior draws and
the check that a model broadcasts one value per particle."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffpost.posterior.latents import (
    GlobalSpace,
    leading_count,
    run_until_globals_seen,
    site_log_prob,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffpost.posterior.problem import Problem

__all__ = ["GlobalLatentMethods"]


class GlobalLatentMethods:
    """Mixed into :class:`~diffpost.posterior.Problem` (which defines every attribute used)."""

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

    def with_second_signal(self, value: Tensor) -> Problem:
        """This problem with its second DiffusionPrior site (e.g. a blur kernel) at one value per
        particle: an ordinary problem of the first signal.

        Args:
            value: ``(P, *event)`` of the second signal's prior; likelihood calls then take
                exactly ``P`` particles (in one chunk), and no linear structure is offered.
                Gradients flow to ``value`` when it requires them.

        Raises:
            ValueError: no second signal, or a misshapen value.
        """
        if self.second is None:
            raise ValueError("with_second_signal: the model has one DiffusionPrior site")
        name, prior = self.second
        event = tuple(prior.event_shape)
        if value.dim() != len(event) + 1 or tuple(value.shape[1:]) != event:
            raise ValueError(
                f"the second signal {name!r} has event shape {event}; got a value of shape "
                f"{tuple(value.shape)} (expected (P, *event))"
            )
        if self.batch_size is not None and self.batch_size < value.shape[0]:
            raise ValueError(
                f"one value of {name!r} per particle is evaluated in one chunk of "
                f"{value.shape[0]} particles; batch_size={self.batch_size} is smaller"
            )
        problem = copy.copy(self)
        problem.second_value, problem.particle_count = value, value.shape[0]
        problem.nfe, problem.vjp = 0, 0
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
