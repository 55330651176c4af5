r"""Non-linear forward models: :class:`PhaseRetrieval` (Fourier magnitudes) and :class:`Saturation`
(a sensor's soft clipping of another operator's output).

They are plain :class:`~diffpost.models.operators.Operator` objects: differentiable, without adjoint
or SVD, for the engines that only need :math:`\log p(y \mid x)` and its gradient.

References:
    Fienup. Phase retrieval algorithms: a comparison. Applied Optics 21(15), 1982.
    Chung, Kim, Mccann, Klasky, Ye. Diffusion Posterior Sampling for General Noisy Inverse
    Problems. ICLR 2023. arXiv:2209.14687.
    Zhang, Chu, Berner, Meng, Anandkumar, Song. Improving Diffusion Inverse Problem Solving with
    Decoupled Noise Annealing (DAPS). CVPR 2025. arXiv:2407.01521.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpost.models.operators._common import image_shape
from diffpost.models.operators.base import Operator

__all__ = ["PhaseRetrieval", "Saturation"]


class PhaseRetrieval(Operator):
    r"""Fourier phase retrieval: :math:`y = |F_P\, x|`, the magnitude of the oversampled spectrum.

    The image is zero-padded to ``P = (round(oversampling * H), round(oversampling * W))`` and
    transformed by the unitary 2-D FFT (``torch.fft.fft2(x, s=P, norm="ortho")``), per channel:
    ``(*batch, [C,] H, W) -> (*batch, [C,] P_H, P_W)``. Where the image sits in the padded frame
    does not matter: a circular shift only changes the phase.

    Args:
        shape: the image shape ``(H, W)`` or ``(C, H, W)``.
        oversampling: the padded-to-original size ratio per axis, at least 1 (2 is the usual
            oversampling that makes the problem generically identifiable up to its trivial
            ambiguities: shift, conjugate flip, global sign).

    Raises:
        ValueError: the shape is not an image shape or ``oversampling < 1``.

    References:
        Fienup. Phase retrieval algorithms: a comparison. Applied Optics 21(15), 1982.
        Chung, Kim, Mccann, Klasky, Ye. Diffusion Posterior Sampling for General Noisy Inverse
        Problems. ICLR 2023. arXiv:2209.14687.
    """

    def __init__(self, shape: tuple[int, ...], oversampling: float = 2.0):
        _, height, width = image_shape("PhaseRetrieval", shape)
        if not (math.isfinite(oversampling) and oversampling >= 1):
            raise ValueError(
                f"PhaseRetrieval: oversampling must be finite and >= 1; got {oversampling!r}"
            )
        self.padded = (round(oversampling * height), round(oversampling * width))
        super().__init__(tuple(shape), tuple(shape)[:-2] + self.padded)
        self.oversampling = float(oversampling)

    def _forward(self, x: Tensor) -> Tensor:
        return torch.fft.fft2(x, s=self.padded, norm="ortho").abs()


class Saturation(Operator):
    r"""Soft saturation of an operator's output: :math:`y = \ell \tanh(A(x) / \ell)`.

    Close to ``A(x)`` for small values, it clips smoothly at :math:`\pm \ell`, as a sensor with a
    limited dynamic range. ``(*batch, *inner.in_shape) -> (*batch, *inner.out_shape)``.

    Args:
        inner: the operator ``A`` (typically linear, e.g. :class:`~diffpost.models.operators.Blur`).
        level: the saturation level :math:`\ell > 0`.

    Raises:
        ValueError: ``inner`` is not an Operator or ``level`` is not positive.

    References:
        Zhang, Chu, Berner, Meng, Anandkumar, Song. Improving Diffusion Inverse Problem Solving
        with Decoupled Noise Annealing. CVPR 2025. arXiv:2407.01521 (high-dynamic-range task).
    """

    def __init__(self, inner: Operator, level: float = 1.0):
        if not isinstance(inner, Operator):
            raise ValueError(f"Saturation wraps an Operator; got {type(inner).__name__}")
        if not (math.isfinite(level) and level > 0):
            raise ValueError(f"Saturation: level must be positive and finite; got {level!r}")
        super().__init__(tuple(inner.in_shape), tuple(inner.out_shape))
        self.inner = inner
        self.level = float(level)

    def _forward(self, x: Tensor) -> Tensor:
        return self.level * torch.tanh(self.inner._forward(x) / self.level)
