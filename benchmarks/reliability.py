"""Failed or non-finite runs over many seeds, every engine at its defaults.

The problem is the conformance suite's Gaussian-mixture one (d = 4, three components, two random
linear measurements with sigma = 0.3; SMCDiff: two coordinates observed exactly), on the VP
schedule, 2 chains x 64 particles (RSLD: 16 ensembles of 8). A run fails when it raises (the
error's type and message are recorded: ``EngineFailed`` names the step and the cause) or returns
non-finite values or weights. Engines whose run at defaults costs seconds get fewer seeds
(``--seeds`` for the others); the table says how many each ran. FlowVI runs the conformance
suite's small flow (its official 20000 steps are hours on a CPU).

Run::

    CI=1 .venv/bin/python -m benchmarks.reliability --seeds 200 \\
        --output benchmarks/results/reliability.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_conformance as conformance  # noqa: E402

from benchmarks.reporting import write_report  # noqa: E402

#: seeds for engines whose run at defaults takes seconds (DAPS about 20 s)
EXPENSIVE = {"DAPS": 30, "FlowVI": 40, "REDDiff": 100, "DPS": 100, "SNIPS": 100, "ScoreALD": 100}


def run_once(name: str, seed: int) -> str | None:
    """``None`` for a finite run, else the failure's description."""
    engine = conformance.engine_at_defaults(name)
    model, y, _ = conformance.make_problem("mixture", "vp_linear", engine)
    chains, particles = (16, 8) if name == "RSLD" else (2, 64)
    try:
        result = conformance.run(
            engine, model, y, seed=seed, num_chains=chains, num_particles=particles
        )
    except Exception as error:  # every failure is what this counts
        return f"{type(error).__name__}: {error}"
    finite = all(bool(torch.isfinite(v).all()) for v in result.values.values())
    if not finite or not bool(torch.isfinite(torch.logsumexp(result.log_weights, 1)).all()):
        return "non-finite values or weights"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--engines", default=None, help="comma-separated (default all)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--start", type=int, default=0, help="first seed (to extend a run)")
    parser.add_argument(
        "--all-seeds", action="store_true", help="--seeds for every engine, the slow ones too"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.engines.split(",") if args.engines else conformance.ENGINES
    lines = [
        f"# Failed runs over many seeds, every engine at its defaults ({datetime.date.today()})",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| engine | seeds | failed | seconds per run | first failure |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        count = args.seeds if args.all_seeds else min(args.seeds, EXPENSIVE.get(name, args.seeds))
        seeds = range(args.start, count)
        count = len(seeds)
        start = time.perf_counter()
        failures = [(seed, run_once(name, seed)) for seed in seeds]
        failures = [(seed, message) for seed, message in failures if message is not None]
        seconds = (time.perf_counter() - start) / count
        first = "" if not failures else f"seed {failures[0][0]}: {failures[0][1][:200]}"
        label = f"{count}" if args.start == 0 else f"{args.start}-{args.start + count - 1}"
        line = f"| {name} | {label} | {len(failures)} | {seconds:.2f} | {first} |"
        print(line, flush=True)
        lines.append(line)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
