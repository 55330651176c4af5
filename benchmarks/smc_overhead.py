"""Overhead of each SMC engine over the bare denoiser cost.

overhead = wall time of a run / (NFE x time of one batched denoiser call on the same particles) - 1,
measured in one process on the same problem (the d = 800, d_y = 4 Gaussian-mixture benchmark, 1024
particles, float32), so machine noise affects both terms alike. Engines with a VJP per step are
charged against the cost of a denoiser call *with* its VJP. The aim is an overhead under 10%; the
exact Gaussian-mixture denoiser is cheap (a few matrix products), which makes this a pessimistic
measurement: with a real network the same absolute overhead is a far smaller fraction.

Run::

    .venv/bin/python benchmarks/smc_overhead.py --output benchmarks/results/smc_overhead.txt
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

import posterior
from models.problems import gaussian_mixture_benchmark


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=800)
    parser.add_argument("--obs-dim", type=int, default=4)
    parser.add_argument("--particles", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    problem = gaussian_mixture_benchmark(args.dim, args.obs_dim, seed=0, dtype=torch.float32)
    x = torch.randn(args.particles, args.dim)
    denoiser = problem.prior.denoiser
    call = best_time(lambda: denoiser(x, 0.5), 10)

    def call_with_vjp():
        with torch.enable_grad():
            leaf = x.clone().requires_grad_(True)
            torch.autograd.grad(denoiser(leaf, 0.5).sum(), leaf)

    call_vjp = best_time(call_with_vjp, 10)
    lines = [
        f"# SMC overhead over the bare denoiser, recorded {datetime.date.today()}, {platform.machine()} CPU "
        f"({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}",
        f"# problem: GMM benchmark d={args.dim}, d_y={args.obs_dim}; {args.particles} particles, {args.steps} steps, float32",
        f"# one denoiser call: {call * 1e3:.2f} ms; with its VJP: {call_vjp * 1e3:.2f} ms",
        f"{'engine':>12} {'NFE':>5} {'VJP':>5} {'wall s':>8} {'denoiser s':>10} {'overhead':>9}",
    ]
    print("\n".join(lines), flush=True)
    for name in ("MCGDiff", "TDS", "FPS", "FKSteering"):
        engine_class = getattr(posterior, name, None)
        if engine_class is None:
            continue
        engine = engine_class(num_steps=args.steps)

        def run():
            return posterior.sample(
                problem.model,
                engine,
                num_particles=args.particles,
                seed=0,
                progress=False,
                model_kwargs=problem.model_kwargs,
            )

        result = run()
        wall = best_time(run, args.repeats)
        nfe, vjp = result.info["nfe"], result.info["vjp"]
        bare = vjp * call_vjp + (nfe - vjp) * call
        line = f"{name:>12} {nfe:>5} {vjp:>5} {wall:>8.3f} {bare:>10.3f} {wall / bare - 1:>8.1%}"
        lines.append(line)
        print(line, flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
