r"""Draws from a Pyro model's prior predictive :math:`p(x)\,p(y \mid x)`, batched.

The diffusion prior's site is sampled once for the whole batch (exact for Gaussian mixtures, the
prior's reverse sampler for a learned prior), and every other unobserved site from its batched
distribution. Every draw takes an explicit ``torch.Generator``; the global random state is left
untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from diffpost.models.priors import DiffusionPrior

__all__ = ["prior_predictive"]


class _PriorPredictive(Messenger):
    """Draw every unobserved site: the prior ``num`` times, the others once from their
    (batched) distributions. One ``torch.Generator`` per device, seeded by ``seed``."""

    def __init__(self, num: int, seed: int):
        super().__init__()
        self.num = num
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or msg["infer"].get("_deterministic"):
            return
        fn = msg["fn"]
        if isinstance(fn, DiffusionPrior):
            generator = self._generator(fn.device)
            msg["value"] = fn.sample((self.num,), generator=generator)
        elif "generator" in inspect.signature(fn.sample).parameters:
            msg["value"] = fn.sample(generator=self._generator(_device_of(fn)))
        else:
            # a distribution whose sample() takes no generator: draw inside fork_rng, seeded
            # from our generator, so that the global random state is left as it was
            device = _device_of(fn)
            generator = self._generator(device)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                msg["value"] = fn.sample()


def _device_of(fn: Any) -> torch.device:
    try:
        return fn.mean.device
    except (AttributeError, NotImplementedError):
        return torch.device("cpu")


def prior_predictive(
    model: Callable,
    num_samples: int,
    seed: int = 0,
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[str, Tensor, dict[str, Tensor]]:
    r"""Draw :math:`(x_i, y_i) \sim p(x) p(y \mid x)`, ``i = 1..num_samples``, in one batch.

    The prior site (the model's :class:`~diffpost.models.priors.DiffusionPrior`) is sampled with
    ``sample((num_samples,), generator=...)`` (exact for Gaussian mixtures, the prior's
    reverse sampler for a learned prior); every other unobserved site is then drawn from its
    distribution, which broadcasts over the leading sample dimension (as
    :meth:`diffpost.posterior.Problem.log_likelihood` already requires of observations).

    Args:
        model: the Pyro model, called as ``model(*model_args, **model_kwargs)`` with its
            observations left unobserved (e.g. ``y=None``).
        num_samples: number of draws.
        seed: seed of the ``torch.Generator`` (one per device) of every draw; distributions
            whose ``sample`` takes no generator draw inside :func:`torch.random.fork_rng`
            seeded from it, leaving the global random state untouched.
        model_args: positional arguments of the model.
        model_kwargs: keyword arguments of the model (without observed values).

    Returns:
        ``(latent_name, x, observations)``: the prior site's name, ``x`` of shape
        ``(num_samples, *event)`` and observed-site name -> ``(num_samples, *obs event)``.

    Raises:
        ValueError: no or several DiffusionPrior sites; an observed site (its value would be the
            same for every trial); a site whose draw has no leading ``num_samples`` dim.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
    with torch.no_grad():
        trace = poutine.trace(_PriorPredictive(num_samples, int(seed))(model)).get_trace(
            *model_args, **(model_kwargs or {})
        )
    sites = [
        site
        for site in prune_subsample_sites(trace).nodes.values()
        if site["type"] == "sample" and not site["infer"].get("_deterministic")
    ]
    priors = [s for s in sites if isinstance(s["fn"], DiffusionPrior) and not s["is_observed"]]
    if len(priors) != 1:
        raise ValueError(
            f"the model needs exactly one DiffusionPrior latent site; found {len(priors)}"
        )
    latent = priors[0]
    observed = [s["name"] for s in sites if s["is_observed"]]
    if observed:
        raise ValueError(
            f"site(s) {observed} are observed, so their values would be the same in every trial: "
            "pass model_kwargs that leave the measurements unobserved (e.g. y=None); the study "
            "simulates them"
        )
    observations = {}
    for site in sites:
        if site is latent:
            continue
        value = site["value"]
        if value.dim() == 0 or value.shape[0] != num_samples:
            raise ValueError(
                f"site {site['name']!r} drew a value of shape {tuple(value.shape)} for "
                f"{num_samples} prior draws: its distribution must broadcast over a leading "
                "sample dimension (declare the observation with .to_event(k), no plate)"
            )
        observations[site["name"]] = value
    if not observations:
        raise ValueError("the model has no observation site besides the prior")
    return latent["name"], latent["value"], observations
