"""Head-to-head against the two installable peers, deepinv and azula, on the same work.

Every run, ours or a peer's, uses the same exact Gaussian-mixture denoiser, the same noise
schedule and time grid and the same number of denoiser calls (:mod:`peer_adapters` wraps ours into
each peer's interface and records every adaptation). Accuracy: on the MCGDiff Gaussian-mixture
problems (``d`` in ``--dims``, ``d_y`` in ``--obs-dims``, ``K`` in ``--steps``, ``--seeds``
seeds), the sliced Wasserstein distance SW_2 (256 directions) between ``--draws`` draws of each
sampler and as many exact posterior draws, with the floor (two exact sets) beside it. Ours and the
peer's run one after the other on each problem, in one process, so that machine noise hits both.
Speed (``--speed``): wall time of 100 steps with 256 particles at ``d = 800, d_y = 4`` against the
bare denoiser's cost for the same calls (``no_grad``, and with one VJP per call), repeats
interleaved, medians reported.

Needs the ``peers`` extra (``pip install -e '.[peers]'``). Run::

    .venv/bin/python benchmarks/peers.py --output benchmarks/results/peers.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import peer_adapters  # benchmarks/peer_adapters.py (the script's own folder)
import torch
from reporting import write_report

from diffpost import posterior
from diffpost.diagnostics import sliced_wasserstein
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.posterior.engines.common import sampling_grid


@dataclass(frozen=True)
class Pair:
    """One comparison: our engine (built for ``K`` steps) against one peer method."""

    label: str
    ours: Callable[[int], posterior.Engine]
    library: str  # "azula" or "deepinv"
    method: str  # key of peer_adapters.AZULA_METHODS / DEEPINV_METHODS
    options: dict = field(default_factory=dict)

    @property
    def peer(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.library}.{self.method}" + (f"({extra})" if extra else "")


def _sw(draws: torch.Tensor, reference: torch.Tensor, seed: int) -> float:
    return float(sliced_wasserstein(draws, reference, seed=seed, num_projections=256, p=2))


#: as shipped (each side at its defaults) and matched (the same algorithm on both sides)
PAIRS = [
    Pair("DPS", lambda k: posterior.DPS(num_steps=k), "azula", "dps"),
    Pair("DPS", lambda k: posterior.DPS(num_steps=k), "deepinv", "dps"),
    Pair("PiGDM", lambda k: posterior.PiGDM(num_steps=k), "azula", "pgdm", {"eta": 0.0}),
    Pair("PiGDM(eta=0)", lambda k: posterior.PiGDM(num_steps=k, eta=0.0), "azula", "pgdm",
         {"eta": 0.0}),
    Pair("PiGDM(paper)", lambda k: posterior.PiGDM(num_steps=k, guidance="paper"), "azula",
         "pgdm", {"eta": 1.0}),
    Pair("PiGDM(paper, eta=0)",
         lambda k: posterior.PiGDM(num_steps=k, guidance="paper", eta=0.0), "azula", "pgdm",
         {"eta": 0.0}),
    Pair("PiGDM", lambda k: posterior.PiGDM(num_steps=k), "deepinv", "pigdm"),
    Pair("PiGDM", lambda k: posterior.PiGDM(num_steps=k), "deepinv", "pigdm", {"units": "unit"}),
    Pair("MMPS", lambda k: posterior.MMPS(num_steps=k), "azula", "mmps"),
    Pair("MMPS(cg=3)", lambda k: posterior.MMPS(num_steps=k, cg_iterations=3), "deepinv",
         "mmps"),
    Pair("DDRM", lambda k: posterior.DDRM(num_steps=k), "deepinv", "ddrm"),
    Pair("DDRM", lambda k: posterior.DDRM(num_steps=k), "deepinv", "ddrm", {"exact": True}),
    Pair("TDS", lambda k: posterior.TDS(num_steps=k), "azula", "tds"),
    Pair("DiffPIR", lambda k: posterior.DiffPIR(num_steps=k), "azula", "diffpir"),
    Pair("DiffPIR(lambda=10)", lambda k: posterior.DiffPIR(num_steps=k, lambda_=10.0), "azula",
         "diffpir"),
]  # fmt: skip


def _peer(pair: Pair) -> Callable:
    if pair.library == "azula":
        return peer_adapters.AZULA_METHODS[pair.method]
    return peer_adapters.DEEPINV_METHODS[pair.method]


def _ours(problem, engine: posterior.Engine, num_samples: int, seed: int) -> torch.Tensor:
    result = posterior.sample(
        problem.model,
        engine,
        num_particles=num_samples,
        seed=seed,
        progress=False,
        model_kwargs=problem.model_kwargs,
    )
    return result.get_samples(seed=seed)["x"]


def accuracy(args, pairs: list[Pair]) -> list[str]:
    """Per pair and cell: medians of SW, wins, wall times; and the pair's totals."""
    # results[(label, peer)][(d, d_y, K)] = list of (ours_sw, peer_sw, ours_s, peer_s, floor)
    results: dict[tuple[str, str], dict[tuple[int, int, int], list[tuple]]] = {}
    for dim in map(int, args.dims.split(",")):
        for obs_dim in map(int, args.obs_dims.split(",")):
            for num_steps in map(int, args.steps.split(",")):
                for seed in range(args.seeds):
                    problem = gaussian_mixture_benchmark(dim, obs_dim, seed=seed)
                    exact = problem.exact_posterior()
                    generator = torch.Generator().manual_seed(10_000 + seed)
                    reference = exact.sample((args.draws,), generator=generator)
                    other = exact.sample((args.draws,), generator=generator)
                    floor = _sw(other, reference, seed)
                    ours_cache: dict[str, tuple[float, float]] = {}
                    for pair in pairs:
                        if pair.label not in ours_cache:
                            start = time.perf_counter()
                            draws = _ours(problem, pair.ours(num_steps), args.draws, seed)
                            wall = time.perf_counter() - start
                            ours_cache[pair.label] = (_sw(draws, reference, seed), wall)
                        start = time.perf_counter()
                        draws = _peer(pair)(problem, num_steps, args.draws, seed, **pair.options)
                        wall = time.perf_counter() - start
                        peer_sw = _sw(draws.to(reference), reference, seed)
                        ours_sw, ours_wall = ours_cache[pair.label]
                        cell = results.setdefault((pair.label, pair.peer), {})
                        cell.setdefault((dim, obs_dim, num_steps), []).append(
                            (ours_sw, peer_sw, ours_wall, wall, floor)
                        )
                    print(f"done d={dim} d_y={obs_dim} K={num_steps} seed={seed}", flush=True)
    lines = [
        "## Accuracy: SW_2 to exact posterior draws",
        "",
        f"{args.draws} draws per run, SW_2 over 256 directions against {args.draws} exact draws; "
        f"medians over {args.seeds} seeds (0-{args.seeds - 1}). `wins`: problems where ours is at "
        "least as close as the peer. `spread`: the larger of the two interquartile ranges over "
        "seeds, the yardstick for 'never worse by more than the seed-to-seed spread'.",
        "",
        "| ours | peer | d | d_y | K | ours SW | peer SW | floor | wins | ratio | spread | "
        "ours s | peer s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = [
        "",
        "### Totals per pair",
        "",
        "| ours | peer | wins | share | median ratio ours/peer | cells worse by more than the "
        "spread |",
        "|---|---|---|---|---|---|",
    ]
    for (label, peer), cells in results.items():
        wins = total = worse = 0
        ratios = []
        for (dim, obs_dim, num_steps), rows in cells.items():
            ours = [r[0] for r in rows]
            theirs = [r[1] for r in rows]
            cell_wins = sum(a <= b for a, b in zip(ours, theirs, strict=True))
            wins, total = wins + cell_wins, total + len(rows)
            ratios += [a / b for a, b in zip(ours, theirs, strict=True) if b > 0]
            spread = max(_iqr(ours), _iqr(theirs))
            gap = statistics.median(ours) - statistics.median(theirs)
            worse += gap > spread
            lines.append(
                f"| {label} | {peer} | {dim} | {obs_dim} | {num_steps} | "
                f"{statistics.median(ours):.3f} | {statistics.median(theirs):.3f} | "
                f"{statistics.median(r[4] for r in rows):.3f} | {cell_wins}/{len(rows)} | "
                f"{statistics.median(ours) / statistics.median(theirs):.2f} | {spread:.3f} | "
                f"{statistics.median(r[2] for r in rows):.2f} | "
                f"{statistics.median(r[3] for r in rows):.2f} |"
            )
        summary.append(
            f"| {label} | {peer} | {wins}/{total} | {wins / total:.0%} | "
            f"{statistics.median(ratios):.2f} | {worse} of {len(cells)} |"
        )
    return lines + summary


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def speed(args, pairs: list[Pair]) -> list[str]:
    """Wall time at d = 800, d_y = 4, 256 particles, ``K = 100``, against the bare denoiser."""
    problem = gaussian_mixture_benchmark(800, 4, seed=0)
    num_steps, num_samples = 100, 256
    grid = sampling_grid(problem.prior.schedule, num_steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, 800, dtype=torch.float64, generator=generator)

    def bare() -> None:
        with torch.no_grad():
            for t in grid[:-1]:
                problem.prior.denoise(x, t)

    def bare_vjp() -> None:
        for t in grid[:-1]:
            leaf = x.clone().requires_grad_(True)
            out = problem.prior.denoise(leaf, t)
            torch.autograd.grad(out, leaf, torch.ones_like(out))

    def noise() -> None:
        generator = torch.Generator().manual_seed(0)
        for _ in grid[:-1]:
            torch.randn(x.shape, dtype=x.dtype, generator=generator)

    jobs: dict[str, Callable[[], object]] = {
        "bare denoiser (no_grad)": bare,
        "bare denoiser + VJP": bare_vjp,
        "one N(0, I) draw per step": noise,
    }
    for pair in pairs:
        jobs.setdefault(
            f"ours {pair.label}",
            lambda p=pair: _ours(problem, p.ours(num_steps), num_samples, 0),
        )
        jobs.setdefault(
            f"{pair.peer} (for {pair.label})",
            lambda p=pair: _peer(p)(problem, num_steps, num_samples, 0, **p.options),
        )
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.repeats):  # interleaved: every job once per round
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    base, base_vjp = (statistics.median(times[k]) for k in list(jobs)[:2])
    lines = [
        "## Speed: d = 800, d_y = 4, 256 particles, 100 steps",
        "",
        f"Median of {args.repeats} interleaved rounds; torch threads: {torch.get_num_threads()}.",
        "",
        "| run | wall s | / bare denoiser | / bare denoiser + VJP |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        wall = statistics.median(values)
        lines.append(f"| {name} | {wall:.3f} | {wall / base:.2f} | {wall / base_vjp:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="8,80")
    parser.add_argument("--obs-dims", default="1,4")
    parser.add_argument("--steps", default="20,100")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--pairs", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = None if args.pairs is None else set(args.pairs.split(","))
    pairs = [pair for pair in PAIRS if wanted is None or pair.label in wanted]
    import azula  # noqa: PLC0415 (versions for the report)
    import deepinv  # noqa: PLC0415

    lines = [
        "# Head-to-head against deepinv and azula",
        "",
        f"Recorded {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, azula {azula.__version__}, deepinv {deepinv.__version__}. "
        f"Command: `.venv/bin/python benchmarks/peers.py --dims {args.dims} --obs-dims "
        f"{args.obs_dims} --steps {args.steps} --seeds {args.seeds} --draws {args.draws}"
        + (f" --pairs {args.pairs}" if args.pairs else "")
        + ("" if args.speed else " --no-speed")
        + ("" if args.accuracy else " --no-accuracy")
        + f" --repeats {args.repeats} --threads {args.threads}`.",
        "",
        "## Adaptations of the peers to the shared problem",
        "",
        *(f"- **{name}**: {text}" for name, text in peer_adapters.ADAPTATIONS.items()),
        "",
    ]
    if args.accuracy:
        lines += accuracy(args, pairs) + [""]
    if args.speed:
        lines += speed(args, pairs)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
