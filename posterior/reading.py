"""How a Pyro model is read: the signal and global latents set without sampling, the sites
classified, the observed values checked, the linear-Gaussian structure detected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import Operator
from diffpost.models.priors import DiffusionPrior
from diffpost.posterior.latents import GlobalLatent, classify_globals

__all__ = ["GaussianStructure", "Reading", "SetLatents", "is_deterministic", "read_model"]


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


class Reading(NamedTuple):
    """What :func:`read_model` found in a model."""

    latent_name: str
    prior: DiffusionPrior
    observed: dict[str, Tensor]
    likelihood_sites: list[str]
    gaussian: GaussianStructure | None
    global_latents: dict[str, GlobalLatent]
    second: tuple[str, DiffusionPrior] | None


class SetLatents(Messenger):
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


def is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def read_model(
    model: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    batch_size: int | None,
    known: dict[str, GlobalLatent] | None,
    bound: dict[str, Tensor] | None,
) -> Reading:
    """Read the model with the global latents at ``bound`` (one value each; ``None``: at a
    typical point); ``known`` skips their classification (already done by the caller).

    Raises:
        ValueError: see :meth:`~diffpost.posterior.Problem.from_model`.
    """

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
            messenger = SetLatents(lambda n, p: placeholder(n, p, signal_value), globals_at(shift))
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
    if len(priors) > 2:
        names = ", ".join(repr(s["name"]) for s in priors)
        raise ValueError(
            f"the model has {len(priors)} DiffusionPrior sites ({names}); at most two are "
            "supported (an image and, for BlindDPS, its blur kernel)"
        )
    for site in priors:
        if site["fn"].batch_shape:
            raise ValueError(
                f"the prior at site {site['name']!r} has batch shape "
                f"{tuple(site['fn'].batch_shape)}; declare one signal (engines add the "
                "particle dimension themselves)"
            )
    prior_site = priors[0]
    prior: DiffusionPrior = prior_site["fn"]
    second = None
    if len(priors) == 2:
        second = (priors[1]["name"], priors[1]["fn"])
        if (second[1].dtype, second[1].device) != (prior.dtype, prior.device):
            raise ValueError(
                f"the priors at sites {prior_site['name']!r} and {second[0]!r} differ in "
                f"dtype or device ({prior.dtype}, {prior.device} against {second[1].dtype}, "
                f"{second[1].device})"
            )
    others = [
        s for s in sites if s not in priors and not is_deterministic(s) and not s["is_observed"]
    ]
    if known is None:
        known = classify_globals(others, trace, prior_site, read)
    if known and second is not None:
        raise ValueError(
            f"the model has global latents {sorted(known)} and a second DiffusionPrior site "
            f"{second[0]!r}: the two together are not supported"
        )
    for site in others:  # bound values: the same sites as the unbound model's
        if site["name"] not in known:
            raise ValueError(f"latent site {site['name']!r} appeared at new global values")
    observed, likelihood_sites = {}, []
    for site in sites:
        name = site["name"]
        if not site["is_observed"] or is_deterministic(site):
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
    if (known and bound is None) or len(likelihood_sites) != 1 or len(priors) > 1:
        pass  # free global latents: the structure depends on them
    elif likelihood_sites[0] in observed:
        site = trace.nodes[likelihood_sites[0]]
        fn = site["fn"]
        if isinstance(fn, GaussianObservation) and fn.x is prior_site["value"]:
            gaussian = GaussianStructure(site["name"], fn.operator, fn.sigma, site["value"])
    return Reading(prior_site["name"], prior, observed, likelihood_sites, gaussian, known, second)
