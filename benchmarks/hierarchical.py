"""Hierarchical mechanisms (PMMH, EM, Gibbs) against the exact posterior of a global latent.

Each problem of ``diffpost.models.problems`` with one unknown scalar (a noise level, an operator
gain, a blur width on the 8x8 digits mixture) has ``p(theta | y)`` by quadrature. Each mechanism
runs on it for ``--seeds`` seeds; the table gives, as mean ± 1.96 sd / sqrt(seeds):

- PMMH and Gibbs (samplers): the Kolmogorov–Smirnov distance of the draws of theta to the exact
  marginal, the error of their mean in posterior standard deviations, and the bulk ESS of theta;
- EM (a point estimate): the distance of the final estimate to the exact mode, in posterior
  standard deviations, for the chain (restart) with the largest final ``log_marginal``;

with NFE and wall time per run. A mechanism that refuses a problem is listed with its reason.

Run::

    .venv/bin/python benchmarks/hierarchical.py --output benchmarks/results/hierarchical.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import arviz_stats
import torch
from reporting import interval, write_report

from diffpost import posterior
from diffpost.models import problems

PROBLEMS = {
    "noise": problems.noise_level_problem,
    "gain": problems.gain_problem,
    "blur": problems.blur_width_problem,
}


def mechanisms(args) -> dict[str, tuple[posterior.Engine, int, int]]:
    """label -> (engine, chains, particles)."""
    kept, warmup = args.kept, args.warmup
    return {
        "PMMH(Exact)": (posterior.PMMH(posterior.Exact(), num_steps=kept, warmup=warmup), 2, 8),
        "PMMH(MCGDiff, 20 steps)": (
            posterior.PMMH(posterior.MCGDiff(num_steps=20), num_steps=kept, warmup=warmup),
            2,
            128,
        ),
        "EM(Exact)": (posterior.EM(posterior.Exact(), num_steps=args.rounds), 2, 2000),
        "EM(MCGDiff, 50 steps)": (
            posterior.EM(posterior.MCGDiff(num_steps=50), num_steps=args.rounds),
            2,
            256,
        ),
        "Gibbs(DPS, 200 steps)": (posterior.Gibbs(posterior.DPS(num_steps=200)), 2, 400),
    }


def measure(problem, engine, chains: int, particles: int, seed: int) -> dict[str, float]:
    grid, weights = problem.exact_marginal()
    mean = float(weights @ grid)
    sd = float((weights @ (grid - mean) ** 2).sqrt())
    start = time.perf_counter()
    result = posterior.sample(
        problem.model,
        engine,
        num_particles=particles,
        num_chains=chains,
        seed=seed,
        progress=False,
        model_kwargs=problem.model_kwargs,
    )
    wall = time.perf_counter() - start
    theta = result.values[problem.latent]
    row = {"nfe": float(result.info["nfe"]), "wall": wall}
    if isinstance(engine, posterior.EM):  # the restart with the largest log marginal posterior
        mode = float(grid[weights.argmax()])
        best = int(result.stats["log_marginal"][:, -1].argmax())
        row["mode_error"] = abs(float(theta[best, 0]) - mode) / sd
        return row
    empirical = (theta.flatten()[:, None] <= grid[None]).to(grid.dtype).mean(0)
    row["ks"] = float((empirical - weights.cumsum(0)).abs().max())
    row["mean_error"] = (float(theta.mean()) - mean) / sd
    row["ess"] = float(arviz_stats.ess(theta.numpy())) if theta.shape[1] > 3 else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kept", type=int, default=1000, help="PMMH iterations kept")
    parser.add_argument("--warmup", type=int, default=300, help="PMMH warm-up iterations")
    parser.add_argument("--rounds", type=int, default=30, help="EM rounds")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--mechanisms", default=None, help="comma-separated labels (default all)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = mechanisms(args)
    if args.mechanisms:
        chosen = {k: v for k, v in chosen.items() if k in args.mechanisms.split(",")}
    lines = [
        "# Hierarchical mechanisms against the exact posterior of a global latent",
        "",
        f"Recorded {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores, "
        f"1 torch thread), torch {torch.__version__}; command: `.venv/bin/python "
        f"benchmarks/hierarchical.py --seeds {args.seeds} --kept {args.kept} --warmup "
        f"{args.warmup} --rounds {args.rounds} --problems {args.problems}`.",
        "",
        "KS: Kolmogorov–Smirnov distance of the draws of theta to the exact marginal (the 99% "
        "quantile for ESS independent draws is 1.63 / sqrt(ESS)); mean error and mode error in "
        "exact posterior standard deviations; mean ± 1.96 sd / sqrt(seeds).",
        "",
        "| problem | mechanism | chains x particles | KS | mean error (sd) | ESS | EM mode "
        "error (sd) | NFE | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in args.problems.split(","):
        problem = PROBLEMS[key]()
        for label, (engine, chains, particles) in chosen.items():
            rows = []
            try:
                for seed in range(args.seeds):
                    rows.append(measure(problem, engine, chains, particles, seed))
                    print(key, label, seed, rows[-1], flush=True)
            except ValueError as error:
                reason = str(error).splitlines()[0]
                lines.append(f"| {key} | {label} | {chains} x {particles} | refused: {reason} |")
                print(key, label, "refused:", reason, flush=True)
                continue

            def cell(name, rows=rows):
                values = [r[name] for r in rows if name in r]
                return interval(values) if values else "-"

            nfe = statistics.mean(r["nfe"] for r in rows)
            wall = statistics.mean(r["wall"] for r in rows)
            lines.append(
                f"| {key} | {label} | {chains} x {particles} | {cell('ks')} | "
                f"{cell('mean_error')} | {cell('ess')} | {cell('mode_error')} | {nfe:.0f} | "
                f"{wall:.1f} |"
            )
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
