"""Write ``digits.npz``: scikit-learn's copy of the UCI optical digits with a fixed held-out split.

The UCI "Optical Recognition of Handwritten Digits" data (Alpaydin & Kaynak, 1998; CC BY 4.0)
ships with scikit-learn as ``load_digits()``: 1797 images of 8x8 pixels with integer values 0..16.
This script stores them as uint8 with their labels and a boolean ``heldout`` mask: 300 images,
30 per class, drawn with ``numpy.random.default_rng(0)``. The held-out images are never used to
train a shipped prior; they serve demos, tests and calibration studies.

Run from the repository root: ``python scripts/zoo/make_digits_data.py``.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

#: the shipped priors' folder in this repository (the scripts write their outputs there)
ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"

HELDOUT_PER_CLASS = 30


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(0)
    heldout = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        heldout[rng.choice(members, HELDOUT_PER_CLASS, replace=False)] = True
    path = ZOO.joinpath("digits.npz")
    np.savez_compressed(path, images=images, labels=labels, heldout=heldout)
    print(f"wrote {path}: {len(labels)} images, {heldout.sum()} held out")


if __name__ == "__main__":
    main()
