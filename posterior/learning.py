r"""Learning a prior from corrupted measurements only, by expectation-maximisation with the
library's own posterior samplers.

Given measurements :math:`y_i = A_i x_i + \sigma e_i` of unseen signals :math:`x_i \sim p`
(per-measurement operators, e.g. a random mask per image), :func:`learn_prior`
fits a prior :math:`q_\theta` to them by Monte Carlo EM (Rozet et al. 2024; Bai et al. 2024 with
DPS): round :math:`k` draws

.. math:: x_i^{(k)} \sim q_{\theta_k}(x \mid y_i) \quad \text{(E-step: any engine, all
          measurements batched through a plate)},

then refits :math:`\theta_{k+1}` to the completed data :math:`\{x_i^{(k)}\}` (M-step: one of
:mod:`diffpost.models.corrupted`'s, a Gaussian-mixture fit or a network trained by denoising
score matching, warm-started). For an exact E-step each round does not decrease
:math:`\sum_i \log q_\theta(y_i)` (Dempster et al. 1977); with one posterior draw per measurement
it is a stochastic EM (Celeux & Diebolt 1985) whose iterates fluctuate around a fixed point
(average the last rounds' estimates for a point estimate). Like any EM on a mixture it can stop
in a local optimum: the E-step's log-evidence (exact with the Exact engine) tells runs from
different seeds apart (measured in ``tests/test_corrupted.py``'s set-up with three components:
two or three of five seeds stuck, each with a lower evidence).

The paper starts from a Gaussian prior fitted by EM in closed form, then moves to the network:
here that is a few rounds of ``FitMixture(1)`` with the Exact engine, whose result is the
``prior`` of the network's rounds (``benchmarks/corrupted_training.py``). The paper's E-step is
MMPS with one conjugate-gradient iteration (the default engine,
:class:`~diffpost.posterior.MMPS`); its masks are stored zero-filled (``y = A * x``), which here
is :class:`~diffpost.models.operators.Diagonal` inside
:class:`~diffpost.models.operators.PerProblem`.

A ``directory`` makes the loop resumable at round granularity: the manifest, each round's E-step
draws and its fitted prior are written atomically, and the M-step's own checkpoint (the trainer's)
resumes a round interrupted during training. A resumed loop gives the same priors as an
uninterrupted one.

References:
    Rozet, Andry, Lanusse, Louppe. Learning Diffusion Priors from Observations by Expectation
    Maximization. NeurIPS 2024. arXiv:2405.13712 (github.com/francois-rozet/diffusion-priors).
    Bai, Wang, Chen, Sun. An Expectation-Maximization Algorithm for Training Clean Diffusion
    Models from Corrupted Observations. NeurIPS 2024. arXiv:2407.01014.
    Dempster, Laird, Rubin. Maximum likelihood from incomplete data via the EM algorithm. JRSS B,
    1977. Celeux, Diebolt. The SEM algorithm. Computational Statistics Quarterly, 1985.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch import Tensor

from diffpost.models.corrupted import Measurements
from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import LinearOperator
from diffpost.models.operators.compose import PerProblem
from diffpost.posterior.engines import ENGINES, EngineFailed
from diffpost.posterior.engines.common import check_positive_integers
from diffpost.posterior.files import write_atomically
from diffpost.posterior.many import sample_many
from diffpost.posterior.tasks import StudyDirectory, fingerprint, run_seeds, study_manifest

__all__ = ["EMResult", "learn_prior", "measurement_model"]


def measurement_model(prior, operator, sigma, y=None):
    """The E-step's Pyro model: a plate over the measurements ``y`` (``(B, *out_shape)``), each
    the observation of its own signal drawn from ``prior``."""
    with pyro.plate("measurements", y.shape[0]):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)


class EMResult(NamedTuple):
    """What :func:`learn_prior` returns.

    Attributes:
        prior: the prior after the last round.
        priors: the prior after each round, ``rounds`` of them (``priors[-1] is prior``).
        draws: the last round's E-step draws, ``(M, samples_per_measurement, *event)``: samples
            of each hidden signal given its measurement, under the last round's starting prior.
        history: one dict per round: ``round``, ``e_seconds``, ``m_seconds`` and
            ``log_evidence``, the mean over measurements of the E-step's log-evidence estimate
            :math:`\\log q_{\\theta_k}(y_i)` under the round's *starting* prior (``nan`` for an
            engine that does not estimate it; exact for the Exact engine).
    """

    prior: Any
    priors: list
    draws: Tensor
    history: list[dict]


def _check(prior, measurements, m_step, rounds, samples_per_measurement, problems_per_run):
    if not isinstance(measurements, Measurements):
        raise ValueError(
            "measurements must be a models.corrupted.Measurements(y, operator, sigma); got "
            f"{type(measurements).__name__}"
        )
    y, operator, sigma = measurements
    if not isinstance(y, Tensor) or y.dim() < 2 or y.shape[0] < 1:
        raise ValueError("measurements.y must be a tensor of shape (M, *out_shape) with M >= 1")
    if not isinstance(operator, LinearOperator):
        raise ValueError(
            f"measurements.operator must be a linear operator; got {type(operator).__name__}"
        )
    if tuple(y.shape[1:]) != tuple(operator.out_shape):
        raise ValueError(
            f"measurements.y has shape {tuple(y.shape)}, the operator measures "
            f"{tuple(operator.out_shape)}: expected (M, {', '.join(map(str, operator.out_shape))})"
        )
    if isinstance(operator, PerProblem) and operator.num_problems != y.shape[0]:
        raise ValueError(
            f"measurements.operator has {operator.num_problems} per-measurement operators for "
            f"{y.shape[0]} measurements"
        )
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
        raise ValueError(f"measurements.sigma must be a positive number; got {sigma!r}")
    if not torch.isfinite(y).all():
        raise ValueError("measurements.y has non-finite values")
    if tuple(getattr(prior, "event_shape", ())) != tuple(operator.in_shape):
        raise ValueError(
            f"prior has event shape {tuple(getattr(prior, 'event_shape', ()))}, the operator "
            f"acts on {tuple(operator.in_shape)}"
        )
    if not (callable(m_step) and hasattr(m_step, "state") and hasattr(m_step, "load")):
        raise ValueError(
            "m_step must be an M-step such as models.corrupted.FitMixture(...) or "
            f"TrainNetwork(...); got {type(m_step).__name__}"
        )
    counts = {"rounds": rounds, "samples_per_measurement": samples_per_measurement}
    if problems_per_run is not None:
        counts["problems_per_run"] = problems_per_run
    check_positive_integers("learn_prior", **counts)


def _operator_probe(measurements: Measurements) -> Tensor:
    """The operator applied to fixed random signals, one per measurement: what the manifest
    fingerprints (a changed mask changes it)."""
    operator = measurements.operator
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(
        (measurements.count, *operator.in_shape), generator=generator, dtype=torch.float64
    )
    with torch.no_grad():
        return operator(probe.to(measurements.y))


def _prior_fingerprint(prior) -> str:
    """The starting prior's identity: its type and its denoiser's weights and buffers."""
    denoiser = getattr(prior, "denoiser", None)
    weights = dict(denoiser.state_dict()) if isinstance(denoiser, torch.nn.Module) else {}
    return fingerprint([type(prior).__name__, weights])


def _save(state: Any, path: Path) -> None:
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def learn_prior(
    prior,
    measurements: Measurements,
    m_step,
    *,
    rounds: int,
    engine=None,
    samples_per_measurement: int = 1,
    problems_per_run: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    executor: Any = None,
    num_threads: int | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
) -> EMResult:
    r"""Fit a prior to corrupted measurements by Monte Carlo EM (see the module docstring).

    Round ``k`` (``k = 0 .. rounds - 1``): the E-step draws ``samples_per_measurement``
    posterior samples per measurement with ``engine`` under the current prior, running the
    measurements as plated problems of :func:`measurement_model`, ``problems_per_run`` per run,
    through :func:`~diffpost.posterior.sample_many` (so on ``executor`` when one is given); the
    M-step ``m_step(prior, draws, seed=..., checkpoint=...)`` returns the next prior from the
    draws, shape ``(M * samples_per_measurement, *event)``.

    Args:
        prior: the starting prior (any prior ``engine`` accepts: ``Gaussian``,
            ``GaussianMixture``, ``DiffusionPrior``), of the operator's input shape.
        measurements: the data set (:class:`Measurements`).
        m_step: :class:`FitMixture` or :class:`TrainNetwork` (or an object with the same
            ``__call__``, ``state`` and ``load``).
        rounds: number of EM rounds.
        engine: the E-step's engine (default :class:`~diffpost.posterior.MMPS` at its defaults,
            the paper's); ``posterior.Exact()`` for an exact prior.
        samples_per_measurement: posterior draws per measurement and round (the paper: 1).
        problems_per_run: measurements per plated run (default: all in one run).
        seed: seeds round ``k``'s E-step runs (child ``k`` of ``SeedSequence(seed)``, then one
            child per run) and its M-step.
        batch_size: the engine's chunk of particles per denoiser call.
        executor, num_threads: as for :func:`~diffpost.posterior.sample_many`.
        directory: where rounds are saved; a loop called again with the same folder resumes
            after the last finished round (a folder holding another loop is refused).
        progress: print one line per round (off under ``CI``).

    Returns:
        An :class:`EMResult`.

    Raises:
        ValueError: naming the argument, before any work.
    """
    engine = ENGINES["MMPS"]() if engine is None else engine
    _check(prior, measurements, m_step, rounds, samples_per_measurement, problems_per_run)
    count = measurements.count
    per_run = count if problems_per_run is None else min(problems_per_run, count)
    starts = list(range(0, count, per_run))
    store = None
    if directory is not None:
        manifest = study_manifest(
            "learn_prior",
            engine,
            seed,
            m_step=repr(m_step),
            measurements=fingerprint(
                [measurements.y, float(measurements.sigma), _operator_probe(measurements)]
            ),
            samples_per_measurement=samples_per_measurement,
            problems_per_run=per_run,
            prior=_prior_fingerprint(prior),
        )
        store = StudyDirectory(directory, manifest, "round", _save, _load)
    show = progress and not os.environ.get("CI")
    priors, history, draws = [], [], None
    finished = store.finished(rounds) if store is not None else {}
    for k, round_seed in enumerate(run_seeds(seed, rounds)):
        e_seed, m_seed = run_seeds(round_seed, 2)
        saved = finished.get(k)
        draws_file = None if store is None else store.path / f"round-{k:06d}-draws.pt"
        if saved is not None:
            prior = m_step.load(saved["prior"], prior)
            priors.append(prior)
            history.append(saved["history"])
            draws = _load(draws_file)["draws"] if k == rounds - 1 else None
            continue
        began = time.perf_counter()
        if draws_file is not None and draws_file.exists():
            saved_draws = _load(draws_file)
            draws, log_evidence = saved_draws["draws"], saved_draws["log_evidence"]
        else:
            runs = sample_many(
                measurement_model,
                engine,
                [
                    {"y": part.y, "operator": part.operator}
                    for part in (measurements.select(s, s + per_run) for s in starts)
                ],
                num_particles=samples_per_measurement,
                seed=e_seed,
                executor=executor,
                num_threads=num_threads,
                progress=False,
                batch_size=batch_size,
                model_kwargs={"prior": prior, "sigma": measurements.sigma},
            )
            # values: (1 chain, P draws, B problems, *event) -> (B * P, *event), problem-major
            draws = torch.cat(
                [run.values["x"][0].transpose(0, 1).flatten(0, 1) for run in runs]
            ).detach()
            evidence = [run.log_evidence for run in runs]
            log_evidence = (
                float(torch.cat([e.reshape(-1) for e in evidence]).double().mean())
                if all(e is not None for e in evidence)
                else math.nan
            )
            if draws_file is not None:
                _save({"draws": draws, "log_evidence": log_evidence}, draws_file)
        if not torch.isfinite(draws).all():
            raise EngineFailed(
                f"learn_prior: round {k}'s E-step ({engine.name}) gave non-finite "
                "draws; the prior or the engine's settings do not suit these measurements"
            )
        e_seconds = time.perf_counter() - began
        began = time.perf_counter()
        checkpoint = None if store is None else store.path / f"round-{k:06d}-training.ckpt"
        prior = m_step(prior, draws, seed=m_seed, checkpoint=checkpoint)
        entry = {
            "round": k,
            "e_seconds": e_seconds,
            "m_seconds": time.perf_counter() - began,
            "log_evidence": log_evidence,
        }
        if store is not None:
            store.save(k, {"prior": m_step.state(prior), "history": entry})
        priors.append(prior)
        history.append(entry)
        if show:
            print(
                f"EM round {k}: E-step {entry['e_seconds']:.1f} s, M-step "
                f"{entry['m_seconds']:.1f} s, mean log-evidence {log_evidence:.3f}",
                flush=True,
            )
    event = tuple(draws.shape[1:])
    return EMResult(prior, priors, draws.reshape(count, samples_per_measurement, *event), history)
