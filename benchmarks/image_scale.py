"""Image-scale posterior sampling with the natural-image patch prior, next to classical baselines.

For each task of ``models.problems.IMAGE_TASKS`` (denoise, deblur, super_resolution, inpaint, ct,
mri; 256x256 default images, centre-cropped to ``--size``) and each engine (DPS, PiGDM, DDRM,
DAPS, and MCGDiff where the operator has an SVD, i.e. not for CT), one run of
``posterior.sample`` on ``problems.image_problem(task)`` with the patch prior
``zoo.natural_patches`` (PaDIS-style, :mod:`diffpost.models.patches`), reporting:

- PSNR and SSIM (``data_range=2``) of the posterior mean (``result.mean()``, clipped to
  ``[-1, 1]`` like every point estimate here);
- the coverage of the central 90% pixel-wise intervals of ``--particles`` independent draws
  (``result.independent_draws``; the fraction of pixels whose true value lies inside; draws not
  clipped), the same level read from the truth's rank among the draws
  (``diagnostics.rank_coverage``: unbiased for few draws) and the draws' pixel-wise standard
  deviation averaged over pixels;
- wall time (``info["wall_time"]``), time per engine step and per denoiser call (``info["nfe"]``
  counts calls, each on every particle of every chain; ``info["vjp"]`` those with a VJP);
- the classical baselines of :mod:`benchmarks.classical` on the same ``y`` (oracle-tuned where
  they have a parameter).

A figure per task goes to ``<output stem>/<task>.png`` (truth, measurement, the two best
classical baselines, each engine's posterior mean and pixel-wise standard deviation). The results
file is rewritten after every run, so a partial run leaves partial results. An engine that fails
is recorded with its error message instead of stopping the benchmark.

``--part memory`` runs one 256x256 DPS run (16 particles, 5 steps by default) in a subprocess and
records its peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and timings.

Run::

    .venv/bin/python -m benchmarks.image_scale --output benchmarks/results/image_scale.md
    .venv/bin/python -m benchmarks.image_scale --part memory \\
        --output benchmarks/results/image_scale_memory.md
    .venv/bin/python -m benchmarks.image_scale --size 64 --steps DPS=5 PiGDM=5 DDRM=5 DAPS=4 \\
        MCGDiff=5 --stand-in --output /tmp/image_scale_64.md     # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import classical
from benchmarks.reporting import write_report
from diffpost import posterior
from diffpost.diagnostics.scores import coverage, rank_coverage
from diffpost.models import problems, zoo
from diffpost.models.patches import patch_count

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("DPS", "PiGDM", "DDRM", "DAPS", "MCGDiff")
DEFAULT_STEPS = {"DPS": 50, "PiGDM": 50, "DDRM": 20, "DAPS": 20, "MCGDiff": 50}
#: DAPS: inner probability-flow ODE steps per annealing level (the official value); with the
#: default 20 levels a run makes 20 x 5 = 100 denoiser calls
DAPS_ODE_STEPS = 5
#: what the papers (or, where stated, the engine's docstring) use
PAPER_STEPS = {
    "DPS": "1000 DDPM steps (DPS paper)",
    "PiGDM": "100 DDIM steps (PiGDM paper)",
    "DDRM": "20 steps (DDRM paper)",
    "DAPS": "200 annealing levels x 5 ODE steps = 1000 NFE, 100 Langevin steps per level "
    "(DAPS-1K, official config)",
    "MCGDiff": "engine default 100 steps",
}
LEVEL = 0.9


def engine_for(name: str, steps: int) -> posterior.Engine:
    if name == "DAPS":
        return posterior.DAPS(num_steps=steps, ode_steps=DAPS_ODE_STEPS)
    return getattr(posterior, name)(num_steps=steps)


# ------------------------------------------------------------------------------------------
# problems and priors
# ------------------------------------------------------------------------------------------


def standin_prior(shape: tuple[int, int, int]):
    """A patch prior with the shipped network's architecture and *random* weights (seed 0): for
    checking the benchmark before ``natural_patches.pt`` exists; its results mean nothing."""
    from diffpost.models.denoisers import VDenoiser
    from diffpost.models.networks import UNet
    from diffpost.models.patches import PatchDenoiser, PatchNetwork
    from diffpost.models.priors import DiffusionPrior
    from diffpost.models.schedules import VP

    torch.manual_seed(0)
    network = {
        "channels": 1,
        "base_channels": 16,
        "channel_multipliers": (1, 2, 2),
        "condition_channels": 2,
    }  # scripts/zoo/train_patches.py's NETWORK
    net = PatchNetwork(UNet(**network), 16).eval().requires_grad_(False)
    return DiffusionPrior(PatchDenoiser(VDenoiser(net, VP(kind="cosine"))), shape)


def crop_image(task: str, size: int) -> torch.Tensor:
    """The task's default image, centre-cropped to ``size x size``."""
    image = zoo.photo(problems.IMAGE_TASKS[task][0])
    height, width = image.shape[-2:]
    if not 16 <= size <= min(height, width):
        raise ValueError(f"--size must lie in [16, {min(height, width)}]; got {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def crop_problem(task: str, size: int, *, seed: int = 0, prior=None, stand_in: bool = False):
    """``problems.image_problem(task)`` on the centre-cropped default image; ``prior`` (default:
    ``zoo.natural_patches`` of the crop's shape, or :func:`standin_prior` with ``stand_in``)."""
    image = crop_image(task, size)
    if prior is None:
        shape = tuple(image.shape)
        prior = standin_prior(shape) if stand_in else zoo.natural_patches(shape)
    return problems.image_problem(task, image, prior=prior, seed=seed)


# ------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------


def run_engine(problem, name: str, steps: int, args) -> dict:
    """One engine on one problem: scores and timings, or the error it raised."""
    engine = engine_for(name, steps)
    chains, particles = posterior.draw_layout(
        engine, args.particles, particles_per_chain=args.smc_particles
    )
    row = {
        "engine": name,
        "steps": steps,
        "layout": f"{chains}x{particles}",
        "config": repr(engine),
    }
    try:
        result = posterior.sample(
            problem.model,
            engine,
            num_particles=particles,
            num_chains=chains,
            seed=args.seed,
            model_kwargs=problem.model_kwargs,
            batch_size=args.batch_size,
            progress=False,
        )
    except Exception as error:  # recorded in the table; the benchmark goes on
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc()
        print(row["traceback"], flush=True)
        return row
    truth = problem.x_true.cpu()
    mean = result.mean().detach().to(device="cpu", dtype=truth.dtype)
    draws = result.independent_draws(args.particles)[result.latent_name].detach().cpu()
    wall, nfe = float(result.info["wall_time"]), int(result.info["nfe"])
    quality, structure = classical.score(mean.clamp(-1.0, 1.0), truth)
    std = draws.double().std(0)
    row.update(
        psnr=quality,
        ssim=structure,
        coverage=coverage(draws.double(), truth.double(), [LEVEL])[LEVEL],
        rank_coverage=rank_coverage(draws.double(), truth.double(), [LEVEL])[LEVEL],
        std=float(std.mean()),
        wall=wall,
        nfe=nfe,
        vjp=int(result.info["vjp"]),
        per_step=wall / steps,
        per_nfe=wall / max(nfe, 1),
        mean_image=mean.clamp(-1.0, 1.0),
        std_image=std.to(truth.dtype),
        finite=bool(torch.isfinite(draws).all()),
    )
    return row


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def task_table(task: str, problem, baselines, rows: list[dict]) -> list[str]:
    lines = [
        f"### {task}: {problem.name} (sigma = {float(problem.sigma):g}, "
        f"{tuple(problem.x_true.shape)}, image `{problems.IMAGE_TASKS[task][0]}`)",
        "",
        "| method | PSNR | SSIM | 90% cov. | rank cov. | mean std | wall s | steps | NFE (VJP) "
        "| s/step | s/NFE | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in baselines:
        lines.append(
            f"| classical: {b.name} | {b.psnr:.2f} | {b.ssim:.3f} | — | — | — | {b.seconds:.1f} "
            f"| — | — | — | — | {b.note} |"
        )
    for row in rows:
        if "error" in row:
            message = row["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {row['engine']} | — | — | — | — | — | — | {row['steps']} | — | — | — | "
                f"**failed**: {message} |"
            )
            continue
        if "skipped" in row:
            lines.append(
                f"| {row['engine']} | — | — | — | — | — | — | — | — | — | — | {row['skipped']} |"
            )
            continue
        note = f"chains x particles {row['layout']}"
        if not row["finite"]:
            note += "; NON-FINITE draws"
        lines.append(
            f"| {row['engine']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
            f"{row['coverage']:.3f} | {row['rank_coverage']:.3f} | {row['std']:.3f} | "
            f"{row['wall']:.0f} | {row['steps']} | "
            f"{row['nfe']} ({row['vjp']}) | {row['per_step']:.2f} | {row['per_nfe']:.2f} | {note} |"
        )
    return lines + [""]


def header(args) -> list[str]:
    prior = (
        "**STAND-IN prior with random weights (debugging only: the numbers mean nothing)**"
        if args.stand_in
        else "`zoo.natural_patches` (16x16 position-aware patch UNet, PaDIS-style)"
    )
    engine_lines = []
    for name in args.engines:
        count = steps_for(args, None, name)
        special = [
            f"{task}: {value}"
            for (task, engine), value in args.steps.items()
            if task in args.tasks and engine == name and value != count
        ]
        extra = ""
        if name == "DAPS":
            extra = (
                f" annealing levels x {DAPS_ODE_STEPS} ODE steps = "
                f"{count * DAPS_ODE_STEPS} denoiser calls, 100 Langevin steps per level"
            )
        elif name == "MCGDiff":
            extra = (
                f" steps; {args.particles} chains x {args.smc_particles} particles (one "
                "independent draw per chain, `posterior.draw_layout`), not run on CT (no SVD)"
            )
        else:
            extra = " steps"
        if special:
            extra += f" (**fewer on {', '.join(special)}**)"
        engine_lines.append(
            f"- {name}: {count}{extra}; paper/default: {PAPER_STEPS[name]}; otherwise the "
            "engine's defaults."
        )
    lines = [
        f"# Image-scale posterior sampling with the patch prior ({datetime.date.today()})",
        "",
        f"Command: `.venv/bin/python -m benchmarks.image_scale {' '.join(args.argv)}`",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores shared with other jobs, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, float32, "
        f"engines on {args.device}. "
        "Wall times are on a loaded machine: compare them within this file only.",
        "",
        f"Prior: {prior}. Images {args.size}x{args.size}"
        + (" (centre crops of the default images)" if args.size != 256 else "")
        + f"; seed {args.seed} (problem and run). {args.particles} independent draws per engine "
        f"(batch_size {args.batch_size}).",
        "",
        "Engines and adaptations (compare each with the paper's setting after it):",
        "",
        *engine_lines,
        "",
        "Metrics: PSNR/SSIM (data_range 2) of the posterior mean clipped to [-1, 1] (classical "
        "baselines clipped too); `90% cov.`: fraction of pixels whose truth lies in the central "
        f"90% interval of the {args.particles} draws (with 8 draws the interval runs between "
        "the 0.05 and 0.95 empirical quantiles, linearly interpolated, so coverage is "
        "noisy and biased low for small draw counts: about 0.72 for a calibrated posterior "
        "and 8 draws); `rank cov.`: the same level read from the truth's rank among the draws "
        "(`diagnostics.rank_coverage`, the randomised PIT), 0.90 in expectation for a "
        "calibrated posterior whatever the number of draws; `mean std`: pixel-wise std of the "
        "draws, averaged over pixels; `s/step`: wall / engine steps; `s/NFE`: wall / denoiser "
        "calls (each call evaluates every particle; the rest of a step — VJPs, operators, DAPS' "
        "Langevin likelihood gradients — is included). Classical baselines (benchmarks/"
        "classical.py) with a parameter are **oracle-tuned**: the parameter on a small grid "
        "that maximises PSNR against the true image; their wall time includes the whole grid.",
        "",
    ]
    if args.size < 80 and "mri" in args.tasks:
        lines += [
            f"Caution: at {args.size}x{args.size} `image_problem('mri')` does not keep a quarter "
            "of the k-space lines: it draws `height // 4 - 20` extra lines, a negative count "
            "that slices all but the last few of the shuffled lines (e.g. 60 of 64 lines at "
            "64x64); its name still says 64 of 256.",
            "",
        ]
    for note in args.notes:
        lines += [note, ""]
    return lines


def write_figure(task: str, problem, baselines, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    truth = problem.x_true[0].double().numpy()
    ranked = sorted(baselines, key=lambda b: -b.psnr)[:2]
    columns = 2 + len(rows)
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.6), squeeze=False)
    grey = {"cmap": "gray", "vmin": -1, "vmax": 1}

    def show(ax, image, title, **kwargs):
        ax.imshow(image, **kwargs)
        ax.set_title(title, fontsize=8)

    show(axes[0, 0], truth, "truth", **grey)
    y = problem.y.detach().double()
    if task in ("denoise", "deblur", "super_resolution"):
        show(axes[0, 1], y.reshape(y.shape[-2:]).numpy(), "measurement y", **grey)
    elif task == "inpaint":
        filled = problem.operator.adjoint(y[None])[0, 0].numpy()
        observed = problem.operator.mask.reshape(truth.shape).numpy()
        shown = np.where(observed, filled, np.nan)
        cmap = plt.get_cmap("gray").copy()
        cmap.set_bad("red")
        show(axes[0, 1], shown, "y (unobserved red)", cmap=cmap, vmin=-1, vmax=1)
    elif task == "ct":
        show(axes[0, 1], y.reshape(y.shape[-2:]).numpy(), "sinogram y", cmap="gray", aspect="auto")
    else:
        spectrum = torch.zeros(truth.shape, dtype=torch.complex128)
        kept = problem.operator.mask.flatten().nonzero().squeeze(1)
        spectrum.view(-1)[kept] = torch.complex(y[0], y[1])
        magnitude = torch.fft.fftshift(spectrum).abs().add(1e-3).log10().numpy()
        show(axes[0, 1], magnitude, "k-space |y| (log)", cmap="magma")
    for ax, b in zip(axes[1, :2], ranked, strict=False):
        show(ax, b.image[0].double().numpy(), f"{b.name} ({b.psnr:.1f} dB)", **grey)
    done = [r for r in rows if "std_image" in r]
    top = max((float(np.quantile(r["std_image"].numpy(), 0.99)) for r in done), default=1.0)
    for column, row in enumerate(rows, start=2):
        if "mean_image" not in row:
            why = "skipped" if "skipped" in row else "failed"
            for ax in axes[:, column]:
                ax.text(0.5, 0.5, f"{row['engine']}\n{why}", ha="center", va="center")
            continue
        show(
            axes[0, column],
            row["mean_image"][0].double().numpy(),
            f"{row['engine']} mean ({row['psnr']:.1f} dB)",
            **grey,
        )
        image = axes[1, column].imshow(
            row["std_image"][0].double().numpy(), cmap="viridis", vmin=0, vmax=max(top, 1e-6)
        )
        axes[1, column].set_title(f"{row['engine']} std (cov {row['coverage']:.2f})", fontsize=8)
        fig.colorbar(image, ax=axes[1, column], fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(problem.name, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def failures(sections: dict) -> list[str]:
    lines = []
    for task, (_, _, rows) in sections.items():
        for row in rows:
            if "error" in row:
                last = [line for line in row["traceback"].strip().splitlines() if line.strip()]
                where = [line.strip() for line in last if line.strip().startswith("File ")][-3:]
                lines.append(f"- {task} / {row['engine']}: `{row['error'].splitlines()[0]}`")
                lines += [f"  - at `{w}`" for w in where]
    return ["## Failures", "", *lines, ""] if lines else []


def main_part(args) -> None:
    figures = Path(args.figures) if args.figures else None
    if figures is None and args.output:
        figures = Path(args.output).with_suffix("")
    sections: dict[str, tuple] = {}

    def report(final: bool) -> None:
        lines = header(args)
        if not final:
            done = f"{len(sections)} of {len(args.tasks)}"
            lines += [f"**Partial results: {done} tasks so far (the last may be partial).**", ""]
        lines += ["## Results", ""]
        for task, (problem, baselines, rows) in sections.items():
            lines += task_table(task, problem, baselines, rows)
        lines += failures(sections)
        if final:
            write_report(lines, args.output)
        elif args.output:
            Path(args.output).write_text("\n".join(lines) + "\n")

    prior_cache = {}
    for task in args.tasks:
        shape = (1, args.size, args.size)
        if shape not in prior_cache:
            prior_cache[shape] = (
                standin_prior(shape) if args.stand_in else zoo.natural_patches(shape)
            )
        problem = crop_problem(task, args.size, seed=args.seed, prior=prior_cache[shape])
        # the engines' twin on --device: the same seed draws the same y (on the CPU, then moved)
        on_device = problem
        if args.device != "cpu":
            on_device = problems.image_problem(
                task,
                problem.x_true.to(args.device),
                prior=zoo.natural_patches(shape, device=args.device),
                seed=args.seed,
            )
        print(f"== {task}: {problem.name}", flush=True)
        try:
            baselines = classical.baselines(problem, task)
        except ImportError as error:  # a bare GPU machine without scikit-image: engines only
            print(f"  no classical baselines ({error})", flush=True)
            baselines = []
        for b in baselines:
            quality = f"PSNR {b.psnr:.2f} SSIM {b.ssim:.3f}"
            print(f"  classical {b.name}: {quality} ({b.note}, {b.seconds:.0f}s)", flush=True)
        rows: list[dict] = []
        sections[task] = (problem, baselines, rows)
        for name in args.engines:
            if name == "MCGDiff" and problem.operator.svd() is None:
                rows.append({"engine": name, "skipped": "not run: the operator has no SVD"})
                continue
            start = time.perf_counter()
            row = run_engine(on_device, name, steps_for(args, task, name), args)
            rows.append(row)
            summary = (
                row["error"].splitlines()[0]
                if "error" in row
                else f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} cov {row['coverage']:.3f} "
                f"NFE {row['nfe']} wall {row['wall']:.0f}s"
            )
            print(f"  {name}: {summary} ({time.perf_counter() - start:.0f}s)", flush=True)
            report(final=False)
        if figures is not None:
            write_figure(task, problem, baselines, rows, figures / f"{task}.png")
    report(final=True)


# ------------------------------------------------------------------------------------------
# --part memory
# ------------------------------------------------------------------------------------------


def memory_one(args) -> None:
    """The child: one DPS run; prints a JSON line with its peak RSS and timings."""
    shape = (1, args.size, args.size)
    prior = standin_prior(shape) if args.stand_in else zoo.natural_patches(shape)
    problem = crop_problem("inpaint", args.size, seed=args.seed, prior=prior)
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = args.steps.get((None, "DPS"), 5)
    result = posterior.sample(
        problem.model,
        posterior.DPS(num_steps=steps),
        num_particles=args.particles,
        seed=args.seed,
        model_kwargs=problem.model_kwargs,
        batch_size=args.batch_size,
        progress=False,
    )
    wall, nfe = float(result.info["wall_time"]), int(result.info["nfe"])
    report = {
        "setup_mib": setup,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall": wall,
        "steps": steps,
        "nfe": nfe,
        "vjp": int(result.info["vjp"]),
        "per_step": wall / steps,
        "per_nfe": wall / max(nfe, 1),
    }
    print(json.dumps(report), flush=True)


def memory_part(args) -> None:
    steps = args.steps.get((None, "DPS"), 5)
    command = [sys.executable, "-m", "benchmarks.image_scale", "--part", "memory-one"]
    command += ["--size", str(args.size), "--particles", str(args.particles)]
    command += ["--steps", f"DPS={steps}", "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.batch_size is not None:
        command += ["--batch-size", str(args.batch_size)]
    if args.stand_in:
        command.append("--stand-in")
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"the child failed:\n{run.stderr[-4000:]}")
    child = json.loads(run.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    patches = patch_count(args.size, args.size, 16)
    lines = [
        f"# Peak memory of one image-scale run ({datetime.date.today()})",
        "",
        f"Command: `.venv/bin/python -m benchmarks.image_scale {' '.join(args.argv)}`",
        "",
        f"DPS ({steps} steps, every step one denoiser call with a VJP), inpainting (30% of the "
        f"pixels), {args.size}x{args.size}, {args.particles} particles in one chain, batch_size "
        + (
            "None (all particles in one denoiser call), "
            if args.batch_size is None
            else f"{args.batch_size}, "
        )
        + ("STAND-IN random-weight prior" if args.stand_in else "`zoo.natural_patches`")
        + f", {args.threads} torch thread(s), CPU, float32, on {platform.node()} "
        f"({os.cpu_count()} cores shared with other jobs). The run is a fresh subprocess; its "
        "peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` in the parent. At most "
        f"{patches} 16x16 patches per image per call, {patches * args.particles} per call in all.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| peak RSS of the child (MiB) | {peak:.0f} |",
        f"| its RSS after loading the prior and the problem (MiB) | {child['setup_mib']:.0f} |",
        f"| so the run itself added (MiB) | {peak - child['setup_mib']:.0f} |",
        f"| wall time of the run (s) | {child['wall']:.1f} |",
        f"| NFE (VJP) | {child['nfe']} ({child['vjp']}) |",
        f"| s per step | {child['per_step']:.2f} |",
        f"| s per denoiser call (with its VJP) | {child['per_nfe']:.2f} |",
        f"| s per particle-image per call | {child['per_nfe'] / args.particles:.3f} |",
        f"| whole child process, incl. start-up (s) | {elapsed:.0f} |",
        "",
    ]
    write_report(lines, args.output)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def _steps(text: str) -> tuple[tuple[str | None, str], int]:
    """``ENGINE=N`` (every task) or ``TASK:ENGINE=N`` (one task)."""
    key, _, value = text.partition("=")
    task, _, name = key.rpartition(":")
    if (
        name not in ENGINES
        or (task and task not in problems.IMAGE_TASKS)
        or not value.isdigit()
        or int(value) < 1
    ):
        raise argparse.ArgumentTypeError(
            f"expected ENGINE=N or TASK:ENGINE=N with ENGINE in {ENGINES}, TASK in "
            f"{tuple(problems.IMAGE_TASKS)}; got {text!r}"
        )
    return (task or None, name), int(value)


def steps_for(args, task: str | None, name: str) -> int:
    """The steps of engine ``name`` on ``task``: a per-task ``--steps``, else a global one, else
    :data:`DEFAULT_STEPS`."""
    return args.steps.get((task, name), args.steps.get((None, name), DEFAULT_STEPS[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["main", "memory", "memory-one"], default="main")
    parser.add_argument("--tasks", nargs="+", default=list(problems.IMAGE_TASKS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--particles",
        type=int,
        default=None,
        help="independent draws per engine (default 8; --part memory: 16)",
    )
    parser.add_argument(
        "--smc-particles",
        type=int,
        default=4,
        help="particles per chain of MCGDiff (one independent draw per chain)",
    )
    parser.add_argument(
        "--steps",
        nargs="*",
        type=_steps,
        default=[],
        metavar="[TASK:]ENGINE=N",
        help=f"steps per engine, on every task or on one (defaults {DEFAULT_STEPS}; DAPS: "
        f"annealing levels, each with {DAPS_ODE_STEPS} ODE steps)",
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device", default="cpu", help="where the engines run (e.g. cuda; baselines on the CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="a random-weight patch prior instead of zoo.natural_patches (debugging only)",
    )
    parser.add_argument(
        "--note", action="append", dest="notes", default=[], help="a line for the header"
    )
    parser.add_argument("--figures", default=None, help="figure folder (default: output stem)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.steps = dict(args.steps)
    if args.particles is None:
        args.particles = 16 if args.part in ("memory", "memory-one") else 8
    unknown = set(args.tasks) - set(problems.IMAGE_TASKS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; known: {list(problems.IMAGE_TASKS)}")
    torch.set_num_threads(args.threads)
    if args.part == "memory-one":
        memory_one(args)
    elif args.part == "memory":
        memory_part(args)
    else:
        main_part(args)


if __name__ == "__main__":
    main()
