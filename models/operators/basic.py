"""The basic linear operators: :class:`Identity` (denoising), :class:`Matrix` (dense),
:class:`Mask` (inpainting, motif scaffolding) and :class:`Diagonal` (pixel gains, zero-filled
masks), all with an exact SVD."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpost.models.operators.base import SVD, LinearOperator

__all__ = ["Identity", "Matrix", "Mask", "Diagonal"]


class Identity(LinearOperator):
    """:math:`A = I` on signals of shape ``shape`` (denoising); ``U = V = I``, ``s = 1``.

    Args:
        shape: the signal's event shape, e.g. ``(d,)`` or ``(C, H, W)``.
    """

    def __init__(self, shape: tuple[int, ...]):
        shape = tuple(int(n) for n in torch.Size(shape))
        super().__init__(shape, shape)

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y

    def svd(self) -> SVD:
        d = math.prod(self.in_shape)
        unflatten = lambda z: z.reshape((-1,) + tuple(self.in_shape))  # noqa: E731
        return SVD(
            singular_values=torch.ones(d, dtype=torch.float64),
            vt=lambda x: x.flatten(1),
            v=unflatten,
            ut=lambda y: y.flatten(1),
            u=unflatten,
        )


class Matrix(LinearOperator):
    r"""A dense matrix :math:`A \in \mathbb{R}^{m \times d}` on vectors ``(d,)``.

    Its full SVD (``torch.linalg.svd``) is computed on first use and cached.

    Args:
        matrix: shape ``(m, d)``; its device and dtype are kept, and inputs are cast to them.
    """

    def __init__(self, matrix: Tensor):
        matrix = torch.as_tensor(matrix)
        if matrix.dim() != 2:
            raise ValueError(f"Matrix expects a 2-D tensor (m, d); got shape {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError("Matrix: the matrix has non-finite entries")
        super().__init__((matrix.shape[1],), (matrix.shape[0],))
        self.weight = matrix
        self._svd: SVD | None = None

    def _forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.to(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return y @ self.weight.to(y)

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return self.weight.to(dtype=dtype, device=device)

    def svd(self) -> SVD:
        if self._svd is None:
            left, singular_values, right_t = torch.linalg.svd(self.weight, full_matrices=True)
            self._svd = SVD(
                singular_values=singular_values,
                vt=lambda x: x @ right_t.to(x).T,
                v=lambda z: z @ right_t.to(z),
                ut=lambda y: y @ left.to(y),
                u=lambda z: z @ left.to(z).T,
                leading_vt=lambda x, k: x @ right_t[:k].to(x).T,
                leading_v=lambda z, shape: z @ right_t[: z.shape[1]].to(z),
            )
        return self._svd


class Mask(LinearOperator):
    r"""Keep the observed entries: ``forward(x) = x[..., mask]`` as a flat vector in index order.

    The adjoint scatters measurements back into the signal's shape (zeros elsewhere). Its SVD has
    ``s = 1``, ``U = I`` and ``V`` the permutation that lists the observed entries first (in index
    order) and the unobserved ones after them.

    Args:
        mask: boolean tensor of the signal's event shape (e.g. ``(C, H, W)`` for inpainting, or
            ``(d,)`` for a set of coordinates of a vector, as in motif scaffolding), ``True`` where
            observed; or a 1-D integer tensor of observed coordinates together with ``shape``.
        shape: the event shape, only with integer coordinates.
    """

    def __init__(self, mask: Tensor, shape: tuple[int, ...] | None = None):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if shape is None or mask.dim() != 1 or mask.is_floating_point():
                raise ValueError(
                    "Mask expects a boolean mask of the signal's shape, or 1-D integer "
                    f"coordinates with shape=...; got dtype {mask.dtype}, shape {tuple(mask.shape)}"
                )
            d = math.prod(shape)
            if mask.numel() and (mask.min() < 0 or mask.max() >= d):
                raise ValueError(f"Mask coordinates must lie in [0, {d}); got {mask.tolist()}")
            if mask.unique().numel() != mask.numel():
                raise ValueError("Mask coordinates must be distinct")
            flat = torch.zeros(d, dtype=torch.bool)
            flat[mask.long()] = True
            mask = flat.reshape(shape)
        elif shape is not None and tuple(shape) != tuple(mask.shape):
            raise ValueError(
                f"Mask: shape {tuple(shape)} does not match the mask's {tuple(mask.shape)}"
            )
        if mask.dim() == 0:
            raise ValueError("Mask needs at least one dimension")
        observed = mask.flatten().nonzero().squeeze(1)
        if observed.numel() == 0:
            raise ValueError("Mask observes no entry")
        super().__init__(tuple(mask.shape), (observed.numel(),))
        self.mask = mask
        self.observed = observed
        self.unobserved = (~mask.flatten()).nonzero().squeeze(1)
        self.permutation = torch.cat([self.observed, self.unobserved])

    def _forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, self.observed.to(x.device)]

    def _adjoint(self, y: Tensor) -> Tensor:
        flat = y.new_zeros(y.shape[0], math.prod(self.in_shape))
        flat[:, self.observed.to(y.device)] = y
        return flat.reshape((-1,) + tuple(self.in_shape))

    def svd(self) -> SVD:
        permutation = self.permutation

        def v(z: Tensor) -> Tensor:
            flat = torch.empty_like(z)
            flat[:, permutation.to(z.device)] = z
            return flat.reshape((-1,) + tuple(self.in_shape))

        def leading_v(z: Tensor, shape: tuple[int, ...]) -> Tensor:
            flat = z.new_zeros(z.shape[0], math.prod(shape))
            flat[:, permutation[: z.shape[1]].to(z.device)] = z
            return flat.reshape((-1,) + shape)

        return SVD(
            singular_values=torch.ones(self.observed.numel(), dtype=torch.float64),
            vt=lambda x: x.flatten(1)[:, permutation.to(x.device)],
            v=v,
            ut=lambda y: y,
            u=lambda z: z,
            leading_vt=lambda x, k: x.flatten(1)[:, permutation[:k].to(x.device)],
            leading_v=leading_v,
        )


class Diagonal(LinearOperator):
    r"""Entry-wise gains :math:`A x = w \odot x`, measurements of the signal's shape.

    With a 0/1 ``weights`` it is the *zero-filled* form of :class:`Mask`: :math:`y = m \odot x +
    \sigma e` observes the same entries, and an unobserved entry's measurement is pure noise,
    independent of :math:`x`, so the posterior is the same as with ``Mask(m)`` (the evidence
    differs by the density of that noise). Its measurements keep the image's shape whatever the
    number of observed pixels, so masks of different sizes can share a plate
    (``PerProblem([Diagonal(m) for m in masks])`` is applied as one vectorised product), as in
    Rozet et al.'s EM on masked images (2024), who store ``y = A * x`` the same way.

    SVD: ``s = |w|`` in decreasing order (``V^T x`` lists the entries in that order and ``U``
    carries the signs), so the observed entries of a mask come first.

    Args:
        weights: real tensor of the signal's event shape (its dtype and device are kept).

    References:
        Rozet, Andry, Lanusse, Louppe. Learning Diffusion Priors from Observations by Expectation
        Maximization. NeurIPS 2024. arXiv:2405.13712.
    """

    def __init__(self, weights: Tensor):
        weights = torch.as_tensor(weights)
        if weights.dim() == 0 or not (weights.is_floating_point() or weights.dtype == torch.bool):
            raise ValueError(
                "Diagonal expects a real or boolean tensor of the signal's shape; got dtype "
                f"{weights.dtype}, shape {tuple(weights.shape)}"
            )
        if weights.dtype == torch.bool:
            weights = weights.to(torch.get_default_dtype())
        if not torch.isfinite(weights).all():
            raise ValueError("Diagonal: the weights have non-finite entries")
        super().__init__(tuple(weights.shape), tuple(weights.shape))
        self.weights = weights
        flat = weights.flatten()
        self.permutation = torch.argsort(flat.abs(), descending=True, stable=True)
        self.signs = torch.where(flat[self.permutation] < 0, -1.0, 1.0).to(flat)

    def _forward(self, x: Tensor) -> Tensor:
        return x * self.weights.to(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return y * self.weights.to(y)

    def svd(self) -> SVD:
        permutation, shape = self.permutation, tuple(self.in_shape)

        def scatter(z: Tensor, signs: Tensor | None = None) -> Tensor:
            flat = torch.empty_like(z)
            flat[:, permutation.to(z.device)] = z if signs is None else z * signs.to(z)
            return flat.reshape((-1,) + shape)

        return SVD(
            singular_values=self.weights.flatten()[permutation].abs().to(torch.float64),
            vt=lambda x: x.flatten(1)[:, permutation.to(x.device)],
            v=scatter,
            ut=lambda y: y.flatten(1)[:, permutation.to(y.device)] * self.signs.to(y),
            u=lambda z: scatter(z, self.signs),
        )
