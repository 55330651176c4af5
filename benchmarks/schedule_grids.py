"""Grid-based engines on every schedule: the posterior variance ratio (engine / exact).

A Gaussian prior in d = 6 (random covariance), two random linear measurements with sigma = 0.3
and the exact Gaussian posterior; each engine at its default number of steps, 8 chains x 500
particles, seed 0. For each schedule (VP linear, DiscreteVP linear, VE, EDM, rectified flow) the
table gives the mean over coordinates of var(engine) / var(exact) and the largest error of the
mean in posterior sds. ``--grid ddim`` reproduces the earlier behaviour (the DDIM sub-sequence of
1000 steps on every schedule, uniform in ``t``) by replacing ``sampling_grid`` in the engines'
modules; the default is the schedule-aware ``sampling_grid`` (Karras spacing on EDM).

Run::

    .venv/bin/python -m benchmarks.schedule_grids --grid ddim --output /tmp/before.md
    .venv/bin/python -m benchmarks.schedule_grids --output /tmp/after.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

import pyro
import torch

from benchmarks.reporting import write_report
from diffpost import posterior
from diffpost.models import GaussianObservation, operators
from diffpost.models.priors import Gaussian
from diffpost.models.schedules import EDM, VE, VP, DiscreteVP, RectifiedFlow, time_grid

ENGINES = ["MCGDiff", "TDS", "FKSteering", "FPS", "DDRM", "DPS", "PiGDM", "DDS", "MMPS"]


def ddim_everywhere(schedule, num_steps, device=None):
    """The earlier grid: the DDIM sub-sequence of 1000 steps whatever the schedule."""
    train_steps = schedule.num_train_steps if isinstance(schedule, DiscreteVP) else 1000
    steps = min(num_steps, train_steps)
    return time_grid(steps, "ddim", num_train_steps=train_steps, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=["schedule", "ddim"], default="schedule")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.grid == "ddim":
        for name, module in list(sys.modules.items()):
            if name.startswith("diffpost.posterior.engines") and hasattr(module, "sampling_grid"):
                module.sampling_grid = ddim_everywhere

    dtype = torch.float64
    generator = torch.Generator().manual_seed(0)
    d = 6
    factor = torch.randn(d, d, dtype=dtype, generator=generator) / d**0.5
    covariance = factor @ factor.T + 0.5 * torch.eye(d, dtype=dtype)
    operator = operators.Matrix(torch.randn(2, d, dtype=dtype, generator=generator))
    y = torch.randn(2, dtype=dtype, generator=generator)
    schedules = {
        "VP": VP(),
        "DiscreteVP": DiscreteVP.linear(),
        "VE": VE(),
        "EDM": EDM(),
        "RectifiedFlow": RectifiedFlow(),
    }
    lines = [
        f"# Variance ratio engine / exact, grid: {args.grid} ({datetime.date.today()})",
        "",
        "Gaussian prior, d = 6, 2 measurements, sigma = 0.3; default steps; 8 x 500 particles; "
        "cells: variance ratio / largest mean error in posterior sds.",
        "",
        "| engine | " + " | ".join(schedules) + " |",
        "|---" * (len(schedules) + 1) + "|",
    ]
    for name in ENGINES:
        cells = []
        for schedule in schedules.values():
            prior = Gaussian(torch.zeros(d, dtype=dtype), covariance, schedule=schedule)

            def model(y=None, prior=prior):
                x = pyro.sample("x", prior)
                return pyro.sample("y", GaussianObservation(operator, x, 0.3), obs=y)

            exact = prior.posterior(operator, y, torch.tensor(0.3, dtype=dtype))
            result = posterior.sample(
                model,
                getattr(posterior, name)(),
                num_particles=500,
                num_chains=8,
                seed=0,
                progress=False,
                model_kwargs={"y": y},
            )
            draws = result.get_samples()["x"]
            ratio = float((draws.var(0) / exact.variance).mean())
            error = float(((draws.mean(0) - exact.mean).abs() / exact.variance.sqrt()).max())
            cells.append(f"{ratio:.2f} / {error:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
