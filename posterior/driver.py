"""The run driver: one loop for every engine."""

from __future__ import annotations

import inspect
import math
import numbers
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
from diffpost.posterior.sharding import ParticleShard, Sharding, active_shard, agreed_seed

__all__ = ["check_model_arguments", "check_run", "check_seed", "draw_layout", "sample"]


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


#: seeds are 64-bit unsigned (what ``torch.Generator.manual_seed`` takes)
SEED_RANGE = 2**64


def check_seed(seed: Any) -> None:
    """Refuse a ``seed`` that is not ``None`` or an integer in ``[0, 2**64)`` (``1.5`` would
    silently equal ``1``, ``"abc"`` and ``2**70`` fail deep inside torch).

    Raises:
        TypeError: not an integer (bools and floats included).
        ValueError: outside ``[0, 2**64)``.
    """
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer or None; got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < SEED_RANGE:
        raise ValueError(f"seed must be in [0, 2**64); got {seed}")


def check_run(engine: Any, num_particles: Any, num_chains: Any) -> None:
    """Refuse an ``engine`` that is not an engine instance and sizes that are not positive
    integers (shared by :func:`sample` and the studies that call it).

    Raises:
        ValueError: naming the argument.
    """
    if not isinstance(engine, Engine):
        raise ValueError(
            f"engine must be a posterior engine instance (e.g. posterior.Exact()); got {engine!r}"
        )
    for name, value in (("num_particles", num_particles), ("num_chains", num_chains)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_model_arguments(model: Any, model_args: Any, model_kwargs: Any) -> None:
    """Refuse a model that is not callable, ``model_args`` that is not a tuple or list, and
    ``model_kwargs`` that is not a dict of names the model accepts (a misspelled key would
    otherwise fail inside the model, or be swallowed by ``**kwargs``-free models with a
    ``TypeError`` that does not say which argument)."""
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model; got {type(model).__name__}")
    if not isinstance(model_args, (tuple, list)):
        raise TypeError(f"model_args must be a tuple; got {type(model_args).__name__}")
    if model_kwargs is None:
        return
    if not isinstance(model_kwargs, dict):
        raise TypeError(
            f"model_kwargs must be a dict of the model's keyword arguments (e.g. {{'y': y}}); "
            f"got {type(model_kwargs).__name__}"
        )
    try:
        parameters = inspect.signature(model).parameters
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = {
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(model_kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"model_kwargs has {unknown}, which the model does not accept; its keyword "
            f"arguments are {sorted(accepted)}"
        )


#: copies of the particles an engine holds at once (state, proposal, Tweedie estimate, noise,
#: gradient, cache, resampling buffer, ...): the floor of a run's memory
PARTICLE_COPIES = 8


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the allocator's free memory; CPU: available physical
    memory), or ``None`` where it cannot be read."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None
    return None


def particle_bytes(problem: Problem, count: int) -> int:
    """Bytes of ``PARTICLE_COPIES`` copies of ``count`` particles of the problem's signal."""
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    return PARTICLE_COPIES * count * math.prod(problem.event_shape) * itemsize


def check_memory(problem: Problem, count: int) -> None:
    """Refuse a run whose particles alone cannot fit in the device's free memory, before any
    work (the allocator would fail deep inside the sampler).

    Raises:
        MemoryError: with the estimate, the free memory and the particle count that would fit.
    """
    free = available_memory(problem.device)
    need = particle_bytes(problem, count)
    if free is None or need <= free:
        return
    fits = max(1, count * free // need)
    raise MemoryError(
        f"{count} particles of shape {tuple(problem.event_shape)} ({problem.dtype}) need about "
        f"{need / 2**30:.3g} GiB ({PARTICLE_COPIES} copies held by the engines) and "
        f"{problem.device} has {free / 2**30:.3g} GiB free: use at most about {fits} particles "
        "in all (num_chains * num_particles, times the plate's problems)"
    )


def out_of_memory(
    problem: Problem, count: int, batch_size: int | None, error: BaseException
) -> MemoryError:
    """The error to raise when a run ran out of memory: the particles fitted (checked before),
    so the denoiser's activations did not; a smaller ``batch_size`` chunks them."""
    current = count if batch_size is None else min(batch_size, count)
    return MemoryError(
        f"the run ran out of memory on {problem.device} ({type(error).__name__}: {error}); the "
        f"denoiser is called on {current} particles at once: pass batch_size={max(1, current // 4)}"
        " (or smaller) to chunk its calls"
    )


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


def check_sharding(sharding: Any, engine: Engine, problem: Problem) -> None:
    """Refuse a sharded run the sharding cannot do, before any work (naming what is wrong)."""
    if not isinstance(sharding, Sharding):
        raise TypeError(
            f"sharding must be a posterior.Sharding or None; got {type(sharding).__name__}"
        )
    if engine.family != "smc":
        raise ValueError(
            f"sharding splits the particles of the SMC engines; {engine.name} is not one "
            f"(family {engine.family!r}; many measurements run with posterior.sample_many)"
        )
    if problem.plate is not None:
        raise ValueError(
            f"sharding runs one problem; the model has a plate {problem.plate[0]!r} of "
            f"{problem.plate[1]} problems"
        )


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
    sharding: Sharding | None = None,
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
        sharding: split this SMC run's particles over the processes of a ``torch.distributed``
            group (:class:`~diffpost.posterior.Sharding`; every process calls ``sample`` with the
            same arguments, see :mod:`diffpost.posterior.sharding`); each process returns the
            whole result, with ``info["sharding"]`` recording the particles it exchanged.

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
    check_run(engine, num_particles, num_chains)
    check_seed(seed)
    check_model_arguments(model, model_args, model_kwargs)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None; got {type(callback).__name__}")
    problem = Problem.from_model(model, *model_args, batch_size=batch_size, **(model_kwargs or {}))
    if device is not None and torch.device(device) != problem.device:
        raise ValueError(
            f"device={device!r} but the prior lives on {problem.device}: move the prior's denoiser "
            "(and the observations) there instead"
        )
    problem.require(engine)
    if sharding is not None:
        check_sharding(sharding, engine, problem)
        seed = agreed_seed(seed, sharding, problem.device)
    seed = secrets.randbits(63) if seed is None else int(seed)  # checked above
    generator = torch.Generator(device=problem.device).manual_seed(seed)

    start = time.perf_counter()

    # a plate of B problems runs as B * num_chains chains, problem-major
    runs = num_chains * problem.num_problems
    shard = None
    if sharding is not None:
        shard = ParticleShard.create(sharding, runs, num_particles, seed, problem.device)
        progress = progress and shard.rank == 0

    def steps(indices):
        return tqdm(
            indices,
            desc=engine.name,
            disable=len(indices) == 0 or not progress_enabled(progress),
        )

    local = runs * (num_particles if shard is None else shard.local_particles)
    check_memory(problem, local)
    with active_shard(shard):
        try:
            state, records = run(
                engine, problem, runs, num_particles, generator, steps=steps, callback=callback
            )
        except (torch.OutOfMemoryError, MemoryError) as error:
            raise out_of_memory(problem, local, batch_size, error) from error
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
            "uses_noise_level": engine.uses_noise_level,
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
            **({} if shard is None else {"sharding": shard.summary()}),
        },
        fitted=engine.fitted(problem, state),
    )
