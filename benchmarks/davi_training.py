"""DAVI against the exact posterior as training grows, with the official unconditional auxiliary
score and with a conditional one, on the 4-D Gaussian problem of ``tests/test_amortized.py``
(the conformance suite's prior, two measurements, sigma = 0.3; 2000 training and 20 test
measurements).

Per (auxiliary, steps, seed): the mean over the test measurements of the largest mean error in
posterior sds, of the mean variance ratio and of the smallest variance ratio over coordinates
(2000 draws each; the exact posterior's own values are 0, 1 and 1 up to Monte Carlo error).

Run (about 25 minutes per auxiliary on one core)::

    .venv/bin/python benchmarks/davi_training.py --auxiliaries unconditional,conditional \
        --steps 1500,6000,24000 --seeds 0,1
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from reporting import write_report  # benchmarks/reporting.py (the script's own folder)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_amortized import _setting  # noqa: E402

from diffpost import posterior  # noqa: E402

D = torch.float64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--auxiliaries", default="unconditional,conditional")
    parser.add_argument("--steps", default="1500,6000,24000")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, prior, operator, train, test = _setting()
    lines = [
        "# DAVI on the 4-D Gaussian problem as training grows",
        "",
        f"Recorded {datetime.date.today()} on one CPU core; command: `.venv/bin/python "
        f"benchmarks/davi_training.py --auxiliaries {args.auxiliaries} --steps {args.steps} "
        f"--seeds {args.seeds}`.",
        "",
        "| auxiliary score | steps | seed | mean error (sds) | variance ratio | smallest ratio | "
        "train (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for auxiliary in args.auxiliaries.split(","):
        for steps in (int(value) for value in args.steps.split(",")):
            for seed in (int(value) for value in args.seeds.split(",")):
                start = time.perf_counter()
                davi = posterior.DAVI(num_steps=steps, auxiliary=auxiliary)
                fitted = davi.fit(model, train, seed=seed)
                seconds = time.perf_counter() - start
                errors, ratios, smallest = [], [], []
                for y in test:
                    exact = prior.posterior(operator, y, torch.tensor(0.3, dtype=D))
                    draws = fitted.sample(y, 2000, seed=3).values["x"][0]
                    sd = exact.variance.sqrt()
                    errors.append(float(((draws.mean(0) - exact.mean) / sd).abs().max()))
                    ratio = draws.var(0) / exact.variance
                    ratios.append(float(ratio.mean()))
                    smallest.append(float(ratio.min()))
                lines.append(
                    f"| {auxiliary} | {steps} | {seed} | {statistics.mean(errors):.3f} | "
                    f"{statistics.mean(ratios):.3f} | {statistics.mean(smallest):.3f} | "
                    f"{seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
