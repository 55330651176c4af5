"""ΠGDM with the fitted posterior variance (Peng et al. 2024) against plain ΠGDM on the
Gaussian-mixture benchmark.

For each problem of :func:`diffpost.models.problems.gaussian_mixture_benchmark` the diagonal
:math:`\\operatorname{Var}[x_0 \\mid x_t]` is fitted by maximum likelihood
(:meth:`diffpost.models.covariance.PosteriorVariance.fit`) to ``--data`` draws of the prior, then
both engines draw ``--draws`` samples; the metric is the paper's SW_1 to exact posterior draws
(as ``benchmarks/gmm.py``). Both engines and the fit run in the same process, interleaved per
problem.

Run::

    .venv/bin/python benchmarks/fitted_covariance.py --dims 8,80 --obs-dims 1,4 --steps 20,100 \\
        --seeds 10 --output benchmarks/results/fitted_covariance.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from reporting import interval, write_report  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models.covariance import PosteriorVariance
from diffpost.models.problems import gaussian_mixture_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="8,80")
    parser.add_argument("--obs-dims", default="1,4")
    parser.add_argument("--steps", default="20,100")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--data", type=int, default=4000, help="prior draws the fit sees")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    metric = {"num_projections": 100, "p": 1}
    lines = [
        "# ΠGDM with the fitted posterior variance (Peng et al. 2024)",
        "",
        f"Recorded {datetime.date.today()}; command: `.venv/bin/python "
        f"benchmarks/fitted_covariance.py --dims {args.dims} --obs-dims {args.obs_dims} --steps "
        f"{args.steps} --seeds {args.seeds} --draws {args.draws} --data {args.data}`.",
        "",
        f"SW_1 (100 directions) between {args.draws} draws and {args.draws} exact posterior "
        f"draws, mean ± 1.96 sd/sqrt(seeds) over {args.seeds} problems; `fit s` is the time to fit "
        f"the variance (64 times, {args.data} prior draws), `wins` the problems where the fit is "
        "closer.",
        "",
        "| d | d_y | steps | PiGDM | PiGDM + fit | wins | floor | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dim in map(int, args.dims.split(",")):
        for obs_dim in map(int, args.obs_dims.split(",")):
            for steps in map(int, args.steps.split(",")):
                plain, fitted, floors, seconds = [], [], [], []
                for seed in range(args.seeds):
                    problem = gaussian_mixture_benchmark(dim, obs_dim, seed=seed)
                    exact = problem.exact_posterior()
                    reference = exact.sample(
                        (args.draws,), generator=torch.Generator().manual_seed(10_000 + seed)
                    )
                    other = exact.sample(
                        (args.draws,), generator=torch.Generator().manual_seed(20_000 + seed)
                    )
                    floors.append(sliced_wasserstein(other, reference, seed=seed, **metric))
                    start = time.perf_counter()
                    data = problem.prior.sample(
                        (args.data,), generator=torch.Generator().manual_seed(30_000 + seed)
                    )
                    fit = PosteriorVariance.fit(
                        problem.prior.denoiser,
                        data,
                        generator=torch.Generator().manual_seed(40_000 + seed),
                    )
                    seconds.append(time.perf_counter() - start)
                    for engine, out in (
                        (posterior.PiGDM(num_steps=steps), plain),
                        (posterior.PiGDM(num_steps=steps, posterior_variance=fit), fitted),
                    ):
                        result = posterior.sample(
                            problem.model,
                            engine,
                            num_particles=args.draws,
                            seed=seed,
                            progress=False,
                            model_kwargs=problem.model_kwargs,
                        )
                        draws = result.values["x"][0]
                        out.append(sliced_wasserstein(draws, reference, seed=seed, **metric))
                wins = sum(f < p for f, p in zip(fitted, plain, strict=True))
                line = (
                    f"| {dim} | {obs_dim} | {steps} | {interval(plain)} | {interval(fitted)} | "
                    f"{wins}/{args.seeds} | {interval(floors)} | {statistics.mean(seconds):.1f} |"
                )
                lines.append(line)
                print(line, flush=True)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
