"""Convergence of the SMC engines to the exact posterior as the number of particles grows.

On one Gaussian-mixture benchmark problem, each engine runs ``--chains`` independent filters of
N particles for N in ``--particles``; one draw per filter (by its weight) is compared with an exact
posterior sample of the same size by sliced Wasserstein, next to the noise floor (mean over 4
pairs of independent exact sets). Asymptotically exact engines (MCGDiff, TDS, FK steering) should
approach the floor, up to the discretisation error of the diffusion model they sample; FPS-SMC is
not asymptotically exact.

Run::

    .venv/bin/python benchmarks/smc_convergence.py --output benchmarks/results/smc_convergence.txt
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models.problems import gaussian_mixture_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--obs-dim", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--particles", default="16,128,1024")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    problem = gaussian_mixture_benchmark(args.dim, args.obs_dim, seed=args.seed)
    exact = problem.exact_posterior()
    reference = exact.sample((args.chains,), generator=torch.Generator().manual_seed(1))
    floor = (
        sum(
            sliced_wasserstein(
                exact.sample((args.chains,), generator=torch.Generator().manual_seed(k)), reference
            )
            for k in range(2, 6)
        )
        / 4
    )
    sizes = [int(n) for n in args.particles.split(",")]
    lines = [
        f"# SMC convergence, recorded {datetime.date.today()}, {platform.machine()} CPU "
        f"({os.cpu_count()} cores), "
        f"torch {torch.__version__}",
        f"# {problem.name}; {args.steps} steps; {args.chains} filters, one draw each; "
        f"noise floor {floor:.3f} (mean of 4 exact pairs)",
        f"{'engine':>12} "
        + " ".join(f"{'N=' + str(n):>9}" for n in sizes)
        + f" {'last/floor':>11} {'wall s':>8}",
    ]
    print("\n".join(lines), flush=True)
    for name in ("MCGDiff", "TDS", "FKSteering", "FPS"):
        engine = getattr(posterior, name)(num_steps=args.steps)
        distances, start = [], time.perf_counter()
        for n in sizes:
            result = posterior.sample(
                problem.model,
                engine,
                num_particles=n,
                num_chains=args.chains,
                seed=0,
                progress=False,
                model_kwargs=problem.model_kwargs,
            )
            distances.append(sliced_wasserstein(result.one_draw_per_chain()["x"], reference))
        wall = time.perf_counter() - start
        line = (
            f"{name:>12} "
            + " ".join(f"{d:>9.3f}" for d in distances)
            + f" {distances[-1] / floor:>11.2f} {wall:>8.1f}"
        )
        lines.append(line)
        print(line, flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
