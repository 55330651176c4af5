"""Helpers shared by the structured operators: image-shape parsing, precomputed constants served on
an input's device and dtype, and the orthonormal basis of a group average."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor


def image_shape(
    operator: str, shape: tuple[int, ...], *, single_channel: bool = False
) -> tuple[int, int, int]:
    """Parse an image event shape ``(H, W)`` or ``(C, H, W)`` into ``(C, H, W)``.

    Args:
        operator: the operator's name, for error messages.
        shape: the event shape.
        single_channel: whether only ``(H, W)`` and ``(1, H, W)`` are accepted.

    Returns:
        ``(C, H, W)`` with ``C = 1`` for a 2-D shape.

    Raises:
        ValueError: the shape has the wrong length or a non-positive size.
    """
    shape = tuple(torch.Size(shape))
    expected = "(H, W) or (1, H, W)" if single_channel else "(H, W) or (C, H, W)"
    if (
        len(shape) not in (2, 3)
        or min(shape) <= 0
        or (single_channel and len(shape) == 3 and shape[0] != 1)
    ):
        raise ValueError(
            f"{operator} expects an image shape {expected} with positive sizes; got {shape}"
        )
    return (1,) * (3 - len(shape)) + shape


def _serve(tensor: Tensor, like: Tensor) -> Tensor:
    if tensor.is_complex():
        return tensor.to(device=like.device, dtype=like.dtype.to_complex())
    if tensor.is_floating_point():
        return tensor.to(device=like.device, dtype=like.dtype)
    return tensor.to(device=like.device)


class Constants:
    """Precomputed tensors kept on the CPU at full precision, served on an input's device and dtype.

    Real tensors are stored in float64 and complex ones in complex128; calling the object with an
    input ``x`` returns them cast to ``x``'s device and dtype (its complex counterpart for complex
    tensors; integer and boolean tensors are only moved), memoised per device and dtype so that a
    GPU run copies them once.

    Args:
        **tensors: the named tensors (sparse COO tensors are allowed).
    """

    def __init__(self, **tensors: Tensor):
        self.cpu = SimpleNamespace(**tensors)
        self._served: dict[tuple[torch.device, torch.dtype], SimpleNamespace] = {}

    def __call__(self, like: Tensor) -> SimpleNamespace:
        key = (like.device, like.dtype)
        if key not in self._served:
            self._served[key] = SimpleNamespace(
                **{name: _serve(tensor, like) for name, tensor in vars(self.cpu).items()}
            )
        return self._served[key]


def mean_basis(size: int) -> Tensor:
    r"""An orthogonal ``(size, size)`` matrix whose first row is the normalised mean direction.

    It is the Householder reflection :math:`Q = I - 2 w w^\top / \|w\|^2` with
    :math:`w = e_1 - \mathbf{1}/\sqrt{n}`, which is symmetric and maps :math:`e_1` to
    :math:`\mathbf{1}/\sqrt{n}`; its other rows span the zero-mean directions.

    Args:
        size: ``n``, the group size.

    Returns:
        ``Q``, float64, shape ``(size, size)``.
    """
    identity = torch.eye(size, dtype=torch.float64)
    w = identity[0] - torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64)
    norm = (w * w).sum()
    if norm == 0:
        return identity
    return identity - 2 * torch.outer(w, w) / norm


def sort_descending(singular_values: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values sorted in descending order (stable) and the permutation that sorts them."""
    return torch.sort(singular_values, descending=True, stable=True)
