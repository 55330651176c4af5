r"""Patch diffusion priors for images of any size (PaDIS, Hu et al. 2024).

A position-aware network is trained on small ``P x P`` patches of images; at sampling time the
image is cut into non-overlapping patches along a grid shifted at every noise level, each patch
is denoised knowing where it lies, and the patches are put back:

.. math:: \hat x_0(x_t, t)_{B} = D_\theta\big((x_t)_B,\ t,\ \mathrm{pos}(B)\big)
          \quad\text{for every patch } B \text{ of the grid shifted by } s(t),

which is the Tweedie mean of the patch-product prior :math:`p(x) \propto \prod_B p_\theta(x_B
\mid \mathrm{pos}(B))` of PaDIS for one partition; the shift :math:`s(t) \in \{0..P-1\}^2` changes
from one noise level to the next so that seams never stay in place and average out over the
steps (PaDIS, Sec. 3.2).

- :class:`PatchNetwork` — a :class:`~diffpost.models.networks.UNet` with two coordinate channels
  (row and column of every pixel in the whole image, in ``[-1, 1]``), ``(x, t, positions) ->``
  prediction; train it with :func:`~diffpost.models.training.train` and ``conditions=positions``.
- :func:`random_patches` — a training set of patches with their positions, drawn from a list of
  images with the 8 flips and rotations of each whole image.
- :class:`PatchDenoiser` — the whole-image denoiser above, for any ``(C, H, W)`` with
  ``H, W >= P``, chunked in ``patch_batch`` patches per network call; wrap it in a
  :class:`~diffpost.models.priors.DiffusionPrior` of the image's shape (``zoo.natural_patches``).

Departures from PaDIS (stated where they matter): positions are normalised to the extent of each
image (PaDIS trains on one image size, so absolute and relative positions coincide there), which
lets one network serve images of any size; the patches at the border of a shifted grid are moved
inside the image instead of zero-padding it, so the network never sees padding (each pixel still
belongs to exactly one patch, the one of the shifted grid); and the shift is a pseudo-random
function of the noise level ``t`` instead of a fresh random draw, so that the denoiser is a
deterministic function of ``(x_t, t)`` as the library's denoiser contract requires (an engine
that calls it twice at one step sees one grid, every step sees another).

References:
    Hu, Song, Xu, Shen, Fessler. Learning Image Priors through Patch-based Diffusion Models for
    Solving Inverse Problems. NeurIPS 2024. arXiv:2406.02462.
    Wang et al. Patch Diffusion: Faster and More Data-Efficient Training of Diffusion Models.
    NeurIPS 2023. arXiv:2304.12526 (coordinate channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffpost.models.denoisers import Denoiser, broadcast_time
from diffpost.models.networks import UNet

__all__ = [
    "PatchNetwork",
    "PatchDenoiser",
    "coordinate_maps",
    "random_patches",
    "patch_starts",
    "grid_shift",
    "patch_count",
]


def coordinate_maps(positions: Tensor, patch_size: int) -> Tensor:
    """Row and column coordinates of every pixel of each patch in its image, in ``[-1, 1]``.

    Args:
        positions: ``(N, 4)``: the patch's top row, left column, and the image's height and
            width (pixel centres are mapped to ``2 (i + 1/2) / H - 1``).
        patch_size: ``P``.

    Returns:
        Shape ``(N, 2, P, P)``.
    """
    offsets = torch.arange(patch_size, dtype=positions.dtype, device=positions.device) + 0.5
    rows = 2.0 * (positions[:, 0, None] + offsets) / positions[:, 2, None] - 1.0
    cols = 2.0 * (positions[:, 1, None] + offsets) / positions[:, 3, None] - 1.0
    size = (positions.shape[0], patch_size, patch_size)
    return torch.stack([rows[:, :, None].expand(size), cols[:, None, :].expand(size)], dim=1)


class PatchNetwork(nn.Module):
    """A position-aware patch network ``(x (N, C, P, P), t (N,), positions (N, 4)) -> (N, C, P,
    P)``: a :class:`~diffpost.models.networks.UNet` with ``condition_channels=2`` fed the
    :func:`coordinate_maps` of the patches.

    Args:
        unet: the UNet; it must have ``condition_channels == 2``.
        patch_size: ``P``.
    """

    def __init__(self, unet: UNet, patch_size: int):
        super().__init__()
        if getattr(unet, "condition_channels", 0) != 2:
            raise ValueError("PatchNetwork needs a UNet with condition_channels=2")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer; got {patch_size!r}")
        self.unet = unet
        self.patch_size = patch_size

    def forward(self, x: Tensor, t: Tensor, positions: Tensor) -> Tensor:
        if x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"PatchNetwork takes {self.patch_size}x{self.patch_size} patches; got "
                f"{tuple(x.shape)}"
            )
        return self.unet(x, t, coordinate_maps(positions.to(x.dtype), self.patch_size))


_DIHEDRAL = [(k, flip) for k in range(4) for flip in (False, True)]


def random_patches(
    images: list[Tensor], count: int, patch_size: int, *, seed: int = 0, dihedral: bool = True
) -> tuple[Tensor, Tensor]:
    """A training set of patches and their positions.

    Each patch comes from one of the 8 flips and rotations of one image (when ``dihedral``), the
    image drawn with probability proportional to its number of patch positions, the position
    uniform; the positions are those in the transformed image.

    Args:
        images: tensors ``(C, H_i, W_i)`` with ``H_i, W_i >= P``.
        count: number of patches.
        patch_size: ``P``.
        seed: seed of the draws.
        dihedral: use the 8 flips and rotations of every image (else the images as they are).

    Returns:
        ``(patches (count, C, P, P), positions (count, 4))``, positions as in
        :func:`coordinate_maps`.
    """
    variants = []
    for image in images:
        if image.dim() != 3 or min(image.shape[-2:]) < patch_size:
            raise ValueError(
                f"images must be (C, H, W) with H, W >= {patch_size}; got {tuple(image.shape)}"
            )
        for k, flip in _DIHEDRAL if dihedral else [(0, False)]:
            turned = torch.rot90(image, k, dims=(-2, -1))
            variants.append(turned.flip(-1) if flip else turned)
    generator = torch.Generator().manual_seed(seed)
    spans = torch.tensor(
        [(v.shape[-2] - patch_size + 1) * (v.shape[-1] - patch_size + 1) for v in variants],
        dtype=torch.float64,
    )
    which = torch.multinomial(spans / spans.sum(), count, replacement=True, generator=generator)
    channels = images[0].shape[0]
    patches = torch.empty(count, channels, patch_size, patch_size, dtype=images[0].dtype)
    positions = torch.empty(count, 4)
    for index, variant in enumerate(variants):
        rows = (which == index).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        height, width = variant.shape[-2:]
        top = torch.randint(0, height - patch_size + 1, (rows.numel(),), generator=generator)
        left = torch.randint(0, width - patch_size + 1, (rows.numel(),), generator=generator)
        r = top[:, None] + torch.arange(patch_size)
        c = left[:, None] + torch.arange(patch_size)
        patches[rows] = variant[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)
        positions[rows] = torch.stack(
            [top, left, torch.full_like(top, height), torch.full_like(top, width)], dim=1
        ).float()
    return patches, positions


def patch_starts(size: int, patch_size: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """The grid of patches along one axis of length ``size``, shifted by ``shift``.

    Patch ``k`` nominally covers ``[k P - shift, (k + 1) P - shift)``; the first and last are
    moved inside ``[0, size)``. Pixel ``i`` belongs to patch ``(i + shift) // P``.

    Returns:
        ``(starts (K,), owner (size,), offset (size,))``: the patches' first pixels, each
        pixel's patch and its place in that patch.
    """
    count = (size - 1 + shift) // patch_size + 1
    starts = (torch.arange(count) * patch_size - shift).clamp(0, size - patch_size)
    owner = (torch.arange(size) + shift) // patch_size
    return starts, owner, torch.arange(size) - starts[owner]


def grid_shift(t: float, patch_size: int) -> tuple[int, int]:
    """The grid's shift at noise level ``t``: a pseudo-random (hashed) function of ``t`` in
    ``{0..P-1}^2``, so that nearby levels get unrelated shifts."""
    key = int(round(float(t) * 2**30)) & 0xFFFFFFFF
    key = (key * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF  # Knuth's multiplicative hash
    key ^= key >> 15
    rows, cols = divmod((key * 0x85EBCA6B & 0xFFFFFFFF) % patch_size**2, patch_size)
    return rows, cols


class PatchDenoiser(Denoiser):
    r"""The whole-image Tweedie denoiser of a patch prior (module docstring), for any image
    ``(N, C, H, W)`` with ``H, W >= P``.

    Args:
        patch_denoiser: a network adapter of :mod:`diffpost.models.denoisers` (e.g.
            :class:`~diffpost.models.denoisers.VDenoiser`) around a :class:`PatchNetwork`; its
            schedule is this denoiser's.
        patch_batch: patches per network call (memory; the particle count times the patches
            per image is split into calls of this size).
        shifts: ``"time"`` (the grid's shift is :func:`grid_shift` of the noise level, the
            default) or ``"none"`` (the unshifted grid at every level: seams stay in place).

    Shapes: ``x_t (N, C, H, W)``, ``t`` scalar or ``(N,)`` -> ``(N, C, H, W)``.
    """

    def __init__(self, patch_denoiser: Denoiser, *, patch_batch: int = 4096, shifts: str = "time"):
        super().__init__(patch_denoiser.schedule)
        net = getattr(patch_denoiser, "net", None)
        if not isinstance(net, PatchNetwork):
            raise ValueError("patch_denoiser must be a network adapter around a PatchNetwork")
        if isinstance(patch_batch, bool) or not isinstance(patch_batch, int) or patch_batch < 1:
            raise ValueError(f"patch_batch must be a positive integer; got {patch_batch!r}")
        if shifts not in ("time", "none"):
            raise ValueError(f"shifts must be 'time' or 'none'; got {shifts!r}")
        self.patch_denoiser = patch_denoiser
        self.patch_size = net.patch_size
        self.patch_batch = patch_batch
        self.shifts = shifts

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        if x_t.dim() != 4 or min(x_t.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"PatchDenoiser takes images (N, C, H, W) with H, W >= {self.patch_size}; got "
                f"{tuple(x_t.shape)}"
            )
        times = broadcast_time(t, x_t)
        levels = times.unique()
        if levels.numel() == 1:
            return self._denoise_on_grid(x_t, times, float(levels[0]))
        out = torch.empty_like(x_t)  # rows at different noise levels: one grid per level
        for level in levels:
            rows = (times == level).nonzero().squeeze(1)
            out = out.index_copy(0, rows, self._denoise_on_grid(x_t[rows], times[rows], level))
        return out

    def _denoise_on_grid(self, x_t: Tensor, times: Tensor, level: float | Tensor) -> Tensor:
        size, height, width = self.patch_size, x_t.shape[-2], x_t.shape[-1]
        shift = grid_shift(float(level), size) if self.shifts == "time" else (0, 0)
        top, row_owner, row_offset = (
            a.to(x_t.device) for a in patch_starts(height, size, shift[0])
        )
        left, col_owner, col_offset = (
            a.to(x_t.device) for a in patch_starts(width, size, shift[1])
        )
        rows = top[:, None] + torch.arange(size, device=x_t.device)
        cols = left[:, None] + torch.arange(size, device=x_t.device)
        n, c, per_image = x_t.shape[0], x_t.shape[1], top.numel() * left.numel()
        patches = x_t[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (N, C, Kh, Kw, P, P)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * per_image, c, size, size)
        grid = torch.stack(torch.meshgrid(top, left, indexing="ij"), -1).reshape(per_image, 2)
        extent = torch.tensor([height, width], device=x_t.device).expand(per_image, 2)
        positions = torch.cat([grid, extent], 1).to(x_t.dtype).repeat(n, 1)
        patch_times = times.repeat_interleave(per_image)
        denoised = torch.cat(
            [
                self.patch_denoiser(
                    patches[i : i + self.patch_batch],
                    patch_times[i : i + self.patch_batch],
                    positions[i : i + self.patch_batch],
                )
                for i in range(0, patches.shape[0], self.patch_batch)
            ]
        )
        denoised = denoised.reshape(n, top.numel(), left.numel(), c, size, size)
        denoised = denoised.permute(0, 3, 1, 2, 4, 5)  # (N, C, Kh, Kw, P, P)
        return denoised[
            :, :, row_owner[:, None], col_owner[None, :], row_offset[:, None], col_offset[None, :]
        ]

    def __repr__(self) -> str:
        return (
            f"PatchDenoiser(patch_size={self.patch_size}, patch_batch={self.patch_batch}, "
            f"shifts={self.shifts!r})"
        )


def patch_count(height: int, width: int, patch_size: int) -> int:
    """The largest number of patches a shifted grid cuts an ``H x W`` image into."""
    return ((height + patch_size - 2) // patch_size + 1) * (
        (width + patch_size - 2) // patch_size + 1
    )
