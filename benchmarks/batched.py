"""Batched against sequential calibration studies, and the memory of a large plated run.

Part 1 (``--part time``): simulation-based calibration of MCGDiff and of DPS on the shipped
20-component 8x8 digits Gaussian mixture (``zoo.digits_gmm``) with 2x2 average pooling (16
measurements) and sigma = 0.1: ``--trials`` trials, each run alone (``trials_per_batch=1``, one
``posterior.sample`` call per trial) and all of them as plated batches (``trials_per_batch`` =
``--batch``). Both paths run in the same process, interleaved, and the ratio of their wall times
is reported per repeat; the calibration p-values show that the results agree (``Exact``, which
is calibrated, passes in both; MCGDiff with one chain of correlated particles and DPS fail SBC in
both, by the same margin).

Part 2 (``--part memory``): peak memory of one plated run of ``--problems`` problems x
``--particles`` particles on the 16x16 UNet prior (``zoo.digits16``), inpainting the bottom half,
DPS, with ``batch_size`` chunks: the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU) against the same run with a single problem.

Run::

    .venv/bin/python -m benchmarks.batched --part time --output benchmarks/results/batched.md
    .venv/bin/python -m benchmarks.batched --part time --particles 16 \
        --output benchmarks/results/batched_16.md
    .venv/bin/python -m benchmarks.batched --part memory --problems 64 --particles 256 \
        --batch-size 1024 --steps 3 --output benchmarks/results/batched_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from benchmarks.reporting import write_report
from diffpost import diagnostics, posterior
from diffpost.models import GaussianObservation, operators, zoo


def digits_model(dtype=torch.float32):
    prior = zoo.digits_gmm(20, dtype=dtype)
    operator = operators.Downsample((1, 8, 8), 2)  # 16 measurements

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)

    return model


def time_part(args) -> list[str]:
    model = digits_model()
    engines = [
        posterior.MCGDiff(num_steps=args.steps),
        posterior.DPS(num_steps=args.steps),
        posterior.Exact(),  # calibrated: both paths must pass
    ]
    lines = [
        f"# Batched against sequential calibration studies ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Prior: zoo.digits_gmm(20), "
        f"d = 64, 2x2 average pooling (16 measurements), sigma = 0.1. {args.trials} trials, "
        f"{args.particles} particles x 1 chain, {args.steps} steps; batched = "
        f"trials_per_batch {args.batch}. Interleaved, {args.repeats} repeats.",
        "",
        "| engine | repeat | sequential s | batched s | speed-up | p sequential | p batched |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine in engines:
        for repeat in range(args.repeats):
            timings, p_values = [], []
            for per_batch in (1, args.batch):
                start = time.perf_counter()
                study = diagnostics.calibration_study(
                    model,
                    engine,
                    args.trials,
                    num_particles=args.particles,
                    seed=repeat,
                    trials_per_batch=per_batch,
                    batch_size=args.batch_size,
                    progress=False,
                )
                timings.append(time.perf_counter() - start)
                p_values.append(study.p_value())
            lines.append(
                f"| {engine.name} | {repeat} | {timings[0]:.1f} | {timings[1]:.1f} | "
                f"{timings[0] / timings[1]:.1f}x | {p_values[0]:.3g} | {p_values[1]:.3g} |"
            )
            print(lines[-1], flush=True)
    return lines


def memory_run(problems: int, particles: int, batch_size: int, steps: int, device: str) -> float:
    """Peak memory in MiB of one plated DPS run (RSS on the CPU, allocated on a GPU)."""
    prior = zoo.digits16(device=device)
    shape = tuple(prior.event_shape)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[..., shape[-2] // 2 :, :] = False
    operator = operators.Mask(mask)
    y = torch.zeros((problems,) + tuple(operator.out_shape), device=device)

    def model(y=None):
        with pyro.plate("images", problems):
            x = pyro.sample("x", prior)
            return pyro.sample("y", GaussianObservation(operator, x, 0.05), obs=y)

    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    posterior.sample(
        model,
        posterior.DPS(num_steps=steps),
        num_particles=particles,
        seed=0,
        batch_size=batch_size,
        progress=False,
        model_kwargs={"y": y},
    )
    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def memory_part(args) -> list[str]:
    lines = [
        f"# Peak memory of a plated run ({datetime.date.today()})",
        "",
        f"DPS, {args.steps} steps, zoo.digits16 (16x16 UNet), bottom half inpainted; "
        f"batch_size {args.batch_size}; device {args.device}. Each configuration in a fresh "
        "process (peak RSS is monotone).",
        "",
        "| problems x particles | particles in all | peak MiB |",
        "|---|---|---|",
    ]
    for problems in (1, args.problems):
        command = [
            sys.executable,
            "-m",
            "benchmarks.batched",
            "--part",
            "memory-one",
            "--problems",
            str(problems),
            "--particles",
            str(args.particles),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
        ]
        root = Path(__file__).resolve().parent.parent
        run = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
        output = run.stdout
        peak = float(output.strip().splitlines()[-1])
        total = problems * args.particles
        lines.append(f"| {problems} x {args.particles} | {total} | {peak:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["time", "memory", "memory-one"], default="time")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.part == "memory-one":
        print(memory_run(args.problems, args.particles, args.batch_size, args.steps, args.device))
        return
    lines = time_part(args) if args.part == "time" else memory_part(args)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
