"""The MCGDiff Gaussian-mixture benchmark for every engine that can run it.

For each ``(d, d_y)``, seed and number of steps, the problem of
:func:`diffpost.models.problems.gaussian_mixture_benchmark` is solved by each engine and its
``--draws`` samples are compared with as many exact posterior draws by sliced Wasserstein. The noise
floor is the same distance between two exact sets. The table reports mean ± 1.96 sd / sqrt(seeds)
over seeds (the paper's CLT intervals), NFE and wall time per run, with the paper's own MCGDiff,
DDRM, DPS and RNVP columns beside.

How a particle filter makes its sample set (``--layout``):

- ``pooled`` (the official benchmark script, ``gmm.py`` of the authors' repositories): ``draws /
  particles`` filters of ``--particles`` particles, every particle kept after a final resampling
  by its weight (run with ``--particles 1000 --draws 2000``: two filters of 1000);
- ``filters``: ``--draws`` independent filters, one draw each (independent draws; costs ``draws x
  particles`` particles).

Unweighted engines run all ``--draws`` samples as one ensemble either way.

Metric (``--metric``): ``paper`` is the official estimator, the mean over 100 random directions of
the 1-D Wasserstein-1 distance (scipy's ``wasserstein_distance``), i.e. ``SW_1`` with 100
projections; ``sw2`` is ``SW_2`` with 256 projections, which punishes mass on a wrong far mode
much more (a fraction ``q`` of mass ``D`` away costs ``q D`` in ``W_1`` but ``sqrt(q) D`` in
``W_2``), so its values are not comparable with the paper's columns.

Run (the recorded results in ``benchmarks/results/`` give their exact commands)::

    .venv/bin/python benchmarks/gmm.py --seeds 20 --steps 20 --layout pooled --particles 1000 \
        --draws 2000 --engines MCGDiff --output benchmarks/results/gmm.md
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import os
import platform
import statistics
import time

import torch
from reporting import interval  # benchmarks/reporting.py (the script's own folder)

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models.problems import gaussian_mixture_benchmark, mcgdiff_schedule
from diffpost.models.schedules import RectifiedFlow
from diffpost.posterior.engines.smc.core import SMCEngine

#: the paper's Table (v2, "Sliced Wasserstein, GM"): (d, d_y) -> (MCGDiff, DDRM, DPS, RNVP), 20
#: steps
PAPER = {
    (8, 1): ("1.43 ± 0.55", "5.88 ± 1.16", "4.86 ± 1.01", "9.43 ± 0.99"),
    (8, 2): ("0.49 ± 0.24", "5.20 ± 1.32", "5.79 ± 1.96", "8.93 ± 1.29"),
    (8, 4): ("0.38 ± 0.25", "2.51 ± 1.29", "3.48 ± 1.52", "6.71 ± 1.54"),
    (80, 1): ("1.39 ± 0.45", "5.64 ± 1.10", "4.98 ± 1.14", "6.86 ± 0.88"),
    (80, 2): ("0.67 ± 0.24", "7.07 ± 1.35", "5.10 ± 1.23", "7.79 ± 1.50"),
    (80, 4): ("0.28 ± 0.14", "7.81 ± 1.48", "4.28 ± 1.26", "7.95 ± 1.61"),
    (800, 1): ("2.40 ± 1.00", "7.44 ± 1.15", "6.49 ± 1.16", "7.74 ± 1.34"),
    (800, 2): ("1.31 ± 0.60", "8.95 ± 1.12", "6.88 ± 1.01", "8.75 ± 1.02"),
    (800, 4): ("0.47 ± 0.19", "8.39 ± 1.48", "5.51 ± 1.18", "7.81 ± 1.63"),
}


#: the prior's diffusion by ``--schedule`` name
SCHEDULES = {"mcgdiff": mcgdiff_schedule, "rectified_flow": RectifiedFlow}

#: engines that can run a noisy linear Gaussian problem, in table order
ENGINE_NAMES = (
    "MCGDiff", "TDS", "FPS", "FKSteering", "DDRM", "DPS", "PiGDM", "MMPS", "SNIPS", "DDS",
    "DiffPIR", "DSG", "DPPS", "MCG", "ScoreSDE", "FlowChef", "FlowDPS", "ScoreALD", "DAPS", "DCDP",
    "REDDiff", "RSLD", "FlowVI",
)  # fmt: skip
FAMILIES = ("smc", "explicit", "langevin", "variational")


def engine_class(name: str) -> type[posterior.Engine] | None:
    """The engine class ``name`` from :mod:`diffpost.posterior` (or its family package), or
    ``None``."""
    found = getattr(posterior, name, None)
    for family in FAMILIES:
        if found is not None:
            break
        try:
            module = importlib.import_module(f"posterior.engines.{family}")
        except ImportError:
            continue
        found = getattr(module, name, None)
    return found


#: engines whose ``num_steps`` is not a number of diffusion steps run once per problem, with
#: these settings: FlowVI as the MCGDiff paper's RNVP baseline (200 Adam iterations at 1e-3,
#: batch 10, no warm-up; its official 20 000-step schedule does not move in 20 or 100 steps),
#: SNIPS on its own 500 noise levels (its step size assumes them), RED-diff and RSLD with their
#: official optimiser step counts
FIXED = {
    "FlowVI": {
        "num_steps": 200,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "batch_size": 10,
        "num_flow_steps": 5,
        "hidden_features": 128,
    },
    "SNIPS": {},
    "REDDiff": {},
    "RSLD": {},
}


def engines(num_steps: int, names: list[str], first: bool) -> dict[str, posterior.Engine]:
    """The engines among ``names`` that exist, at ``num_steps`` (the :data:`FIXED` ones only
    with ``first``, at their own settings)."""
    found = {}
    for label in names:
        name, options = engine_options(label)
        cls = engine_class(name)
        if cls is None:
            continue
        if name in FIXED:
            if first:
                found[label] = cls(**FIXED[name], **options)
        else:
            found[label] = cls(num_steps=num_steps, **options)
    return found


def engine_options(label: str) -> tuple[str, dict[str, object]]:
    """``"MCGDiff(grid=log_ratio;eta=0.6)" -> ("MCGDiff", {"grid": "log_ratio", "eta": 0.6})``:
    an engine name with settings (numbers read as numbers, the rest as strings)."""
    if "(" not in label:
        return label, {}
    name, inside = label.split("(", 1)
    options: dict[str, object] = {}
    for item in inside.rstrip(")").split(";"):
        key, value = item.split("=", 1)
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return name, options


#: name -> (description, sliced_wasserstein keyword arguments)
METRICS = {
    "paper": ("SW_1, the mean over 100 random directions of the 1-D W_1 (the official estimator)",
              {"num_projections": 100, "p": 1}),
    "sw2": ("SW_2 over 256 random directions (not comparable with the paper's columns)",
            {"num_projections": 256, "p": 2}),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="8,80,800")
    parser.add_argument("--obs-dims", default="1,2,4")
    parser.add_argument("--steps", default="20,100")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=2000, help="samples per engine and run")
    parser.add_argument("--particles", type=int, default=1000, help="particles per filter")
    parser.add_argument("--layout", choices=("pooled", "filters"), default="pooled")
    parser.add_argument("--metric", choices=tuple(METRICS), default="paper")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINE_NAMES),
        help="comma-separated; settings in brackets, e.g. MCGDiff(grid=log_ratio;eta=0.6)",
    )
    parser.add_argument("--output", default=None, help="markdown file to write the table to")
    parser.add_argument(
        "--compare-to",
        default=None,
        help="an engine label of --engines: adds a column counting the problems on which each "
        "engine is closer than it",
    )
    parser.add_argument(
        "--schedule",
        choices=("mcgdiff", "rectified_flow"),
        default="mcgdiff",
        help="the prior's diffusion: the paper's discrete VP, or rectified flow (flow engines)",
    )
    args = parser.parse_args()
    if args.compare_to is not None and args.compare_to not in args.engines.split(","):
        parser.error(f"--compare-to {args.compare_to!r} is not one of --engines")
    if args.layout == "pooled" and args.draws % args.particles:
        parser.error("--layout pooled needs --draws to be a multiple of --particles")
    description, metric = METRICS[args.metric]
    sampling = (
        f"{args.draws // args.particles} filters of {args.particles} particles, all kept after a "
        "final resampling"
        if args.layout == "pooled"
        else f"{args.draws} filters of {args.particles} particles, one draw each"
    )
    lines = [
        "# Gaussian-mixture benchmark (MCGDiff paper, section 7 of the reference)",
        "",
        f"Recorded {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__}; command: `.venv/bin/python benchmarks/gmm.py --dims "
        f"{args.dims} --obs-dims {args.obs_dims} --steps {args.steps} --seeds {args.seeds} --draws "
        f"{args.draws} --particles {args.particles} --layout {args.layout} --metric {args.metric} "
        f"--engines {args.engines} --schedule {args.schedule}"
        + (f" --compare-to {args.compare_to}" if args.compare_to else "")
        + "`.",
        "",
        f"Metric: {description}, between {args.draws} engine draws and {args.draws} exact "
        f"posterior draws; mean ± 1.96 sd/sqrt(seeds) over {args.seeds} seeds. Particle filters: "
        f"{sampling}; other engines: {args.draws} draws of one run. `floor` is the same distance "
        "between two exact sets. Paper columns: MCGDiff v2 table (20 steps, SW_1 with 100 "
        "directions).",
        "",
        "| d | d_y | steps | engine | SW | floor | NFE | wall s | paper MCGDiff | paper DDRM | "
        "paper DPS | paper RNVP |"
        + (f" closer than {args.compare_to} |" if args.compare_to else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.compare_to else ""),
    ]
    print("\n".join(lines), flush=True)
    for dim in map(int, args.dims.split(",")):
        for obs_dim in map(int, args.obs_dims.split(",")):
            for position, num_steps in enumerate(map(int, args.steps.split(","))):
                rows: dict[str, dict[str, list[float]]] = {}
                floors = []
                for seed in range(args.seeds):
                    problem = gaussian_mixture_benchmark(
                        dim, obs_dim, seed=seed, schedule=SCHEDULES[args.schedule]()
                    )
                    exact = problem.exact_posterior()
                    reference = exact.sample(
                        (args.draws,), generator=torch.Generator().manual_seed(10_000 + seed)
                    )
                    other = exact.sample(
                        (args.draws,), generator=torch.Generator().manual_seed(20_000 + seed)
                    )
                    floors.append(sliced_wasserstein(other, reference, seed=seed, **metric))
                    for name, engine in engines(
                        num_steps, args.engines.split(","), position == 0
                    ).items():
                        filters = isinstance(engine, SMCEngine)
                        if not filters:
                            particles, chains = args.draws, 1
                        elif args.layout == "pooled":
                            particles, chains = args.particles, args.draws // args.particles
                        else:
                            particles, chains = args.particles, args.draws
                        start = time.perf_counter()
                        result = posterior.sample(
                            problem.model,
                            engine,
                            num_particles=particles,
                            num_chains=chains,
                            seed=seed,
                            progress=False,
                            model_kwargs=problem.model_kwargs,
                        )
                        wall = time.perf_counter() - start
                        if filters and args.layout == "filters":
                            draws = result.one_draw_per_chain(seed)["x"]
                        else:
                            draws = result.get_samples(seed=seed)["x"]
                        row = rows.setdefault(
                            name, {"sw": [], "nfe": [], "wall": [], "steps": engine.num_steps}
                        )
                        row["sw"].append(sliced_wasserstein(draws, reference, seed=seed, **metric))
                        row["nfe"].append(result.info["nfe"])
                        row["wall"].append(wall)
                paper = PAPER.get((dim, obs_dim), ("-",) * 4) if num_steps == 20 else ("-",) * 4
                for name, row in rows.items():
                    line = (
                        f"| {dim} | {obs_dim} | {row['steps']} | {name} | {interval(row['sw'])} | "
                        f"{interval(floors)} | "
                        f"{statistics.mean(row['nfe']):.0f} | {statistics.mean(row['wall']):.1f} | "
                        f"{paper[0]} | {paper[1]} | {paper[2]} | {paper[3]} |"
                    )
                    if args.compare_to:
                        baseline = rows[args.compare_to]["sw"]
                        closer = sum(a < b for a, b in zip(row["sw"], baseline, strict=True))
                        line += f" {closer}/{len(baseline)} |"
                    lines.append(line)
                    print(line, flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
