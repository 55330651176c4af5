"""The result of an inference run: weighted particles from independent chains.

A :class:`ParticleSet` stores every value as ``(chains, draws, *event)``: chains are independent
runs of the engine (batched together), draws are the particles of one run. Weighted engines (SMC)
keep normalised log-weights per chain; unweighted ones have uniform weights. A run on a plate of
``B`` problems stores ``(chains, draws, B, *event)`` and weights ``(chains, draws, B)``
(``info["plate"] = [name, B]``); :meth:`ParticleSet.select_problem` gives one problem's set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffpost.posterior.files import read_file, write_atomically
from diffpost.posterior.resampling import ess as _ess
from diffpost.posterior.resampling import systematic

__all__ = ["ParticleSet", "normalised_log_weights"]

#: the format tag :meth:`ParticleSet.save` writes (files of earlier versions have none)
SAVE_FORMAT = "diffpost.ParticleSet/1"

#: largest |logsumexp| of a chain's log-weights taken as normalised (float32 round-off of the
#: engines' own normalisation stays far below it)
NORMALISATION_TOLERANCE = 1e-4


def check_same_run_kind(first: ParticleSet, other: ParticleSet) -> None:
    """Refuse to join sets of different problems or engines: their observations (every observed
    site, by value), their engine and its configuration must agree, or the joined set would keep
    only the first's and say nothing of the rest.

    Raises:
        ValueError: naming what differs.
    """
    if first.observed.keys() != other.observed.keys():
        raise ValueError(
            f"ParticleSet.concat: sets observe different sites ({sorted(first.observed)} and "
            f"{sorted(other.observed)})"
        )
    for name, value in first.observed.items():
        theirs = other.observed[name]
        if value.shape != theirs.shape or not torch.equal(value, theirs.to(value)):
            raise ValueError(
                f"ParticleSet.concat: sets differ in the observed value of site {name!r}: they are "
                "runs on different problems (join runs of one problem, or compare them side by "
                "side with diagnostics.compare)"
            )
    for key in ("engine", "config"):
        if first.info.get(key) != other.info.get(key):
            raise ValueError(
                f"ParticleSet.concat: sets differ in their {key} ({first.info.get(key)!r} and "
                f"{other.info.get(key)!r}); R-hat over the joined chains would compare engines"
            )


def normalised_log_weights(log_weights: Tensor) -> Tensor:
    """``log_weights`` ``(chains, draws[, B])`` normalised over draws (``logsumexp == 0`` per
    chain): returned as given when they already are (to ``NORMALISATION_TOLERANCE``), shifted
    when not (a set built from unnormalised weights, e.g. log-likelihoods, would otherwise give
    wrong means).

    Raises:
        ValueError: NaN entries, or a chain (a problem) whose weights are all zero.
    """
    if not log_weights.is_floating_point():
        raise ValueError(f"ParticleSet.log_weights must be floating point; got {log_weights.dtype}")
    if bool(torch.isnan(log_weights).any()):
        raise ValueError("ParticleSet.log_weights has NaN entries")
    totals = torch.logsumexp(log_weights, dim=1, keepdim=True)
    if not bool(torch.isfinite(totals).all()):
        raise ValueError(
            "ParticleSet.log_weights: some chain has no draw with a positive, finite weight "
            "(every log-weight -inf, or one +inf)"
        )
    if bool((totals.abs() <= NORMALISATION_TOLERANCE).all()):
        return log_weights
    return log_weights - totals


@dataclass
class ParticleSet:
    """Weighted particles from ``chains`` independent runs.

    Attributes:
        values: site name -> tensor ``(chains, draws, *event)``; the latent site of the prior
            (``problem.latent_name``) is always present.
        log_weights: ``(chains, draws)``, normalised per chain (``logsumexp == 0`` over draws;
            weights given unnormalised are normalised at construction, NaN refused).
        log_evidence: ``(chains,)`` estimate of ``log p(y)`` per chain, or ``None``.
        log_likelihood: ``(chains, draws)`` total ``log p(y | x)`` of each particle, or ``None``
            when the likelihood is degenerate (noiseless observation).
        observed: observed site name -> the observed value (unbatched).
        stats: per-step statistics, name -> ``(chains, steps)`` (e.g. ``ess``, ``resampled``,
            ``t``, ``log_evidence_increment``).
        info: engine name and configuration, ``num_particles``, ``num_chains``, ``nfe``,
            ``vjp``, ``wall_time``, ``seed``, ``latent_name``, ``event_dims``; ``plate``
            ``[name, B]`` for a plated run, whose values are ``(chains, draws, B, *event)``,
            weights and log-likelihoods ``(chains, draws, B)``, evidence ``(chains, B)`` and
            statistics ``(chains, B, steps)``.
        fitted: what the engine fitted besides the particles, name -> object (e.g. the
            normalizing flow of :class:`~diffpost.posterior.FlowVI`, which draws more samples); kept
            in memory only (not saved, not moved by :meth:`to`, dropped by :meth:`concat`).
    """

    values: dict[str, Tensor]
    log_weights: Tensor
    log_evidence: Tensor | None = None
    log_likelihood: Tensor | None = None
    observed: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    fitted: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        expected = "(chains, draws)" if self.plate is None else "(chains, draws, B)"
        if self.log_weights.dim() != (2 if self.plate is None else 3) or (
            self.plate is not None and self.log_weights.shape[2] != self.plate[1]
        ):
            raise ValueError(
                f"ParticleSet.log_weights must be {expected}; got {tuple(self.log_weights.shape)}"
            )
        for name, value in self.values.items():
            if value.shape[: self.log_weights.dim()] != self.log_weights.shape:
                raise ValueError(
                    f"ParticleSet value {name!r} has shape {tuple(value.shape)}; expected leading "
                    f"{expected} = {tuple(self.log_weights.shape)}"
                )
        self.log_weights = normalised_log_weights(self.log_weights)

    @property
    def plate(self) -> tuple[str, int] | None:
        """``(name, B)`` of the plate over problems of a plated run, else ``None``."""
        plate = self.info.get("plate")
        return None if plate is None else (str(plate[0]), int(plate[1]))

    def select_problem(self, index: int) -> ParticleSet:
        """Problem ``index`` of a plated run, as the set a run on that problem alone gives
        (values ``(chains, draws, *event)``, its observation, weights, evidence, statistics).

        Raises:
            ValueError: the set has no plate, or ``index`` is outside ``[0, B)``.
        """
        if self.plate is None:
            raise ValueError("select_problem: this ParticleSet has no plate over problems")
        name, size = self.plate
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise ValueError(f"select_problem: index must be in [0, {size}) (plate {name!r})")
        info = {k: v for k, v in self.info.items() if k != "plate"}
        info["plate_index"] = [name, index]

        def pick(value: Tensor | None, dim: int) -> Tensor | None:
            return None if value is None else value.select(dim, index)

        return ParticleSet(
            values={k: pick(v, 2) for k, v in self.values.items()},
            log_weights=pick(self.log_weights, 2),
            log_evidence=pick(self.log_evidence, 1),
            log_likelihood=pick(self.log_likelihood, 2),
            observed={k: pick(v, 0) for k, v in self.observed.items()},
            stats={k: pick(v, 1) for k, v in self.stats.items()},
            info=info,
        )

    def _problems(self) -> list[ParticleSet]:
        return [self.select_problem(b) for b in range(self.plate[1])]

    @property
    def num_chains(self) -> int:
        return self.log_weights.shape[0]

    @property
    def num_draws(self) -> int:
        return self.log_weights.shape[1]

    @property
    def latent_name(self) -> str:
        """Name of the prior's latent site."""
        return self.info.get("latent_name", next(iter(self.values)))

    def _site(self, name: str | None) -> Tensor:
        name = self.latent_name if name is None else name
        if name not in self.values:
            raise ValueError(f"no site {name!r} in this ParticleSet; it has {sorted(self.values)}")
        return self.values[name]

    def _event_weights(self, value: Tensor) -> Tensor:
        weights = self.log_weights.exp().to(value.dtype)
        return weights.reshape(weights.shape + (1,) * (value.dim() - weights.dim()))

    def mean(self, name: str | None = None) -> Tensor:
        """Weighted posterior mean over chains and draws, shape ``event`` (``(B, *event)`` for a
        plated run)."""
        value = self._site(name)
        return (self._event_weights(value) * value).sum(1).mean(0)

    def var(self, name: str | None = None) -> Tensor:
        """Weighted posterior variance over chains and draws (chains pooled), shape ``event``
        (``(B, *event)`` for a plated run)."""
        value = self._site(name)
        weights = self._event_weights(value)
        mean = self.mean(name)
        return (weights * (value - mean) ** 2).sum(1).mean(0)

    def ess(self) -> Tensor:
        """Effective sample size of the weights per chain, ``(chains,)`` (``(chains, B)`` for a
        plated run); ``draws`` if uniform."""
        if self.plate is not None:
            return _ess(self.log_weights.transpose(1, 2))
        return _ess(self.log_weights)

    def _generator(self, seed: int | None, purpose: str) -> torch.Generator:
        """A generator on the weights' device for drawing from this set, seeded by ``seed``
        (default: the run's seed, 0 when unknown) *and* ``purpose``.

        Seeding it with the run's seed itself would replay the engine's first random numbers,
        so the draw would be correlated with the particles: with the Exact engine, whose first
        draws pick the mixture components, ``one_draw_per_chain`` then picked particles of the
        same few components (measured: biased means, ranks far from uniform). The seed is
        therefore hashed with ``purpose`` into an unrelated stream.
        """
        seed = self.info.get("seed") if seed is None else seed
        seed = 0 if seed is None else int(seed)
        if "plate_index" in self.info:  # problems of one plated run draw independently
            purpose = f"{purpose}:{self.info['plate_index'][1]}"
        digest = hashlib.sha256(f"posterior.ParticleSet.{purpose}:{seed}".encode()).digest()
        derived = int.from_bytes(digest[:8], "little") >> 1
        return torch.Generator(device=self.log_weights.device).manual_seed(derived)

    def equal_weight_ancestors(self, seed: int | None = None) -> Tensor | None:
        """Ancestors of the equal-weight draws of :meth:`get_samples`, or ``None`` if uniform.

        Systematic resampling per chain with :meth:`_generator` (``seed``, default the run's),
        then a random order within each chain (systematic resampling sorts the ancestors; a
        sorted chain reads as autocorrelated and non-stationary to ArviZ's ESS and split R-hat).
        The draws of one particle filter still share ancestors: ArviZ's ESS of them counts
        exchangeable draws and overstates the information; :meth:`independent_draws` (one per
        chain) and the weights' ESS (:meth:`ess`) do not.

        Returns:
            ``long`` tensor ``(chains, draws)`` of indices into each chain's particles, on the
            weights' device; ``None`` when the weights are uniform (no resampling).
        """
        if self.plate is not None:
            raise ValueError(
                "equal_weight_ancestors: a plated set resamples per problem; use "
                "select_problem(b).equal_weight_ancestors()"
            )
        uniform = torch.full_like(self.log_weights, -math.log(self.num_draws))
        if torch.allclose(self.log_weights, uniform):
            return None
        generator = self._generator(seed, "equal_weight_draws")
        ancestors = systematic(self.log_weights, generator)
        # systematic resampling returns each chain's ancestors sorted; shuffled within the chain,
        # the draws' order carries no information, so ArviZ's split R-hat and autocorrelation
        # ESS do not read the sort as non-stationarity or autocorrelation
        noise = torch.rand(ancestors.shape, generator=generator, device=ancestors.device)
        return torch.gather(ancestors, 1, torch.argsort(noise, dim=1))

    def get_samples(
        self, group_by_chain: bool = False, seed: int | None = None
    ) -> dict[str, Tensor]:
        """Equal-weight draws, Pyro style.

        Uniformly weighted sets are returned as they are. Weighted ones are resampled per chain
        with systematic resampling (:meth:`equal_weight_ancestors`), seeded by ``seed`` (default:
        the run's seed), so the call is deterministic.

        Args:
            group_by_chain: keep ``(chains, draws, *event)``; otherwise
                ``(chains * draws, *event)``.
            seed: seed of the resampling generator.

        Returns:
            Site name -> tensor (with a plate, ``(chains[, draws], B, *event)``; each problem
            resampled on its own).
        """
        if self.plate is not None:
            parts = [p.get_samples(group_by_chain, seed) for p in self._problems()]
            dim = 2 if group_by_chain else 1
            return {name: torch.stack([p[name] for p in parts], dim) for name in self.values}
        values = self.values
        ancestors = self.equal_weight_ancestors(seed)
        if ancestors is not None:
            values = {
                name: torch.gather(
                    v, 1, ancestors.reshape(ancestors.shape + (1,) * (v.dim() - 2)).expand_as(v)
                )
                for name, v in values.items()
            }
        if group_by_chain:
            return dict(values)
        return {name: v.flatten(0, 1) for name, v in values.items()}

    def one_draw_per_chain(self, seed: int | None = None) -> dict[str, Tensor]:
        """One particle per chain, drawn by its weight: ``chains`` independent posterior draws.

        The particles of one SMC chain share ancestors; comparing sample sets fairly (e.g. with
        :func:`diffpost.diagnostics.sliced_wasserstein`) needs independent draws, hence many chains
        and one draw from each.

        Args:
            seed: seed of the draw (default: the run's seed; see :meth:`_generator`).

        Returns:
            Site name -> tensor ``(chains, *event)`` (``(chains, B, *event)`` with a plate).
        """
        if self.plate is not None:
            parts = [p.one_draw_per_chain(seed) for p in self._problems()]
            return {name: torch.stack([p[name] for p in parts], 1) for name in self.values}
        generator = self._generator(seed, "one_draw_per_chain")
        pick = torch.multinomial(self.log_weights.exp(), 1, generator=generator)[:, 0]
        chains = torch.arange(self.num_chains, device=pick.device)
        return {name: value[chains, pick] for name, value in self.values.items()}

    def independent_draws(self, num_draws: int | None = None, seed: int | None = None):
        """Independent, equal-weight posterior draws, whatever the engine.

        Where the run's particles are independent (``info["independent_particles"]``, recorded
        from the engine; for a set without it, uniform weights count as independent), the
        equal-weight draws of :meth:`get_samples`; otherwise (resampling filters, interacting
        particles, MCMC chains) one draw per chain (:meth:`one_draw_per_chain`).
        :func:`~diffpost.posterior.draw_layout` gives a run layout that yields enough of them.

        Args:
            num_draws: how many (default: all there are), the first ones in chain order.
            seed: seed of the resampling or per-chain draw (default: the run's).

        Returns:
            Site name -> ``(num_draws, *event)`` (``(num_draws, B, *event)`` with a plate).

        Raises:
            ValueError: more draws asked for than the run holds, naming what to change.
        """
        independent = self.info.get("independent_particles")
        if independent is None:
            uniform = torch.full_like(self.log_weights, -math.log(self.num_draws))
            independent = bool(torch.allclose(self.log_weights, uniform))
        if independent:
            draws, available = self.get_samples(seed=seed), self.num_chains * self.num_draws
        else:
            draws, available = self.one_draw_per_chain(seed), self.num_chains
        count = available if num_draws is None else num_draws
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"num_draws must be a positive integer or None; got {num_draws!r}")
        if count > available:
            engine = self.info.get("engine", "this engine")
            why = (
                f"{self.num_chains} chains x {self.num_draws} particles"
                if independent
                else f"{engine}'s particles are correlated within a chain, so a run gives one "
                f"independent draw per chain, and it has {self.num_chains}; run with "
                f"num_chains >= {count} (posterior.draw_layout)"
            )
            raise ValueError(f"independent_draws: {count} asked for, {available} available ({why})")
        return {name: value[:count] for name, value in draws.items()}

    def to_datatree(self, **kwargs):
        """This set as an ``xarray.DataTree`` in the ArviZ 1.x layout (see
        :func:`diffpost.diagnostics.to_datatree` for the arguments)."""
        from diffpost.diagnostics.convert import to_datatree

        return to_datatree(self, **kwargs)

    def to(self, device=None, dtype: torch.dtype | None = None) -> ParticleSet:
        """A copy with every tensor moved (floating tensors also cast to ``dtype``)."""

        def move(value: Tensor | None) -> Tensor | None:
            if value is None:
                return None
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)

        return ParticleSet(
            values={k: move(v) for k, v in self.values.items()},
            log_weights=move(self.log_weights),
            log_evidence=move(self.log_evidence),
            log_likelihood=move(self.log_likelihood),
            observed={k: move(v) for k, v in self.observed.items()},
            stats={k: move(v) for k, v in self.stats.items()},
            info=dict(self.info),
        )

    def save(self, path: str | Path) -> None:
        """Save with ``torch.save`` (tensors moved to the CPU), atomically (a temporary file
        renamed into place, so an interrupted save keeps the previous file); read back with
        :meth:`load`."""
        cpu = self.to("cpu")
        data = {
            "format": SAVE_FORMAT,
            "values": cpu.values,
            "log_weights": cpu.log_weights,
            "log_evidence": cpu.log_evidence,
            "log_likelihood": cpu.log_likelihood,
            "observed": cpu.observed,
            "stats": cpu.stats,
            "info": cpu.info,
        }
        write_atomically(path, lambda temporary: torch.save(data, temporary))

    @classmethod
    def load(cls, path: str | Path, device=None) -> ParticleSet:
        """Load a set written by :meth:`save`, onto ``device`` (default CPU).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: a truncated file, or one that :meth:`save` did not write.
        """

        def read(file: Path) -> dict:
            data = torch.load(file, map_location=device or "cpu", weights_only=True)
            if not isinstance(data, dict) or data.pop("format", SAVE_FORMAT) != SAVE_FORMAT:
                raise ValueError("not a dict written by ParticleSet.save")
            missing = {"values", "log_weights"} - set(data)
            if missing:
                raise ValueError(f"missing {sorted(missing)}")
            return data

        return cls(**read_file(path, "ParticleSet file (written by ParticleSet.save)", read))

    def select_chains(self, chains: int | list[int] | Tensor) -> ParticleSet:
        """A set with only the given chains, in that order (e.g. the best of several EM
        restarts); values, weights, evidence, likelihoods and per-step statistics follow.

        Args:
            chains: a chain index or a list of them.

        Raises:
            ValueError: an index outside ``[0, num_chains)``.
        """
        index = torch.as_tensor([chains] if isinstance(chains, int) else chains, dtype=torch.long)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"select_chains: give a chain index or a list of them; got {chains!r}")
        if bool(((index < 0) | (index >= self.num_chains)).any()):
            raise ValueError(
                f"select_chains: chains must lie in [0, {self.num_chains}); got {index.tolist()}"
            )

        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index.to(value.device)]

        info = dict(self.info)
        info["num_chains"] = int(index.numel())
        return ParticleSet(
            values={k: pick(v) for k, v in self.values.items()},
            log_weights=pick(self.log_weights),
            log_evidence=pick(self.log_evidence),
            log_likelihood=pick(self.log_likelihood),
            observed=dict(self.observed),
            stats={k: pick(v) for k, v in self.stats.items()},
            info=info,
        )

    @classmethod
    def concat(cls, sets: list[ParticleSet]) -> ParticleSet:
        """Join runs of the same problem along ``chain`` (so R-hat compares independent runs)."""
        if not sets:
            raise ValueError("ParticleSet.concat needs at least one set")
        first = sets[0]
        for other in sets[1:]:
            if other.plate != first.plate:
                raise ValueError(
                    f"ParticleSet.concat: sets differ in their plate ({first.plate} and "
                    f"{other.plate})"
                )
            if other.values.keys() != first.values.keys() or other.num_draws != first.num_draws:
                raise ValueError("ParticleSet.concat: sets differ in sites or number of draws")
            check_same_run_kind(first, other)

        def join(getter) -> Tensor | None:
            parts = [getter(s) for s in sets]
            return None if any(p is None for p in parts) else torch.cat(parts, 0)

        stats = {}
        for key in first.stats:
            if all(
                key in s.stats and s.stats[key].shape[1:] == first.stats[key].shape[1:]
                for s in sets
            ):
                stats[key] = torch.cat([s.stats[key] for s in sets], 0)
        info = dict(first.info)
        info["num_chains"] = sum(s.num_chains for s in sets)
        for key in ("nfe", "vjp", "wall_time"):
            if all(key in s.info for s in sets):
                info[key] = sum(s.info[key] for s in sets)
        return cls(
            values={k: torch.cat([s.values[k] for s in sets], 0) for k in first.values},
            log_weights=join(lambda s: s.log_weights),
            log_evidence=join(lambda s: s.log_evidence),
            log_likelihood=join(lambda s: s.log_likelihood),
            observed=dict(first.observed),
            stats=stats,
            info=info,
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.values.items())
        engine = self.info.get("engine", "?")
        sizes = f"chains={self.num_chains}, draws={self.num_draws}"
        return f"ParticleSet(engine={engine}, {sizes}, {shapes})"
