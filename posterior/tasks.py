"""The machinery of many independent runs: submit module-level tasks to any
``concurrent.futures``-like executor (or run them in-process), collect them as they complete,
resubmit failures, show progress, and stream results to a study directory to resume from.

Used by :func:`diffpost.posterior.sample_many` and :func:`diffpost.diagnostics.calibration_study`.
Reproducibility rests on two things fixed per run, not per process: its seed (:func:`run_seeds`)
and its number of torch threads (:func:`run_scope`, which also runs one task at a time per
process: Pyro's handler stack is global to a process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffpost.posterior.driver import check_seed, progress_enabled
from diffpost.posterior.files import read_file, write_atomically

__all__ = [
    "RunsFailed",
    "StudyDirectory",
    "check_directory",
    "check_executor",
    "check_num_threads",
    "check_retries",
    "check_study",
    "fingerprint",
    "run_seeds",
    "run_tasks",
    "run_scope",
    "study_manifest",
]

#: the manifest's file name in a study directory, and its format tag
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "diffpost.study/1"


class RunsFailed(RuntimeError):
    """Some runs of a study failed on every attempt; the others finished.

    Raised once every other run has finished (and been saved, with a ``directory``).

    Attributes:
        failures: run index -> the exception of its last attempt.
        results: run index -> result of every run that finished (for :func:`sample_many` a
            :class:`~diffpost.posterior.ParticleSet`; for ``calibration_study`` a batch's
            ranks and coverage counts).
        total: the number of runs in the study.
    """

    def __init__(
        self,
        failures: dict[int, BaseException],
        results: dict[int, Any],
        total: int,
        attempts: int,
        label: Callable[[int], str] = lambda index: f"run {index}",
    ):
        self.failures = dict(sorted(failures.items()))
        self.results = dict(sorted(results.items()))
        self.total = total
        listed = "; ".join(
            f"{label(index)}: {type(error).__name__}: {_one_line(error)}"
            for index, error in self.failures.items()
        )
        super().__init__(
            f"{len(self.failures)} of {total} runs failed after {attempts} attempt"
            f"{'s' if attempts > 1 else ''} each ({listed}); the {len(self.results)} finished "
            "results are in this exception's .results"
        )


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# checks shared by the studies
# --------------------------------------------------------------------------------------------


def check_executor(executor: Any) -> None:
    """Refuse an ``executor`` that is neither ``None`` nor has a callable ``submit``.

    Raises:
        ValueError: naming the argument.
    """
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise ValueError(
            "executor must be None (in-process) or have a submit method like a "
            "concurrent.futures.Executor (e.g. distributed.Client(...).get_executor()); got "
            f"{type(executor).__name__}"
        )


def check_retries(retries: Any) -> None:
    """Refuse ``retries`` that is not a non-negative integer.

    Raises:
        ValueError: naming the argument.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer; got {retries!r}")


def check_num_threads(num_threads: Any) -> None:
    """Refuse ``num_threads`` that is neither ``None`` nor a positive integer.

    Raises:
        ValueError: naming the argument.
    """
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer or None; got {num_threads!r}")


def check_directory(directory: Any) -> None:
    """Refuse a ``directory`` that is neither ``None`` nor a path (``str`` or ``os.PathLike``).

    Raises:
        ValueError: naming the argument.
    """
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a path or None; got {type(directory).__name__}")


def check_study(seed: Any, executor: Any, retries: Any, num_threads: Any, directory: Any) -> None:
    """The checks every study shares: an integer ``seed`` (``None`` refused: a study is
    reproducible by design) and the executor, retry, thread and directory options.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    check_seed(seed)
    if seed is None:
        raise TypeError("seed must be an integer (a study is reproducible by design); got None")
    check_executor(executor)
    check_retries(retries)
    check_num_threads(num_threads)
    check_directory(directory)


def study_manifest(kind: str, engine: Any, seed: int, **fields: Any) -> dict[str, Any]:
    """The manifest of a study directory: its kind, the engine with its config, the seed, and
    the study's own ``fields`` (JSON-able)."""
    return {
        "kind": kind,
        "engine": engine.name,
        "config": engine.config(),
        "seed": int(seed),
        **fields,
    }


def run_seeds(seed: int, count: int) -> list[int]:
    """One 63-bit seed per run: child ``i`` of ``numpy.random.SeedSequence(seed)`` for run ``i``
    (``spawn_key = (i,)``, so run ``i``'s seed does not depend on ``count``).

    Args:
        seed: the study's seed, a non-negative integer.
        count: the number of runs.

    Returns:
        ``count`` integers in ``[0, 2**63)``: the first 64-bit word of each child's
        ``generate_state``, shifted right by one.
    """
    children = np.random.SeedSequence(int(seed)).spawn(count)
    return [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]


#: held by every run of a study in a process: one run at a time (see :func:`run_scope`)
RUN_LOCK = threading.Lock()


@contextlib.contextmanager
def run_scope(num_threads: int | None) -> Iterator[None]:
    """Run the block alone in this process, with ``num_threads`` torch threads (restored after;
    ``None``: the thread's own count).

    Alone: Pyro's effect handlers live on one stack per process, so two models traced at once
    in threads of one process (a thread pool, a Dask worker with several threads) corrupt each
    other's traces (measured: "Multiple sample sites named 'x'"). Runs in threads of one process
    therefore take turns on :data:`RUN_LOCK`; parallel runs need processes (Dask workers with
    ``threads_per_worker=1``, as many as cores) or machines.

    Threads: CPU kernels split their reductions by thread, so a run's last bits depend on the
    thread count (measured: the Exact engine's float64 draws differ by 7e-16 between 1 and 2
    threads). Fixing it makes a run's result the same in-process and on a worker (Dask's nanny
    starts its workers with ``OMP_NUM_THREADS=1``). The count is per OS thread (OpenMP's), so
    setting it affects only the thread running the task.
    """
    with RUN_LOCK:
        if num_threads is None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def fingerprint(value: Any) -> str:
    """A SHA-256 hex digest of tensors (dtype, shape and bytes), plain values (by value), and
    lists, tuples and dicts of them; any other object counts by its type's name only.

    Args:
        value: what to fingerprint (e.g. a study's observations).

    Returns:
        64 hexadecimal characters.
    """
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, Tensor):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor:{item.dtype}:{tuple(item.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(item, (bool, int, float, str, type(None))):
            digest.update(f"{type(item).__name__}:{item!r};".encode())
        elif isinstance(item, Mapping):
            digest.update(b"dict{")
            for key in sorted(item, key=str):
                feed(str(key))
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, (list, tuple)):
            digest.update(f"seq{len(item)}[".encode())
            for element in item:
                feed(element)
            digest.update(b"]")
        else:
            digest.update(f"object:{type(item).__qualname__};".encode())

    feed(value)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# the directory of a study
# --------------------------------------------------------------------------------------------


class StudyDirectory:
    """A folder holding one study: ``manifest.json`` (what the study is) and one file per run,
    ``<unit>-000012.pt``, written atomically as each run finishes.

    Opening it creates the folder and the manifest, or checks the manifest already there: a
    folder holding another study (a manifest that differs, or run files without a manifest) is
    refused, so results of different studies never mix.

    Args:
        path: the folder (created with its parents if missing).
        manifest: JSON-able description of the study (engine, config, seed, number of runs,
            layout, fingerprints of the data, ...).
        unit: file name prefix of one run (``"run"``, ``"batch"``).
        save: ``save(result, path)`` writes one result to ``path`` (atomically).
        load: ``load(path) -> result`` reads it back; a ``ValueError`` marks an unreadable file.

    Raises:
        ValueError: ``path`` is not a path, or the folder holds another study.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict[str, Any],
        unit: str,
        save: Callable[[Any, Path], None],
        load: Callable[[Path], Any],
    ):
        check_directory(path)
        self.path = Path(path)
        self.unit = unit
        self._save, self._load = save, load
        manifest = json.loads(json.dumps({"format": MANIFEST_FORMAT, **manifest}, default=repr))
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"directory {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / MANIFEST
        if file.exists():
            stored = read_file(file, "study manifest (manifest.json)", _read_json)
            differ = sorted(
                key for key in set(stored) | set(manifest) if stored.get(key) != manifest.get(key)
            )
            if differ:
                details = ", ".join(
                    f"{key}: {_short(stored.get(key))} there, {_short(manifest.get(key))} now"
                    for key in differ
                )
                raise ValueError(
                    f"directory {self.path} holds another study (it differs in {details}); use "
                    "another folder, or delete this one to start again"
                )
        else:
            pattern = re.compile(r"(run|batch)-\d+\.pt")
            strays = sorted(p.name for p in self.path.iterdir() if pattern.fullmatch(p.name))
            if strays:
                raise ValueError(
                    f"directory {self.path} holds result files ({strays[0]}, ...) but no "
                    f"{MANIFEST}: they belong to an unknown study; use another folder"
                )
            text = json.dumps(manifest, indent=1, sort_keys=True)
            write_atomically(file, lambda temporary: temporary.write_text(text))

    def file(self, index: int) -> Path:
        """The file of run ``index``."""
        return self.path / f"{self.unit}-{index:06d}.pt"

    def finished(self, count: int) -> dict[int, Any]:
        """The results of runs ``0 .. count - 1`` already saved (an unreadable file is warned
        about and its run done again)."""
        results = {}
        for index in range(count):
            file = self.file(index)
            if not file.exists():
                continue
            try:
                results[index] = self._load(file)
            except ValueError as error:
                warnings.warn(f"{error}; running {self.unit} {index} again", stacklevel=3)
        return results

    def save(self, index: int, result: Any) -> None:
        """Write run ``index``'s result."""
        self._save(result, self.file(index))


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a manifest written by diffpost (format {MANIFEST_FORMAT})")
    return data


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# running the tasks
# --------------------------------------------------------------------------------------------


def run_tasks(
    task: Callable[[Any, int], Any],
    jobs: Sequence[Any],
    *,
    executor: Any = None,
    retries: int = 1,
    progress: bool = True,
    description: str = "runs",
    directory: StudyDirectory | None = None,
    label: Callable[[int], str] = lambda index: f"run {index}",
) -> list[Any]:
    """Run ``task(jobs[i], attempt)`` for every ``i``, with retries, progress and resume.

    Runs already saved in ``directory`` are loaded, not run. The others are submitted at once to
    ``executor`` (``executor.submit(task, job, attempt)``; its futures need ``result`` and
    ``add_done_callback``, as ``concurrent.futures`` and Dask futures have) and collected as
    they complete, or run one after the other in this process when ``executor`` is ``None``.
    Each finished result is saved to ``directory`` before the next is collected. A run that
    raises (or whose future raises: a dead worker, a broken pool) is run again, up to
    ``retries`` times; ``attempt`` is 0 for the first. Every submission's arguments are unique
    (see :func:`_call`), so executors that cache calls by their arguments never replay one.

    Args:
        task: a module-level function (picklable by reference), ``task(job, attempt)``.
        jobs: one picklable argument per run.
        executor: ``None`` or an object with ``submit`` (see :func:`check_executor`).
        retries: further attempts of a failed run.
        progress: show a progress bar over runs (off under ``CI``).
        description: the progress bar's label.
        directory: where results are saved and loaded, or ``None``.
        label: names run ``i`` in :class:`RunsFailed`'s message.

    Returns:
        The ``len(jobs)`` results, in the order of ``jobs``.

    Raises:
        RunsFailed: some runs failed on every attempt (raised after all others finished).
        KeyboardInterrupt: the runs still pending on ``executor`` are cancelled first.
    """
    count = len(jobs)
    results = {} if directory is None else directory.finished(count)
    pending = [index for index in range(count) if index not in results]
    failures: dict[int, BaseException] = {}
    bar = tqdm(
        total=count,
        initial=len(results),
        desc=description,
        disable=not progress_enabled(progress),
    )

    def finish(index: int, result: Any) -> None:
        if directory is not None:
            directory.save(index, result)
        results[index] = result
        bar.update(1)

    with bar:
        if executor is None:
            for index in pending:
                for attempt in range(retries + 1):
                    try:
                        result = task(jobs[index], attempt)
                    except Exception as error:  # a failed run is reported, not fatal
                        failures[index] = error
                        continue
                    failures.pop(index, None)
                    finish(index, result)
                    break
        else:
            _run_on_executor(task, jobs, pending, executor, retries, failures, finish)
    if failures:
        raise RunsFailed(failures, results, count, retries + 1, label)
    return [results[index] for index in range(count)]


def _call(task: Callable[[Any, int], Any], job: Any, attempt: int, token: str) -> Any:
    """``task(job, attempt)``: what an executor runs. ``token``, unique to one call of
    :func:`run_tasks`, makes every submission's arguments unique, so an executor that caches
    calls by their arguments (Dask's pure tasks, keyed by a hash of them) never hands back the
    result or error of an earlier study's, or an earlier attempt's, identical call."""
    del token
    return task(job, attempt)


def _run_on_executor(
    task: Callable[[Any, int], Any],
    jobs: Sequence[Any],
    pending: list[int],
    executor: Any,
    retries: int,
    failures: dict[int, BaseException],
    finish: Callable[[int, Any], None],
) -> None:
    """Submit ``pending`` runs, collect them as they complete, resubmit failures."""
    done: queue.Queue = queue.Queue()
    outstanding: dict[int, Any] = {}
    attempts = dict.fromkeys(pending, 0)
    token = uuid.uuid4().hex  # this call's, so no submission repeats an earlier call's arguments

    def submit(index: int) -> None:
        future = executor.submit(_call, task, jobs[index], attempts[index], token)
        outstanding[index] = future
        future.add_done_callback(lambda f, index=index: done.put((index, f)))

    try:
        for index in pending:
            submit(index)
        while outstanding:
            index, future = done.get()
            del outstanding[index]
            try:
                result = future.result()
            except Exception as error:  # the run raised, or its worker or pool died
                if attempts[index] < retries:
                    attempts[index] += 1
                    submit(index)
                else:
                    failures[index] = error
                continue
            finish(index, result)
    except BaseException:
        for future in outstanding.values():
            future.cancel()
        raise
