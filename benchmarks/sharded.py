"""One SMC run sharded over processes (posterior.Sharding) against one process, and the largest
run one process holds.

Part 1 (``--part time``): MCGDiff at its defaults (100 steps) with ``--particles`` particles in one
chain on the Gaussian-mixture benchmark at d = 800, d_y = 4 (``gaussian_mixture_benchmark``,
float64). Four set-ups, each a fresh group of processes started by
``posterior.sharding.launch_local`` (gloo on the loopback address), interleaved over
``--repeats`` rounds: one process with one thread, the same with half the particles (the work of
one rank: weak scaling), one process with two threads (all of this machine's cores), and two
processes of one thread each in both noise modes. Reported: the run's
own wall time (``info["wall_time"]``, without start-up), the ratio to each single-process set-up,
and the bytes each rank sent per step (``info["sharding"]``).

With ``--device cuda`` (``benchmarks/gpu.sh``): one process on one GPU against ``--processes``
processes, one GPU each (nccl), in both noise modes.

Part 2 (``--part memory``): peak resident memory of one process running MCGDiff (``--steps``
steps; memory does not grow with steps) with ``--particles`` particles at d = 800, the denoiser
chunked by ``--batch-size``, each count in a fresh process.

Run::

    .venv/bin/python -m benchmarks.sharded --part time --output benchmarks/results/sharded.md
    .venv/bin/python -m benchmarks.sharded --part memory --particles 25000 50000 100000 \
        --output benchmarks/results/sharded_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.reporting import write_report
from diffpost import posterior
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.posterior.sharding import init_process_group, launch_local

ROOT = Path(__file__).resolve().parents[1]


def setups(device: str, processes: int) -> dict[str, tuple[int, int, str | None]]:
    """name -> (processes, threads per process, noise): the set-ups of the time part."""
    if device == "cuda":
        return {
            "1 process, 1 GPU": (1, 1, None),
            f"{processes} processes, global noise": (processes, 1, "global"),
            f"{processes} processes, per-rank noise": (processes, 1, "per_rank"),
        }
    return {
        "1 process, 1 thread": (1, 1, None),
        "1 process, 1 thread, half the particles": (1, 1, "half"),
        "1 process, 2 threads": (1, 2, None),
        "2 processes, global noise": (2, 1, "global"),
        "2 processes, per-rank noise": (2, 1, "per_rank"),
    }


def problem(device: str = "cpu", dim: int = 800, obs_dim: int = 4):
    return gaussian_mixture_benchmark(dim, obs_dim, seed=0, device=device)


def worker(args) -> None:
    """One run (in a group when ``--noise`` is given); rank 0 prints its numbers as JSON."""
    sharding, device = None, "cpu"
    if args.device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if args.noise is not None:
        init_process_group("nccl" if args.device == "cuda" else "gloo")
        sharding = posterior.Sharding(noise=args.noise)
    inverse = problem(device)
    result = posterior.sample(
        inverse.model,
        posterior.MCGDiff(num_steps=args.steps),
        num_particles=args.particles,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=False,
        model_kwargs=inverse.model_kwargs,
        sharding=sharding,
    )
    shard = result.info.get("sharding", {"rank": 0})
    record = {
        "wall_time": result.info["wall_time"],
        "resampled_steps": int(result.stats["resampled"].sum()),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **{k: v for k, v in shard.items() if k != "rank"},
    }
    if shard["rank"] == 0:
        print("RESULT " + json.dumps(record), flush=True)
    if sharding is not None:
        torch.distributed.destroy_process_group()


def worker_record(stdout: str) -> dict:
    """The numbers a worker printed (its ``RESULT {...}`` line)."""
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def launch(processes: int, threads: int, noise: str | None, args) -> dict:
    count = args.particles[0] // 2 if noise == "half" else args.particles[0]
    noise = None if noise == "half" else noise
    argv = ["-m", "benchmarks.sharded", "--worker", "--particles", str(count)]
    argv += ["--steps", str(args.steps), "--seed", "0", "--device", args.device]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if noise is not None:
        argv += ["--noise", noise]
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        os.chdir(ROOT)
        completed = launch_local(argv, processes, timeout=1800)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    for rank, process in enumerate(completed):
        if process.returncode != 0:
            raise RuntimeError(f"rank {rank} failed:\n{process.stderr[-3000:]}")
    return worker_record(completed[0].stdout)


def time_part(args) -> list[str]:
    configurations = setups(args.device, args.processes)
    records: dict[str, list[dict]] = {name: [] for name in configurations}
    for _ in range(args.repeats):
        for name, (processes, threads, noise) in configurations.items():
            records[name].append(launch(processes, threads, noise, args))
            print(name, records[name][-1], flush=True)
    median = {name: statistics.median(r["wall_time"] for r in rs) for name, rs in records.items()}
    single = [name for name, (n, _, noise) in configurations.items() if n == 1 and noise is None]
    lines = [
        "# One MCGDiff run sharded over processes against one process",
        "",
        f"`{' '.join(sys.argv)}` on {platform.node()} ({os.cpu_count()} cores), "
        f"{datetime.date.today()}, torch {torch.__version__}.",
        "",
        f"MCGDiff, {args.steps} steps, {args.particles[0]} particles in one chain, Gaussian "
        "mixture "
        f"benchmark d = 800, d_y = 4 (float64, {args.device}); each set-up a fresh process group "
        "(`launch_local`, gloo on loopback), interleaved over "
        f"{args.repeats} rounds; wall time of the run itself (`info['wall_time']`).",
        "",
        "| set-up | wall time (s), median | runs | "
        + " | ".join(f"{base} / this" for base in single)
        + " | bytes sent per rank per step | resampling steps |",
        "|---|---|---|" + "---|" * len(single) + "---|---|",
    ]
    for name, rs in records.items():
        sent = statistics.median(r.get("bytes_moved", 0) for r in rs) / args.steps
        lines.append(
            f"| {name} | {median[name]:.2f} | "
            + ", ".join(f"{r['wall_time']:.2f}" for r in rs)
            + "".join(f" | {median[base] / median[name]:.2f}x" for base in single)
            + f" | {sent / 2**10:.0f} KiB | {rs[0]['resampled_steps']} |"
        )
    half = "1 process, 1 thread, half the particles"
    if half in median:
        lines += [
            "",
            f"Weak scaling: each of the two processes does the work of the one-process run of "
            f"{args.particles[0] // 2} particles ({median[half]:.2f} s): the sharded runs take "
            + ", ".join(
                f"{median[name] / median[half]:.2f}x"
                for name, (n, _, _) in configurations.items()
                if n == 2
            )
            + " of its time (global, per-rank noise).",
        ]
    row = args.particles[0] * 800 * 8
    lines += [
        "",
        f"For scale: the particles are {row / 2**20:.0f} MiB; a rank's half, "
        f"{row / 2**21:.0f} MiB. The global-noise mode draws the whole run's noise on every "
        "rank (the single-process draws, bit for bit); the per-rank mode draws only its half.",
    ]
    return lines


def memory_part(args) -> list[str]:
    lines = [
        "# Peak memory of one process running MCGDiff at d = 800",
        "",
        f"`{' '.join(sys.argv)}` on {platform.node()} "
        f"({os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB), "
        f"{datetime.date.today()}, torch {torch.__version__}.",
        "",
        f"MCGDiff, {args.steps} steps, one chain, float64, denoiser chunks of "
        f"{args.batch_size} particles; peak RSS of a fresh process.",
        "",
        "| particles | particles alone (GiB) | peak RSS (GiB) | wall time (s) |",
        "|---|---|---|---|",
    ]
    for count in args.particles:
        argv = [sys.executable, "-m", "benchmarks.sharded", "--worker", "--particles", str(count)]
        argv += ["--steps", str(args.steps), "--seed", "0"]
        if args.batch_size is not None:
            argv += ["--batch-size", str(args.batch_size)]
        completed = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False
        )
        if completed.returncode != 0:
            lines.append(f"| {count} | {count * 800 * 8 / 2**30:.2f} | failed | - |")
            print(completed.stderr[-3000:])
            continue
        record = worker_record(completed.stdout)
        lines.append(
            f"| {count} | {count * 800 * 8 / 2**30:.2f} | {record['peak_rss_gib']:.2f} | "
            f"{record['wall_time']:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("time", "memory"), default="time")
    parser.add_argument("--particles", type=int, nargs="+", default=[10_000])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--noise", choices=("global", "per_rank"), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="GPUs to shard over (cuda)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.worker:
        args.particles = args.particles[0]
        worker(args)
        return
    lines = time_part(args) if args.part == "time" else memory_part(args)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
