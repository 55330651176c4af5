r"""Real-valued views of the unitary 2-D DFT, shared by :class:`~diffpost.models.operators.Fourier`
and the circular :class:`~diffpost.models.operators.Blur`.

The spectrum :math:`X = F x` (``torch.fft.fft2(x, norm="ortho")``) of a real ``H x W`` image is
stored here *interleaved*: flat index ``2 k`` holds :math:`\operatorname{Re} X_k` and ``2 k + 1``
holds :math:`\operatorname{Im} X_k`, ``k`` the row-major frequency index. The map
:math:`T: x \mapsto (\operatorname{Re} X, \operatorname{Im} X)` is an isometry from
:math:`\mathbb{R}^{HW}` into :math:`\mathbb{R}^{2HW}` with transpose
:math:`T^\top w = \operatorname{Re} F^{H} (w_{\mathrm{re}} + i\, w_{\mathrm{im}})`.

A real signal has :math:`X_{-k} = \overline{X_k}`, so only :math:`HW` of the :math:`2HW` numbers are
free. Choosing one representative ``k`` per conjugate pair :math:`\{k, -k\}` gives the real
orthonormal Fourier basis: :math:`\sqrt{2} \operatorname{Re} X_k` and
:math:`\sqrt{2} \operatorname{Im} X_k` for a pair, :math:`X_k` itself for the (up to four)
self-conjugate frequencies :math:`k = -k`. Its coordinates are a scaled gather from ``T x``
(:func:`spectral_gather`) and its synthesis the transposed scatter (:func:`spectral_scatter`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def conjugate_frequencies(height: int, width: int) -> Tensor:
    """The flat index of :math:`-k` for every flat frequency ``k``: int64, shape ``(H W,)``."""
    rows = (-torch.arange(height)) % height
    columns = (-torch.arange(width)) % width
    return (rows[:, None] * width + columns[None, :]).flatten()


def real_fourier_basis(
    height: int, width: int, preferred: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The real orthonormal Fourier basis as (interleaved spectral index, scale) pairs.

    Args:
        height: ``H``.
        width: ``W``.
        preferred: optional boolean ``(H W,)``; in a conjugate pair with exactly one preferred
            frequency, that one is the representative (otherwise the lower flat index is).

    Returns:
        ``index`` (int64, shape ``(H W,)``, into the interleaved spectrum of length ``2 H W``) and
        ``scale`` (float64, ``sqrt(2)`` for pair coordinates, ``1`` for self-conjugate ones), listed
        as the real parts of all representatives then the imaginary parts of the paired ones.
    """
    frequencies = torch.arange(height * width)
    partner = conjugate_frequencies(height, width)
    if preferred is None:
        preferred = torch.zeros(height * width, dtype=torch.bool)
    self_conjugate = partner == frequencies
    tie = preferred == preferred[partner]
    representative = (
        self_conjugate | (preferred & ~preferred[partner]) | (tie & (frequencies < partner))
    )
    real = representative.nonzero().squeeze(1)
    imaginary = (representative & ~self_conjugate).nonzero().squeeze(1)
    index = torch.cat([2 * real, 2 * imaginary + 1])
    scale = torch.full(index.shape, math.sqrt(2.0), dtype=torch.float64)
    scale[self_conjugate[index // 2]] = 1.0
    return index, scale


def spectral_gather(x: Tensor, index: Tensor, scale: Tensor | None = None) -> Tensor:
    """``scale * (T x)[index]`` (``scale`` None: unscaled): ``(B, H, W) -> (B, len(index))``."""
    spectrum = torch.view_as_real(torch.fft.fft2(x, norm="ortho")).flatten(1)[:, index]
    return spectrum if scale is None else spectrum * scale


def spectral_scatter(
    z: Tensor, index: Tensor, height: int, width: int, scale: Tensor | None = None
) -> Tensor:
    """The transpose of :func:`spectral_gather`: ``(B, len(index)) -> (B, H, W)``."""
    spectrum = z.new_zeros(z.shape[0], height * width * 2)
    spectrum[:, index] = z if scale is None else z * scale
    spectrum = torch.view_as_complex(spectrum.reshape(-1, height, width, 2))
    return torch.fft.ifft2(spectrum, norm="ortho").real


def hermitian_response(kernel: Tensor, height: int, width: int) -> Tensor:
    r"""The frequency response of circular convolution with ``kernel`` on ``H x W`` images.

    The kernel's centre ``(kh // 2, kw // 2)`` is placed at the origin, so that
    :math:`(k * x)_{i,j} = \sum_{a,b} k_{a,b}\, x_{i - a + kh//2,\ j - b + kw//2}` (indices modulo
    the image size). The response is symmetrised to be exactly Hermitian (real at the
    self-conjugate frequencies), as the response of a real kernel is up to round-off.

    Args:
        kernel: ``(kh, kw)`` with ``kh <= H`` and ``kw <= W``.
        height: ``H``.
        width: ``W``.

    Returns:
        The unnormalised DFT of the centred kernel, complex128, shape ``(H, W)``.
    """
    psf = torch.zeros(height, width, dtype=torch.float64)
    psf[: kernel.shape[0], : kernel.shape[1]] = kernel
    psf = torch.roll(psf, shifts=(-(kernel.shape[0] // 2), -(kernel.shape[1] // 2)), dims=(0, 1))
    response = torch.fft.fft2(psf)
    mirrored = response.flatten()[conjugate_frequencies(height, width)].reshape(height, width)
    return (response + mirrored.conj()) / 2


def circular_filter(x: Tensor, response: Tensor) -> Tensor:
    """Multiply the spectrum of a real ``x`` by a Hermitian response: ``(B, H, W) -> (B, H, W)``.

    Args:
        x: real images, shape ``(B, H, W)``.
        response: the half spectrum ``(H, W // 2 + 1)`` of a Hermitian response (as ``rfft2``).
    """
    return torch.fft.irfft2(torch.fft.rfft2(x) * response, s=x.shape[-2:])
