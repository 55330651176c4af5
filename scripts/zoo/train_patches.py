"""The exact script that trained the shipped natural-image patch prior (``natural_patches.pt``).

Usage, from the repository root (needs scikit-image, in the dev extra)::

    python scripts/zoo/train_patches.py --checkpoint /tmp/patches.ckpt
    python scripts/zoo/train_patches.py --photos     # photos.npz: the held-out test images

Training data: the grayscale versions of the scikit-image photographs whose docstrings say CC0
or public domain (``TRAINING``), each at its own size and downscaled by 2 (area average), with
the 8 flips and rotations of every image; ``HELDOUT`` (camera, astronaut, coffee) is never
trained on. 400,000 random 16x16 patches with their positions (``models.patches.random_patches``)
train a position-aware UNet (v-prediction, cosine VP) for ``STEPS`` steps. An interrupted run
(Ctrl-C or SIGTERM) saves its checkpoint; the same command resumes it. At the end the EMA weights
are written in float16 next to the zoo's other priors; ``scripts/zoo/quality.py`` measures them.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffpost.models.denoisers import VDenoiser
from diffpost.models.networks import UNet
from diffpost.models.patches import PatchNetwork, random_patches
from diffpost.models.schedules import VP
from diffpost.models.training import train

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
#: CC0 / public-domain photographs of skimage.data (``cat`` is ``chelsea``, not repeated)
TRAINING = (
    "brick", "cell", "chelsea", "clock", "grass", "gravel", "hubble_deep_field", "horse",
    "microaneurysms", "retina", "rocket", "text",
)  # fmt: skip
HELDOUT = ("camera", "astronaut", "coffee")
PATCH = 16
NETWORK = {"channels": 1, "base_channels": 16, "channel_multipliers": (1, 2, 2),
           "condition_channels": 2}  # fmt: skip
SETTINGS = {"num_steps": 12000, "batch_size": 128, "learning_rate": 2e-3, "warmup_steps": 200}
POOL = 400_000
SCHEDULE = {"kind": "cosine"}
SEED = 0


def grayscale(name: str) -> torch.Tensor:
    """A skimage photograph as a ``(1, H, W)`` float64 image in ``[-1, 1]``."""
    import skimage.color
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    elif image.dtype == bool:
        image = image.astype(np.float64)
    else:
        image = image / 255.0
    return torch.as_tensor(2.0 * image - 1.0, dtype=torch.float64)[None]


def training_images() -> list[torch.Tensor]:
    """The training photographs at their size and at half size (area average)."""
    images = []
    for name in TRAINING:
        image = grayscale(name)
        images += [image, F.avg_pool2d(image[None], 2)[0]]
    return images


def write_photos() -> None:
    """``photos.npz``: the held-out photographs and the Shepp-Logan phantom, centre-cropped
    square and resized to 256x256 (area average), as uint8."""
    import skimage.data
    import skimage.transform

    photos = {}
    for name in HELDOUT + ("phantom",):
        if name == "phantom":
            image = np.asarray(skimage.data.shepp_logan_phantom(), dtype=np.float64)
        else:
            image = (grayscale(name)[0].numpy() + 1.0) / 2.0
        side = min(image.shape)
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        square = image[top : top + side, left : left + side]
        small = skimage.transform.resize(square, (256, 256), anti_aliasing=True, order=1)
        photos[name] = np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)
    out = ZOO / "photos.npz"
    np.savez_compressed(out, **photos)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--photos", action="store_true", help="only write photos.npz")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.photos:
        return write_photos()
    if args.checkpoint is None:
        parser.error("training needs --checkpoint")
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    torch.set_num_threads(args.threads)
    patches, positions = random_patches(training_images(), POOL, PATCH, seed=SEED)
    torch.manual_seed(SEED)
    denoiser = VDenoiser(PatchNetwork(UNet(**NETWORK), PATCH), VP(**SCHEDULE))
    print(f"{sum(p.numel() for p in denoiser.parameters())} parameters, {POOL} patches", flush=True)
    start = time.time()
    result = train(
        denoiser,
        patches.float(),
        conditions=positions,
        **SETTINGS,
        seed=SEED,
        device=args.device,
        checkpoint=args.checkpoint,
        checkpoint_every=250,
    )
    losses = result.losses
    print(f"done in {time.time() - start:.0f} s; last-500 loss {float(losses[-500:].mean()):.4f}")
    state = {k: v.to(torch.float16) for k, v in result.denoiser.net.unet.state_dict().items()}
    out = ZOO / "natural_patches.pt"
    torch.save(
        {
            "network": dict(result.denoiser.net.unet.config),
            "patch_size": PATCH,
            "schedule": SCHEDULE,
            "prediction": "v",
            "training": {
                **SETTINGS,
                "seed": SEED,
                "pool": POOL,
                "steps_done": len(losses),
                "images": TRAINING,
                "heldout": HELDOUT,
            },  # fmt: skip
            "loss_curve": losses[: len(losses) // 100 * 100].reshape(-1, 100).mean(1).float(),
            "state_dict": state,
        },
        out,
    )
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", flush=True)


if __name__ == "__main__":
    main()
