"""How a Pyro model is read: the signal and global latents set without sampling, the sites
classified, the observed values checked, the linear-Gaussian structure detected."""

from __future__ import annotations

import math
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
from diffpost.models.operators.base import LinearOperator, Operator
from diffpost.models.operators.compose import PerProblem, Stack
from diffpost.models.priors import DiffusionPrior
from diffpost.posterior.latents import GlobalLatent, classify_globals

__all__ = ["GaussianStructure", "Reading", "SetLatents", "is_deterministic", "read_model"]


@dataclass(frozen=True)
class GaussianStructure:
    """The observed sites ``y ~ GaussianObservation(operator, x, sigma)`` of the latent ``x``:
    one site, or several stacked (:class:`~diffpost.models.operators.Stack`).

    Attributes:
        site: the observed site's name (several: ``"y1, y2"``).
        operator: the forward model (several sites: their ``Stack``).
        sigma: noise standard deviation (0-d or broadcastable to ``operator.out_shape``;
            several sites with different levels: one per stacked measurement).
        y: the observation, shape ``operator.out_shape`` (several sites: flattened and
            concatenated); ``(B, ...)`` under a plate.
    """

    site: str
    operator: Operator
    sigma: Tensor
    y: Tensor
    plate_size: int | None = None

    @property
    def noiseless(self) -> bool:
        return bool((self.sigma == 0).all())

    def problem_operator(self, index: int) -> Operator:
        """The operator of problem ``index`` of a plate (the shared one unless the model gave
        one per problem, :class:`~diffpost.models.operators.PerProblem`)."""
        if isinstance(self.operator, RowsByProblem):
            return self.operator.per_problem.operators[index]
        return self.operator

    def log_likelihood(self, x: Tensor) -> Tensor:
        r""":math:`\log \mathcal{N}(y; A(x), \sigma^2 I)` of ``n`` particles ``(n, *event)``,
        ``(n,)``: :meth:`GaussianObservation.log_prob
        <diffpost.models.observations.GaussianObservation.log_prob>`'s arithmetic without building
        the distribution (its checks were made when the model was read). Every ``sigma`` must be
        positive."""
        mean = self.operator(x)
        y = self.y_for(x.shape[0])
        out_dims = len(self.operator.out_shape)
        if self.sigma.dim() > out_dims:  # one level per row: the distribution broadcasts it
            return GaussianObservation(self.operator, x, self.sigma).log_prob(y)
        variance = (self.sigma**2).expand(mean.shape)
        event_dims = tuple(range(-out_dims, 0))
        quadratic = ((y - mean) ** 2 / variance).sum(event_dims)
        normaliser = variance.log().sum(event_dims) + math.prod(self.operator.out_shape) * math.log(
            2 * math.pi
        )
        return -0.5 * (quadratic + normaliser)

    def y_for(self, n: int) -> Tensor:
        """The observation of each of ``n`` rows (particles or chains): ``y`` itself
        (``operator.out_shape``, broadcasting) without a plate; with a plate of ``B`` problems,
        ``y`` is ``(B, *out_shape)`` and the rows are problem-major (``n / B`` rows per problem),
        so each row gets its problem's observation, ``(n, *out_shape)``."""
        if self.plate_size is None:
            return self.y
        if n % self.plate_size:
            raise ValueError(
                f"{n} rows cannot be split among the plate's {self.plate_size} problems"
            )
        return self.y.repeat_interleave(n // self.plate_size, dim=0)


class Reading(NamedTuple):
    """What :func:`read_model` found in a model."""

    latent_name: str
    prior: DiffusionPrior
    observed: dict[str, Tensor]
    likelihood_sites: list[str]
    gaussian: GaussianStructure | None
    global_latents: dict[str, GlobalLatent]
    second: tuple[str, DiffusionPrior] | None
    plate: tuple[str, int] | None


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
    prior_site = priors[0]
    plate = read_plate(trace, prior_site)
    for site in priors:
        expected = () if plate is None else (plate[1],)
        if tuple(site["fn"].batch_shape) != expected:
            raise ValueError(
                f"the prior at site {site['name']!r} has batch shape "
                f"{tuple(site['fn'].batch_shape)}; declare one signal (engines add the "
                "particle dimension themselves), or one per problem inside a pyro.plate"
            )
    prior: DiffusionPrior = prior_site["fn"]
    if plate is not None:
        prior = prior.expand(torch.Size())  # the prior of one problem's signal
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
    first_read = known is None  # not a re-read at bound global values (with_globals)
    if known is None:
        known = classify_globals(others, trace, prior_site, read)
    if plate is not None and (known or second is not None):
        what = f"global latents {sorted(known)}" if known else f"a second signal {second[0]!r}"
        raise ValueError(
            f"the model has a plate {plate[0]!r} over problems and {what}: the two together "
            "are not supported yet"
        )
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
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"observed site {name!r}: the observed value is a {type(value).__name__}; pass a "
                f"torch.Tensor (e.g. torch.as_tensor(y, dtype={prior.dtype}))"
            )
        expected = tuple(site["fn"].shape())
        check_plated_site(site, plate)
        check_operator_shape(site, tuple(prior.event_shape), plate)
        if plate is not None and (value.dim() == 0 or value.shape[0] != plate[1]):
            raise ValueError(
                f"observed site {name!r} has value of shape {tuple(value.shape)}; inside plate "
                f"{plate[0]!r} of size {plate[1]} its leading size must be {plate[1]} (one "
                f"observation per problem, {expected})"
            )
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
    if likelihood_sites and len(priors) == 1 and first_read:
        others = [read(signal_value=value) for value in (0.5, -1.37)]
        check_observes_the_signal(trace, others, likelihood_sites, prior_site)
    gaussian = None
    if (known and bound is None) or not likelihood_sites or len(priors) > 1:
        pass  # free global latents: the structure depends on them
    elif all(name in observed for name in likelihood_sites):
        gaussian = gaussian_structure(
            [trace.nodes[name] for name in likelihood_sites], prior_site, read, plate
        )
    return Reading(
        prior_site["name"], prior, observed, likelihood_sites, gaussian, known, second, plate
    )


def gaussian_structure(
    sites: list[dict], prior_site: dict, read: Callable, plate: tuple[str, int] | None
) -> GaussianStructure | None:
    """The linear-Gaussian structure of the observed sites, when every one is a
    GaussianObservation of the signal itself; several sites are stacked
    (:class:`~diffpost.models.operators.Stack`, per-measurement sigma, flattened ``y``)."""
    if not all(isinstance(site["fn"], GaussianObservation) for site in sites):
        return None
    if not all(observes_signal(site, prior_site, read) for site in sites):
        return None
    size = None if plate is None else plate[1]
    for site in sites:
        sigma = torch.as_tensor(site["fn"].sigma)
        if plate is not None and sigma.dim() > len(site["fn"].operator.out_shape):
            raise ValueError(
                f"observed site {site['name']!r}: sigma of shape {tuple(sigma.shape)} "
                f"differs between the problems of plate {plate[0]!r}; one noise level "
                "(or one per measurement, shared by the problems) is supported"
            )
    if len(sites) == 1:
        fn = sites[0]["fn"]
        operator = fn.operator
        if isinstance(operator, PerProblem):
            operator = RowsByProblem(operator, plate, sites[0]["name"])
        return GaussianStructure(sites[0]["name"], operator, fn.sigma, sites[0]["value"], size)
    if any(isinstance(site["fn"].operator, PerProblem) for site in sites):
        return None  # several sites with per-problem operators: the likelihood only
    operators = [site["fn"].operator for site in sites]
    sigmas = [torch.as_tensor(site["fn"].sigma) for site in sites]
    if all(sigma.numel() == 1 for sigma in sigmas) and all(
        bool(sigma.reshape(()) == sigmas[0].reshape(())) for sigma in sigmas
    ):
        sigma = sigmas[0].reshape(())  # one noise level: engines that need a scalar accept it
    else:
        sigma = torch.cat(
            [
                sigma.expand(tuple(op.out_shape)).reshape(-1)
                for sigma, op in zip(sigmas, operators, strict=True)
            ]
        )
    leading = 0 if plate is None else 1
    y = torch.cat([site["value"].flatten(leading) for site in sites], dim=-1)
    names = ", ".join(site["name"] for site in sites)
    return GaussianStructure(names, Stack(*operators), sigma, y, size)


class RowsByProblem(LinearOperator):
    """A :class:`~diffpost.models.operators.PerProblem` operator on problem-major particle rows
    ``(B * K, *in_shape)`` (the layout engines use), instead of the model's ``(K, B, *in_shape)``;
    it has no SVD. Built by :func:`read_model` for the linear structure of a plated problem."""

    display_name = "PerProblem"  # what error messages call it: the user's operator

    def __init__(self, per_problem: PerProblem, plate: tuple[str, int] | None, site: str):
        if plate is None or per_problem.num_problems != plate[1]:
            where = "no plate" if plate is None else f"plate {plate[0]!r} of size {plate[1]}"
            raise ValueError(
                f"observed site {site!r}: a PerProblem operator of {per_problem.num_problems} "
                f"problems needs a plate of that size around the signal; the model has {where}"
            )
        if not isinstance(per_problem, LinearOperator):
            raise ValueError(
                f"observed site {site!r}: a non-linear PerProblem operator has no linear structure"
            )
        super().__init__(tuple(per_problem.in_shape), tuple(per_problem.out_shape))
        self.per_problem = per_problem

    def _plated(self, rows: Tensor, shape) -> Tensor:
        count = self.per_problem.num_problems
        if rows.shape[0] % count:
            raise ValueError(
                f"{rows.shape[0]} rows cannot be split among the plate's {count} problems"
            )
        return rows.reshape(count, rows.shape[0] // count, *shape).transpose(0, 1)

    def _rows(self, plated: Tensor) -> Tensor:
        return plated.transpose(0, 1).reshape(-1, *plated.shape[2:])

    def _forward(self, x: Tensor) -> Tensor:
        return self._rows(self.per_problem.forward(self._plated(x, self.in_shape)))

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._rows(self.per_problem.adjoint(self._plated(y, self.out_shape)))

    def norm(self) -> float:
        return self.per_problem.norm()


def _site_summary(site: dict) -> Tensor | None:
    """What a site's distribution says of the signal: its mean, else its log-density at the
    observation, else ``None`` (neither can be computed)."""
    fn = site["fn"]
    for compute in (lambda: fn.mean, lambda: fn.log_prob(site["value"])):
        try:
            value = compute()
        except Exception:  # noqa: BLE001 - distributions raise many types for either
            continue
        if isinstance(value, Tensor):
            return value
    return None


def check_observes_the_signal(
    trace, other_traces: list, likelihood_sites: list[str], prior_site: dict
) -> None:
    """Refuse a model none of whose observed sites depends on the signal: their distributions
    (means, or log-densities at the data) are the same at three constant values of the signal
    (0 in ``trace``, the others in ``other_traces``).

    Raises:
        ValueError: naming the sites and the signal.
    """
    for name in likelihood_sites:
        first = _site_summary(trace.nodes[name])
        for other_trace in other_traces:
            second = _site_summary(other_trace.nodes[name])
            if first is None or second is None or first.shape != second.shape:
                return  # cannot tell: assume it does
            if not torch.equal(first, second):
                return
    raise ValueError(
        f"no observed site ({', '.join(repr(n) for n in likelihood_sites)}) depends on the signal "
        f"{prior_site['name']!r}: their distributions are the same whatever its value. Pass the "
        f"sampled signal (or a function of it) to the observation, e.g. "
        f"GaussianObservation(A, {prior_site['name']}, sigma)"
    )


def observes_signal(site: dict, prior_site: dict, read: Callable) -> bool:
    """Whether the observation's ``x`` is the signal itself: the same tensor, or (a clone, a
    view, a cast) equal to it at two different placeholder values of the signal."""
    x = site["fn"].x
    if x is prior_site["value"]:
        return True
    if tuple(x.shape) != tuple(prior_site["value"].shape):
        return False
    if not torch.equal(x.to(prior_site["value"].dtype), prior_site["value"]):
        return False
    trace = read(signal_value=0.5)
    signal, other = trace.nodes[prior_site["name"]]["value"], trace.nodes[site["name"]]["fn"].x
    return tuple(other.shape) == tuple(signal.shape) and torch.equal(other.to(signal.dtype), signal)


def read_plate(trace, prior_site: dict) -> tuple[str, int] | None:
    """The plate over problems around the signal: ``(name, size)`` or ``None``.

    Raises:
        ValueError: nested, sequential, subsampled or not rightmost (``dim=-1``) plates.
    """
    frames = prior_site["cond_indep_stack"]
    if not frames:
        return None
    name = prior_site["name"]
    if len(frames) > 1:
        names = [frame.name for frame in frames]
        raise ValueError(
            f"the signal {name!r} is inside nested plates {names}; one plate over problems is "
            "supported"
        )
    frame = frames[0]
    if not frame.vectorized:
        raise ValueError(
            f"the signal {name!r} is inside a sequential plate {frame.name!r} (a for-loop "
            "plate); use a vectorised `with pyro.plate(...)`"
        )
    if frame.dim != -1:
        raise ValueError(
            f"plate {frame.name!r} around the signal {name!r} has dim={frame.dim}; the plate "
            "over problems must be the rightmost batch dim (dim=-1, the default)"
        )
    full = frame.full_size if frame.full_size is not None else frame.size
    if full != frame.size:
        raise ValueError(
            f"plate {frame.name!r} is subsampled ({frame.size} of {full}); every problem of "
            "the plate must be run"
        )
    return frame.name, int(frame.size)


def check_operator_shape(site: dict, event: tuple[int, ...], plate: tuple[str, int] | None):
    """Refuse a GaussianObservation whose operator does not take the signal's event shape (e.g.
    one operator per problem of a plate, built from a batch of masks)."""
    if not isinstance(site["fn"], GaussianObservation):
        return
    in_shape = tuple(site["fn"].operator.in_shape)
    if in_shape == event:
        return
    hint = (
        f"; for one operator per problem of plate {plate[0]!r}, give "
        "operators.PerProblem([A_0, ..., A_B-1]), each taking the signal's event shape"
        if plate is not None
        else ""
    )
    raise ValueError(
        f"observed site {site['name']!r}: the operator's input shape {in_shape} is not the "
        f"signal's event shape {event}{hint}"
    )


def check_plated_site(site: dict, plate: tuple[str, int] | None) -> None:
    """Refuse an observed site outside the signal's plate, or inside another one."""
    names = [frame.name for frame in site["cond_indep_stack"]]
    if plate is None and names:
        raise ValueError(
            f"observed site {site['name']!r} is inside plate(s) {names} but the signal is not: "
            "put the signal inside the plate too (one signal per problem), or declare the "
            "observation with .to_event(k)"
        )
    if plate is not None and names != [plate[0]]:
        raise ValueError(
            f"observed site {site['name']!r} is inside plate(s) {names}; with the signal "
            f"inside plate {plate[0]!r} every observed site must be inside exactly that plate"
        )
