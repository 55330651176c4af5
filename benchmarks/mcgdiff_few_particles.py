"""MCGDiff with 16 particles per filter on the hardest cell of the paper's mixture benchmark.

At d = 80, d_y = 4 and 20 steps, with 1000 filters of 16 particles and one draw per filter,
MCGDiff is further from the exact posterior than TDS on every one of 20 problems
(``gmm-mcgdiff-grid.md``). This script checks whether one of MCGDiff's own settings closes the gap:
the paper's 20-step ``eta = 0.6``, its potentials (``potential="paper"``), its resampling
(multinomial at every step), and the shared DDIM grid. SW_1 over 100 directions (the paper's
estimator) against 1000 exact draws, per problem. Run::

    .venv/bin/python benchmarks/mcgdiff_few_particles.py --seeds 6 \
        --output benchmarks/results/mcgdiff_few_particles.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models.problems import gaussian_mixture_benchmark

SETTINGS = {
    "MCGDiff": lambda k: posterior.MCGDiff(num_steps=k),
    "eta=0.6": lambda k: posterior.MCGDiff(num_steps=k, eta=0.6),
    "potential=paper": lambda k: posterior.MCGDiff(num_steps=k, potential="paper"),
    "multinomial every step": lambda k: posterior.MCGDiff(
        num_steps=k, resampling="multinomial", ess_threshold=1.0
    ),
    "grid=ddim": lambda k: posterior.MCGDiff(num_steps=k, grid="ddim"),
    "TDS": lambda k: posterior.TDS(num_steps=k),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--filters", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# MCGDiff with few particles per filter: its settings against TDS, d = 80, d_y = 4",
        "",
        f"Recorded {datetime.date.today()}; command: `.venv/bin/python "
        f"benchmarks/mcgdiff_few_particles.py --seeds {args.seeds} --particles {args.particles} "
        f"--filters {args.filters} --steps {args.steps}`. SW_1 (100 directions) of "
        f"{args.filters} draws, one per filter of {args.particles} particles, to {args.filters} "
        "exact posterior draws; one row per problem (seed).",
        "",
        "| seed | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
    ]
    print("\n".join(lines), flush=True)
    columns: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for seed in range(args.seeds):
        problem = gaussian_mixture_benchmark(80, 4, seed=seed)
        reference = problem.exact_posterior().sample(
            (args.filters,), generator=torch.Generator().manual_seed(10_000 + seed)
        )
        for name, make in SETTINGS.items():
            result = posterior.sample(
                problem.model,
                make(args.steps),
                num_particles=args.particles,
                num_chains=args.filters,
                seed=seed,
                progress=False,
                model_kwargs=problem.model_kwargs,
            )
            draws = result.one_draw_per_chain(seed)["x"]
            distance = sliced_wasserstein(draws, reference, seed=seed, num_projections=100, p=1)
            columns[name].append(distance)
        line = f"| {seed} | " + " | ".join(f"{columns[n][-1]:.2f}" for n in SETTINGS) + " |"
        lines.append(line)
        print(line, flush=True)
    means = " | ".join(f"**{statistics.mean(columns[n]):.2f}**" for n in SETTINGS)
    lines.append(f"| mean | {means} |")
    print(lines[-1])
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
