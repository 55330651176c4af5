"""Phase retrieval on the shipped digits prior: DAPS (and the other decoupled engines) against DPS.

Each held-out digit ``x`` (``diffpost.models.zoo.digits_data("heldout")``, values in ``[-1, 1]``;
8x8, or 16x16 with ``--size 16``) is observed as ``y = |F_P x| + 0.05 e``, the magnitude of its 2x
oversampled unitary Fourier transform (:class:`diffpost.models.operators.PhaseRetrieval`, DPS/DAPS'
noise level), and each engine draws ``--samples`` posterior samples per image under the UNet prior
``diffpost.models.zoo.digits()`` (``digits16()`` for 16x16).

Ambiguities. ``|F_P x|`` is unchanged by ``x -> -x`` and by the conjugate flip ``x -> x[::-1,
::-1]`` (a 180-degree rotation; its shift inside the padded frame changes only the phase). A
translation is *not* an ambiguity here: the digits' background is -1, not 0, so every image fills
its frame. Each draw is therefore replaced by the member of its 4-element orbit closest to the
truth before any statistic (the standard "up to trivial ambiguities" protocol; it uses the truth,
as the DPS paper's best-of-4 does). Reported per engine, mean ± 1.96 sd / sqrt(images):

- PSNR (data range 2) of the posterior mean of the aligned draws, and of the best draw;
- failed: the images whose posterior-mean PSNR is below 20 dB (a wrong reconstruction, not a
  blurred one), and the per-image PSNRs of the means;
- failed draws: the single aligned draws below 20 dB, over all images (a draw in a wrong mode);
- spread: the per-pixel standard deviation of the aligned draws, averaged over pixels;
- the data misfit ``||y - |F_P x||| / sqrt(m)`` of the draws over sigma (about 1 for draws that
  explain the data, as the truth does);
- NFE, VJP and wall time per image.

Engines. Each engine has its defaults, and DAPS and DPS also their official phase-retrieval
configurations (DPS ``scale = 1``; DAPS ``tau = 0.01`` and the phase-retrieval step), which is
what the DAPS paper compares. The figure shows, unless ``--figure-images`` says otherwise, the
three images where the first engine's posterior mean beats the second's most and the three where
it loses most: a choice made from the results, stated in the output.

Run (the recorded results give the exact command; ``--workers 2`` runs two engines at once)::

    .venv/bin/python benchmarks/phase_retrieval.py --size 16 --images 60 --samples 8 \\
        --engines 'DAPS (official PR config),DPS (official PR config)' --workers 2 \\
        --output benchmarks/results/phase_retrieval_16.md \\
        --figure benchmarks/results/phase_retrieval_16.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import math
import os
import platform
import statistics
import time

import pyro
import torch
from reporting import interval  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.diagnostics.scores import psnr
from diffpost.models import GaussianObservation, operators, zoo

SIGMA = 0.05
#: an image counts as failed when the PSNR of its posterior mean is below this (dB)
FAILED_BELOW = 20.0

#: label -> (family module, engine class name, keyword arguments)
ENGINES = {
    "DAPS": ("langevin", "DAPS", {}),
    "DAPS (official PR config)": ("langevin", "DAPS", {"data_std": 0.01, "step_size": 0.5}),
    "ScoreALD": ("langevin", "ScoreALD", {}),
    "DCDP (official PR config)": (
        "langevin",
        "DCDP",
        {
            "num_steps": 200,
            "purification_start": 1.0,
            "purification_end": 0.02,
            "consistency_steps": 100,
        },
    ),
    "DPS": ("explicit", "DPS", {}),
    "DPS (official PR config)": ("explicit", "DPS", {"scale": 1.0}),
}


def make_engine(label: str) -> posterior.Engine | None:
    """The engine of ``label``, or ``None`` (with a message) when its family is not available."""
    family, name, kwargs = ENGINES[label]
    try:
        cls = getattr(importlib.import_module(f"posterior.engines.{family}"), name)
    except (ImportError, AttributeError) as error:
        print(f"skipping {label}: {error}", flush=True)
        return None
    return cls(**kwargs)


def orbit(x: torch.Tensor) -> torch.Tensor:
    """The trivial ambiguities of phase retrieval for ``(S, 1, H, W)`` draws:
    ``(4, S, 1, H, W)``."""
    flipped = x.flip(-1, -2)
    return torch.stack([x, -x, flipped, -flipped])


def align(draws: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each draw replaced by the member of its orbit closest to ``truth``, ``(S, 1, H, W)``."""
    candidates = orbit(draws)
    errors = (candidates - truth).pow(2).flatten(2).sum(-1)  # (4, S)
    best = errors.argmin(0)
    return candidates[best, torch.arange(draws.shape[0])]


def setting(args) -> tuple[str, torch.Tensor, operators.PhaseRetrieval, list[torch.Tensor]]:
    """The prior's name, the ``(M, 1, S, S)`` truths, the operator and the ``M`` noisy data."""
    prior_name = "digits" if args.size == 8 else "digits16"
    images, _ = zoo.digits_data("heldout", size=args.size, device=args.device)
    images = images[: args.images]
    operator = operators.PhaseRetrieval((1, args.size, args.size), oversampling=args.oversampling)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    measurements = [
        operator(x[None])[0] + SIGMA * torch.randn(operator.out_shape, generator=generator,
                                                   device=args.device)
        for x in images
    ]  # fmt: skip
    return prior_name, images, operator, measurements


def run_engine(label: str, args) -> tuple[dict | None, list]:
    """One engine on every image: its statistics and its ``(mean, sd)`` images (own process)."""
    torch.set_num_threads(args.threads)
    engine = make_engine(label)
    if engine is None:
        return None, []
    prior_name, images, operator, measurements = setting(args)
    prior = getattr(zoo, prior_name)(device=args.device)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, SIGMA), obs=y)

    keys = ("mean", "best", "draws", "spread", "misfit", "nfe", "vjp", "wall")
    row, means = {key: [] for key in keys}, []
    for index, (truth, y) in enumerate(zip(images, measurements, strict=True)):
        start = time.perf_counter()
        result = posterior.sample(
            model, engine, num_particles=args.samples, seed=args.seed + index,
            progress=False, device=args.device, model_kwargs={"y": y},
        )  # fmt: skip
        row["wall"].append(time.perf_counter() - start)
        draws = result.values["x"][0].float()
        aligned = align(draws, truth)
        mean = aligned.mean(0)
        means.append((mean, aligned.std(0)))
        row["mean"].append(psnr(mean, truth, data_range=2.0))
        row["draws"].append([psnr(draw, truth, data_range=2.0) for draw in aligned])
        row["best"].append(max(row["draws"][-1]))
        row["spread"].append(float(aligned.std(0).mean()))
        misfit = (y - operator(draws)).flatten(1).norm(dim=1) / math.sqrt(y.numel())
        row["misfit"].append(float(misfit.mean()) / SIGMA)
        row["nfe"].append(result.info["nfe"])
        row["vjp"].append(result.info["vjp"])
    return row, means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="held-out digits (the first ones)")
    parser.add_argument("--samples", type=int, default=8, help="posterior draws per image")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated labels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, choices=(8, 16), default=8,
        help="8: zoo.digits() on the 8x8 digits; 16: zoo.digits16() on 16x16 ones",
    )  # fmt: skip
    parser.add_argument(
        "--oversampling", type=float, default=2.0,
        help="padded-to-original size ratio of the Fourier transform (2: the papers' setting)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (8x8 images gain nothing from more, and lose much on shared cores)",
    )
    parser.add_argument("--output", default=None, help="markdown file for the table")
    parser.add_argument("--figure", default=None, help="png file for the image grid")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="engines run in this many processes at once (each with --threads threads)",
    )  # fmt: skip
    parser.add_argument(
        "--figure-images", default=None,
        help="comma-separated image indices for the figure (default: the 3 where the first "
        "engine beats the second most and the 3 where it loses most)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior_name, images, operator, measurements = setting(args)

    labels = [label.strip() for label in args.engines.split(",")]
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        outcomes = list(pool.map(run_engine, labels, [args] * len(labels)))
    rows = {label: row for label, (row, _) in zip(labels, outcomes, strict=True) if row is not None}
    means = {
        label: mean for label, (row, mean) in zip(labels, outcomes, strict=True) if row is not None
    }
    for label, row in rows.items():
        print(f"{label}: mean PSNR {interval(row['mean'])}", flush=True)
        for index, values in enumerate(row["draws"]):
            print(f"  image {index}: " + " ".join(f"{value:.1f}" for value in values), flush=True)

    truth_misfit = [
        float((y - operator(x[None])[0]).norm() / math.sqrt(y.numel())) / SIGMA
        for x, y in zip(images, measurements, strict=True)
    ]
    lines = [
        "# Phase retrieval on the shipped digits prior",
        "",
        (
            f"Recorded {datetime.date.today()} on {platform.machine()} {args.device} "
            f"({os.cpu_count()} cores), torch {torch.__version__}; command: `.venv/bin/python "
            f"benchmarks/phase_retrieval.py --images {args.images} --samples {args.samples} "
            f"--engines '{args.engines}' --device {args.device} --seed {args.seed} "
            f"--threads {args.threads} --size {args.size} --oversampling {args.oversampling:g} "
            f"--workers {args.workers}`."
        ),
        "",
        (
            f"Prior `diffpost.models.zoo.{prior_name}()` (UNet, cosine VP); the first "
            f"{args.images} held-out {args.size}x{args.size} digits; `y = |F_P x| + {SIGMA} e`, "
            f"oversampling {args.oversampling:g}. {args.samples} draws per image, each aligned to "
            "the truth over the 4 trivial ambiguities (sign, 180-degree rotation) before any "
            "statistic. Mean ± 1.96 sd/sqrt(images). Misfit: `||y - |F_P x||| / sqrt(m)` over "
            f"sigma (the truth's: {statistics.mean(truth_misfit):.2f}). Spread: per-pixel sd of "
            "the aligned draws, mean over pixels (images span [-1, 1])."
        ),
        "",
        (
            "| engine | PSNR of mean (dB) | PSNR of best draw (dB) | failed | failed draws | "
            "spread | misfit | NFE | VJP | wall s / image |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        draws = [value for image in row["draws"] for value in image]
        lines.append(
            f"| {label} | {interval(row['mean'])} | {interval(row['best'])} | "
            f"{sum(value < FAILED_BELOW for value in row['mean'])}/{len(row['mean'])} | "
            f"{sum(value < FAILED_BELOW for value in draws)}/{len(draws)} | "
            f"{interval(row['spread'])} | {interval(row['misfit'])} | "
            f"{statistics.mean(row['nfe']):.0f} | {statistics.mean(row['vjp']):.0f} | "
            f"{statistics.mean(row['wall']):.1f} |"
        )
    lines.append("\nPer-image PSNR of the posterior mean (dB):\n")
    for label, row in rows.items():
        lines.append(f"- {label}: " + ", ".join(f"{value:.1f}" for value in row["mean"]))
    for label, (module, name, kwargs) in ENGINES.items():
        if label in rows:
            lines.append(f"\n`{label}`: `diffpost.posterior.engines.{module}.{name}(**{kwargs})`.")
    if args.figure:
        shown = (
            [int(index) for index in args.figure_images.split(",")]
            if args.figure_images
            else contrasting_images(list(rows.values()))
        )
        lines.append(f"\nFigure images: {', '.join(map(str, shown))}.")
        save_figure(args.figure, shown, images, measurements, rows, means)
    print("\n".join(lines), flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def contrasting_images(rows: list[dict], per_side: int = 3) -> list[int]:
    """The images where the first engine beats the second most, and where it loses most.

    With one engine, the first ``2 * per_side`` images. Sorted by index.
    """
    if len(rows) < 2:
        return list(range(min(2 * per_side, len(rows[0]["mean"]))))
    gaps = [first - second for first, second in zip(rows[0]["mean"], rows[1]["mean"], strict=True)]
    order = sorted(range(len(gaps)), key=gaps.__getitem__)
    return sorted(set(order[:per_side] + order[-per_side:]))


def save_figure(path: str, shown: list[int], images, measurements, rows, means) -> None:
    """Truth, log |y|, and each engine's aligned posterior mean (titled with its PSNR) and sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_titles = ["truth", "log(0.1 + y)"]
    for label in means:
        row_titles += [f"{label}\nmean", f"{label}\nsd"]
    figure, axes = plt.subplots(
        len(row_titles),
        len(shown),
        figsize=(1.3 * len(shown) + 1.8, 1.3 * len(row_titles)),
        squeeze=False,
    )
    for j, index in enumerate(shown):
        panels = [
            (images[index][0], -1, 1),
            (torch.log(0.1 + measurements[index][0].clamp_min(0)), None, None),
        ]
        for label in means:
            mean, sd = means[label][index]
            panels += [(mean[0], -1, 1), (sd[0], 0, 1)]
        axes[0, j].set_title(f"image {index}", fontsize=7)
        for offset, label in enumerate(means):
            axes[2 + 2 * offset, j].set_title(f"{rows[label]['mean'][index]:.1f} dB", fontsize=7)
        for i, (panel, low, high) in enumerate(panels):
            axes[i, j].imshow(panel.detach().cpu().numpy(), cmap="gray", vmin=low, vmax=high)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, title in enumerate(row_titles):
        axes[i, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
