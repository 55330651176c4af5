"""One batch of trials of :func:`~diffpost.diagnostics.calibration_study`: the unit of work that
runs in-process or on an executor's worker.

A batch runs the engine on its trials (one plated run, or one run for a batch of one trial) and
reduces the draws on the spot to what the study keeps: the ranks of the truth, the coverage
counts and the run's totals. Only these small tensors travel back from a worker, and only they
are saved per batch in a study's directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from torch import Tensor

from diffpost import posterior
from diffpost.diagnostics.ranks import Summaries, ranks_of_truth
from diffpost.diagnostics.scores import central_intervals
from diffpost.posterior.engines.base import Engine
from diffpost.posterior.files import read_file, write_atomically
from diffpost.posterior.problem import Problem
from diffpost.posterior.tasks import run_scope

__all__ = ["CalibrationBatch", "load_batch", "run_batch", "save_batch", "tie_generator"]

#: the keys of a batch's result
RESULT_KEYS = ("ranks", "covered", "nfe", "vjp", "wall_time")


class CalibrationBatch(NamedTuple):
    """The trials ``first .. first + B - 1`` of a study, with what a worker needs to run them.

    Attributes:
        model: the study's model (observations unobserved).
        engine: the engine under study.
        observations: observed site -> ``(B, *obs event)`` the batch's simulated measurements.
        truths: ``(B, d)`` the batch's flattened truths.
        first: index of the batch's first trial in the study.
        seeds: ``B`` trial seeds; the run's seed is ``seeds[0]``.
        plated: one plated run over the ``B`` trials (``trials_per_batch > 1``) rather than a
            run of the model conditioned on the single trial.
        summary: the study's summaries, with the TARP references of this batch only.
        latent: name of the prior's site.
        event: the signal's event shape.
        num_draws: :math:`L`, the draws per trial.
        levels: the nominal levels of the coverage curves.
        tarp: column of the ``"tarp"`` summary, or ``None``.
        log_likelihood: whether the ``"log_likelihood"`` summary is used.
        one_draw_per_chain: one draw per chain instead of all equal-weight draws.
        num_particles, num_chains, batch_size: the runs' layout.
        num_threads: torch threads while the batch runs (``None``: the process's).
        model_args, model_kwargs: the model's other arguments.
    """

    model: Callable
    engine: Engine
    observations: dict[str, Tensor]
    truths: Tensor
    first: int
    seeds: list[int]
    plated: bool
    summary: Summaries
    latent: str
    event: tuple[int, ...]
    num_draws: int
    levels: list[float]
    tarp: int | None
    log_likelihood: bool
    one_draw_per_chain: bool
    num_particles: int
    num_chains: int
    batch_size: int | None
    num_threads: int | None
    model_args: tuple
    model_kwargs: dict[str, Any]


def tie_generator(trial_seed: int) -> torch.Generator:
    """The CPU generator that breaks a trial's ties of ranks: seeded by a hash of the trial's
    seed (not the seed itself, whose stream the engine's first draws use), so a trial's ranks
    depend on nothing but its own seed, whatever the order in which trials run.

    Args:
        trial_seed: the trial's seed (``trial_seeds[i]`` of the study).

    Returns:
        A ``torch.Generator`` on the CPU.
    """
    digest = hashlib.sha256(f"diffpost.calibration.ties:{int(trial_seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _plated_model(model: Callable, size: int, data: dict[str, Tensor]) -> Callable:
    """``model`` conditioned on a batch of observations ``(size, *obs)``, inside a plate."""
    conditioned = poutine.condition(model, data=data)

    def plated(*args, **kwargs):
        with pyro.plate("trials", size):
            return conditioned(*args, **kwargs)

    return plated


def run_batch(job: CalibrationBatch, attempt: int = 0) -> dict[str, Any]:
    """Run a batch's trials and reduce each to its ranks and coverage: the task of a study.

    Args:
        job: the batch.
        attempt: 0 for the first attempt (unused: a retry runs the same seeds).

    Returns:
        ``{"ranks": (B, K) long, "covered": (Q, K) float64, "nfe": int, "vjp": int,
        "wall_time": float}``: per trial and summary the rank of the truth among the draws;
        per level and summary how many of the batch's trials the central interval (TARP: the
        ball) contains; the run's denoiser calls, VJPs and seconds.
    """
    with run_scope(job.num_threads):
        return _run_batch(job)


def _run_batch(job: CalibrationBatch) -> dict[str, Any]:
    size = job.truths.shape[0]
    runs = {"num_particles": job.num_particles, "num_chains": job.num_chains}
    runs.update(batch_size=job.batch_size, progress=False)
    runs.update(model_args=job.model_args, model_kwargs=job.model_kwargs)
    if job.plated:
        plated = posterior.sample(
            _plated_model(job.model, size, job.observations), job.engine, seed=job.seeds[0], **runs
        )
        results = [plated.select_problem(b) for b in range(size)]
        totals = plated.info
    else:
        data = {name: value[0] for name, value in job.observations.items()}
        single = posterior.sample(
            poutine.condition(job.model, data=data), job.engine, seed=job.seeds[0], **runs
        )
        results, totals = [single], single.info

    level_tensor = torch.tensor(job.levels, dtype=torch.float64)
    ranks, covered = [], None
    for b, result in enumerate(results):
        draws = (
            result.one_draw_per_chain()[job.latent]
            if job.one_draw_per_chain
            else result.get_samples()[job.latent]
        )
        log_likelihood = None
        if job.log_likelihood:
            data = {name: value[b] for name, value in job.observations.items()}
            problem = Problem.from_model(
                poutine.condition(job.model, data=data), *job.model_args, **job.model_kwargs
            )

            def log_likelihood(flat: Tensor, problem: Problem = problem) -> Tensor:
                with torch.no_grad():
                    return problem.log_likelihood(flat.reshape(flat.shape[:1] + job.event))

        values, target = job.summary(
            draws.reshape(job.num_draws, -1), job.truths[b], b, log_likelihood
        )
        # rank of the truth among the draws, and the central intervals that contain it
        trial_ranks = ranks_of_truth(values, target, tie_generator(job.seeds[b])).cpu()
        ranks.append(trial_ranks)
        lower, upper = central_intervals(values, job.levels)
        inside = ((lower <= target) & (target <= upper)).cpu().double()
        if job.tarp is not None:  # TARP: the ball around the reference holding a fraction alpha
            inside[:, job.tarp] = (trial_ranks[job.tarp] < level_tensor * job.num_draws).double()
        covered = inside if covered is None else covered + inside
    return {
        "ranks": torch.stack(ranks),
        "covered": covered,
        "nfe": int(totals.get("nfe", 0)),
        "vjp": int(totals.get("vjp", 0)),
        "wall_time": float(totals.get("wall_time", 0.0)),
    }


def save_batch(result: dict[str, Any], path: Path) -> None:
    """Write a batch's result (:func:`run_batch`) atomically with ``torch.save``."""
    data = {"format": "diffpost.CalibrationBatch/1", **result}
    write_atomically(path, lambda temporary: torch.save(data, temporary))


def load_batch(path: Path) -> dict[str, Any]:
    """Read a batch's result written by :func:`save_batch`.

    Raises:
        ValueError: a file :func:`save_batch` did not write.
    """

    def read(file: Path) -> dict[str, Any]:
        data = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.pop("format", None) != "diffpost.CalibrationBatch/1":
            raise ValueError("not a batch written by calibration_study")
        missing = sorted(set(RESULT_KEYS) - set(data))
        if missing:
            raise ValueError(f"missing {missing}")
        return data

    return read_file(path, "calibration batch (written by calibration_study)", read)
