"""Speed of the structured operators against the dense matrix product, on one CPU table.

For a batch of 256 images of 64 x 64 pixels (one channel; three for colorization), float32, it
times the forward, the adjoint and one SVD round trip (``vt`` then ``v``) of every operator, and the
same products with the dense matrices (``A``, and ``V`` for the SVD) where ``d * m * 8`` bytes stay
under 2 GB. The ratio is structured time / dense time (below 1: the structured form is faster).

Run: ``python benchmarks/operators.py | tee benchmarks/results/operators.txt``.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable

import torch

from diffpost.models import operators as ops

BATCH, SIZE = 256, 64
MIN_RUNS, MIN_SECONDS, MAX_RUNS = 5, 1.0, 100
DENSE_LIMIT_BYTES = 2 * 1024**3


def _operators() -> dict[str, ops.Operator]:
    image = (1, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    centred_lines = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    centred_lines[torch.randperm(SIZE, generator=generator)[: SIZE // 4]] = (
        True  # 4x row undersampling
    )
    centred_lines[:4] = centred_lines[-4:] = True  # the low frequencies
    blur = ops.Blur(image, ops.gaussian_kernel(9, 2.0))
    return {
        "Identity": ops.Identity(image),
        "Mask (50%)": ops.Mask(torch.rand(image, generator=generator) < 0.5),
        "Downsample x4": ops.Downsample(image, 4),
        "Blur separable 9": blur,
        "Blur circular 9x9": ops.Blur(image, torch.outer(*2 * (ops.gaussian_kernel(9, 2.0),))),
        "Colorization (3 ch)": ops.Colorization((3, SIZE, SIZE)),
        "Fourier (4x lines)": ops.Fourier(image, centred_lines),
        "Radon (60 angles)": ops.Radon(image, 60),
        "Compose(Down, Blur)": ops.Compose(ops.Downsample(image, 4), blur),
        "PhaseRetrieval x2": ops.PhaseRetrieval(image, 2.0),
        "Saturation(Blur)": ops.Saturation(blur, level=0.5),
    }


def _time(fn: Callable[[], torch.Tensor]) -> float:
    """Best wall time in milliseconds, after a warm-up.

    At least ``MIN_RUNS`` runs and ``MIN_SECONDS`` in all (at most ``MAX_RUNS``), 10 ms apart: the
    best run is the one least disturbed by other processes when the CPUs are shared.
    """
    fn()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < MIN_RUNS or (
        time.perf_counter() - begin < MIN_SECONDS and len(times) < MAX_RUNS
    ):
        time.sleep(0.01)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _row(name: str, op: ops.Operator) -> list[str]:
    x = torch.randn(BATCH, *op.in_shape)
    d, m = math.prod(op.in_shape), math.prod(op.out_shape)
    cells = [name, f"{d}->{m}"]
    forward = _time(lambda: op.forward(x))
    linear = op.is_linear and d * m * 8 < DENSE_LIMIT_BYTES
    dense = op.matrix(dtype=torch.float32) if linear else None
    flat = x.reshape(BATCH, d)
    pairs = [(forward, _time(lambda: flat @ dense.T) if linear else None)]
    if op.is_linear:
        y = torch.randn(BATCH, *op.out_shape)
        pairs.append(
            (
                _time(lambda: op.adjoint(y)),
                _time(lambda: y.reshape(BATCH, m) @ dense) if linear else None,
            )
        )
    else:
        pairs.append((None, None))
    svd = op.svd() if op.is_linear else None
    if svd is not None:
        v_dense = svd.vt(
            torch.eye(d).reshape((d,) + tuple(op.in_shape))
        )  # rows: V^T of basis vectors
        pairs.append((_time(lambda: svd.v(svd.vt(x))), _time(lambda: (flat @ v_dense.T) @ v_dense)))
    else:
        pairs.append((None, None))
    for structured, dense_time in pairs:
        cells += ["-" if structured is None else f"{structured:.2f}"]
        cells += ["-" if dense_time is None else f"{dense_time:.2f}"]
        cells += [
            "-" if structured is None or dense_time is None else f"{structured / dense_time:.2f}"
        ]
    return cells


def main() -> None:
    torch.set_num_threads(2)
    header = ["operator", "d->m"]
    for what in ("forward", "adjoint", "svd vt+v"):
        header += [f"{what} ms", "dense ms", "ratio"]
    load = os.getloadavg()[0]  # other processes on the same CPUs slow the 2-thread timings down
    rows = [header] + [_row(name, op) for name, op in _operators().items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"# operators benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# torch {torch.__version__}, CPU count {os.cpu_count()}, threads "
        f"{torch.get_num_threads()}, float32, batch {BATCH} x {SIZE} x {SIZE}, "
        f"best of {MIN_RUNS} to {MAX_RUNS} runs"
    )
    print(f"# 1-minute load average before the run: {load:.2f}")
    print("# ratio = structured / dense matrix product (below 1: structured is faster)")
    print("# '-': not applicable (no adjoint or SVD, or a non-linear operator without a matrix)")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
