r"""Global latents: the small continuous unknowns of a model besides its signal.

A model may declare, beside its diffusion-prior signal ``x``, latent sites such as a noise level
``sigma ~ HalfNormal(0.2)``, a blur width ``width ~ LogNormal(0, 0.3)`` or an operator gain. They
are the *global latents* :math:`\theta` of a hierarchical (or blind) inverse problem: the
observation's operator and noise level may depend on them, the signal's prior may not.
Inference mechanisms (:class:`~diffpost.posterior.PMMH`, :class:`~diffpost.posterior.Gibbs`,
:class:`~diffpost.posterior.EM`) move them in an unconstrained space, as Pyro's and NumPyro's HMC
do: :math:`\theta = T(z)` with :math:`T` = ``torch.distributions.biject_to(support)``, and the
density of :math:`z` carries :math:`\log |\det \partial T / \partial z|`.

:class:`GlobalSpace` packs every global latent into one unconstrained vector of ``dim`` entries:
values ``(P, *site shape)`` per site, with ``P`` leading particles (or chains), map to and from
``z`` of shape ``(P, dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.poutine as poutine
import torch
from pyro.distributions import Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to

from diffpost.models.observations import GaussianObservation
from diffpost.models.priors import DiffusionPrior, GaussianMixture

__all__ = [
    "GlobalLatent",
    "GlobalSpace",
    "MAX_GLOBAL_SIZE",
    "classify_globals",
    "describe_distribution",
    "leading_count",
    "run_until_globals_seen",
    "same_prior",
    "site_log_prob",
]

#: the largest global latent (entries of one site) the library infers; bigger unknowns are
#: signals and need a prior of their own (a DiffusionPrior)
MAX_GLOBAL_SIZE = 64


@dataclass(frozen=True)
class GlobalLatent:
    """One global latent site.

    Attributes:
        name: the site's name.
        shape: the site's value shape (the distribution's batch and event shape).
        transform: ``biject_to(support)``, from unconstrained values to the support.
        distribution: the site's distribution when the model was read (for display; the model is
            traced again wherever its density is needed, so it may depend on other globals).
    """

    name: str
    shape: torch.Size
    transform: Transform
    distribution: object

    @property
    def unconstrained_shape(self) -> torch.Size:
        return self.transform.inverse_shape(self.shape)

    @property
    def size(self) -> int:
        """Entries of the unconstrained value."""
        return math.prod(self.unconstrained_shape)

    def typical_value(self, like: Tensor) -> Tensor:
        """``T(0)``: a point of the support (e.g. 1 for a positive scale), on ``like``'s dtype and
        device."""
        zeros = torch.zeros(self.unconstrained_shape, dtype=like.dtype, device=like.device)
        return self.transform(zeros)


class GlobalSpace:
    r"""Every global latent of a model as one unconstrained vector.

    Args:
        latents: the model's global latents, in the order of the model.
    """

    def __init__(self, latents: list[GlobalLatent]):
        self.latents = list(latents)
        self.dim = sum(latent.size for latent in self.latents)

    @property
    def names(self) -> list[str]:
        return [latent.name for latent in self.latents]

    def constrain(self, z: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        r"""``z`` ``(P, dim)`` -> values ``{name: (P, *shape)}`` and
        :math:`\log |\det \partial T / \partial z|` ``(P,)``."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected unconstrained values (P, {self.dim}); got {tuple(z.shape)}")
        values, log_jacobian, start = {}, z.new_zeros(z.shape[0]), 0
        for latent in self.latents:
            part = z[:, start : start + latent.size].reshape(
                (z.shape[0],) + latent.unconstrained_shape
            )
            start += latent.size
            value = latent.transform(part)
            jacobian = latent.transform.log_abs_det_jacobian(part, value)
            log_jacobian = log_jacobian + jacobian.reshape(z.shape[0], -1).sum(1)
            values[latent.name] = value
        return values, log_jacobian

    def unconstrain(self, values: dict[str, Tensor]) -> Tensor:
        """Values ``{name: (P, *shape)}`` -> ``z`` ``(P, dim)``."""
        parts = []
        for latent in self.latents:
            value = values[latent.name]
            z = latent.transform.inv(value)
            parts.append(z.reshape(z.shape[0], -1))
        return torch.cat(parts, dim=1)


def site_log_prob(site: dict) -> Tensor:
    """``log p`` of a site's value, summed over the distribution's own batch dims: a value with
    ``P`` extra leading dims gives ``(P,)``, an unbatched one a 0-d tensor."""
    fn = site["fn"]
    log_prob = fn.log_prob(site["value"])
    extra = len(fn.batch_shape)
    return log_prob.sum(tuple(range(log_prob.dim() - extra, log_prob.dim()))) if extra else log_prob


def same_prior(first: DiffusionPrior, second: DiffusionPrior) -> bool:
    """Whether two traces' priors are the same distribution (by identity, or equal parameters)."""
    if first is second:
        return True
    if type(first) is not type(second) or first.event_shape != second.event_shape:
        return False
    if isinstance(first, GaussianMixture):
        return all(
            torch.equal(getattr(first, n), getattr(second, n))
            for n in ("weights", "means", "covariances")
        )
    return first.denoiser is second.denoiser


def describe_distribution(fn) -> str:
    """A distribution's name, through ``.to_event`` wrappers."""
    event_dims = 0
    while isinstance(fn, Independent):
        fn, event_dims = fn.base_dist, event_dims + fn.reinterpreted_batch_ndims
    return type(fn).__name__ + (f".to_event({event_dims})" if event_dims else "")


def leading_count(values: dict[str, Tensor], latents: dict[str, GlobalLatent]) -> int | None:
    """``P`` when every value is ``(P, *shape)``, ``None`` when every one is ``(*shape)``."""
    counts = {
        None if tuple(values[n].shape) == tuple(latent.shape) else values[n].shape[0]
        for n, latent in latents.items()
    }
    if len(counts) != 1:
        raise ValueError(
            f"global-latent values with mixed leading sizes {sorted(map(str, counts))}"
        )
    return counts.pop()


def classify_globals(sites: list[dict], trace, prior_site: dict, read) -> dict[str, GlobalLatent]:
    """The latent sites besides the signal as global latents, or a ``ValueError`` naming the first
    that cannot be one and why. ``read(signal_value, shift)`` traces the model again with the
    signal and the globals moved, to check what depends on what."""
    latents = {}
    for site in sites:
        name, fn = site["name"], site["fn"]
        kind = describe_distribution(fn)
        if isinstance(fn, GaussianObservation):
            raise ValueError(
                f"latent site {name!r} ({kind}) has no value: if it is a measurement, pass it "
                f"(e.g. model_kwargs={{'{name}': y}})"
            )
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} ({kind}) is discrete: global latents must be continuous "
                "(marginalise it out in the model, or fix it)"
            )
        plates = [frame.name for frame in site["cond_indep_stack"]]
        if plates:
            raise ValueError(
                f"latent site {name!r} ({kind}) is inside plate(s) {plates}: a global latent "
                "must be outside every plate"
            )
        try:
            transform = biject_to(fn.support)
        except NotImplementedError:
            raise ValueError(
                f"latent site {name!r} ({kind}): its support {fn.support} has no bijection to "
                "an unconstrained space (torch.distributions.biject_to)"
            ) from None
        latent = GlobalLatent(name, fn.shape(), transform, fn)
        if latent.size > MAX_GLOBAL_SIZE:
            raise ValueError(
                f"latent site {name!r} ({kind}) has {latent.size} entries: global latents have "
                f"at most {MAX_GLOBAL_SIZE}; an unknown that large is a signal and needs a "
                "DiffusionPrior"
            )
        latents[name] = latent
    if not latents:
        return latents
    moved_signal = read(signal_value=0.5)
    for name in latents:
        here, there = site_log_prob(trace.nodes[name]), site_log_prob(moved_signal.nodes[name])
        if not torch.allclose(here, there, equal_nan=True):
            raise ValueError(
                f"latent site {name!r} ({describe_distribution(trace.nodes[name]['fn'])}) "
                f"depends on the signal {prior_site['name']!r}: if it is a measurement, pass "
                f"its value (e.g. model_kwargs={{'{name}': y}}); a latent that depends on the "
                "signal is not supported"
            )
    moved_globals = read(shift=0.5)
    if not same_prior(prior_site["fn"], moved_globals.nodes[prior_site["name"]]["fn"]):
        raise ValueError(
            f"the prior at site {prior_site['name']!r} changes with the global latents "
            f"{sorted(latents)}: a prior whose parameters depend on them is not supported "
            "(build the prior outside the model)"
        )
    return latents


class _AllGlobalsSeen(Exception):
    """Raised by :class:`_UntilGlobalsSeen` once every global latent has been visited."""


class _UntilGlobalsSeen(Messenger):
    """Run a model until its last global latent: set them to given values (or let them sample),
    add up their log-densities, then stop; the signal's site gets a placeholder (its sampler
    never runs)."""

    def __init__(self, names: set[str], values: dict[str, Tensor] | None, placeholder: Tensor):
        super().__init__()
        self.names, self.values, self.placeholder = names, values, placeholder
        self.seen: dict[str, Tensor] = {}
        self.total: Tensor | float = 0.0

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if isinstance(msg["fn"], DiffusionPrior):
            msg["value"] = self.placeholder
        elif self.values is not None and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.names and not msg["is_observed"]:
            self.total = self.total + site_log_prob(msg)
            self.seen[msg["name"]] = msg["value"]
            if set(self.seen) == self.names:
                raise _AllGlobalsSeen


def run_until_globals_seen(
    model,
    args: tuple,
    kwargs: dict,
    names: set[str],
    placeholder: Tensor,
    values: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    r"""Run ``model`` only until its last global latent, and return their values and
    :math:`\log p(\theta)`.

    Args:
        model: the Pyro model.
        args, kwargs: its arguments.
        names: the global latents.
        placeholder: the signal's value while the model runs (its prior never samples).
        values: the globals' values (with or without a leading particle dim); ``None`` lets
            Pyro draw them from their priors (with the global random number generator: callers
            seed it in a ``torch.random.fork_rng`` block).

    Returns:
        ``(values, log_prior)``.
    """
    messenger = _UntilGlobalsSeen(set(names), values, placeholder)
    try:
        with poutine.block():
            messenger(model)(*args, **kwargs)
    except _AllGlobalsSeen:
        pass
    missing = sorted(set(names) - set(messenger.seen))
    if missing:
        raise ValueError(f"the model did not draw the global latent(s) {missing}")
    return messenger.seen, torch.as_tensor(messenger.total)
