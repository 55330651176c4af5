"""The GPU check: engines on CUDA against the exact posterior, and their speed on a UNet prior.

1. **Correctness on CUDA.** The conformance suite's Gaussian-mixture problem (d = 4, VP), built on
   the GPU in float64 and float32, every engine at its defaults (FlowVI: the suite's small flow),
   4 chains x 256 particles: the largest mean error in posterior sds and the variance ratio, with
   the CPU bounds of ``tests/test_conformance.py`` (the GPU's random streams differ from the
   CPU's, so a run on CUDA is another Monte Carlo replicate: it must fall inside the bounds).
2. **Speed.** The shipped 16x16 digits UNet (``zoo.digits16``), half the image observed with
   sigma = 0.1, MCGDiff (100 steps), DPS (1000), DAPS (defaults), DDRM (20) and REDDiff (1000) on
   4 chains x 256 particles: wall time after a warm-up run, NFEs and particles x NFE per second.
3. **Batched against unbatched.** The same prior and mask, ``--problems`` held-out digits:
   MCGDiff and DPS (100 steps each) on all of them as one plated run against one run per digit,
   64 particles each, interleaved: particles x NFE per second and the ratio.

``benchmarks/gpu.sh`` runs this with the CUDA tests and the sharded benchmark.

Run on a CUDA machine::

    python -m benchmarks.gpu --output benchmarks/results/gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_conformance as conformance  # noqa: E402

from benchmarks.reporting import write_report  # noqa: E402
from diffpost import posterior  # noqa: E402
from diffpost.models import GaussianMixture, GaussianObservation, operators, zoo  # noqa: E402


def mixture_on(device: str, dtype: torch.dtype, engine: posterior.Engine):
    """The suite's mixture problem with its prior and data on ``device`` in ``dtype``."""
    model, y, exact = conformance.make_problem("mixture", "vp_linear", engine)
    trace = pyro.poutine.trace(model).get_trace(y)
    prior, fn = trace.nodes["x"]["fn"], trace.nodes["y"]["fn"]
    moved = GaussianMixture(
        prior.weights.to(device, dtype),
        prior.means.to(device, dtype),
        prior.covariances.to(device, dtype),
        schedule=prior.schedule,
    )
    if isinstance(fn.operator, operators.Mask):
        operator = operators.Mask(fn.operator.mask.to(device))
    else:
        operator = operators.Matrix(fn.operator.weight.to(device, dtype))
    sigma = float(fn.sigma)

    def on_device(y=None):
        x = pyro.sample("x", moved)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    return on_device, y.to(device, dtype), exact


def correctness(lines: list[str], device: str) -> None:
    lines += [
        "## Correctness on CUDA (mixture problem, VP, defaults, 4 x 256)",
        "",
        "| engine | dtype | mean error | CPU bound | variance ratio | CPU bound | inside |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in conformance.ENGINES:
        engine = conformance.engine_at_defaults(name)
        chains, particles = conformance.layout(engine)
        mc, mt, vc, vt = conformance.MEASURED[("mixture", name, "vp_linear")]
        for dtype in (torch.float64, torch.float32):
            model, y, exact = mixture_on(device, dtype, engine)
            try:
                result = conformance.run(
                    engine, model, y, seed=0, num_chains=chains, num_particles=particles
                )
                moved = posterior.ParticleSet(
                    {k: v.double().cpu() for k, v in result.values.items()},
                    result.log_weights.double().cpu(),
                )
                mean_error, ratio = conformance.moment_errors(moved, exact)
                inside = abs(mean_error - mc) <= mt and abs(ratio - vc) <= vt
                cells = (
                    f"{mean_error:.3f} | {mc:.2f} ± {mt:.2f} | {ratio:.3f} | {vc:.2f} ± {vt:.2f}"
                )
                line = f"| {name} | {str(dtype)[6:]} | {cells} | {'yes' if inside else 'NO'} |"
            except Exception as error:  # a failure on the GPU is what this looks for
                line = f"| {name} | {str(dtype)[6:]} | {type(error).__name__}: {error} | | | | NO |"
            print(line, flush=True)
            lines.append(line)


def digits16_problem(device: str, problems: int | None = None):
    """The 16x16 UNet prior with the top half observed (sigma 0.1): ``(model, y)``, ``y`` of one
    held-out digit or, with ``problems``, of that many (the model then has a plate)."""
    prior = zoo.digits16(device=device)
    images, _ = zoo.digits_data("heldout", size=16)
    x_true = images[: problems or 1].to(device)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool, device=device)
    mask[:, :8] = True
    operator = operators.Mask(mask)
    generator = torch.Generator(device=device).manual_seed(0)
    clean = operator(x_true)
    y = clean + 0.1 * torch.randn(clean.shape, generator=generator, device=device)

    def model(y=None):
        if problems is None:
            x = pyro.sample("x", prior)
            return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)
        with pyro.plate("digits", problems):
            x = pyro.sample("x", prior)
            return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)

    return model, (y if problems else y[0])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(lines: list[str], device: str) -> None:
    model, y = digits16_problem(device)

    lines += [
        "",
        "## Speed on the 16x16 digits UNet (half observed, sigma = 0.1, 4 x 256 particles)",
        "",
        "| engine | steps | wall s | NFE | particle-NFE per s |",
        "|---|---|---|---|---|",
    ]
    engines = [
        posterior.MCGDiff(),
        posterior.DPS(),
        posterior.DAPS(),
        posterior.DDRM(),
        posterior.REDDiff(),
    ]
    for engine in engines:
        kwargs = {
            "num_particles": 256,
            "num_chains": 4,
            "model_kwargs": {"y": y},
            "progress": False,
        }
        posterior.sample(model, type(engine)(num_steps=2), seed=0, **kwargs)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        result = posterior.sample(model, engine, seed=0, **kwargs)
        synchronize(device)
        wall = time.perf_counter() - start
        rate = 1024 * result.info["nfe"] / wall
        nfe = result.info["nfe"]
        line = f"| {engine.name} | {engine.num_steps} | {wall:.2f} | {nfe} | {rate:.3g} |"
        print(line, flush=True)
        lines.append(line)


def batched(lines: list[str], device: str, problems: int, repeats: int = 2) -> None:
    plated, ys = digits16_problem(device, problems)
    single, _ = digits16_problem(device)
    lines += [
        "",
        f"## Batched against unbatched: {problems} digits x 64 particles, 16x16 UNet",
        "",
        "| engine | plated wall s | one-by-one wall s | plated particle-NFE per s | "
        "one-by-one particle-NFE per s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for engine in (posterior.MCGDiff(num_steps=100), posterior.DPS(num_steps=100)):
        kwargs = {"num_particles": 64, "progress": False}
        posterior.sample(
            single, type(engine)(num_steps=2), seed=0, model_kwargs={"y": ys[0]}, **kwargs
        )
        walls = {"plated": [], "single": []}
        nfe = {}
        for _ in range(repeats):  # interleaved
            synchronize(device)
            start = time.perf_counter()
            result = posterior.sample(plated, engine, seed=0, model_kwargs={"y": ys}, **kwargs)
            synchronize(device)
            walls["plated"].append(time.perf_counter() - start)
            nfe["plated"] = result.info["nfe"]
            start = time.perf_counter()
            total = 0
            for b in range(problems):
                result = posterior.sample(
                    single, engine, seed=b, model_kwargs={"y": ys[b]}, **kwargs
                )
                total += result.info["nfe"]
            synchronize(device)
            walls["single"].append(time.perf_counter() - start)
            nfe["single"] = total
        plate_wall, single_wall = min(walls["plated"]), min(walls["single"])
        # particle-NFE: particles evaluated per denoiser call, times calls
        plate_rate = problems * 64 * nfe["plated"] / plate_wall
        single_rate = 64 * nfe["single"] / single_wall
        line = (
            f"| {engine.name} | {plate_wall:.2f} | {single_wall:.2f} | {plate_rate:.3g} | "
            f"{single_rate:.3g} | {plate_rate / single_rate:.1f}x |"
        )
        print(line, flush=True)
        lines.append(line)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    parser.add_argument("--problems", type=int, default=16)
    args = parser.parse_args()
    lines = [
        f"# GPU check ({datetime.date.today()}, {device_name(args.device)}, torch "
        f"{torch.__version__})",
        "",
        "Command: `python -m benchmarks.gpu --output benchmarks/results/gpu.md` on the device "
        "machine (see the module docstring).",
        "",
    ]
    if "correctness" not in args.skip:
        correctness(lines, args.device)
    if "speed" not in args.skip:
        speed(lines, args.device)
    if "batched" not in args.skip:
        batched(lines, args.device, args.problems)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
