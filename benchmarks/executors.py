"""In-process against a Dask cluster: a calibration study of one task per trial.

A ``--trials``-trial simulation-based calibration of MCGDiff (``--steps`` steps, ``--particles``
particles, one chain) on the shipped 20-component 8x8 digits Gaussian mixture
(``zoo.digits_gmm``) with 2x2 average pooling (16 measurements) and sigma = 0.1, with
``trials_per_batch=1`` so that every trial is one task: run in this process (``executor=None``)
and on three ``distributed.LocalCluster`` of ``--workers`` worker processes with one thread each
(loopback only, no dashboard), through ``client.get_executor()``: with Dask's defaults, whose
nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; with that variable unset; and unset
with ``MALLOC_TOP_PAD_`` = 64 MiB (glibc allocator settings: torch's CPU tensors are malloc'd,
and memory given back to the system at each free is faulted in again at the next step). The
paths run interleaved (in-process, then each cluster, per repeat), ``--repeats`` times each,
with the same seed per repeat: the ranks must be identical on every path, and the report says
so.

The executor's per-run overhead is measured twice: the same study with the ``Exact`` engine
(a near-free run: one closed-form draw), whose time per trial is almost all overhead; and on
the MCGDiff study, the time outside the engine (wall time minus the sum of the runs' own wall
times, ``info["wall_time"]``), per trial, in worker-seconds for the cluster (workers x wall
time, minus the engine's time), which includes the workers' idle time at the end of a study.

Run::

    .venv/bin/python -m benchmarks.executors --output benchmarks/results/executors.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from benchmarks.batched import digits_model
from benchmarks.reporting import write_report
from diffpost import diagnostics, posterior


def timed_study(model, engine, args, seed: int, executor) -> tuple[float, object]:
    start = time.perf_counter()
    study = diagnostics.calibration_study(
        model,
        engine,
        args.trials,
        num_particles=args.particles,
        seed=seed,
        trials_per_batch=1,
        executor=executor,
        progress=False,
    )
    return time.perf_counter() - start, study


#: the paths compared: label -> Dask config of its cluster (None: in-process)
PATHS = {
    "in-process": None,
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's
    # dynamic mmap threshold: large allocations are fresh mmaps, faulted in page by page
    "cluster, Dask defaults": {},
    "cluster, trim unset": {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None},
    # tasks run in a worker thread, whose malloc arena gives memory back to the system at every
    # free of its top; a 64 MiB pad keeps it (in-process runs in a thread pool: 1.4-1.7x slower
    # than in the main thread without it, equal with it)
    "cluster, trim unset, top pad": {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.nanny.pre-spawn-environ.MALLOC_TOP_PAD_": 2**26,
    },
}
#: the allocator variables each cluster's workers report
MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def malloc_environment() -> dict[str, str | None]:
    """The worker's glibc allocator variables (run on each worker)."""
    return {name: os.environ.get(name) for name in MALLOC_VARIABLES}


def start_cluster(config: dict, workers: int):
    """A loopback LocalCluster of ``workers`` one-thread processes started under ``config``.

    The nanny copies its pre-spawn environment into this process's ``os.environ``, which the
    next cluster's workers would inherit: it is restored once the workers have started."""
    import dask
    import distributed  # the distributed extra

    saved = dict(os.environ)
    try:
        with dask.config.set(config):
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
        client = distributed.Client(cluster)
        client.wait_for_workers(workers, timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cluster, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--particles", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import distributed  # the distributed extra

    load_before = os.getloadavg()
    model = digits_model()
    clusters, executors, startup, environments = [], {}, {}, {}
    for label, config in PATHS.items():
        if config is None:
            executors[label] = None
            continue
        start = time.perf_counter()
        cluster, client = start_cluster(config, args.workers)
        startup[label] = time.perf_counter() - start
        clusters.append((cluster, client))
        executors[label] = client.get_executor()
        reported = list(client.run(malloc_environment).values())
        environments[label] = ", ".join(f"{k}={v}" for k, v in reported[0].items())
    # the first tasks import torch, pyro and diffpost on the workers: not timed
    warm = argparse.Namespace(**{**vars(args), "trials": 4 * args.workers})
    for executor in executors.values():
        timed_study(model, posterior.Exact(), warm, 0, executor)

    engines = {"MCGDiff": posterior.MCGDiff(num_steps=args.steps), "Exact": posterior.Exact()}
    rows: dict[str, list[dict]] = {name: [] for name in engines}
    table = []
    for name, engine in engines.items():
        for repeat in range(args.repeats):
            record, studies = {}, {}
            for label, executor in executors.items():  # interleaved
                record[label], studies[label] = timed_study(model, engine, args, repeat, executor)
                record[f"engine {label}"] = studies[label].info["wall_time"]
            reference = studies["in-process"]
            record["identical"] = all(
                torch.equal(study.ranks, reference.ranks)
                and torch.equal(study.coverage, reference.coverage)
                for study in studies.values()
            )
            rows[name].append(record)
            times = " | ".join(f"{record[label]:.2f}" for label in PATHS)
            engine_times = " | ".join(f"{record[f'engine {label}']:.2f}" for label in PATHS)
            identical = "yes" if record["identical"] else "NO"
            table.append(f"| {name} | {repeat} | {times} | {engine_times} | {identical} |")
            print(table[-1], flush=True)
    load_after = os.getloadavg()
    for cluster, client in clusters:
        client.close()
        cluster.close()

    def median(name: str, key) -> float:
        return statistics.median(key(r) for r in rows[name])

    trials, workers = args.trials, args.workers
    clustered = [label for label in PATHS if PATHS[label] is not None]
    per_trial = median("MCGDiff", lambda r: r["engine in-process"] / trials)
    summary = []
    for label in clustered:
        ratio = median("MCGDiff", lambda r, label=label: r["in-process"] / r[label])
        engine_ratio = median(
            "MCGDiff", lambda r, label=label: r[f"engine {label}"] / r["engine in-process"]
        )
        outside = median(
            "MCGDiff",
            lambda r, label=label: (workers * r[label] - r[f"engine {label}"]) / trials,
        )
        exact = median("Exact", lambda r, label=label: r[label] / trials)
        summary += [
            f"- {label}: wall-time ratio in-process / cluster **{ratio:.2f}** (MCGDiff); the "
            f"engine's own time {engine_ratio:.2f}x that of in-process runs; "
            f"{1e3 * outside:.1f} ms of worker time per trial outside the engine "
            f"({workers} x wall - engine); near-free runs (Exact) {1e3 * exact:.1f} ms per trial "
            f"(wall / trials)",
        ]
    outside_here = median("MCGDiff", lambda r: (r["in-process"] - r["engine in-process"]) / trials)
    exact_here = median("Exact", lambda r: r["in-process"] / trials)
    identical = all(r["identical"] for records in rows.values() for r in records)
    command = "python -m benchmarks.executors " + " ".join(sys.argv[1:])
    started = "; ".join(
        f"{label}: started in {startup[label]:.1f} s, workers report {environments[label]}"
        for label in clustered
    )
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"# In-process against a Dask cluster: calibration studies ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, dask/distributed {distributed.__version__}; load average "
        f"{load_before[0]:.2f} before and {load_after[0]:.2f} after (the machine is shared). "
        f"Prior: zoo.digits_gmm(20), d = 64, 2x2 average pooling (16 measurements), sigma = 0.1. "
        f"{trials} trials, trials_per_batch = 1 (one task per trial), {args.particles} particles "
        f"x 1 chain; MCGDiff with {args.steps} steps, and Exact (near-free). In-process: "
        f"executor=None (one torch thread per run, the default num_threads=1). Clusters: "
        f"LocalCluster of {workers} worker processes x 1 thread on 127.0.0.1, with Dask's "
        f"defaults (the nanny sets MALLOC_TRIM_THRESHOLD_=65536), with that variable unset, "
        f"and unset with MALLOC_TOP_PAD_=64 MiB ({started}); first tasks (imports on the "
        f"workers) not timed. Interleaved in the order of the columns, {args.repeats} "
        f"repeats, seed = repeat. Times in seconds; engine = the sum of the runs' own wall "
        f"times (info['wall_time']).",
        "",
        "| engine | repeat | "
        + " | ".join(f"{label} s" for label in PATHS)
        + " | "
        + " | ".join(f"engine, {label}" for label in PATHS)
        + " | identical ranks |",
        "|---|---|" + "---|" * (2 * len(PATHS)) + "---|",
        *table,
        "",
        f"Medians ({per_trial:.3f} s of engine per trial in-process):",
        "",
        *summary,
        f"- in-process: {1e3 * outside_here:.1f} ms per trial outside the engine (wall - "
        f"engine); near-free runs (Exact) {1e3 * exact_here:.1f} ms per trial",
        f"- ranks and coverage identical on every path in every repeat: "
        f"{'yes' if identical else 'NO'}",
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
