"""Amortized posteriors (APS: one conditional flow for every measurement; DAVI: one implicit
sampler trained by score distillation) against the exact posterior and against FlowVI (one flow
fitted per measurement) on the 8x8 digits Gaussian-mixture prior.

Problem: the shipped exact prior :func:`diffpost.models.zoo.digits_gmm` (20 components, d = 64)
observed through a fixed random 16 x 64 Gaussian matrix (entries N(0, 1/64)) with noise 0.1.
Each of ``--methods`` trains on ``--train`` measurements simulated from the model (measurements
only), then draws for ``--test`` new ones; each is compared with :class:`~diffpost.posterior.Exact`:

- 90% coverage: the fraction of pixels whose true value lies in the draws' per-pixel central
  90% interval (0.90 for a calibrated sampler; Exact's own value is the reference);
- mean error: the mean over pixels of |mean - exact mean| / exact sd; variance ratio: the mean
  over pixels of var / exact var;
- cost: each method's training time once, against FlowVI fitted per measurement (APS's flow,
  optimiser and steps) on the first ``--flowvi`` test measurements, whose accuracy is also reported.

Run::

    .venv/bin/python benchmarks/amortized.py --output benchmarks/results/amortized.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import pyro
import torch
from reporting import interval, write_report  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.models import GaussianMixture, GaussianObservation, operators, zoo

D = torch.float64


def summaries(draws: torch.Tensor, exact, truth: torch.Tensor) -> tuple[float, float, float]:
    """``(coverage, mean error in sds, variance ratio)`` of ``draws`` ``(n, 64)``."""
    low, high = torch.quantile(draws, torch.tensor([0.05, 0.95], dtype=D), dim=0)
    coverage = float(((truth >= low) & (truth <= high)).to(D).mean())
    sd = exact.variance.sqrt()
    error = float(((draws.mean(0) - exact.mean) / sd).abs().mean())
    ratio = float((draws.var(0) / exact.variance).mean())
    return coverage, error, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--flowvi", type=int, default=5)
    parser.add_argument(
        "--methods",
        default="APS",
        help="comma-separated: APS, DAVI (official, unconditional auxiliary score), "
        "DAVI-conditional",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    shipped = zoo.digits_gmm()  # event (1, 8, 8); the same mixture on flat (64,) vectors
    prior = GaussianMixture(
        shipped.weights, shipped.means.reshape(-1, 64), shipped.covariances.reshape(-1, 64, 64)
    )
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(16, 64, generator=generator, dtype=D) / 8
    operator, sigma = operators.Matrix(matrix), 0.1

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    def simulate(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = prior.sample((count,), generator=generator)
        return x, x @ matrix.T + sigma * torch.randn(count, 16, generator=generator, dtype=D)

    _, train = simulate(args.train)
    methods = {
        "APS": posterior.APS(num_steps=args.steps),
        "DAVI": posterior.DAVI(num_steps=args.steps),
        "DAVI-conditional": posterior.DAVI(num_steps=args.steps, auxiliary="conditional"),
    }
    chosen = args.methods.split(",")
    fitted, train_seconds = {}, {}
    for name in chosen:
        start = time.perf_counter()
        fitted[name] = methods[name].fit(model, train, seed=0)
        train_seconds[name] = time.perf_counter() - start
    truths, tests = simulate(args.test)
    rows = {"Exact": []} | {name: [] for name in chosen}
    sample_seconds = {name: [] for name in chosen}
    for index in range(args.test):
        y, truth = tests[index], truths[index]
        exact = prior.posterior(operator, y, torch.tensor(sigma, dtype=D))
        exact_draws = exact.sample((args.draws,), generator=generator)
        rows["Exact"].append(summaries(exact_draws, exact, truth))
        for name in chosen:
            start = time.perf_counter()
            draws = fitted[name].sample(y, args.draws, seed=index).values["x"][0]
            sample_seconds[name].append(time.perf_counter() - start)
            rows[name].append(summaries(draws, exact, truth))
    flowvi_rows, flowvi_seconds = [], []
    for index in range(args.flowvi):
        y, truth = tests[index], truths[index]
        exact = prior.posterior(operator, y, torch.tensor(sigma, dtype=D))
        engine = posterior.FlowVI(
            num_steps=args.steps,
            learning_rate=1e-3,
            warmup_steps=0,
            num_flow_steps=methods["APS"].num_flow_steps,
            hidden_features=methods["APS"].hidden_features,
        )
        start = time.perf_counter()
        result = posterior.sample(
            model, engine, num_particles=args.draws, seed=index, progress=False,
            model_kwargs={"y": y},
        )  # fmt: skip
        flowvi_seconds.append(time.perf_counter() - start)
        flowvi_rows.append(summaries(result.values["x"][0], exact, truth))
        for name in chosen:
            rows.setdefault(f"{name} (same measurements as FlowVI)", []).append(rows[name][index])
    if flowvi_rows:
        rows["FlowVI"] = flowvi_rows

    def cell(values, position):
        return interval([value[position] for value in values], digits=3)

    lines = [
        f"# Amortized posterior sampling ({', '.join(chosen)}) on the digits mixture prior",
        "",
        f"Recorded {datetime.date.today()} on 2 CPU cores; command: `.venv/bin/python "
        f"benchmarks/amortized.py --train {args.train} --test {args.test} --draws {args.draws} "
        f"--steps {args.steps} --flowvi {args.flowvi} --methods {args.methods}`.",
        "",
        "Prior `zoo.digits_gmm()` (d = 64), y = A x + 0.1 e with A a fixed random 16 x 64 matrix. "
        f"Each method trained once on {args.train} simulated measurements; {args.test} new "
        "measurements, "
        f"{args.draws} draws each. Cells: mean ± 1.96 sd / sqrt(measurements).",
        "",
        "| sampler | measurements | 90% coverage | mean error (sds) | variance ratio |",
        "|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        lines.append(
            f"| {name} | {len(values)} | {cell(values, 0)} | {cell(values, 1)} | "
            f"{cell(values, 2)} |"
        )
    lines.append("")
    for name in chosen:
        line = (
            f"Cost: {name} training {train_seconds[name]:.0f} s once ({args.steps} steps), then "
            f"{1000 * statistics.mean(sample_seconds[name]):.1f} ms per measurement for "
            f"{args.draws} draws"
        )
        if flowvi_seconds:
            line += (
                f"; it has paid for itself against FlowVI after "
                f"{train_seconds[name] / statistics.mean(flowvi_seconds):.1f} measurements"
            )
        lines.append(line + ".")
    if flowvi_seconds:
        lines.append(
            f"FlowVI: {statistics.mean(flowvi_seconds):.0f} s per measurement (APS's flow, same "
            "steps)."
        )
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
