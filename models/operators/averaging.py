r"""Operators that average disjoint groups of pixels: :class:`Downsample` (super-resolution by
average pooling) and :class:`Colorization` (RGB to gray by channel mean).

Averaging ``n`` entries is the row :math:`\mathbf{1}^\top / n` of norm :math:`1/\sqrt{n}`, so each
group contributes one singular value :math:`1/\sqrt{n}` with right singular vector
:math:`\mathbf{1}/\sqrt{n}` and ``n - 1`` null directions. The SVD is therefore block diagonal:
``U = I`` on the measurements, and ``V`` applies one ``n x n`` orthogonal matrix per group (see
:func:`~diffpost.models.operators._common.mean_basis`), never a dense ``d x d`` matrix.

References:
    Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022.
    arXiv:2201.11793 (super-resolution and colorization ``H_functions``).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from diffpost.models.operators._common import Constants, image_shape, mean_basis
from diffpost.models.operators.base import SVD, LinearOperator

__all__ = ["Downsample", "Colorization"]


class _GroupAverage(LinearOperator):
    """Average of disjoint groups of ``group_size`` entries, one measurement per group.

    Subclasses implement :meth:`_members` and :meth:`_from_members`, which lay the signal out as
    ``(B, group_size, m)``: member ``i`` of every group along the middle axis, the groups in the
    flat order of the measurements along the last.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], group_size: int):
        super().__init__(in_shape, out_shape)
        self.group_size = group_size
        self._constants = Constants(basis=mean_basis(group_size))

    @abstractmethod
    def _members(self, x: Tensor) -> Tensor:
        """``(B, *in_shape) -> (B, group_size, m)``."""

    @abstractmethod
    def _from_members(self, members: Tensor) -> Tensor:
        """``(B, group_size, m) -> (B, *in_shape)``, the inverse of :meth:`_members`."""

    def _forward(self, x: Tensor) -> Tensor:
        return self._members(x).mean(1).reshape((-1,) + tuple(self.out_shape))

    def _adjoint(self, y: Tensor) -> Tensor:
        spread = (y.reshape(y.shape[0], 1, -1) / self.group_size).expand(-1, self.group_size, -1)
        return self._from_members(spread)

    def svd(self) -> SVD:
        """``s = 1/sqrt(n)`` per measurement, ``U = I``, ``V`` the per-group mean basis.

        ``V^T x`` lists the scaled group means first (in measurement order), then the first
        zero-mean coordinate of every group, then the second, and so on.
        """
        m = math.prod(self.out_shape)
        return SVD(
            singular_values=torch.full((m,), 1 / math.sqrt(self.group_size), dtype=torch.float64),
            vt=lambda x: (self._constants(x).basis @ self._members(x)).flatten(1),
            v=lambda z: self._from_members(
                self._constants(z).basis.T @ z.reshape(-1, self.group_size, m)
            ),
            ut=lambda y: y.flatten(1),
            u=lambda z: z.reshape((-1,) + tuple(self.out_shape)),
        )


class Downsample(_GroupAverage):
    r"""Super-resolution: average pooling of ``factor x factor`` blocks.

    ``(*batch, C, H, W) -> (*batch, C, H / k, W / k)`` (or without the channel axis), with the
    exact SVD :math:`s = 1/k` per output pixel, ``U = I`` and ``V`` built from per-block orthonormal
    bases whose first vector is the normalised constant block.

    Args:
        shape: the image shape ``(H, W)`` or ``(C, H, W)``; ``H`` and ``W`` divisible by ``factor``.
        factor: the integer downsampling factor ``k >= 1``.

    Raises:
        ValueError: the shape is not an image shape, or ``factor`` does not divide ``H`` and ``W``.

    References:
        Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022.
        arXiv:2201.11793.
    """

    def __init__(self, shape: tuple[int, ...], factor: int):
        channels, height, width = image_shape("Downsample", shape)
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"Downsample: factor must be a positive integer; got {factor!r}")
        factor = int(factor)
        if height % factor or width % factor:
            raise ValueError(
                f"Downsample: factor {factor} must divide the image height and width; got shape "
                f"{tuple(shape)}"
            )
        out_shape = tuple(shape)[:-2] + (height // factor, width // factor)
        super().__init__(tuple(shape), out_shape, factor * factor)
        self.factor = factor
        self._blocks = (channels, height // factor, width // factor)

    def _members(self, x: Tensor) -> Tensor:
        channels, rows, columns = self._blocks
        k = self.factor
        blocks = x.reshape(-1, channels, rows, k, columns, k).permute(0, 3, 5, 1, 2, 4)
        return blocks.reshape(-1, k * k, channels * rows * columns)

    def _from_members(self, members: Tensor) -> Tensor:
        channels, rows, columns = self._blocks
        k = self.factor
        blocks = members.reshape(-1, k, k, channels, rows, columns).permute(0, 3, 4, 1, 5, 2)
        return blocks.reshape((-1,) + tuple(self.in_shape))


class Colorization(_GroupAverage):
    r"""Colorization: the channel mean ``(*batch, C, H, W) -> (*batch, 1, H, W)`` (RGB: ``C = 3``).

    Exact SVD: :math:`s = 1/\sqrt{C}` per pixel, ``U = I``, and ``V`` the per-pixel channel basis
    whose first vector is :math:`\mathbf{1}/\sqrt{C}`.

    Args:
        shape: the image shape ``(C, H, W)``.

    Raises:
        ValueError: the shape is not ``(C, H, W)``.

    References:
        Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022.
        arXiv:2201.11793.
        Wang, Yu, Zhang. Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model.
        ICLR 2023. arXiv:2212.00490.
    """

    def __init__(self, shape: tuple[int, ...]):
        if len(tuple(shape)) != 3:
            raise ValueError(
                f"Colorization expects a color image shape (C, H, W); got {tuple(shape)}"
            )
        channels, height, width = image_shape("Colorization", shape)
        super().__init__((channels, height, width), (1, height, width), channels)

    def _members(self, x: Tensor) -> Tensor:
        return x.flatten(2)

    def _from_members(self, members: Tensor) -> Tensor:
        return members.reshape((-1,) + tuple(self.in_shape))
