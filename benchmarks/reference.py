"""Engines against NUTS reference posteriors on problems without a closed form.

The prior is the shipped 8x8 digits Gaussian mixture (``zoo.digits_gmm(20)``, float64): its
density is exact, so :func:`diffpost.diagnostics.nuts_reference` gives a reference posterior for
any likelihood. On held-out digits (``zoo.digits_data("heldout")``, values in ``[-1, 1]``):

- ``phase``: Fourier phase retrieval, ``y = |F_P x| + 0.05 e`` (2x oversampled,
  :class:`~diffpost.models.operators.PhaseRetrieval`). Its component posteriors are multimodal
  (the flips and the sign of the image give the same magnitudes, and the non-convex likelihood
  has further local modes); the reference splits each component at the modes its climbs reach
  and weighs them by their cells' evidences (``diagnostics.reference``);
- ``poisson``: photon counts, ``y ~ Poisson(10 exp(x - 1))`` per pixel (rate 1.4 on the
  background, 10 on the strokes);
- ``noise``: an unknown noise level, ``sigma ~ LogNormal(log 0.1, 0.5)``, half of the pixels
  observed (a fixed random mask) with ``sigma = 0.1``; here the reference is also checked
  against quadrature over ``sigma`` (its exact marginal is closed form for each ``sigma``).

Every engine that can run a problem runs it at its defaults (``--particles`` particles, one
chain): for ``phase`` and ``poisson`` the engines that need only a finite likelihood, for
``noise`` the hierarchical mechanisms around inner engines. Reported per engine, as
mean ± 1.96 sd / sqrt(images):

- ``sw``: sliced Wasserstein (256 projections) between the engine's equal-weight draws and as
  many reference draws, with ``floor``, the same distance between two disjoint sets of reference
  draws of that size: an engine at the floor is indistinguishable from the reference;
- ``coverage``: the fraction of reference draws inside the engine's central 90% interval,
  averaged over pixels: 0.90 for a right spread, below for too narrow or shifted, above for too
  wide;
- ``psnr``: of the engine's posterior mean against the truth (for orientation), and the
  reference's own;
- for ``noise``, ``sigma err``: the error of the engine's posterior mean of sigma in reference
  posterior sds;
- wall time per image.

References are cached (``--cache``, default ``benchmarks/.cache``), so a rerun only runs the
engines. Run::

    .venv/bin/python benchmarks/reference.py --images 3 --output benchmarks/results/reference.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from reporting import interval, write_report  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.diagnostics import ReferenceNotConverged, nuts_reference, psnr, sliced_wasserstein
from diffpost.models import GaussianObservation, operators, zoo

SIGMA = 0.05
NOISE = 0.1
HERE = Path(__file__).resolve().parent


def phase_problem(prior, x, seed):
    A = operators.PhaseRetrieval((1, 8, 8))
    g = torch.Generator().manual_seed(seed)
    y = A(x[None])[0] + SIGMA * torch.randn(A.out_shape, generator=g, dtype=x.dtype)

    def model(y=None):
        signal = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(A, signal, SIGMA), obs=y)

    return model, {"y": y}


def poisson_problem(prior, x, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
        y = dist.Poisson(10 * torch.exp(x - 1)).sample()

    def model(y=None):
        signal = pyro.sample("x", prior)
        return pyro.sample("y", dist.Poisson(10 * torch.exp(signal - 1)).to_event(3), obs=y)

    return model, {"y": y}


def noise_mask() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(1, 8, 8, generator=g) < 0.5


def noise_problem(prior, x, seed):
    A = operators.Mask(noise_mask())
    g = torch.Generator().manual_seed(seed)
    y = A(x[None])[0] + NOISE * torch.randn(A.out_shape, generator=g, dtype=x.dtype)
    scale = torch.tensor(0.5, dtype=x.dtype)
    location = torch.tensor(math.log(NOISE), dtype=x.dtype)

    def model(y=None):
        sigma = pyro.sample("sigma", dist.LogNormal(location, scale))
        signal = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(A, signal, sigma[..., None]), obs=y)

    def exact_sigma():
        grid = torch.linspace(0.02, 0.4, 600, dtype=x.dtype)
        log_density = torch.stack([prior.log_evidence(A, y, v) for v in grid]) + dist.LogNormal(
            location, scale
        ).log_prob(grid)
        weights = torch.softmax(log_density, 0)
        mean = float(weights @ grid)
        return mean, float((weights @ (grid - mean) ** 2).sqrt())

    return model, {"y": y}, exact_sigma


def engines(problem: str, particles: int) -> dict[str, tuple[posterior.Engine, int, int]]:
    """label -> (engine, chains, particles): for ``noise`` the hierarchical mechanisms in
    ``benchmarks/hierarchical.py``'s configurations, else every engine that needs only a finite
    likelihood, at its defaults."""
    if problem == "noise":
        return {
            "PMMH(Exact)": (posterior.PMMH(posterior.Exact(), num_steps=1000, warmup=300), 2, 8),
            "EM(MCGDiff, 50 steps)": (posterior.EM(posterior.MCGDiff(num_steps=50)), 2, 256),
            "Gibbs(DPS, 200 steps)": (posterior.Gibbs(posterior.DPS(num_steps=200)), 2, 400),
        }
    chosen = {}
    for name, cls in posterior.registry().items():
        if cls.infers_globals or cls.infers_two_signals:
            continue
        if set(cls.requires) <= {"finite_likelihood"}:
            chosen[name] = (cls(), 1, particles)
    return chosen


def weighted_moments(values: torch.Tensor, log_weights: torch.Tensor) -> tuple[float, float]:
    w = log_weights.exp() / log_weights.shape[0]
    mean = float((w * values).sum())
    return mean, float((w * (values - mean) ** 2).sum().sqrt())


def reference_coverage(draws: torch.Tensor, reference: torch.Tensor, level: float = 0.9) -> float:
    """Fraction of reference draws inside the engine's per-pixel central ``level`` interval."""
    flat = draws.flatten(1)
    low = torch.quantile(flat, (1 - level) / 2, dim=0)
    high = torch.quantile(flat, (1 + level) / 2, dim=0)
    ref = reference.flatten(1)
    return float(((ref >= low) & (ref <= high)).double().mean())


def checked_modes(info: dict) -> list[dict]:
    """The reference's sampled modes in basins of weight at least 0.01 (those its checks
    cover)."""
    basin: dict[int, float] = {}
    for mode in info["modes"]:
        basin[mode["group"]] = basin.get(mode["group"], 0.0) + mode["weight"]
    return [m for m in info["modes"] if m["sampled"] and basin[m["group"]] >= 0.01]


def run(args) -> list[str]:
    torch.set_num_threads(args.threads)
    prior = zoo.digits_gmm(20)
    images, _ = zoo.digits_data("heldout", dtype=torch.float64)
    makers = {"phase": phase_problem, "poisson": poisson_problem, "noise": noise_problem}
    lines = [
        "# Engines against NUTS reference posteriors (digits mixture prior, 8x8)",
        "",
        f"Command: `.venv/bin/python benchmarks/reference.py {' '.join(args.argv)}`",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; images: {args.images} held-out "
        f"digits from index {args.first_image}; {args.particles} particles per engine, one "
        "chain, engine seed 0 (the hierarchical mechanisms: chains x particles as in "
        "hierarchical.py); NUTS: "
        f"{args.warmup} warm-up and {args.samples} kept draws per chain, 4 chains per mode of "
        "each component." + (f" Left out: {', '.join(args.skip)}." if args.skip else ""),
        "",
    ]
    for name in args.problems:
        rows: dict[str, dict[str, list[float]]] = {}
        reference_rows: dict[str, list[float]] = {}
        count = args.noise_images if name == "noise" and args.noise_images else args.images
        for i in range(args.first_image, args.first_image + count):
            x = images[i]
            made = makers[name](prior, x, seed=i)
            model, kwargs = made[0], made[1]
            start = time.perf_counter()
            try:
                ref = nuts_reference(
                    model,
                    model_kwargs=kwargs,
                    num_samples=args.samples,
                    num_warmup=args.warmup,
                    evidence_draws=args.evidence_draws,
                    cache=args.cache,
                    seed=i,
                )
            except ReferenceNotConverged as error:  # no reference: reported, engines not run
                reference_rows.setdefault("refused", []).append(f"image {i}: {error}")
                print(f"{name} image {i}: reference refused: {error}", flush=True)
                continue
            reference_rows.setdefault("wall", []).append(ref.info["wall_time"])
            reference_rows.setdefault("psnr", []).append(psnr(ref.mean(), x, data_range=2))
            checked = checked_modes(ref.info)
            reference_rows.setdefault("rhat", []).append(max(m["rhat_max"] for m in checked))
            reference_rows.setdefault("ess", []).append(min(m["ess_bulk_min"] for m in checked))
            reference_rows.setdefault("modes", []).append((len(checked), len(ref.info["modes"])))
            draws = ref.get_samples(seed=1)["x"]
            draws = draws[
                torch.randperm(draws.shape[0], generator=torch.Generator().manual_seed(i))
            ]
            if name == "noise":
                mean, sd = weighted_moments(ref.values["sigma"], ref.log_weights)
                exact_mean, exact_sd = made[2]()
                reference_rows.setdefault("sigma err", []).append((mean - exact_mean) / exact_sd)
            print(f"{name} image {i}: reference {time.perf_counter() - start:.0f} s", flush=True)
            for label, (engine, chains, particles) in engines(name, args.particles).items():
                if label in args.skip:
                    continue
                start = time.perf_counter()
                try:
                    result = posterior.sample(
                        model,
                        engine,
                        num_particles=particles,
                        num_chains=chains,
                        seed=0,
                        progress=False,
                        model_kwargs=kwargs,
                    )
                except Exception as error:  # an engine failing is a result, reported
                    rows.setdefault(label, {}).setdefault("failed", []).append(str(error)[:80])
                    continue
                wall = time.perf_counter() - start
                sample = result.get_samples()["x"]
                m = min(sample.shape[0], draws.shape[0] // 2)
                row = rows.setdefault(label, {})
                row.setdefault("sw", []).append(sliced_wasserstein(sample[:m], draws[:m]))
                row.setdefault("floor", []).append(sliced_wasserstein(draws[m : 2 * m], draws[:m]))
                row.setdefault("coverage", []).append(reference_coverage(sample, draws))
                row.setdefault("psnr", []).append(psnr(result.mean(), x, data_range=2))
                row.setdefault("wall", []).append(wall)
                if name == "noise":
                    sigma = result.get_samples()["sigma"]
                    row.setdefault("sigma err", []).append((float(sigma.mean()) - mean) / sd)
                print(f"  {label}: sw {row['sw'][-1]:.3f} wall {wall:.0f} s", flush=True)
        lines += table(name, rows, reference_rows)
    return lines


TITLES = {
    "phase": "(a) phase retrieval, |F_P x| + 0.05 e",
    "poisson": "(b) Poisson counts, rate 10 exp(x - 1)",
    "noise": "(c) unknown noise level, 50% of pixels, sigma ~ LogNormal(log 0.1, 0.5)",
}


def table(name, rows, reference_rows) -> list[str]:
    sigma = name == "noise"
    lines = [f"## {TITLES[name]}", ""]
    ref = reference_rows
    for refusal in ref.get("refused", []):
        lines += [f"NUTS reference refused for {refusal}", ""]
    if "psnr" not in ref:
        return lines
    text = (
        f"NUTS reference: PSNR {interval(ref['psnr'])}, worst R-hat {max(ref['rhat']):.4f}, "
        f"least bulk ESS {min(ref['ess']):.0f}, {statistics.mean(ref['wall']):.0f} s per image; "
        "modes checked / found per image: "
        + ", ".join(f"{checked} / {found}" for checked, found in ref["modes"])
    )
    if sigma:
        text += f"; its sigma mean against quadrature: {interval(ref['sigma err'])} sd"
    lines += [text + ".", ""]
    header = "| engine | sw | floor | coverage (0.90) | psnr |"
    header += (" sigma err (sd) |" if sigma else "") + " wall (s) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for label, row in rows.items():
        if "sw" not in row:
            lines.append(f"| {label} | failed: {row['failed'][0]} |")
            continue
        cells = [
            interval(row["sw"], 3),
            interval(row["floor"], 3),
            interval(row["coverage"]),
            interval(row["psnr"], 1),
        ]
        if sigma:
            cells.append(interval(row["sigma err"]))
        cells.append(f"{statistics.mean(row['wall']):.1f}")
        failed = f" ({len(row['failed'])} failed)" if "failed" in row else ""
        lines.append(f"| {label}{failed} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="poisson,noise,phase")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--noise-images", type=int, help="images of the noise problem")
    parser.add_argument(
        "--first-image",
        type=int,
        default=0,
        help="index of the first held-out image",
    )
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000, help="NUTS draws per chain")
    parser.add_argument("--warmup", type=int, default=1000, help="NUTS warm-up per chain")
    parser.add_argument("--evidence-draws", type=int, default=8192)
    parser.add_argument("--cache", default=str(HERE / ".cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="engines left out, comma-separated")
    parser.add_argument("--output")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.problems = args.problems.split(",")
    args.skip = [name for name in args.skip.split(",") if name]
    write_report(run(args), args.output)


if __name__ == "__main__":
    main()
