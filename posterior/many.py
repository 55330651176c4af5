"""Many independent runs of one engine, in-process or on any ``concurrent.futures`` executor.

:func:`sample_many` runs :func:`~diffpost.posterior.sample` once per observation through the
machinery of :mod:`diffpost.posterior.tasks` (shared with
:func:`diffpost.diagnostics.calibration_study`): results collected as they complete, failed runs
resubmitted, a progress bar, and a directory (a manifest and one file per run) from which an
interrupted study resumes.

Reproducibility: run ``i`` is seeded by child ``i`` of ``numpy.random.SeedSequence(seed)`` and
runs with a fixed number of torch threads, so its result does not depend on the executor, the
order of completion, the number of runs or which runs were already done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from diffpost.posterior.driver import check_model_arguments, check_run, sample
from diffpost.posterior.engines import Engine
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem
from diffpost.posterior.tasks import (
    StudyDirectory,
    check_study,
    fingerprint,
    run_scope,
    run_seeds,
    run_tasks,
    study_manifest,
)

__all__ = ["SampleJob", "sample_job", "sample_many"]


class SampleJob(NamedTuple):
    """One run of :func:`sample_many`: :func:`~diffpost.posterior.sample`'s arguments."""

    model: Callable
    engine: Engine
    seed: int
    num_particles: int
    num_chains: int
    batch_size: int | None
    num_threads: int | None
    model_args: tuple
    model_kwargs: dict[str, Any]


def sample_job(job: SampleJob, attempt: int) -> ParticleSet:
    """Run one job of :func:`sample_many`: the task its executor runs.

    Args:
        job: the run's arguments.
        attempt: 0 for the first attempt (unused: a retry runs the same seed).

    Returns:
        The run's :class:`~diffpost.posterior.ParticleSet`, values
        ``(num_chains, num_particles, *event)``.
    """
    with run_scope(job.num_threads):
        return sample(
            job.model,
            job.engine,
            num_particles=job.num_particles,
            num_chains=job.num_chains,
            seed=job.seed,
            batch_size=job.batch_size,
            progress=False,
            model_args=job.model_args,
            model_kwargs=job.model_kwargs,
        )


def _check_observations(observations: Any, model_kwargs: dict[str, Any]) -> list[dict]:
    """The observations as a list of dicts with the same names, none given by ``model_kwargs``.

    Raises:
        ValueError: naming the argument and the offending entry.
    """
    if isinstance(observations, (str, bytes, Mapping)) or not isinstance(observations, Sequence):
        raise ValueError(
            "observations must be a sequence (list or tuple) of dicts of observed values, one "
            f"per run (e.g. [{{'y': y0}}, {{'y': y1}}]); got {type(observations).__name__}"
        )
    if not observations:
        raise ValueError("observations must hold at least one dict; got an empty sequence")
    names = None
    for index, entry in enumerate(observations):
        if not isinstance(entry, Mapping) or not all(isinstance(k, str) for k in entry):
            raise ValueError(
                f"observations[{index}] must be a dict of the model's keyword arguments (e.g. "
                f"{{'y': y}}); got {type(entry).__name__}"
            )
        if names is None:
            names = set(entry)
        elif set(entry) != names:
            raise ValueError(
                f"observations[{index}] gives {sorted(entry)}, observations[0] gives "
                f"{sorted(names)}: every run must give the same names"
            )
        shared = sorted(set(entry) & set(model_kwargs))
        if shared:
            raise ValueError(
                f"observations[{index}] and model_kwargs both give {shared}: give each name in "
                "one of them"
            )
    return [dict(entry) for entry in observations]


def sample_many(
    model: Callable,
    engine: Engine,
    observations: Sequence[Mapping[str, Any]],
    *,
    num_particles: int,
    num_chains: int = 1,
    seed: int = 0,
    executor: Any = None,
    directory: str | os.PathLike | None = None,
    retries: int = 1,
    num_threads: int | None = 1,
    progress: bool = True,
    batch_size: int | None = None,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
) -> list[ParticleSet]:
    """Run one engine on many measurements: one :func:`~diffpost.posterior.sample` per entry of
    ``observations``, in-process or on an executor.

    Run ``i`` is ``sample(model, engine, num_particles=..., num_chains=..., seed=seeds[i],
    progress=False, model_args=model_args, model_kwargs={**model_kwargs, **observations[i]})``
    with ``seeds[i]`` from child ``i`` of ``numpy.random.SeedSequence(seed)``
    (:func:`~diffpost.posterior.tasks.run_seeds`) and ``num_threads`` torch threads: its result
    is the same, bit for bit, whatever the executor, the order in which runs complete, and
    which runs a resumed study had already done.

    The model is traced with the first observation in this process before any run (a
    misdeclared model, or an engine that cannot handle the problem, is refused at once); the
    others are checked only for their names. For many small problems that fit in memory
    together, one plated run (``pyro.plate``; see :func:`~diffpost.posterior.sample`) is
    faster; ``sample_many`` is for runs that each fill a device or a process, and for
    spreading them over machines.

    Example::

        from distributed import Client

        client = Client("tcp://scheduler:8786")  # or Client(n_workers=4) on this machine
        sets = posterior.sample_many(model, posterior.MCGDiff(), [{"y": y} for y in ys],
                                     num_particles=256, seed=0, directory="runs/mcgdiff",
                                     executor=client.get_executor())

    Args:
        model: the Pyro model (a module-level function, or any object cloudpickle pickles,
            with an executor that runs tasks in other processes: Dask pickles with cloudpickle,
            ``concurrent.futures.ProcessPoolExecutor`` with ``pickle``).
        engine: an engine instance, e.g. ``posterior.MCGDiff()``.
        observations: ``R`` dicts of observed values, one per run, each passed as keyword
            arguments of the model with ``model_kwargs`` (e.g. ``{"y": y_i}`` with ``y_i`` of
            the observed site's shape); all with the same names, none of which
            ``model_kwargs`` also gives.
        num_particles: particles per chain.
        num_chains: chains per run.
        seed: the study's seed (an integer in ``[0, 2**64)``); the runs' seeds derive from it.
        executor: ``None`` (default) runs in this process, one run after the other; otherwise
            anything with ``submit`` like a ``concurrent.futures.Executor``. The tested one is
            Dask's, ``distributed.Client(...).get_executor()`` (install the ``distributed``
            extra; workers with one thread each, as many as cores); each run is one task,
            whose arguments (the model with its prior, the observation) are pickled with it.
            Runs in threads of one process take turns (Pyro's handler stack is global to a
            process; see :func:`~diffpost.posterior.tasks.run_scope`), so parallel runs need
            processes or machines. For runs on the CPU, start Dask's workers without the
            nanny's ``MALLOC_TRIM_THRESHOLD_=65536``
            (``dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_":
            None})`` before the cluster starts): with it, MCGDiff runs took 2.6x as long
            (``benchmarks/results/executors.md``).
        directory: a folder to stream the results to (``run-000012.pt`` per run, written by
            :meth:`ParticleSet.save` as each run finishes, and ``manifest.json`` describing the
            study: engine, config, seed, number of runs, layout, fingerprints of the
            observations and ``model_kwargs``). Called again with the same folder, the study
            loads the runs already there and does only the missing ones; a folder holding
            another study is refused. Loaded runs come back on the prior's device, without
            ``fitted`` (not saved; FlowVI's flows).
        retries: how many times a failed run (it raised, or its worker died) is run again, with
            the same seed (so it helps with transient failures, not deterministic ones). A
            worker's death fails the runs it held (the running one and any queued on it) once
            Dask's own rescheduling (``distributed.scheduler.allowed-failures``) gives up.
        num_threads: torch threads of each run, set for its duration in the process that runs
            it and restored after (results depend on the thread count in their last bits);
            ``None`` keeps each process's own count, and then results are reproducible only
            for equal counts.
        progress: show a progress bar over runs (off when ``CI`` is set).
        batch_size: chunk size of the denoiser's calls in each run.
        model_args: positional arguments of the model, shared by the runs.
        model_kwargs: keyword arguments of the model shared by the runs.

    Returns:
        ``R`` :class:`~diffpost.posterior.ParticleSet` in the order of ``observations``, each
        with values ``(num_chains, num_particles, *event)`` and ``info["seed"]`` its run's seed.

    Raises:
        ValueError: bad arguments (named), a misdeclared model or an engine that cannot handle
            the first problem, or a ``directory`` that holds another study.
        TypeError: a seed that is not an integer.
        RunsFailed: some runs failed on every attempt; raised once all the others have
            finished (and been saved), listing the failed indices and errors, with the
            finished sets in its ``results`` (index -> ``ParticleSet``).
    """
    check_run(engine, num_particles, num_chains)
    check_study(seed, executor, retries, num_threads, directory)
    check_model_arguments(model, model_args, model_kwargs)
    shared = dict(model_kwargs or {})
    runs = _check_observations(observations, shared)
    try:
        check_model_arguments(model, model_args, runs[0])
    except ValueError as error:  # name the argument that gave the unknown names
        raise ValueError(str(error).replace("model_kwargs has", "observations give", 1)) from None
    model_args = tuple(model_args)

    first = Problem.from_model(model, *model_args, batch_size=batch_size, **shared, **runs[0])
    first.require(engine)
    seeds = run_seeds(seed, len(runs))
    jobs = [
        SampleJob(
            model,
            engine,
            run_seed,
            num_particles,
            num_chains,
            batch_size,
            num_threads,
            model_args,
            {**shared, **observation},
        )
        for run_seed, observation in zip(seeds, runs, strict=True)
    ]
    store = None
    if directory is not None:
        manifest = study_manifest(
            "sample_many",
            engine,
            seed,
            runs=len(runs),
            num_particles=num_particles,
            num_chains=num_chains,
            batch_size=batch_size,
            num_threads=num_threads,
            observations=fingerprint(runs),
            model_arguments=fingerprint([list(model_args), shared]),
        )
        device = first.device
        store = StudyDirectory(
            directory,
            manifest,
            "run",
            save=lambda result, path: result.save(path),
            load=lambda path: ParticleSet.load(path, device=device),
        )
    results = run_tasks(
        sample_job,
        jobs,
        executor=executor,
        retries=retries,
        progress=progress,
        description=f"sample_many {engine.name}",
        directory=store,
    )
    return results
