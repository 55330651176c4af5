"""Many independent runs on an executor: posterior.sample_many and calibration_study's executor,
directory and retries.

The claims: a study gives the same result, bit for bit, in-process and on a real Dask cluster
(two worker processes on the loopback interface); a study interrupted half way resumes from its
directory without redoing finished runs and ends with the uninterrupted result; a directory of
another study is refused; a run that fails is retried and, if it keeps failing, reported by
index after every other run has finished; a worker that dies costs only a retry; bad arguments
are refused by name before any work.

The problems are tiny (a 3-component Gaussian mixture in 3 dims, the Exact engine), so the file
runs in well under a minute on two cores, most of it starting the cluster and restarting the
worker that is killed.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import pytest
import torch
from helpers import gaussian_model

from diffpost import posterior
from diffpost.diagnostics import calibration_study, prior_predictive
from diffpost.models import GaussianMixture, GaussianObservation
from diffpost.models.operators import Mask, Matrix
from diffpost.posterior import RunsFailed, sample_many
from diffpost.posterior.engines.exact import Exact
from diffpost.posterior.tasks import run_scope, run_seeds

D = torch.float64
RUNS = 6


def small_mixture() -> GaussianMixture:
    """3 components in 3 dims, spread means, isotropic covariances of different scales."""
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(3, 3, generator=g, dtype=D)
    scales = 0.3 + torch.rand(3, generator=g, dtype=D)
    weights = torch.softmax(torch.randn(3, generator=g, dtype=D), 0)
    return GaussianMixture(weights, means, scales[:, None, None] * torch.eye(3, dtype=D))


PRIOR = small_mixture()
OPERATOR = Matrix(torch.randn(1, 3, generator=torch.Generator().manual_seed(1), dtype=D))
MODEL = gaussian_model(PRIOR, OPERATOR, 0.5)
OBSERVATIONS = [{"y": torch.tensor([0.4 * i - 1.0], dtype=D)} for i in range(RUNS)]


def special_model(target: float, marker: str | None, action: str):
    """MODEL, except at the observation ``y == target``: there it raises (``action="raise"``)
    or kills its process (``"exit"``), only while ``marker`` does not exist (creating it first),
    or always (``marker=None``, ``"raise"``)."""

    def model(y=None):
        if y is not None and float(y[0]) == target:
            if marker is None:
                raise ValueError(f"model refuses y = {target}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                if action == "exit":
                    os._exit(1)
                raise RuntimeError(f"transient failure at y = {target}")
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(OPERATOR, x, 0.5), obs=y)

    return model


@dataclass(frozen=True)
class Logged(Exact):
    """The Exact engine, appending the observation of every run it starts to ``log``; while the
    file ``refusing`` exists, it refuses the observation ``refuse``."""

    log: str = ""
    refuse: float | None = None
    refusing: str = ""

    def init(self, problem, num_chains, num_particles, generator):
        y = float(problem.observed["y"].flatten()[0])
        if y == self.refuse and os.path.exists(self.refusing):
            raise ValueError(f"engine refuses y = {y}")
        with open(self.log, "a") as handle:
            handle.write(f"{y!r}\n")
        return super().init(problem, num_chains, num_particles, generator)


def logged_runs(log: Path) -> list[float]:
    return [float(line) for line in log.read_text().split()] if log.exists() else []


def assert_same_sets(first: list, second: list) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.values.keys() == b.values.keys()
        for name in a.values:
            assert torch.equal(a.values[name], b.values[name]), name
        assert torch.equal(a.log_weights, b.log_weights)
        assert a.info["seed"] == b.info["seed"]


def assert_same_study(first, second) -> None:
    assert torch.equal(first.ranks, second.ranks)
    assert torch.equal(first.coverage, second.coverage)
    assert torch.equal(first.x_true, second.x_true)
    assert first.summaries == second.summaries
    assert (first.info["nfe"], first.info["vjp"]) == (second.info["nfe"], second.info["vjp"])


def many(model=MODEL, engine=None, observations=OBSERVATIONS, **kwargs):
    kwargs = {"num_particles": 16, "num_chains": 2, "progress": False} | kwargs
    return sample_many(model, engine or Exact(), observations, **kwargs)


def study(model=MODEL, engine=None, **kwargs):
    kwargs = {"num_trials": 20, "num_particles": 19, "progress": False} | kwargs
    return calibration_study(model, engine or Exact(), **kwargs)


@pytest.fixture(scope="module")
def in_process() -> list:
    return many()


# --------------------------------------------------------------------------------------------
# in-process and the generic executor path
# --------------------------------------------------------------------------------------------


def test_each_run_is_one_sample_call_with_its_spawned_seed(in_process):
    seeds = run_seeds(0, RUNS)
    assert [s.info["seed"] for s in in_process] == seeds and len(set(seeds)) == RUNS
    assert all(0 <= s < 2**63 for s in seeds)
    for index in (0, RUNS - 1):
        alone = posterior.sample(
            MODEL,
            Exact(),
            num_particles=16,
            num_chains=2,
            seed=seeds[index],
            progress=False,
            model_kwargs=OBSERVATIONS[index],
        )
        assert_same_sets([in_process[index]], [alone])
        assert torch.equal(in_process[index].observed["y"], OBSERVATIONS[index]["y"])
    # run i's seed does not depend on how many runs the study has
    assert_same_sets(many(observations=OBSERVATIONS[:2]), in_process[:2])
    assert in_process[0].info["seed"] != many(seed=1, observations=OBSERVATIONS[:1])[0].info["seed"]


def test_a_thread_pool_gives_the_in_process_result_and_threads_are_restored(in_process):
    torch.set_num_threads(2)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            assert_same_sets(many(executor=pool), in_process)
        assert torch.get_num_threads() == 2  # restored after the in-process runs too
        assert_same_sets(many(), in_process)
        assert torch.get_num_threads() == 2
        with run_scope(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest.py)


@pytest.mark.parametrize("pool", [False, True], ids=["in_process", "thread_pool"])
def test_a_transient_failure_is_retried_and_a_lasting_one_reported(tmp_path, in_process, pool):
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2) if pool else None
    try:
        flaky = special_model(float(OBSERVATIONS[2]["y"][0]), str(tmp_path / "marker"), "raise")
        assert_same_sets(many(flaky, executor=executor), in_process)
        assert (tmp_path / "marker").exists()  # it did fail once
        (tmp_path / "marker").unlink()
        with pytest.raises(RunsFailed, match=r"1 of 6 runs failed.*run 2: RuntimeError"):
            many(flaky, executor=executor, retries=0)

        broken = special_model(float(OBSERVATIONS[3]["y"][0]), None, "raise")
        with pytest.raises(RunsFailed) as caught:
            many(broken, executor=executor, retries=2)
    finally:
        if executor is not None:
            executor.shutdown()
    error = caught.value
    assert "run 3: ValueError: model refuses" in str(error) and "3 attempts" in str(error)
    assert list(error.failures) == [3] and isinstance(error.failures[3], ValueError)
    assert sorted(error.results) == [0, 1, 2, 4, 5] and error.total == RUNS
    for index, result in error.results.items():
        assert_same_sets([result], [in_process[index]])


def test_an_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, in_process):
    directory, log = tmp_path / "study", tmp_path / "runs.log"
    engine = Logged(log=str(log))
    broken = special_model(float(OBSERVATIONS[3]["y"][0]), None, "raise")
    with pytest.raises(RunsFailed, match="run 3"):
        many(broken, engine, directory=directory, retries=0)
    saved = sorted(p.name for p in directory.glob("run-*.pt"))
    assert saved == [f"run-{i:06d}.pt" for i in (0, 1, 2, 4, 5)]
    assert (directory / "manifest.json").exists()
    times = {name: (directory / name).stat().st_mtime_ns for name in saved}
    assert len(logged_runs(log)) == RUNS - 1  # run 3's model fails before the engine starts

    # called again (the model fixed): only run 3 runs, the others are loaded from their files
    resumed = many(MODEL, engine, directory=directory)
    assert logged_runs(log)[RUNS - 1 :] == [float(OBSERVATIONS[3]["y"][0])]
    assert {name: (directory / name).stat().st_mtime_ns for name in saved} == times
    assert_same_sets(resumed, in_process)
    # and a third call runs nothing
    assert_same_sets(many(MODEL, engine, directory=directory), in_process)
    assert len(logged_runs(log)) == RUNS


KILLED_STUDY = """
import sys, time
sys.path.insert(0, {tests!r})
import test_executors as t

def slow(y=None):  # the same sites as t.MODEL, a little slower, so that the kill lands mid-way
    time.sleep(0.1)
    return t.MODEL(y)

t.many(slow, directory={directory!r})
"""


def test_a_study_killed_half_way_resumes_from_its_directory(tmp_path, in_process):
    """A study in another process is killed (SIGKILL) once two runs are saved; called again
    with the folder, it keeps the saved files, runs the rest, and equals the uninterrupted
    study."""
    directory = tmp_path / "study"
    script = tmp_path / "killed.py"
    script.write_text(
        KILLED_STUDY.format(tests=str(Path(__file__).parent), directory=str(directory))
    )
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(list(directory.glob("run-*.pt"))) < 2:
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "no run was saved within 120 s"
            time.sleep(0.02)
        process.kill()
    finally:
        process.kill()
        process.wait(timeout=30)
    saved = sorted(p.name for p in directory.glob("run-*.pt"))
    assert 2 <= len(saved) < RUNS, saved
    times = {name: (directory / name).stat().st_mtime_ns for name in saved}
    resumed = many(directory=directory)
    assert {name: (directory / name).stat().st_mtime_ns for name in saved} == times
    assert len(list(directory.glob("run-*.pt"))) == RUNS
    assert_same_sets(resumed, in_process)


def test_a_calibration_study_resumes_from_half_of_its_batch_files(tmp_path):
    log = tmp_path / "runs.log"
    engine = Logged(log=str(log))
    full = study(engine=engine, trials_per_batch=2, directory=tmp_path / "full")
    assert len(logged_runs(log)) == 10
    assert_same_study(full, study(trials_per_batch=2))

    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tmp_path / "full" / "manifest.json", half)
    kept = [f"batch-{i:06d}.pt" for i in range(0, 10, 2)]
    for name in kept:
        shutil.copy2(tmp_path / "full" / name, half / name)
    times = {name: (half / name).stat().st_mtime_ns for name in kept}
    resumed = study(engine=engine, trials_per_batch=2, directory=half)
    assert len(logged_runs(log)) == 15  # the 5 missing batches only
    assert {name: (half / name).stat().st_mtime_ns for name in kept} == times
    assert len(list(half.glob("batch-*.pt"))) == 10
    assert_same_study(resumed, full)


def test_a_failed_calibration_batch_is_reported_with_its_trials(tmp_path):
    _, _, simulated = prior_predictive(MODEL, 20, 0)  # the study's own simulations (seed 0)
    target, log, refusing = float(simulated["y"][5, 0]), tmp_path / "runs.log", tmp_path / "no"
    engine = Logged(log=str(log), refuse=target, refusing=str(refusing))
    refusing.touch()
    with pytest.raises(RunsFailed, match=r"batch 5 \(trial 5\): ValueError: engine refuses"):
        study(engine=engine, trials_per_batch=1, directory=tmp_path / "study")
    assert len(list((tmp_path / "study").glob("batch-*.pt"))) == 19
    assert len(logged_runs(log)) == 19
    # resumed once the engine accepts it: only trial 5 runs, and the study is the uninterrupted one
    refusing.unlink()
    resumed = study(engine=engine, trials_per_batch=1, directory=tmp_path / "study")
    assert logged_runs(log)[19:] == [target]
    assert_same_study(resumed, study(trials_per_batch=1))


def test_a_directory_of_another_study_is_refused(tmp_path):
    directory = tmp_path / "study"
    many(observations=OBSERVATIONS[:2], directory=directory)
    with pytest.raises(ValueError, match=r"holds another study.*seed: 0 there, 1 now"):
        many(observations=OBSERVATIONS[:2], directory=directory, seed=1)
    with pytest.raises(ValueError, match=r"holds another study.*observations"):
        many(observations=OBSERVATIONS[1:3], directory=directory)
    with pytest.raises(ValueError, match=r"holds another study.*config"):
        many(
            engine=posterior.MCGDiff(num_steps=3),
            observations=OBSERVATIONS[:2],
            directory=directory,
        )
    with pytest.raises(ValueError, match=r"holds another study.*kind"):
        study(num_trials=10, directory=directory)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "run-000000.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest.json"):
        many(observations=OBSERVATIONS[:2], directory=stray)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        many(observations=OBSERVATIONS[:2], directory=tmp_path / "file")


def test_noiseless_ties_are_broken_by_each_trials_own_generator():
    # coordinate 0 is observed without noise: every draw ties with the truth, and the rank is
    # the tie-breaking draw; it must not depend on which trials ran before (a batch of one
    # trial gives the same ranks alone as within the study)
    model = gaussian_model(PRIOR, Mask(torch.tensor([True, False, False])), 0.0)
    whole = study(model, trials_per_batch=1, num_trials=12)
    tied = whole.ranks[:, 0]
    assert int(tied.max()) - int(tied.min()) > 5  # spread out, not all equal
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        assert_same_study(study(model, trials_per_batch=1, num_trials=12, executor=pool), whole)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: many(executor=object()), "executor must be None"),
        (lambda: many(retries=-1), "retries must be a non-negative integer"),
        (lambda: many(retries=True), "retries must be a non-negative integer"),
        (lambda: many(num_threads=0), "num_threads must be a positive integer"),
        (lambda: many(directory=3), "directory must be a path"),
        (lambda: many(observations="y"), "observations must be a sequence"),
        (lambda: many(observations={"y": OBSERVATIONS[0]["y"]}), "observations must be a seq"),
        (lambda: many(observations=[]), "observations must hold at least one"),
        (lambda: many(observations=[OBSERVATIONS[0], 3]), r"observations\[1\] must be a dict"),
        (lambda: many(observations=[{"y": 1.0}, {"z": 1.0}]), r"observations\[1\] gives"),
        (
            lambda: many(observations=OBSERVATIONS[:1], model_kwargs={"y": None}),
            r"observations\[0\] and model_kwargs both give \['y'\]",
        ),
        (lambda: many(engine="Exact"), "engine must be a posterior engine"),
        (lambda: many(num_particles=0), "num_particles must be a positive integer"),
        (lambda: many(observations=[{"z": 1.0}]), r"observations give \['z'\]"),
        (lambda: study(executor="dask"), "executor must be None"),
        (lambda: study(retries=-1), "retries must be a non-negative integer"),
        (lambda: study(directory=1.5), "directory must be a path"),
        (lambda: study(num_threads=-2), "num_threads must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()


def test_the_first_problem_is_read_before_any_run(tmp_path):
    # a model that fails on the first observation, or an engine that cannot handle the problem,
    # is refused at once (not retried and reported as failed runs), and nothing is written
    broken = special_model(float(OBSERVATIONS[0]["y"][0]), None, "raise")
    with pytest.raises(ValueError, match="model refuses"):
        many(broken, directory=tmp_path / "study")
    noiseless = gaussian_model(PRIOR, Mask(torch.tensor([True, False, False])), 0.0)
    with pytest.raises(ValueError, match="finite"):
        many(noiseless, posterior.DPS(num_steps=2), [{"y": torch.zeros(1, dtype=D)}])
    assert not (tmp_path / "study").exists()


# --------------------------------------------------------------------------------------------
# a real Dask cluster: two worker processes on the loopback interface
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        client = distributed.Client(cluster, timeout="30s")
        try:
            client.wait_for_workers(2, timeout=60)
            yield client
        finally:
            client.close(timeout=30)
    finally:
        cluster.close(timeout=30)


def test_sample_many_on_a_dask_cluster_equals_in_process(client, in_process):
    assert_same_sets(many(executor=client.get_executor()), in_process)


def test_calibration_study_on_a_dask_cluster_equals_in_process(client):
    executor = client.get_executor()
    for kwargs in ({"trials_per_batch": 1}, {"trials_per_batch": 6}):
        here = study(**kwargs)
        there = study(executor=executor, **kwargs)
        assert_same_study(there, here)
        assert there.ranks.shape == (20, 13) and len(set(there.ranks[:, 0].tolist())) > 5
    noiseless = gaussian_model(PRIOR, Mask(torch.tensor([True, False, False])), 0.0)
    assert_same_study(
        study(noiseless, executor=executor, trials_per_batch=1, num_trials=12),
        study(noiseless, trials_per_batch=1, num_trials=12),
    )


def test_a_worker_that_dies_costs_its_runs_a_retry(client, tmp_path, in_process):
    # Dask reschedules the tasks of a dead worker itself (allowed-failures, default 3); with 0 the
    # death reaches sample_many as distributed.KilledWorker, and its own retry takes over
    scheduler = client.cluster.scheduler
    allowed = scheduler.allowed_failures
    scheduler.allowed_failures = 0
    target = float(OBSERVATIONS[4]["y"][0])
    try:
        # without a retry: run 4 is reported, with the runs queued on the same worker (Dask
        # sends a one-thread worker at most 2 tasks at once: worker-saturation 1.1); every
        # other run finished and is exact
        dying = special_model(target, str(tmp_path / "a"), "exit")
        with pytest.raises(RunsFailed) as caught:
            many(dying, executor=client.get_executor(), retries=0)
        failures = caught.value.failures
        assert 4 in failures and len(failures) <= 2
        assert all(type(error).__name__ == "KilledWorker" for error in failures.values())
        for index, result in caught.value.results.items():
            assert_same_sets([result], [in_process[index]])
        client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
        # the same call again, while the failure (and its futures' tracebacks) are alive: Dask
        # must not hand back the erred tasks of the first call (same arguments, same hash)
        assert_same_sets(many(dying, executor=client.get_executor(), retries=0), in_process)

        # with one retry (the default) the study completes, equal to the in-process one
        dying = special_model(target, str(tmp_path / "b"), "exit")
        result = many(dying, executor=client.get_executor(), directory=tmp_path / "study")
    finally:
        scheduler.allowed_failures = allowed
        client.wait_for_workers(2, timeout=60)  # leave the cluster as the fixture made it
    assert (tmp_path / "b").exists()  # the run did kill its worker once
    assert_same_sets(result, in_process)
    assert len(list((tmp_path / "study").glob("run-*.pt"))) == RUNS
