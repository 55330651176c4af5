"""DPS's two guidance rules against exact posteriors, as the number of steps grows.

``DPS(guidance="paper")`` (the official update: a step of ``scale = 0.5`` down the gradient of the
residual norm after each DDPM step) against ``DPS(guidance="score")`` (the same gradient, ``scale
= 1``, as the score of the likelihood in Tweedie's formula, deepinv's form), at 20, 100 and 1000
steps, on the MCGDiff Gaussian-mixture problems (SW_2 over 256 directions between ``--draws``
draws and as many exact posterior draws, median and mean over ``--seeds`` seeds), and on a 2-D
Gaussian posterior (one measurement, sigma 0.5; 4000 draws): the variance ratio along each
coordinate and the largest error of the mean.

Run::

    .venv/bin/python benchmarks/dps_guidance.py --output benchmarks/results/dps_guidance.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics

import pyro
import torch
from reporting import write_report  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models import Gaussian, GaussianObservation, operators
from diffpost.models.problems import gaussian_mixture_benchmark

RULES = ("paper", "score")


def _draws(model, engine, num_particles: int, seed: int, **model_kwargs) -> torch.Tensor:
    result = posterior.sample(
        model,
        engine,
        num_particles=num_particles,
        seed=seed,
        progress=False,
        model_kwargs=model_kwargs,
    )
    return result.get_samples(seed=seed)["x"]


def mixture_rows(args) -> list[str]:
    lines = [
        "## Gaussian-mixture problems: SW_2 to exact draws (median / mean over seeds)",
        "",
        "| d | d_y | steps | paper | score |",
        "|---|---|---|---|---|",
    ]
    for cell in args.cells.split(";"):
        dim, obs_dim = map(int, cell.split(","))
        values: dict[tuple[int, str], list[float]] = {}
        for seed in range(args.seeds):
            problem = gaussian_mixture_benchmark(dim, obs_dim, seed=seed)
            generator = torch.Generator().manual_seed(10_000 + seed)
            reference = problem.exact_posterior().sample((args.draws,), generator=generator)
            for num_steps in map(int, args.steps.split(",")):
                for rule in RULES:
                    engine = posterior.DPS(num_steps=num_steps, guidance=rule)
                    draws = _draws(problem.model, engine, args.draws, seed, **problem.model_kwargs)
                    distance = sliced_wasserstein(
                        draws, reference, seed=seed, num_projections=256, p=2
                    )
                    values.setdefault((num_steps, rule), []).append(float(distance))
        for num_steps in map(int, args.steps.split(",")):
            cells = [values[(num_steps, rule)] for rule in RULES]
            lines.append(
                f"| {dim} | {obs_dim} | {num_steps} | "
                + " | ".join(
                    f"{statistics.median(v):.2f} / {statistics.mean(v):.2f}" for v in cells
                )
                + " |"
            )
            print(lines[-1], flush=True)
    return lines


def gaussian_rows(args) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float64
    prior = Gaussian(
        0.5 * torch.randn(2, generator=generator, dtype=dtype), torch.eye(2, dtype=dtype)
    )
    operator = operators.Matrix(torch.randn(1, 2, generator=generator, dtype=dtype))
    y = torch.randn(1, generator=generator, dtype=dtype)
    exact = prior.posterior(operator, y, 0.5)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.5), obs=y)

    lines = [
        "## 2-D Gaussian posterior (one measurement): variance ratio per coordinate, mean error",
        "",
        "| steps | rule | var ratio | largest mean error |",
        "|---|---|---|---|",
    ]
    for num_steps in map(int, args.steps.split(",")):
        for rule in RULES:
            x = _draws(model, posterior.DPS(num_steps=num_steps, guidance=rule), 4000, 0, y=y)
            ratio = (x.var(0) / exact.covariances[0].diagonal()).tolist()
            error = float((x.mean(0) - exact.means[0]).abs().max())
            lines.append(f"| {num_steps} | {rule} | {ratio[0]:.2f}, {ratio[1]:.2f} | {error:.3f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="8,1;80,1;8,4;80,4", help="d,d_y pairs, ';'-separated")
    parser.add_argument("--steps", default="20,100,1000")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# DPS: the paper's guidance rule against the score form",
        "",
        f"Recorded {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/dps_guidance.py --cells "
        f"'{args.cells}' --steps {args.steps} --seeds {args.seeds} --draws {args.draws} "
        f"--threads {args.threads}`. Scales at each rule's default (paper 0.5, score 1). 1000 "
        "steps run 999 on this 999-step grid.",
        "",
    ]
    lines += gaussian_rows(args) + [""] + mixture_rows(args)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
