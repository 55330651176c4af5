r"""Computed tomography: :class:`Radon`, the parallel-beam projection of an image.

Each projection rotates the image with bilinear interpolation and sums along one axis. The
rotation, interpolation and sum are one fixed linear map, so they are precomputed once as a sparse
matrix with the bilinear weights (the samples :func:`torch.nn.functional.grid_sample` would use with
``align_corners=False`` and zero padding); the forward is a sparse product and the adjoint the
product with the stored transpose, the exact transpose of the discrete forward. There is no
structured SVD; :meth:`~diffpost.models.operators.LinearOperator.pinv` uses conjugate gradient.

References:
    Kak, Slaney. Principles of Computerized Tomographic Imaging. IEEE Press, 1988.
    Song, Shen, Xing, Ermon. Solving Inverse Problems in Medical Imaging with Score-Based
    Generative Models. ICLR 2022. arXiv:2111.08005.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpost.models.operators._common import Constants, image_shape
from diffpost.models.operators.base import LinearOperator

__all__ = ["Radon"]


class _SparseProduct(torch.autograd.Function):
    """``x @ M^T`` for a sparse ``M``, differentiated with the stored transpose (to any order)."""

    @staticmethod
    def forward(x: Tensor, matrix: Tensor, transpose: Tensor) -> Tensor:
        return torch.sparse.mm(matrix, x.T.contiguous()).T

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, matrix, transpose = inputs
        ctx.matrices = (transpose, matrix)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SparseProduct.apply(grad, *ctx.matrices), None, None


def _projection_block(
    height: int, width: int, angle: float, positions: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The projection at one angle, as sorted flat keys ``bin * H W + pixel`` and their weights.

    Detector bin ``t`` and ray step ``s`` (both on ``positions``, centred on the image centre)
    sample the image at column :math:`c_x + t \cos\theta - s \sin\theta` and row
    :math:`c_y + t \sin\theta + s \cos\theta`, bilinearly with zeros outside; bin ``t`` sums
    over ``s``, so the weights of one (bin, pixel) key are added up.
    """
    bins, steps = positions[:, None], positions[None, :]
    column = (width - 1) / 2 + bins * math.cos(angle) - steps * math.sin(angle)
    row = (height - 1) / 2 + bins * math.sin(angle) + steps * math.cos(angle)
    left, top = column.floor(), row.floor()
    detector = torch.arange(len(positions))[:, None]
    keys, weights = [], []
    for corner_row, row_weight in ((top, 1 - (row - top)), (top + 1, row - top)):
        for corner_column, column_weight in (
            (left, 1 - (column - left)),
            (left + 1, column - left),
        ):
            weight = row_weight * column_weight
            inside = (corner_row >= 0) & (corner_row < height) & (corner_column >= 0)
            inside &= (corner_column < width) & (weight > 0)
            pixel = (corner_row * width + corner_column).long()
            keys.append((detector * height * width + pixel)[inside])
            weights.append(weight[inside])
    unique, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    return unique, torch.zeros(len(unique), dtype=torch.float64).index_add_(
        0, inverse, torch.cat(weights)
    )


def _projection_matrix(height: int, width: int, angles: Tensor, detectors: int) -> Tensor:
    """The ``(A * detectors, H * W)`` sparse matrix of all projections, float64, coalesced.

    Built one angle at a time (each block is summed over its rays before the next is made), which
    bounds the memory of the construction.
    """
    positions = torch.arange(detectors, dtype=torch.float64) - (detectors - 1) / 2
    size = height * width
    rows, columns, values = [], [], []
    for number, angle in enumerate(angles.tolist()):
        keys, weights = _projection_block(height, width, angle, positions)
        rows.append(number * detectors + keys // size)
        columns.append(keys % size)
        values.append(weights)
    return torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(columns)]),
        torch.cat(values),
        (len(angles) * detectors, size),
        check_invariants=True,
        is_coalesced=True,
    )


class Radon(LinearOperator):
    r"""Parallel-beam projections: ``(*batch, [1,] H, W) -> (*batch, [1,] A, D)``.

    ``A`` angles, ``D = ceil(sqrt(H^2 + W^2))`` detector bins of unit spacing so that no part of
    the image leaves the field of view. At angle :math:`\theta` the image is sampled bilinearly on
    the grid rotated by :math:`\theta` about the image centre and summed along the rays (at
    :math:`\theta = 0`, the sums down the columns, centred in the ``D`` bins). Forward and adjoint
    are sparse products (see the module docstring); no SVD, pseudo-inverse by conjugate gradient.

    Args:
        shape: the image shape ``(H, W)`` or ``(1, H, W)``.
        angles: the projection angles in radians, a 1-D tensor, or an integer ``A`` for ``A``
            equally spaced angles in ``[0, pi)``.

    Raises:
        ValueError: the shape is not a one-channel image shape, or the angles are empty or not
            finite.

    References:
        Kak, Slaney. Principles of Computerized Tomographic Imaging. IEEE Press, 1988.
        Song, Shen, Xing, Ermon. Solving Inverse Problems in Medical Imaging with Score-Based
        Generative Models. ICLR 2022. arXiv:2111.08005.
    """

    def __init__(self, shape: tuple[int, ...], angles: Tensor | int):
        _, height, width = image_shape("Radon", shape, single_channel=True)
        if isinstance(angles, int) and not isinstance(angles, bool):
            if angles < 1:
                raise ValueError(f"Radon: the number of angles must be positive; got {angles}")
            angles = torch.arange(angles, dtype=torch.float64) * (math.pi / angles)
        angles = torch.as_tensor(angles).detach().to(device="cpu", dtype=torch.float64)
        if angles.dim() != 1 or angles.numel() == 0 or not torch.isfinite(angles).all():
            raise ValueError(
                "Radon expects a non-empty 1-D tensor of finite angles (radians) or a positive "
                f"count; got shape {tuple(angles.shape)}"
            )
        detectors = math.ceil(math.hypot(height, width))
        super().__init__(tuple(shape), tuple(shape)[:-2] + (len(angles), detectors))
        self.angles = angles
        matrix = _projection_matrix(height, width, angles, detectors)
        self._constants = Constants(matrix=matrix, transpose=matrix.t().coalesce())

    def _forward(self, x: Tensor) -> Tensor:
        c = self._constants(x)
        projections = _SparseProduct.apply(x.flatten(1), c.matrix, c.transpose)
        return projections.reshape((-1,) + tuple(self.out_shape))

    def _adjoint(self, y: Tensor) -> Tensor:
        c = self._constants(y)
        image = _SparseProduct.apply(y.flatten(1), c.transpose, c.matrix)
        return image.reshape((-1,) + tuple(self.in_shape))
