"""The GPU check: engines on CUDA against the exact posterior, and their speed on a UNet prior.

1. **Correctness on CUDA.** The conformance suite's Gaussian-mixture problem (d = 4, VP), built on
   the GPU in float64 and float32, every engine at its defaults (FlowVI: the suite's small flow),
   4 chains x 256 particles: the largest mean error in posterior sds and the variance ratio, with
   the CPU bounds of ``tests/test_conformance.py`` (the GPU's random streams differ from the
   CPU's, so a run on CUDA is another Monte Carlo replicate: it must fall inside the bounds).
2. **Speed.** The shipped 16x16 digits UNet (``zoo.digits16``), half the image observed with
   sigma = 0.1, MCGDiff (100 steps), DPS (1000), DAPS (defaults), DDRM (20) and REDDiff (1000) on
   4 chains x 256 particles: wall time after a warm-up run, NFEs and particles x NFE per second.

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


def speed(lines: list[str]) -> None:
    prior = zoo.digits16(device="cuda")
    images, _ = zoo.digits_data("heldout", size=16)
    x_true = images[0].to("cuda")
    mask = torch.zeros(1, 16, 16, dtype=torch.bool, device="cuda")
    mask[:, :8] = True
    operator = operators.Mask(mask)
    generator = torch.Generator(device="cuda").manual_seed(0)
    clean = operator(x_true)
    y = clean + 0.1 * torch.randn(clean.shape, generator=generator, device="cuda")

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, 0.1), obs=y)

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
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = posterior.sample(model, engine, seed=0, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rate = 1024 * result.info["nfe"] / wall
        nfe = result.info["nfe"]
        line = f"| {engine.name} | {engine.num_steps} | {wall:.2f} | {nfe} | {rate:.3g} |"
        print(line, flush=True)
        lines.append(line)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
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
        speed(lines)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
