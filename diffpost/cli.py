"""Command line: ``diffpost demo`` runs the default problem end to end.

The default problem inpaints and denoises a held-out digit with the shipped 8x8 digits prior
(:func:`diffpost.models.zoo.digits`): the top half of the image is observed with Gaussian noise
(``sigma = 0.1``), the bottom half is hidden. An SMC engine (MCGDiff), DPS and DAPS run side by
side, and the demo writes into its output folder

- ``<engine>.nc``: each run's ArviZ DataTree (with the truth as ``constant_data``),
- ``<engine>.png``: its image grid (truth, measurement, posterior mean, pixel-wise std, interval
  width, samples),
- ``compare.png`` and ``summary.txt``: the side-by-side comparison (NFE, VJP, wall time, PSNR and
  SSIM of the posterior mean, coverage of the 90% intervals read two ways, CRPS),

and prints the summary. It takes about a minute on two CPU cores; ``--num-steps`` runs every engine
with fewer steps (a quick check of an installation). ``python -m diffpost`` is the same command.

``diffpost demo --problem camera`` runs an image-scale problem instead: the held-out 256x256
``camera`` photograph (``--task``: any of :data:`diffpost.models.problems.IMAGE_TASKS`, 4x
super-resolution by default; ``ct`` and ``mri`` use their own images) under the natural-image
patch prior (:func:`diffpost.models.zoo.natural_patches`), with DDRM and PiGDM and 8 draws each
(``--size 128`` crops the image's centre for a quicker run). Expect a few minutes on two CPU
cores at 256x256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffpost import __version__, posterior

#: demo engine name -> (engine class name in :mod:`diffpost.posterior`, settings); fewer steps
#: than the papers' defaults (MCGDiff 100, DPS 1000) keep the demo near a minute on two CPU cores
ENGINES = {
    "mcgdiff": ("MCGDiff", {"num_steps": 50}),
    "dps": ("DPS", {"num_steps": 250}),
    "daps": ("DAPS", {}),
}


#: the image-scale demo's engines: DDRM at its paper's 20 steps, PiGDM at 50 (paper: 100)
IMAGE_ENGINES = {
    "ddrm": ("DDRM", {"num_steps": 20}),
    "pigdm": ("PiGDM", {"num_steps": 50}),
}


def image_task(task: str, size: int, seed: int):
    """The image-scale demo's problem (:func:`diffpost.models.problems.image_problem`), its
    default image centre-cropped to ``size``.

    Returns:
        ``(model, x_true, y, operator, problem)``.
    """
    from diffpost.models import problems, zoo

    if task not in problems.IMAGE_TASKS:
        raise SystemExit(f"--task must be one of {sorted(problems.IMAGE_TASKS)}; got {task!r}")
    if not 16 <= size <= 256 or (task == "super_resolution" and size % 4):
        raise SystemExit(
            f"--size must be in [16, 256] (a multiple of 4 for super_resolution); got {size}"
        )
    image = zoo.photo(problems.IMAGE_TASKS[task][0])
    start = (256 - size) // 2
    image = image[:, start : start + size, start : start + size]
    problem = problems.image_problem(task, image, seed=seed)
    return problem.model, problem.x_true, problem.y, problem.operator, problem


def digits_inpainting(digit: int, sigma: float):
    """The demo's problem: a held-out digit, its top half observed with noise ``sigma``.

    Returns:
        ``(model, x_true, y, operator)`` with ``x_true`` of shape ``(1, 8, 8)``.
    """
    import pyro
    import torch

    from diffpost.models import GaussianObservation, operators, zoo

    images, _ = zoo.digits_data("heldout")
    if not 0 <= digit < images.shape[0]:
        raise SystemExit(f"--digit must be in [0, {images.shape[0]}); got {digit}")
    x_true = images[digit]
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    operator = operators.Mask(mask)
    generator = torch.Generator().manual_seed(digit)
    clean = operator(x_true)
    y = clean + sigma * torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    prior = zoo.digits()

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    return model, x_true, y, operator


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from diffpost import diagnostics

    catalogue = ENGINES if args.problem == "digits" else IMAGE_ENGINES
    chosen = args.engines or ",".join(catalogue)
    names = [name.strip().lower() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(names) - set(catalogue))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose among {sorted(catalogue)}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.problem == "digits":
        model, x_true, y, operator = digits_inpainting(args.digit, args.sigma)
        description = (
            f"held-out digit {args.digit} (shipped digits prior), top half observed, "
            f"sigma = {args.sigma}"
        )
        draws = args.num_draws or 32
    else:
        model, x_true, y, operator, problem = image_task(args.task, args.size, args.seed)
        description = f"{problem.name}, {args.size}x{args.size}, natural-image patch prior"
        draws = args.num_draws or 8
    from diffpost.models import operators

    measurement = operator.adjoint(y)  # zero-filled, back-projected, ...: what y shows
    if isinstance(operator, operators.Mask):
        measurement[~operator.mask] = float("nan")

    results = {}
    for name in names:
        class_name, settings = catalogue[name]
        if args.num_steps is not None:
            settings = {**settings, "num_steps": args.num_steps}
        engine = getattr(posterior, class_name)(**settings)
        # a particle filter gives one independent draw per filter: many small filters; the
        # others run four chains of independent draws
        chains, particles = posterior.draw_layout(
            engine, draws, args.particles_per_filter, num_chains=4
        )
        print(f"running {class_name}: {chains} chains x {particles} particles", flush=True)
        result = posterior.sample(
            model,
            engine,
            num_particles=particles,
            num_chains=chains,
            seed=args.seed,
            progress=not args.quiet,
            model_kwargs={"y": y},
            batch_size=args.batch_size,
        )
        results[class_name] = result
        tree = result.to_datatree(x_true=x_true)
        diagnostics.save_datatree(tree, output / f"{name}.nc")
        figure = diagnostics.plot_image_grid(result, truth=x_true, measurement=measurement)
        figure.suptitle(f"{class_name}: {description}")
        figure.savefig(output / f"{name}.png", dpi=110, bbox_inches="tight")

    table, figure = diagnostics.compare(results, truth=x_true, level=0.9)
    figure.savefig(output / "compare.png", dpi=110, bbox_inches="tight")
    columns = [
        c
        for c in ("nfe", "vjp", "wall_time", "psnr", "ssim", "coverage", "rank_coverage", "crps")
        if c in table
    ]
    text = "\n".join(
        [
            f"problem: {description}; seed {args.seed}",
            "coverage: fraction of pixels inside their central 90% posterior interval "
            "(biased low for few draws)",
            "rank_coverage: the same level read from each true pixel's rank among the "
            "independent draws (0.90 in expectation for a calibrated posterior)",
            "",
            table[columns].to_string(float_format=lambda v: f"{v:.3f}"),
        ]
    )
    (output / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {', '.join(sorted(p.name for p in output.iterdir()))} into {output}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffpost {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="inpaint a held-out digit (or restore a 256x256 photograph) with several engines "
        "and write the results",
    )
    demo.add_argument(
        "--problem",
        choices=("digits", "camera"),
        default="digits",
        help="digits: 8x8 digit inpainting (default); camera: an image-scale task (--task)",
    )
    demo.add_argument(
        "--task",
        default="super_resolution",
        help="with --problem camera: denoise, deblur, super_resolution (default), inpaint, ct, mri",
    )
    demo.add_argument(
        "--size", type=int, default=256, help="with --problem camera: centre crop (default 256)"
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="particles per denoiser call (memory; default: all at once)",
    )
    demo.add_argument(
        "--output", default="demo-output", help="output folder (default ./demo-output)"
    )
    demo.add_argument(
        "--engines",
        default=None,
        help=f"comma-separated, among {', '.join(ENGINES)} for digits (default: all) and "
        f"{', '.join(IMAGE_ENGINES)} for camera (default: both)",
    )
    demo.add_argument("--digit", type=int, default=0, help="index of the held-out digit")
    demo.add_argument("--sigma", type=float, default=0.1, help="measurement noise")
    demo.add_argument(
        "--num-draws",
        type=_positive_int,
        default=None,
        help="posterior draws per engine (default 32 for digits, 8 for camera)",
    )
    demo.add_argument(
        "--particles-per-filter", type=_positive_int, default=8, help="particles of each SMC filter"
    )
    demo.add_argument(
        "--num-steps",
        type=_positive_int,
        default=None,
        help="steps of every engine (default: MCGDiff 50, DPS 250, DAPS its default 200 for "
        "digits; DDRM 20, PiGDM 50 for camera)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
