"""The run driver: one loop for every engine."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffpost.posterior.engines.base import Engine, run
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import Problem

__all__ = ["draw_layout", "sample"]


def draw_layout(
    engine: Engine, num_draws: int, particles_per_chain: int = 8, num_chains: int = 1
) -> tuple[int, int]:
    """``(num_chains, num_particles)`` of a run that yields at least ``num_draws`` independent
    draws (:meth:`~diffpost.posterior.ParticleSet.independent_draws`) from ``engine``.

    Engines whose particles are independent draws run ``num_chains`` chains (default 1; several
    let R-hat compare them) of ``ceil(num_draws / num_chains)`` particles; the others (resampling
    filters, interacting particles, MCMC chains: ``engine.independent_particles`` is False) give
    one draw per chain, so they run ``num_draws`` chains of ``particles_per_chain`` particles.
    """
    for name, value in (
        ("num_draws", num_draws),
        ("particles_per_chain", particles_per_chain),
        ("num_chains", num_chains),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if engine.independent_particles:
        return num_chains, -(-num_draws // num_chains)
    return num_draws, particles_per_chain


def progress_enabled(progress: bool) -> bool:
    """Whether to show a progress bar: asked for, and not under ``CI`` or a pytest-xdist
    worker (shared by :func:`sample` and :func:`~diffpost.diagnostics.calibration_study`)."""
    return progress and not any(key in os.environ for key in ("CI", "PYTEST_XDIST_WORKER"))


def _stack_statistics(records: list[dict[str, Tensor]], num_chains: int) -> dict[str, Tensor]:
    """Per-step dicts of ``(chains,)`` tensors or scalars -> name -> ``(chains, steps)``."""
    stats: dict[str, Tensor] = {}
    if not records:
        return stats
    for key in records[0]:
        column = []
        for record in records:
            value = torch.as_tensor(record[key])
            column.append(
                value.detach().reshape(-1).expand(num_chains)
                if value.numel() == 1
                else value.detach()
            )
        stats[key] = torch.stack(column, dim=1)
    return stats


def unfold_plate(value: Tensor, count: int) -> Tensor:
    """``(B * chains, ...)`` problem-major runs -> ``(chains, [draws,] B, ...)``: the plate's dim
    after the sample dims."""
    value = value.reshape(count, value.shape[0] // count, *value.shape[1:])
    if value.dim() == 2:  # (B, chains)
        return value.transpose(0, 1)
    return value.permute(1, 2, 0, *range(3, value.dim()))


def sample(
    model: Callable,
    engine: Engine,
    *,
    num_particles: int,
    num_chains: int = 1,
    seed: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    callback: Callable[[int, Any, dict[str, Tensor]], None] | None = None,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
) -> ParticleSet:
    """Run an inference engine on the inverse problem declared by a Pyro model.

    Args:
        model: a Pyro model with one :class:`~diffpost.models.priors.DiffusionPrior` latent site and
            observed sites.
        engine: an engine instance, e.g. ``posterior.Exact()``.
        num_particles: particles per chain (``draws``).
        num_chains: independent runs, batched together.
        seed: seed of the run's ``torch.Generator`` (drawn at random and recorded when ``None``);
            the same seed on the same device gives identical results.
        device: where to run; must be the prior's device (the default).
        batch_size: chunk size of denoiser and likelihood calls (``None``: all particles at once).
        progress: show a progress bar (always off when ``CI`` is set).
        callback: called as ``callback(step, state, info)`` after every step.
        model_args: positional arguments of the model.
        model_kwargs: keyword arguments of the model (the observations, e.g. ``{"y": y}``).

    Returns:
        A :class:`~diffpost.posterior.particles.ParticleSet` with values
        ``(num_chains, num_particles, *event)`` under the prior site's name. With a
        ``pyro.plate`` of ``B`` problems around the signal and the observations, every problem
        is run at once (one denoiser call per step for all ``B * num_chains * num_particles``
        particles, chunked by ``batch_size``; weights, resampling and evidence per problem and
        chain) and the values are ``(num_chains, num_particles, B, *event)``; see
        :meth:`ParticleSet.select_problem`.

    Raises:
        ValueError: a misdeclared model, bad arguments, or an engine that cannot handle the
            problem (naming the missing capability).
        EngineFailed: non-finite particles or collapsed weights, with the step and time.
    """
    if not isinstance(engine, Engine):
        raise ValueError(
            f"engine must be a posterior engine instance (e.g. posterior.Exact()); got {engine!r}"
        )
    for name, value in (("num_particles", num_particles), ("num_chains", num_chains)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    problem = Problem.from_model(model, *model_args, batch_size=batch_size, **(model_kwargs or {}))
    if device is not None and torch.device(device) != problem.device:
        raise ValueError(
            f"device={device!r} but the prior lives on {problem.device}: move the prior's denoiser "
            "(and the observations) there instead"
        )
    problem.require(engine)
    seed = secrets.randbits(63) if seed is None else int(seed)
    generator = torch.Generator(device=problem.device).manual_seed(seed)

    start = time.perf_counter()

    def steps(indices):
        return tqdm(
            indices,
            desc=engine.name,
            disable=len(indices) == 0 or not progress_enabled(progress),
        )

    # a plate of B problems runs as B * num_chains chains, problem-major
    runs = num_chains * problem.num_problems
    state, records = run(
        engine, problem, runs, num_particles, generator, steps=steps, callback=callback
    )
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    wall_time = time.perf_counter() - start

    draws = engine.draws(problem, state, runs)
    free = bool(problem.global_latents) and problem.bound is None
    log_likelihood = draws.log_likelihood
    if log_likelihood is None and "finite_likelihood" in problem.capabilities and not free:
        signal = draws.values[problem.latent_name]
        with torch.no_grad():
            log_likelihood = problem.log_likelihood(signal.flatten(0, 1)).reshape(signal.shape[:2])
    values, log_weights, log_evidence = draws.values, draws.log_weights, draws.log_evidence
    stats = _stack_statistics(records, runs)
    if problem.plate is not None:
        values = {name: unfold_plate(value, problem.num_problems) for name, value in values.items()}
        log_weights = unfold_plate(log_weights, problem.num_problems)
        log_evidence = (
            None if log_evidence is None else unfold_plate(log_evidence, problem.num_problems)
        )
        log_likelihood = (
            None if log_likelihood is None else unfold_plate(log_likelihood, problem.num_problems)
        )
        stats = {
            name: value.reshape(problem.num_problems, num_chains, *value.shape[1:]).transpose(0, 1)
            for name, value in stats.items()
        }
    return ParticleSet(
        values=values,
        log_weights=log_weights,
        log_evidence=log_evidence,
        log_likelihood=log_likelihood,
        observed={name: value.detach() for name, value in problem.observed.items()},
        stats=stats,
        info={
            "engine": engine.name,
            "config": engine.config(),
            "num_particles": num_particles,
            "num_chains": num_chains,
            "nfe": problem.nfe,
            "vjp": problem.vjp,
            "wall_time": wall_time,
            "seed": seed,
            "latent_name": problem.latent_name,
            "device": str(problem.device),
            "independent_particles": bool(engine.independent_particles),
            **({} if problem.plate is None else {"plate": list(problem.plate)}),
        },
        fitted=engine.fitted(problem, state),
    )
