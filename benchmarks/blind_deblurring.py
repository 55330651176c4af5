"""Blind deblurring of held-out 16x16 digits: unknown blur width and noise level, with EM.

Each held-out digit ``x`` (``zoo.digits_data("heldout", size=16)``) is blurred by a separable
Gaussian kernel of 9 taps and width ``--width`` and observed with noise ``--sigma``. The model
declares both as unknowns, ``sigma ~ HalfNormal(0.2)`` and ``width ~ LogNormal(0, 0.3)``, with the
shipped UNet prior ``zoo.digits16()`` on ``x``. Three runs per image, all with MCGDiff:

- **non-blind**: the true width and noise level, fixed (the best one can do);
- **wrong kernel**: width ``--wrong-width`` and the true noise level, fixed;
- **blind**: ``EM(MCGDiff)`` over both unknowns, two restarts from prior draws, ``--rounds``
  rounds; the restart with the largest ``log_marginal`` is kept, and its last E-step is the
  posterior of ``x`` at the estimate.

Reported per run: PSNR of the posterior mean; for the blind run, the estimates, their errors, and
whether the Laplace 90% intervals of EM (Louis' information) cover the truth.

Run::

    .venv/bin/python benchmarks/blind_deblurring.py --output benchmarks/results/blind_deblurring.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from reporting import interval, write_report

from diffpost import diagnostics, posterior
from diffpost.models import GaussianObservation, operators, zoo

SHAPE = (1, 16, 16)
TAPS = 9


def blind_model(prior):
    def model(y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(0.2))
        width = pyro.sample("width", dist.LogNormal(0.0, 0.3))
        x = pyro.sample("x", prior)
        blur = operators.Blur(SHAPE, operators.gaussian_kernel(TAPS, width))
        return pyro.sample("y", GaussianObservation(blur, x, sigma=sigma), obs=y)

    return model


def fixed_model(prior, width: float, sigma: float):
    blur = operators.Blur(SHAPE, operators.gaussian_kernel(TAPS, width))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(blur, x, sigma=sigma), obs=y)

    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.2)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--wrong-width", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=50, help="MCGDiff steps")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--chains", type=int, default=4, help="filters per run (EM: 2 chains)")
    parser.add_argument("--rounds", type=int, default=10, help="EM rounds")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prior = zoo.digits16()
    images, _ = zoo.digits_data("heldout", size=16)
    true_blur = operators.Blur(SHAPE, operators.gaussian_kernel(TAPS, args.width))
    engine = posterior.MCGDiff(num_steps=args.steps)
    rows = {"non-blind": [], "wrong kernel": [], "blind (EM)": []}
    estimates = {"width": [], "sigma": []}
    covered = {"width": 0, "sigma": 0}
    walls = {"non-blind": [], "wrong kernel": [], "blind (EM)": []}
    for index in range(args.images):
        x_true = images[index]
        generator = torch.Generator().manual_seed(index)
        noise = torch.randn(SHAPE, generator=generator)
        y = true_blur(x_true[None])[0] + args.sigma * noise
        runs = {
            "non-blind": (fixed_model(prior, args.width, args.sigma), engine, args.chains),
            "wrong kernel": (fixed_model(prior, args.wrong_width, args.sigma), engine, args.chains),
            "blind (EM)": (
                blind_model(prior),
                posterior.EM(engine, num_steps=args.rounds),
                2,
            ),
        }
        for label, (model, run_engine, chains) in runs.items():
            start = time.perf_counter()
            result = posterior.sample(
                model,
                run_engine,
                num_particles=args.particles,
                num_chains=chains,
                seed=index,
                progress=False,
                model_kwargs={"y": y},
            )
            walls[label].append(time.perf_counter() - start)
            if label == "blind (EM)":  # the restart with the largest log marginal posterior
                result = result.select_chains(int(result.stats["log_marginal"][:, -1].argmax()))
            rows[label].append(float(diagnostics.psnr(result.mean(), x_true)))
            if label == "blind (EM)":
                for name, truth in (("width", args.width), ("sigma", args.sigma)):
                    estimate = float(result.stats[f"theta_{name}"][:, -1].mean())
                    low = float(result.stats[f"theta_{name}_lo90"][:, -1].mean())
                    high = float(result.stats[f"theta_{name}_hi90"][:, -1].mean())
                    estimates[name].append(estimate)
                    covered[name] += int(low <= truth <= high)
        print(index, {k: round(v[-1], 2) for k, v in rows.items()}, flush=True)
    lines = [
        "# Blind deblurring of held-out 16x16 digits (unknown blur width and noise level)",
        "",
        f"Recorded {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores, "
        f"1 torch thread), torch {torch.__version__}; command: `.venv/bin/python "
        f"benchmarks/blind_deblurring.py --images {args.images} --width {args.width} --sigma "
        f"{args.sigma} --wrong-width {args.wrong_width} --steps {args.steps} --particles "
        f"{args.particles} --chains {args.chains} --rounds {args.rounds}`.",
        "",
        f"Truth: width {args.width} (9 taps, separable), sigma {args.sigma}; priors "
        "HalfNormal(0.2) on sigma and LogNormal(0, 0.3) on the width; MCGDiff with "
        f"{args.steps} steps and {args.particles} particles per filter. PSNR of the posterior "
        "mean, mean ± 1.96 sd / sqrt(images).",
        "",
        "| run | PSNR (dB) | wall s / image |",
        "|---|---|---|",
    ]
    for label, values in rows.items():
        lines.append(f"| {label} | {interval(values)} | {statistics.mean(walls[label]):.1f} |")
    lines += [
        "",
        "| blind estimate | mean ± 1.96 sd / sqrt(images) | truth | Laplace 90% covers truth |",
        "|---|---|---|---|",
    ]
    for name, truth in (("width", args.width), ("sigma", args.sigma)):
        lines.append(
            f"| {name} | {interval(estimates[name], 3)} | {truth} | "
            f"{covered[name]} / {args.images} |"
        )
    gaps = [b - n for b, n in zip(rows["blind (EM)"], rows["non-blind"], strict=True)]
    wrong = [b - w for b, w in zip(rows["blind (EM)"], rows["wrong kernel"], strict=True)]
    lines += [
        "",
        f"Paired by image: blind minus non-blind {interval(gaps)} dB; blind minus wrong kernel "
        f"{interval(wrong)} dB.",
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
