"""Conversion of a :class:`~diffpost.posterior.particles.ParticleSet` to an ArviZ 1.x
``xarray.DataTree``.

The tree follows the ArviZ schema with ``sample_dims = ["chain", "draw"]``: chains are independent
runs of the engine, draws are the particles of one run. ArviZ has no weighted ``summary``, ``ess``
or ``hdi``, so the ``posterior`` group holds *equal-weight* draws (the particles themselves when the
weights are uniform, a systematic resample of them otherwise) and the raw weighted particles are
kept in ``weighted_posterior`` and ``sample_stats`` so that nothing is lost.

Layout (``C`` chains, ``N`` draws, ``S`` steps)::

    /                     attrs: inference_library, engine, config (JSON), nfe, vjp, wall_time, ...
    posterior             site (chain, draw, *event)          equal-weight draws
    posterior_predictive  <obs site> (chain, draw, *obs event)  A(x) of each draw, on request
    sample_stats          log_weight (chain, draw)            raw particles (see below)
                          log_likelihood (chain, draw)        raw particles, when available
                          ancestor (chain, draw)              raw index of each posterior draw
                          log_evidence (chain,)               when available
                          <stat> (chain, step)                every per-step statistic
    log_likelihood        <obs site> | total (chain, draw)    aligned with ``posterior``
    observed_data         <obs site> (*obs event)
    constant_data         <latent> (*event)                   ``x_true``, when given
    weighted_posterior    site (chain, draw, *event)          raw particles, if weights not uniform

The per-draw variables of ``sample_stats`` (``log_weight``, ``log_likelihood``) describe the *raw*
particles, i.e. draw ``d`` of ``sample_stats`` is particle ``d`` of ``weighted_posterior`` (of
``posterior`` when the weights are uniform). ``sample_stats.ancestor[c, d]`` is the raw particle
that draw ``d`` of ``posterior`` copies, so ``posterior == weighted_posterior[ancestor]``. The
``log_likelihood`` *group* is gathered with the same ancestors and therefore matches ``posterior``
draw by draw (as ``arviz_stats.loo`` expects).

Several independent runs of one problem go in one tree along ``chain`` (pass a list of sets), so
``arviz_stats.rhat`` compares them. The importance-weight diagnostics work on the raw
log-weights: :func:`diffpost.diagnostics.pareto_khat`, or ArviZ's accessor on them negated
(``arviz_stats``' ``psislw`` takes log-likelihood-like values, the weights being their negated
exponential): ``(-tree["sample_stats"]["log_weight"]).azstats.psislw(dim="draw")``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import arviz_base
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from diffpost.posterior.files import read_file, write_atomically
from diffpost.posterior.particles import ParticleSet

__all__ = ["to_datatree", "save_datatree", "load_datatree", "equal_weight_ancestors"]

SAMPLE_DIMS = ["chain", "draw"]

_LATENT_DIMS = {1: ["coordinate"], 2: ["row", "column"], 3: ["channel", "row", "column"]}
_OBSERVED_SUFFIXES = {2: ["row", "column"], 3: ["channel", "row", "column"]}

_GROUP_ORDER = (
    "posterior",
    "posterior_predictive",
    "sample_stats",
    "log_likelihood",
    "observed_data",
    "constant_data",
    "weighted_posterior",
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _library_version() -> str:
    from diffpost import __version__

    return __version__


def _numpy(value: Tensor | np.ndarray | Any) -> np.ndarray:
    """A detached CPU numpy copy of the same dtype (``bfloat16`` becomes ``float32``)."""
    if isinstance(value, Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def equal_weight_ancestors(particles: ParticleSet) -> Tensor | None:
    """Ancestors of the equal-weight draws of ``particles``, or ``None`` if weights are uniform.

    The resampling of :meth:`ParticleSet.get_samples` (see
    :meth:`ParticleSet.equal_weight_ancestors`): systematic, per chain, seeded from the run's
    seed.

    Args:
        particles: the set.

    Returns:
        ``long`` tensor ``(chains, draws)`` of indices into each chain's particles, on the device
        of ``particles.log_weights``; ``None`` when the weights are uniform (no resampling).
    """
    return particles.equal_weight_ancestors()


def _gather(value: Tensor, ancestors: Tensor | None) -> Tensor:
    """``value[c, ancestors[c, d]]`` for ``value`` of shape ``(chains, draws, *event)``."""
    if ancestors is None:
        return value
    index = ancestors.to(value.device)
    index = index.reshape(index.shape + (1,) * (value.dim() - 2)).expand_as(value)
    return torch.gather(value, 1, index)


def _attr_value(value: Any) -> Any:
    """A netCDF-serialisable scalar (str, int or float) for a root attribute, or ``None``."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return repr(value)


def _default_dims(site: str, rank: int, observed: bool) -> list[str]:
    if rank == 0:
        return []
    if observed:
        if rank == 1:
            return ["measurement"]
        if rank in _OBSERVED_SUFFIXES:
            return [f"{site}_{suffix}" for suffix in _OBSERVED_SUFFIXES[rank]]
    elif rank in _LATENT_DIMS:
        return list(_LATENT_DIMS[rank])
    return [f"{site}_dim_{k}" for k in range(rank)]


def _name_dims(
    shapes: Mapping[str, tuple[int, ...]],
    overrides: Mapping[str, Sequence[str]],
    observed: bool,
) -> dict[str, list[str]]:
    """Event dim names for the sites of one group.

    A default name already taken in the group by a dim of another size is prefixed with the site
    name (``"coordinate"`` -> ``"z_coordinate"``), so that two sites never clash.
    """
    sizes: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for site, shape in shapes.items():
        if site in overrides:
            dims = list(overrides[site])
            if len(dims) != len(shape):
                raise ValueError(
                    f"dims[{site!r}] has {len(dims)} names {dims} but site {site!r} has "
                    f"{len(shape)} event dims (event shape {tuple(shape)})"
                )
            for dim, size in zip(dims, shape, strict=True):
                if sizes.get(dim, size) != size:
                    raise ValueError(
                        f"dims[{site!r}] reuses dim {dim!r} with size {size}; another site uses "
                        f"it with size {sizes[dim]}"
                    )
        else:
            dims = _default_dims(site, len(shape), observed)
            dims = [
                dim if sizes.get(dim, size) == size else f"{site}_{dim}"
                for dim, size in zip(dims, shape, strict=True)
            ]
        for dim, size in zip(dims, shape, strict=True):
            sizes[dim] = size
        names[site] = dims
    return names


def _step_dims(stats: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """``["step"]`` for every per-step statistic; a statistic whose number of steps differs from
    the most common one gets ``f"{name}_step"`` instead."""
    lengths = Counter(v.shape[1] for v in stats.values() if v.ndim >= 2)
    common = lengths.most_common(1)[0][0] if lengths else None
    dims = {}
    for name, value in stats.items():
        if value.ndim >= 2:
            step = "step" if value.shape[1] == common else f"{name}_step"
            dims[name] = [step] + [f"{name}_dim_{k}" for k in range(value.ndim - 2)]
    return dims


def _drop_empty_sample_dims(dataset: xr.Dataset) -> xr.Dataset:
    # ``sample_dims = []`` (data groups) is written to netCDF as an empty float array and would
    # not read back identical; ArviZ falls back to rcParams when the attribute is absent.
    if "sample_dims" in dataset.attrs and len(dataset.attrs["sample_dims"]) == 0:
        dataset.attrs = {k: v for k, v in dataset.attrs.items() if k != "sample_dims"}
    return dataset


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def check_coords(coords: Mapping[str, Sequence[Any]], sizes: Mapping[str, int]) -> None:
    """Refuse ``coords`` whose values do not match the size of their dim (xarray's own error
    names neither the argument nor the sizes' origin).

    Raises:
        ValueError: naming the dim, its size and the number of coordinate values given.
    """
    for name, values in coords.items():
        if name in sizes and len(values) != sizes[name]:
            raise ValueError(
                f"coords[{name!r}] has {len(values)} values; dim {name!r} has size {sizes[name]}"
            )


def to_datatree(
    particles: ParticleSet | Sequence[ParticleSet],
    *,
    x_true: Tensor | np.ndarray | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> xr.DataTree:
    """A :class:`ParticleSet` as an ``xarray.DataTree`` in the ArviZ 1.x layout.

    Built with :func:`arviz_base.from_dict` and ``sample_dims = ["chain", "draw"]``, so
    ``arviz_stats.summary``, ``ess`` and ``rhat`` (with at least two chains) work on it directly.
    Tensors are moved to the CPU (CUDA sets work) and keep their dtype (``bfloat16`` becomes
    ``float32``).

    Groups:
        * ``posterior``: every site of ``particles.values`` as *equal-weight* draws
          ``(chain, draw, *event)`` (:meth:`ParticleSet.get_samples` with ``group_by_chain=True``:
          the particles themselves for uniform weights, a systematic resample seeded by
          ``info["seed"]``, in random order within each chain, otherwise). Event dims are named
          by rank: ``coordinate``; ``row, column``; ``channel, row, column``; else
          ``{site}_dim_{k}``.
        * ``sample_stats``: ``log_weight`` ``(chain, draw)``, the normalised log-weights of the
          **raw particles before equal-weight resampling**; ``log_likelihood`` ``(chain, draw)``
          of the raw particles when known; ``ancestor`` ``(chain, draw)``, the raw particle each
          ``posterior`` draw copies (``arange`` when not resampled); ``log_evidence``
          ``(chain,)`` when known; every per-step statistic of ``particles.stats`` on
          ``(chain, step)``.
        * ``log_likelihood``: total ``log p(y | x)`` ``(chain, draw)`` of each ``posterior`` draw
          (same ancestors), named after the observed site (``"total"`` with several or none).
        * ``observed_data``: each observed value; dims ``measurement`` for rank 1,
          ``{site}_row, {site}_column`` and ``{site}_channel, {site}_row, {site}_column`` for
          ranks 2 and 3.
        * ``posterior_predictive``: with ``forward``, the noiseless measurement
          :math:`A(x)` of every ``posterior`` draw ``(chain, draw, *obs event)``, named and
          dimensioned like the observed site (``"y"`` with several or no observed sites), so that
          ``arviz_plots.plot_ppc_dist`` compares it with ``observed_data``.
        * ``constant_data``: ``x_true`` under the latent site's name, when given.
        * ``weighted_posterior``: the raw particles ``(chain, draw, *event)``, only when the
          weights are not uniform.

    Root attrs: ``inference_library`` (``"diffpost"``), ``inference_library_version``,
    ``engine``, ``config`` (a JSON string), ``nfe``, ``vjp``, ``wall_time``, ``seed``,
    ``num_particles``, ``num_chains``, ``latent_name``, ``posterior_resampled`` (0/1),
    ``resampling`` and, when known, ``log_evidence`` (log of the mean over chains of the
    per-chain evidence estimates). All are strings or numbers, so the tree round-trips through
    netCDF (:func:`save_datatree` / :func:`load_datatree`).

    Args:
        particles: the set to convert, or several runs of the same problem, joined along
            ``chain`` (:meth:`ParticleSet.concat`) so that R-hat compares independent runs.
        x_true: the ground-truth latent, shape ``event`` of the latent site (``(B, *event)``
            for a plated run), stored in ``constant_data``.
        dims: site name -> names of its *event* dims (no ``chain``/``draw``), overriding the
            defaults; applies to sampled and observed sites (and to ``x_true`` via the latent).
        coords: dim name -> coordinate values (default ``0 .. size - 1``).
        forward: the forward model for ``posterior_predictive``: a
            :class:`~diffpost.models.operators.Operator` or any callable
            ``(n, *event) -> (n, *obs)`` (e.g. ``problem.gaussian.operator``); ``None`` (default)
            adds no such group.

    A plated run (``particles.plate``) is converted problem by problem
    (:meth:`ParticleSet.select_problem`, each resampled on its own) and joined along a dim named
    after the plate, placed after ``chain``/``draw`` (and after ``step``): posterior values are
    ``(chain, draw, <plate>, *event)``, observations ``(<plate>, *obs)``; the root attrs are those
    of the run.

    Returns:
        The ``xarray.DataTree``.

    Raises:
        ValueError: ``x_true`` of the wrong shape, ``dims`` of the wrong length or naming an
            unknown site, statistics or log-likelihoods of the wrong shape.
    """
    if not isinstance(particles, ParticleSet):
        particles = ParticleSet.concat(list(particles))
    if particles.plate is not None:
        return _plated_datatree(particles, x_true, dims, coords, forward)
    dims = dict(dims or {})
    coords = dict(coords or {})
    num_chains, num_draws = particles.num_chains, particles.num_draws
    latent = particles.latent_name

    unknown = sorted(set(dims) - set(particles.values) - set(particles.observed))
    if unknown:
        raise ValueError(
            f"dims names {unknown}, which are neither sampled sites {sorted(particles.values)} "
            f"nor observed sites {sorted(particles.observed)}"
        )

    # ---- equal-weight draws: one set of ancestors for the values and the log-likelihood ----
    ancestors = equal_weight_ancestors(particles)
    posterior = {name: _numpy(_gather(v, ancestors)) for name, v in particles.values.items()}
    value_dims = _name_dims(
        {name: tuple(v.shape[2:]) for name, v in particles.values.items()}, dims, observed=False
    )

    library = {"inference_library": "diffpost", "inference_library_version": _library_version()}
    data: dict[str, dict[str, np.ndarray]] = {"posterior": posterior}
    group_attrs: dict[str, dict[str, Any]] = {"posterior": dict(library)}

    if particles.log_likelihood is not None:
        log_likelihood = particles.log_likelihood
        if tuple(log_likelihood.shape) != (num_chains, num_draws):
            raise ValueError(
                f"ParticleSet.log_likelihood must be (chains, draws) = {(num_chains, num_draws)}; "
                f"got {tuple(log_likelihood.shape)}"
            )
        name = next(iter(particles.observed)) if len(particles.observed) == 1 else "total"
        data["log_likelihood"] = {name: _numpy(_gather(log_likelihood, ancestors))}
        group_attrs["log_likelihood"] = dict(library)

    if x_true is not None:
        event_shape = tuple(particles.values[latent].shape[2:])
        truth = _numpy(x_true)
        if tuple(truth.shape) != event_shape:
            raise ValueError(
                f"x_true must have the event shape {event_shape} of latent site {latent!r}; "
                f"got {tuple(truth.shape)}"
            )
        data["constant_data"] = {latent: truth}
        group_attrs["constant_data"] = dict(library)

    if forward is not None:
        name, values = _posterior_predictive(particles, ancestors, forward)
        data["posterior_predictive"] = {name: values}
        group_attrs["posterior_predictive"] = dict(library)
        value_dims[name] = _name_dims({name: values.shape[2:]}, dims, observed=True)[name]

    if ancestors is not None:
        data["weighted_posterior"] = {name: _numpy(v) for name, v in particles.values.items()}
        group_attrs["weighted_posterior"] = dict(library)

    sizes = {"chain": num_chains, "draw": num_draws}
    for name, values in posterior.items():
        sizes.update(zip(value_dims[name], values.shape[2:], strict=True))
    check_coords(coords, sizes)
    tree = arviz_base.from_dict(
        data, sample_dims=SAMPLE_DIMS, dims=value_dims, coords=coords, attrs=group_attrs
    )
    groups: dict[str, xr.Dataset] = {name: tree[name].to_dataset() for name in data}

    # ---- sample_stats: per-draw (raw particles), per-chain and per-step variables ----
    per_draw = {
        "log_weight": _numpy(particles.log_weights),
        "ancestor": _numpy(
            ancestors
            if ancestors is not None
            else torch.arange(num_draws).expand(num_chains, num_draws)
        ).astype(np.int64),
    }
    if particles.log_likelihood is not None:
        per_draw["log_likelihood"] = _numpy(particles.log_likelihood)
    stats = arviz_base.dict_to_dataset(
        per_draw, sample_dims=SAMPLE_DIMS, coords=coords, attrs=library
    )
    stats["log_weight"].attrs["description"] = (
        "normalised log-weight of each raw particle, before equal-weight resampling "
        "(draw d is particle d of weighted_posterior when present)"
    )
    stats["ancestor"].attrs["description"] = (
        "index of the raw particle that each posterior draw copies"
    )
    if "log_likelihood" in stats:
        stats["log_likelihood"].attrs["description"] = (
            "total log p(y | x) of each raw particle (before resampling)"
        )

    per_chain: dict[str, np.ndarray] = {}
    if particles.log_evidence is not None:
        log_evidence = _numpy(particles.log_evidence)
        if log_evidence.shape != (num_chains,):
            raise ValueError(
                f"ParticleSet.log_evidence must be (chains,) = ({num_chains},); "
                f"got {log_evidence.shape}"
            )
        per_chain["log_evidence"] = log_evidence
    for name, value in particles.stats.items():
        value = _numpy(value)
        if value.ndim == 0 or value.shape[0] != num_chains:
            raise ValueError(
                f"ParticleSet.stats[{name!r}] must be (chains, steps) with chains = {num_chains}; "
                f"got {value.shape}"
            )
        # a per-step statistic named like a per-draw one (e.g. an engine's running mean
        # log-likelihood) keeps both, the per-step one suffixed
        per_chain[f"{name}_step" if name in stats or name in per_chain else name] = value
    if per_chain:
        steps = arviz_base.dict_to_dataset(
            per_chain,
            sample_dims=["chain"],
            dims=_step_dims({k: v for k, v in per_chain.items() if k != "log_evidence"}),
            coords=coords,
        )
        stats = xr.merge([stats, steps], combine_attrs="override", join="exact")
    groups["sample_stats"] = stats

    # ---- observed_data ----
    if particles.observed:
        observed = {name: _numpy(v) for name, v in particles.observed.items()}
        observed_dims = _name_dims(
            {name: v.shape for name, v in observed.items()}, dims, observed=True
        )
        groups["observed_data"] = arviz_base.dict_to_dataset(
            observed, sample_dims=[], dims=observed_dims, coords=coords, attrs=library
        )

    ordered = {
        name: _drop_empty_sample_dims(groups[name]) for name in _GROUP_ORDER if name in groups
    }
    result = xr.DataTree.from_dict(ordered)
    result.attrs = _root_attrs(particles, library, resampled=ancestors is not None)
    return result


def _plated_datatree(
    particles: ParticleSet,
    x_true: Tensor | np.ndarray | None,
    dims: Mapping[str, Sequence[str]] | None,
    coords: Mapping[str, Sequence[Any]] | None,
    forward: Callable[[Tensor], Tensor] | None,
) -> xr.DataTree:
    """:func:`to_datatree` of each problem of a plated run, joined along the plate's dim."""
    name, size = particles.plate
    if x_true is not None:
        x_true = torch.as_tensor(np.asarray(x_true)) if not isinstance(x_true, Tensor) else x_true
        if x_true.dim() == 0 or x_true.shape[0] != size:
            raise ValueError(
                f"x_true of a plated run must be (B, *event) with B = {size} (plate {name!r}); "
                f"got {tuple(x_true.shape)}"
            )
    trees = [
        to_datatree(
            particles.select_problem(b),
            x_true=None if x_true is None else x_true[b],
            dims=dims,
            coords=coords,
            forward=forward,
        )
        for b in range(size)
    ]
    groups = {}
    for group in _GROUP_ORDER:
        if group not in trees[0].children:
            continue
        parts = [tree[group].to_dataset() for tree in trees]
        joined = xr.concat(parts, dim=name, combine_attrs="override", data_vars="all")
        joined = joined.assign_coords({name: np.arange(size)})
        leading = [d for d in ("chain", "draw", "step") if d in joined.dims]
        groups[group] = joined.transpose(*leading, name, ...)
    result = xr.DataTree.from_dict(groups)
    result.attrs = dict(trees[0].attrs)
    result.attrs["plate"] = name
    result.attrs.pop("log_evidence", None)  # per problem: sample_stats.log_evidence
    for key in ("nfe", "vjp", "wall_time"):
        if key in particles.info:
            result.attrs[key] = particles.info[key]
    return result


def _posterior_predictive(
    particles: ParticleSet, ancestors: Tensor | None, forward: Callable[[Tensor], Tensor]
) -> tuple[str, np.ndarray]:
    """``(name, forward(draws))`` of the equal-weight draws, ``(chain, draw, *obs event)``."""
    if not callable(forward):
        raise ValueError(
            f"forward must be an operator or a callable (n, *event) -> (n, *obs); got {forward!r}"
        )
    draws = _gather(particles.values[particles.latent_name], ancestors)
    with torch.no_grad():
        predicted = forward(draws.flatten(0, 1))
    if not isinstance(predicted, Tensor) or predicted.shape[:1] != (
        draws.shape[0] * draws.shape[1],
    ):
        raise ValueError(
            "forward must map (n, *event) to a tensor (n, *obs); got "
            f"{type(predicted).__name__} of shape {tuple(getattr(predicted, 'shape', ()))} for "
            f"n = {draws.shape[0] * draws.shape[1]}"
        )
    name = next(iter(particles.observed)) if len(particles.observed) == 1 else "y"
    observed = particles.observed.get(name)
    if observed is not None and tuple(observed.shape) != tuple(predicted.shape[1:]):
        raise ValueError(
            f"forward gives measurements of shape {tuple(predicted.shape[1:])} but the observed "
            f"site {name!r} has shape {tuple(observed.shape)}"
        )
    return name, _numpy(predicted.reshape(draws.shape[:2] + predicted.shape[1:]))


def _root_attrs(particles: ParticleSet, library: dict[str, str], resampled: bool) -> dict:
    info = particles.info
    attrs: dict[str, Any] = dict(library)
    attrs["engine"] = str(info.get("engine", "unknown"))
    attrs["config"] = json.dumps(info.get("config", {}), sort_keys=True, default=_json_default)
    defaults = {"num_particles": particles.num_draws, "num_chains": particles.num_chains}
    for key in ("nfe", "vjp", "wall_time", "seed", "num_particles", "num_chains"):
        value = _attr_value(info.get(key, defaults.get(key)))
        if value is not None:
            attrs[key] = value
    attrs["latent_name"] = str(particles.latent_name)
    attrs["posterior_resampled"] = int(resampled)
    attrs["resampling"] = "systematic" if resampled else "none"
    if particles.log_evidence is not None:
        log_z = particles.log_evidence.detach().double().cpu()
        attrs["log_evidence"] = float(torch.logsumexp(log_z, 0) - math.log(log_z.numel()))
    return attrs


# --------------------------------------------------------------------------------------------
# netCDF
# --------------------------------------------------------------------------------------------


def save_datatree(tree: xr.DataTree, path: str | Path) -> None:
    """Write ``tree`` to a netCDF-4 file with the ``h5netcdf`` engine.

    Args:
        tree: a tree from :func:`to_datatree` (or any tree with netCDF-serialisable attrs).
        path: the file to write (overwritten if it exists, atomically: written to a temporary
            file renamed into place, so an interrupted save keeps the previous file).
    """
    write_atomically(path, lambda temporary: tree.to_netcdf(temporary, engine="h5netcdf"))


def load_datatree(path: str | Path) -> xr.DataTree:
    """Read a tree written by :func:`save_datatree`, fully into memory; the file is closed.

    Args:
        path: the netCDF file.

    Returns:
        The ``xarray.DataTree`` (no lazy arrays, no open file handle).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated file or one of another format, naming the path.
    """
    tree = read_file(
        path,
        "netCDF-4 DataTree (written by save_datatree)",
        lambda file: xr.open_datatree(file, engine="h5netcdf"),
    )
    try:
        # Not ``tree.load()``: in xarray 2026.9 it skips every variable whose name equals a
        # group's name (it tests ``k not in lazy_data``, a dict keyed by group path), so
        # ``sample_stats.log_likelihood`` would stay lazy on a closed file.
        for node in tree.subtree:
            for variable in node.variables.values():
                variable.load()
    finally:
        tree.close()
    return tree
