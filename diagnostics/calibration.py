r"""Calibration studies: simulation-based calibration (SBC), coverage curves and TARP.

A posterior is *calibrated* when its credible regions contain the truth as often as they claim,
averaged over the problems the model generates. :func:`calibration_study` checks this the way
Talts et al. (2018) propose: draw :math:`(x^\star_i, y_i)` from the model's prior predictive,
run the engine on each :math:`y_i`, and for a scalar summary :math:`f` count the posterior draws
below the truth,

.. math:: r_i = \#\{\ell \le L : f(x^{(\ell)}_i) < f(x^\star_i)\} \in \{0, \dots, L\}.

If the draws are exact and independent, :math:`r_i` is uniform on :math:`\{0, \dots, L\}` for
every :math:`f` (ties, e.g. a noiselessly observed pixel, are broken uniformly at random). The
summaries are

* ``"coordinates"``: every coordinate (pixel) of the flattened signal, or a chosen subset;
* ``"projections"``: random unit directions :math:`\theta^\top x`, shared by all trials;
* ``"log_likelihood"``: :math:`\log p(y_i \mid x)`, the test quantity Modrák et al. (2023)
  recommend, sensitive to posteriors that are too wide or too narrow in the directions the data
  inform (needs a finite likelihood);
* ``"tarp"``: the distance to a random reference point :math:`\lVert x - x^r_i \rVert` of TARP
  (Lemos et al. 2023) in coordinates normalised by the truths' range, with :math:`x^r_i` uniform
  in the unit box (the official ``tarp`` package's ``references="random"``, ``norm=True``): one
  joint summary of all coordinates, meant for high dimensions. Lemos et al. show that nominal
  coverage at every :math:`\alpha` implies an exact posterior when the reference points'
  distribution depends on the observation; with these data-independent references, prior draws
  pass it (measured in ``tests/test_calibration.py``), as they pass every summary that ignores
  :math:`y` (Talts et al.) — the log-likelihood summary is the one that catches them.

Uniformity of each summary's ranks is tested with Pearson's chi-square on ``num_bins`` bins of
the ranks (Talts et al., section 4.1), with the exact bin probabilities of a discrete uniform
on :math:`\{0, \dots, L\}`; the study passes at level :math:`\alpha` when every p-value exceeds
:math:`\alpha / K` for :math:`K` summaries (Bonferroni). Coverage curves give, for each nominal
level :math:`q`, the fraction of trials whose central :math:`q` credible interval of the summary
(empirical quantiles of the draws) contains the truth; TARP's curve is its expected coverage
probability :math:`\mathrm{ECP}(\alpha) = \frac1T\sum_i \mathbb 1\{r_i / L < \alpha\}`.

Choices: the prior-predictive draws of all trials are one batched call of the prior's sampler.
The trials then run in batches (``trials_per_batch``; one plated engine run per batch, seeded by
its first trial's seed), each batch one task that runs the engine and reduces its draws to
ranks and coverage counts (:mod:`diffpost.diagnostics.calibration_batch`), in this process or
on an ``executor`` (the machinery of :func:`diffpost.posterior.sample_many`: retries, a
``directory`` to resume from). Ties are broken with a generator of each trial's own, seeded by
a hash of its seed, so a trial's ranks do not depend on the order in which trials run, and a
study gives the same result, bit for bit, in-process and on any executor. Ranks need
*independent* draws: the particles of one SMC chain share ancestors, which widens the rank
histogram; pass ``one_draw_per_chain=True`` with many chains for SMC engines (each chain then
contributes one draw picked by its weights).

References:
    Talts, Betancourt, Simpson, Vehtari, Gelman. Validating Bayesian inference algorithms with
    simulation-based calibration. arXiv:1804.06788, 2018.
    Modrák, Moon, Kim, Bürkner, Huurre, Faltejsková, Gelman, Vehtari. Simulation-based
    calibration checking for Bayesian computation: the choice of test quantities shapes
    sensitivity. Bayesian Analysis, 2023.
    Lemos, Coogan, Hezaveh, Perreault-Levasseur. Sampling-based accuracy testing of posterior
    estimators for general inference. ICML 2023 (official code: github.com/Ciela-Institute/tarp).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro.poutine as poutine
import torch
from torch import Tensor

from diffpost.diagnostics.calibration_batch import (
    CalibrationBatch,
    load_batch,
    run_batch,
    save_batch,
)
from diffpost.diagnostics.ranks import (
    SUMMARIES,
    Summaries,
    check_summaries,
    rank_uniformity_test,
)
from diffpost.diagnostics.simulation import prior_predictive
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.problem import Problem
from diffpost.posterior.tasks import (
    StudyDirectory,
    check_study,
    fingerprint,
    run_tasks,
    study_manifest,
)

__all__ = [
    "CalibrationStudy",
    "calibration_study",
    "rank_uniformity_test",
    "SUMMARIES",
]

#: default nominal levels of the coverage curves
DEFAULT_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationStudy:
    """The result of :func:`calibration_study`.

    Attributes:
        ranks: ``(T, K)`` ``long``: per trial and summary, the number of posterior draws below
            the truth (plus a random share of ties), in ``[0, num_draws]``.
        num_draws: :math:`L`, the posterior draws per trial.
        summaries: ``K`` names: ``"x[i]"`` (coordinate ``i`` of the flattened latent),
            ``"projection[j]"``, ``"log_likelihood"``, ``"tarp"``.
        kinds: ``K`` kinds: ``"coordinates"``, ``"projections"``, ``"log_likelihood"``, ``"tarp"``.
        levels: ``(Q,)`` nominal levels of the coverage curves.
        coverage: ``(Q, K)``: fraction of trials whose central credible interval of the summary
            at each level contains the truth (for ``"tarp"``: the ECP at credibility ``level``).
        num_bins: bins of the rank histograms and of the chi-square test.
        x_true: ``(T, *event)`` the simulated truths.
        observations: observed site -> ``(T, *obs event)`` the simulated measurements.
        projections: ``(d, P)`` the unit directions of the ``"projections"`` summaries.
        info: engine name and config, ``num_particles``, ``num_chains``, ``seed``, total
            ``nfe``, ``vjp`` and ``wall_time`` over trials.
    """

    ranks: Tensor
    num_draws: int
    summaries: list[str]
    kinds: list[str]
    levels: Tensor
    coverage: Tensor
    num_bins: int
    x_true: Tensor
    observations: dict[str, Tensor] = field(default_factory=dict)
    projections: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_trials(self) -> int:
        return self.ranks.shape[0]

    @property
    def p_values(self) -> Tensor:
        """``(K,)`` chi-square p-values of the uniformity of each summary's ranks."""
        return rank_uniformity_test(self.ranks, self.num_draws, self.num_bins)

    def columns(self, kinds: Sequence[str] | None = None) -> list[int]:
        """Indices of the summaries of ``kinds`` (default all)."""
        if kinds is None:
            return list(range(len(self.kinds)))
        unknown = sorted(set(kinds) - set(self.kinds))
        if unknown:
            raise ValueError(
                f"kinds {unknown} are not in this study; it has {sorted(set(self.kinds))}"
            )
        return [k for k, kind in enumerate(self.kinds) if kind in kinds]

    def p_value(self, kinds: Sequence[str] | None = None) -> float:
        """Bonferroni-adjusted p-value of "all ranks are uniform": ``min(1, K * min_k p_k)`` over
        the summaries of ``kinds`` (default all)."""
        columns = self.columns(kinds)
        return min(1.0, len(columns) * float(self.p_values[columns].min()))

    def passed(self, alpha: float = 0.01, kinds: Sequence[str] | None = None) -> bool:
        """Whether no summary rejects uniformity at family-wise level ``alpha`` (Bonferroni)."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1); got {alpha}")
        return self.p_value(kinds) > alpha

    def normalized_ranks(self) -> Tensor:
        """``(T, K)`` ranks mapped to ``(0, 1)``: ``(r + 0.5) / (L + 1)`` (PIT values)."""
        return (self.ranks.double() + 0.5) / (self.num_draws + 1)

    def to_datatree(self):
        """The PIT values (:meth:`normalized_ranks`) as an ArviZ tree for
        ``arviz_plots.plot_ecdf_pit`` (PIT-ECDF with simultaneous bands, Säilynoja et al. 2022).

        Group ``prior_sbc``, ``sample_dims = ["chain", "draw"]`` with one chain and one draw per
        trial; one variable per kind, ``coordinates`` and ``projections`` with a
        ``coordinates_summary`` / ``projections_summary`` dim labelled by the summary names.
        """
        import arviz_base

        pit = self.normalized_ranks().numpy()
        kinds = list(dict.fromkeys(self.kinds))
        data, dims, coords = {}, {}, {}
        for kind in kinds:
            columns = self.columns([kind])
            if kind in ("coordinates", "projections"):
                data[kind] = pit[None, :, columns]
                dims[kind] = [f"{kind}_summary"]
                coords[f"{kind}_summary"] = [self.summaries[k] for k in columns]
            else:
                data[kind] = pit[None, :, columns[0]]
        return arviz_base.from_dict(
            {"prior_sbc": data}, sample_dims=["chain", "draw"], dims=dims, coords=coords
        )

    def table(self):
        """One row per summary: name, kind, p-value and the coverage at each level
        (a ``pandas.DataFrame``)."""
        import pandas as pd

        rows = {"summary": self.summaries, "kind": self.kinds, "p_value": self.p_values.tolist()}
        for q, values in zip(self.levels.tolist(), self.coverage.tolist(), strict=True):
            rows[f"coverage_{q:g}"] = values
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        engine = self.info.get("engine", "?")
        return (
            f"CalibrationStudy(engine={engine}, trials={self.num_trials}, draws={self.num_draws}, "
            f"summaries={len(self.summaries)}, p_value={self.p_value():.3g})"
        )


#: particles of one batched run of :func:`calibration_study` when ``trials_per_batch`` is ``None``
MAX_BATCHED_PARTICLES = 2**16


def calibration_study(
    model: Callable,
    engine: Engine,
    num_trials: int,
    *,
    num_particles: int = 100,
    num_chains: int = 1,
    one_draw_per_chain: bool = False,
    summaries: Sequence[str] | None = None,
    coordinates: Sequence[int] | None = None,
    num_projections: int = 8,
    levels: Sequence[float] = DEFAULT_LEVELS,
    num_bins: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    trials_per_batch: int | None = None,
    executor: Any = None,
    directory: str | os.PathLike | None = None,
    retries: int = 1,
    num_threads: int | None = 1,
    progress: bool = True,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
) -> CalibrationStudy:
    r"""Simulation-based calibration of an engine on a model (see the module docstring).

    Draws ``num_trials`` pairs :math:`(x^\star_i, y_i)` from the model's prior predictive
    (:func:`prior_predictive`), runs ``posterior.sample`` on each :math:`y_i` (the model
    conditioned on it), and computes the rank of every summary of :math:`x^\star_i` among the
    posterior draws and the coverage of its central credible intervals.

    Args:
        model: the Pyro model, called as ``model(*model_args, **model_kwargs)`` with the
            observations unobserved (e.g. ``def model(y=None)``).
        engine: the engine to check, e.g. ``posterior.Exact()``.
        num_trials: :math:`T`, simulated problems (a few hundred for a sharp test).
        num_particles: particles per chain.
        num_chains: chains per trial.
        one_draw_per_chain: use one draw per chain, picked by its weights
            (:meth:`~diffpost.posterior.ParticleSet.one_draw_per_chain`; :math:`L` = ``num_chains``)
            instead of all equal-weight draws (:math:`L` = ``num_chains * num_particles``).
        summaries: a subset of :data:`SUMMARIES`; default all of them, ``"log_likelihood"``
            only when the likelihood is finite (not for noiseless measurements).
        coordinates: flat indices of the coordinates to rank (default all).
        num_projections: number of random directions for ``"projections"``.
        levels: nominal levels of the coverage curves, in ``(0, 1)``.
        num_bins: bins of the rank histograms and the chi-square test (default
            ``min(20, T // 10, L + 1)``, at least 2: about ten expected trials per bin).
        seed: seeds the prior-predictive draws, directions, reference points and the per-trial
            seeds (which seed the engine runs and the trials' tie-breaking).
        batch_size: chunk size of the engine's denoiser calls (see
            :func:`diffpost.posterior.sample`).
        trials_per_batch: trials run together in one engine run, as a ``pyro.plate`` named
            ``"trials"`` around the model (one denoiser call per step for all of them; the
            per-step Python overhead is paid once per batch); results are identical in
            distribution to running them one by one, not draw for draw (one seed per batch).
            ``None`` (default): as many as keep a run within :data:`MAX_BATCHED_PARTICLES`
            particles (the denoiser's own memory is bounded by ``batch_size``), and 1 for models
            that cannot be plated (global latents, a second signal, a plate of their own).
            ``1`` runs each trial alone with its own seed.
        executor: ``None`` (default) runs the batches in this process, one after the other;
            otherwise anything with ``submit`` like a ``concurrent.futures.Executor``, e.g.
            Dask's ``distributed.Client(...).get_executor()`` (the tested one; see
            :func:`~diffpost.posterior.sample_many` for the workers' settings). Each batch is
            one task (module-level, :func:`~diffpost.diagnostics.calibration_batch.run_batch`)
            that receives the model, the engine and its trials' simulations, and returns only
            their ranks, coverage counts and totals (no particles). The result is the same, bit
            for bit, as in-process. Pass ``trials_per_batch`` too: the default packs up to
            :data:`MAX_BATCHED_PARTICLES` particles into one batch, often every trial, which
            leaves one task and nothing to spread.
        directory: a folder to stream the batches' results to (``batch-000012.pt`` each, and
            ``manifest.json`` describing the study: engine, config, seed, layout, summaries,
            levels and a fingerprint of the simulated trials). Called again with the same
            folder, the study loads the batches already there and runs only the missing ones; a
            folder holding another study is refused.
        retries: how many times a failed batch (it raised, or its worker died) is run again,
            with the same seeds.
        num_threads: torch threads while a batch runs, set in the process that runs it and
            restored after; fixed (default 1) so results do not depend on where batches run
            (their last bits depend on the thread count, and Dask's workers start with one
            thread); ``None`` keeps each process's count.
        progress: show a progress bar over batches (off when ``CI`` is set).
        model_args: positional arguments of the model.
        model_kwargs: keyword arguments of the model, without observed values.

    Returns:
        A :class:`CalibrationStudy`; ``study.passed(alpha)`` is the uniformity verdict.

    Raises:
        ValueError: bad arguments, a model that cannot be simulated (see
            :func:`prior_predictive`), ``"log_likelihood"`` without a finite likelihood, an
            engine that refuses the problem, or a ``directory`` that holds another study.
        RunsFailed: some batches failed on every attempt (:class:`~diffpost.posterior.RunsFailed`,
            raised once all the others have finished and been saved; its ``results`` maps batch
            index -> that batch's ``{"ranks", "covered", "nfe", "vjp", "wall_time"}``).
    """
    for name, value in (
        ("num_trials", num_trials),
        ("num_particles", num_particles),
        ("num_chains", num_chains),
        ("num_projections", num_projections),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if trials_per_batch is not None and (
        isinstance(trials_per_batch, bool)
        or not isinstance(trials_per_batch, int)
        or trials_per_batch < 1
    ):
        raise ValueError(
            f"trials_per_batch must be a positive integer or None; got {trials_per_batch!r}"
        )
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be a posterior engine instance; got {engine!r}")
    check_study(seed, executor, retries, num_threads, directory)
    summaries = check_summaries(summaries)
    levels_list = [float(q) for q in levels]
    if not levels_list or any(not 0 < q < 1 for q in levels_list):
        raise ValueError(f"levels must be a non-empty list of numbers in (0, 1); got {levels_list}")
    num_draws = num_chains if one_draw_per_chain else num_chains * num_particles
    if num_bins is None:
        num_bins = max(2, min(20, num_trials // 10, num_draws + 1))
    if not isinstance(num_bins, int) or not 2 <= num_bins <= num_draws + 1:
        raise ValueError(f"num_bins must be an integer in [2, {num_draws + 1}]; got {num_bins!r}")
    model_kwargs = dict(model_kwargs or {})

    # ---- simulate every trial at once ----
    latent, x_true, observations = prior_predictive(
        model, num_trials, seed, model_args=model_args, model_kwargs=model_kwargs
    )
    event = tuple(x_true.shape[1:])
    cpu = torch.Generator().manual_seed(int(seed))
    first = Problem.from_model(
        poutine.condition(model, data={k: v[0] for k, v in observations.items()}),
        *model_args,
        **model_kwargs,
    )
    finite_likelihood = "finite_likelihood" in first.capabilities
    if trials_per_batch is None:
        plateable = not first.global_latents and first.second is None and first.plate is None
        per_trial = num_chains * num_particles
        trials_per_batch = max(1, MAX_BATCHED_PARTICLES // per_trial) if plateable else 1
    trials_per_batch = min(trials_per_batch, num_trials)
    if summaries is None:
        summaries = [s for s in SUMMARIES if finite_likelihood or s != "log_likelihood"]
    elif "log_likelihood" in summaries and not finite_likelihood:
        raise ValueError(
            "the log_likelihood summary needs a finite likelihood; the model has "
            f"{first.describe_observation()}"
        )
    flat_truth = x_true.reshape(num_trials, -1)
    summary = Summaries.build(summaries, flat_truth, coordinates, num_projections, cpu)
    names, kinds = summary.columns()
    tarp = names.index("tarp") if "tarp" in names else None
    trial_seeds = torch.randint(0, 2**62, (num_trials,), generator=cpu).tolist()
    level_tensor = torch.tensor(levels_list, dtype=torch.float64)

    # ---- the batches of trials, each run and reduced to ranks and coverage by one task ----
    # slices are cloned: a pickled view would carry the whole study's tensor to every worker
    plated = trials_per_batch > 1
    jobs = []
    for first_trial in range(0, num_trials, trials_per_batch):
        trials = slice(first_trial, min(first_trial + trials_per_batch, num_trials))
        references = summary.references
        jobs.append(
            CalibrationBatch(
                model=model,
                engine=engine,
                observations={name: value[trials].clone() for name, value in observations.items()},
                truths=flat_truth[trials].clone(),
                first=first_trial,
                seeds=trial_seeds[trials],
                plated=plated,
                summary=dataclasses.replace(
                    summary, references=None if references is None else references[trials].clone()
                ),
                latent=latent,
                event=event,
                num_draws=num_draws,
                levels=levels_list,
                tarp=tarp,
                log_likelihood="log_likelihood" in summaries,
                one_draw_per_chain=one_draw_per_chain,
                num_particles=num_particles,
                num_chains=num_chains,
                batch_size=batch_size,
                num_threads=num_threads,
                model_args=tuple(model_args),
                model_kwargs=model_kwargs,
            )
        )
    store = None
    if directory is not None:
        manifest = study_manifest(
            "calibration_study",
            engine,
            seed,
            num_trials=num_trials,
            trials_per_batch=trials_per_batch,
            batches=len(jobs),
            num_particles=num_particles,
            num_chains=num_chains,
            one_draw_per_chain=one_draw_per_chain,
            summaries=names,
            levels=levels_list,
            batch_size=batch_size,
            num_threads=num_threads,
            simulations=fingerprint([x_true, observations, summary.directions, summary.references]),
        )
        store = StudyDirectory(directory, manifest, "batch", save=save_batch, load=load_batch)

    def label(index: int) -> str:
        first_trial = jobs[index].first
        last = first_trial + jobs[index].truths.shape[0] - 1
        trials = f"trial {first_trial}" if last == first_trial else f"trials {first_trial}-{last}"
        return f"batch {index} ({trials})"

    results = run_tasks(
        run_batch,
        jobs,
        executor=executor,
        retries=retries,
        progress=progress,
        description=f"calibration {engine.name}",
        directory=store,
        label=label,
    )
    ranks = torch.cat([result["ranks"] for result in results])
    covered = torch.zeros(len(levels_list), len(names), dtype=torch.float64)
    totals = {"nfe": 0, "vjp": 0, "wall_time": 0.0}
    for result in results:  # in batch order, so the float sums do not depend on the executor
        covered += result["covered"]
        for key in totals:
            totals[key] += result[key]

    return CalibrationStudy(
        ranks=ranks,
        num_draws=num_draws,
        summaries=names,
        kinds=kinds,
        levels=level_tensor,
        coverage=covered / num_trials,
        num_bins=num_bins,
        x_true=x_true,
        observations=observations,
        projections=summary.directions,
        info={
            "engine": engine.name,
            "config": engine.config(),
            "num_particles": num_particles,
            "num_chains": num_chains,
            "one_draw_per_chain": one_draw_per_chain,
            "seed": int(seed),
            "latent_name": latent,
            **totals,
        },
    )
