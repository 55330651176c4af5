r"""Accelerated MRI: :class:`Fourier`, the unitary 2-D FFT of a real image, then a k-space mask.

The measurement of frequency ``k`` is the pair
:math:`(\operatorname{Re} X_k, \operatorname{Im} X_k)` of :math:`X = F x`
(``torch.fft.fft2(x, norm="ortho")``), so the operator is linear over the reals. Its exact SVD
follows from the real orthonormal Fourier basis (:mod:`~diffpost.models.operators._spectral`), which
pairs ``k`` with ``-k`` since :math:`X_{-k} = \overline{X_k}` for a real image:

* a self-conjugate frequency (``k = -k``: the DC term and the Nyquist ones) has a real coefficient;
  its real-part measurement has singular value 1 and its imaginary part is identically zero;
* a pair with both ``k`` and ``-k`` kept measures each of its two coordinates twice:
  :math:`\operatorname{Re} X_{\pm k} = a / \sqrt 2` and
  :math:`\operatorname{Im} X_{\pm k} = \pm b / \sqrt 2`, so the left singular vectors are the
  normalised sums and differences of the two measurements, singular value 1 for each of ``a`` and
  ``b``, and the other two combinations are never reached;
* a pair with only one of ``k``, ``-k`` kept measures :math:`a/\sqrt 2` and :math:`b/\sqrt 2` once:
  two singular values :math:`1/\sqrt 2`;
* unobserved pairs are the null space.

So the singular values are 1, :math:`1/\sqrt 2` or 0, and ``U`` is the identity up to these 2 x 2
rotations of mirrored measurements.

References:
    Jalal, Arvinte, Daras, Price, Dimakis, Tamir. Robust Compressed Sensing MRI with Deep
    Generative Priors. NeurIPS 2021. arXiv:2108.01368.
    Song, Shen, Xing, Ermon. Solving Inverse Problems in Medical Imaging with Score-Based
    Generative Models. ICLR 2022. arXiv:2111.08005.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffpost.models.operators._common import Constants, image_shape
from diffpost.models.operators._spectral import (
    conjugate_frequencies,
    real_fourier_basis,
    spectral_gather,
    spectral_scatter,
)
from diffpost.models.operators.base import SVD, LinearOperator

__all__ = ["Fourier"]


class Fourier(LinearOperator):
    r"""Undersampled k-space of a real image: ``(*batch, [1,] H, W) -> (*batch, 2, n)``.

    ``forward(x)[..., 0, j]`` and ``[..., 1, j]`` are the real and imaginary parts of the ``j``-th
    kept coefficient of ``torch.fft.fft2(x, norm="ortho")`` (kept frequencies in row-major order),
    ``n`` the number of ``True`` entries of ``mask``. The adjoint zero-fills k-space and applies
    the inverse unitary FFT (real part). The SVD is exact (see the module docstring).

    Args:
        shape: the image shape ``(H, W)`` or ``(1, H, W)``.
        mask: boolean ``(H, W)``, ``True`` at the sampled frequencies (unshifted: the DC term is at
            ``[0, 0]``; apply ``torch.fft.ifftshift`` to a centred mask).

    Raises:
        ValueError: the shape is not a one-channel image shape, or the mask is not a boolean
            ``(H, W)`` tensor with at least one sampled frequency.

    References:
        Jalal, Arvinte, Daras, Price, Dimakis, Tamir. Robust Compressed Sensing MRI with Deep
        Generative Priors. NeurIPS 2021. arXiv:2108.01368.
    """

    def __init__(self, shape: tuple[int, ...], mask: Tensor):
        _, height, width = image_shape("Fourier", shape, single_channel=True)
        mask = torch.as_tensor(mask).detach().cpu()
        if mask.dtype != torch.bool or tuple(mask.shape) != (height, width):
            raise ValueError(
                f"Fourier expects a boolean k-space mask of shape {(height, width)}; got dtype "
                f"{mask.dtype}, shape {tuple(mask.shape)}"
            )
        kept = mask.flatten().nonzero().squeeze(1)
        if kept.numel() == 0:
            raise ValueError("Fourier: the mask samples no frequency")
        super().__init__(tuple(shape), (2, kept.numel()))
        self.mask = mask
        self._size = (height, width)
        self._constants = Constants(measured=torch.cat([2 * kept, 2 * kept + 1]))
        self._svd_constants: Constants | None = None

    def _forward(self, x: Tensor) -> Tensor:
        measured = spectral_gather(x.reshape((-1,) + self._size), self._constants(x).measured)
        return measured.reshape((-1,) + tuple(self.out_shape))

    def _adjoint(self, y: Tensor) -> Tensor:
        image = spectral_scatter(y.flatten(1), self._constants(y).measured, *self._size)
        return image.reshape((-1,) + tuple(self.in_shape))

    def _decomposition(self) -> Constants:
        """Index tables of the SVD, built on first use (see the module docstring)."""
        height, width = self._size
        flat_mask = self.mask.flatten()
        kept = flat_mask.nonzero().squeeze(1)
        n = kept.numel()
        partner = conjugate_frequencies(height, width)
        # kept representatives come first in each pair, so a lone kept frequency needs no sign flip
        index, scale = real_fourier_basis(height, width, preferred=flat_mask)
        is_representative = torch.zeros(2 * height * width, dtype=torch.bool)
        is_representative[index] = True
        self_conjugate = partner[kept] == kept
        partner_kept = flat_mask[partner[kept]] & ~self_conjugate
        leading = is_representative[2 * kept]  # the kept frequency represents its pair
        # active measurements: Re of every representative, Im of every non-self-conjugate one
        active = torch.cat([leading, leading & ~self_conjugate])
        positions = torch.arange(2 * n)
        spectral = torch.cat([2 * kept, 2 * kept + 1])[active]
        singular_values = torch.full((int(active.sum()),), 1 / math.sqrt(2.0), dtype=torch.float64)
        singular_values[torch.cat([self_conjugate | partner_kept, partner_kept])[active]] = 1.0
        # V: the active basis coordinates in measurement order, then the others
        basis_position = torch.full((2 * height * width,), -1, dtype=torch.long)
        basis_position[index] = torch.arange(height * width)
        rest = torch.ones(height * width, dtype=torch.bool)
        rest[basis_position[spectral]] = False
        v_order = torch.cat([basis_position[spectral], rest.nonzero().squeeze(1)])
        # U: a 2 x 2 rotation mixing each measurement of a representative with its mirror's
        position_of = torch.full((height * width,), -1, dtype=torch.long)
        position_of[kept] = torch.arange(n)
        pairs = (leading & partner_kept).nonzero().squeeze(1)
        mirrors = position_of[partner[kept[pairs]]]
        rank = min(2 * n, height * width)
        padding = singular_values.new_zeros(rank - len(singular_values))
        return Constants(
            singular_values=torch.cat([singular_values, padding]),
            v_index=index[v_order],
            v_scale=scale[v_order],
            u_order=torch.cat([positions[active], positions[~active]]),
            first=torch.cat([pairs, pairs + n]),
            second=torch.cat([mirrors, mirrors + n]),
            sign=torch.cat([torch.ones(len(pairs)), -torch.ones(len(pairs))]).double(),
        )

    def svd(self) -> SVD:
        r"""The exact SVD: ``s`` in {1, 1/sqrt(2), 0}, ``V`` a real Fourier basis, ``U`` near ``I``.

        ``U^T y`` rotates each mirrored pair of measurements :math:`(y_p, y_q)` (same part,
        frequencies ``k`` and ``-k``) into
        :math:`((y_p + \sigma y_q)/\sqrt 2, (y_p - \sigma y_q)/\sqrt 2)`, with
        :math:`\sigma = +1` for real parts and :math:`-1` for imaginary parts, then lists the
        measurements that carry a singular value first.
        """
        if self._svd_constants is None:
            self._svd_constants = self._decomposition()
        tables = self._svd_constants
        height, width = self._size
        root = math.sqrt(2.0)

        def ut(y: Tensor) -> Tensor:
            c = tables(y)
            flat = y.flatten(1)
            p, q = flat[:, c.first], c.sign * flat[:, c.second]
            mixed = flat.clone()
            mixed[:, c.first] = (p + q) / root
            mixed[:, c.second] = (p - q) / root
            return mixed[:, c.u_order]

        def u(z: Tensor) -> Tensor:
            c = tables(z)
            flat = torch.empty_like(z)
            flat[:, c.u_order] = z
            p, q = flat[:, c.first], flat[:, c.second]
            mixed = flat.clone()
            mixed[:, c.first] = (p + q) / root
            mixed[:, c.second] = c.sign * (p - q) / root
            return mixed.reshape((-1,) + tuple(self.out_shape))

        def vt(x: Tensor) -> Tensor:
            c = tables(x)
            return spectral_gather(x.reshape(-1, height, width), c.v_index, c.v_scale)

        def v(z: Tensor) -> Tensor:
            c = tables(z)
            image = spectral_scatter(z, c.v_index, height, width, c.v_scale)
            return image.reshape((-1,) + tuple(self.in_shape))

        return SVD(singular_values=tables.cpu.singular_values, vt=vt, v=v, ut=ut, u=u)
