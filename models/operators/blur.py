r"""Deblurring: :class:`Blur`, a convolution with a known kernel, in two flavours.

* A 1-D kernel ``k`` is *separable*: the image is convolved with ``k`` along its columns and its
  rows, with a zero boundary and the size preserved (as DDRM). Each direction is a small matrix
  :math:`A_H` (``H x H``) or :math:`A_W` (``W x W``) and the operator is their Kronecker product
  :math:`X \mapsto A_H X A_W^\top`, whose SVD combines the two small SVDs: singular values
  :math:`s_{H,i}\, s_{W,j}` (sorted in descending order) and singular vectors
  :math:`V_H^\top X V_W`, :math:`U_H^\top Y U_W`.
* A 2-D kernel means *circular* convolution through the FFT. The operator is diagonal in the
  complex Fourier basis with eigenvalues :math:`K_k`; in the real orthonormal Fourier basis
  (:mod:`~diffpost.models.operators._spectral`) that gives the exact SVD :math:`s = |K_k|`, ``V``
  the real Fourier basis and :math:`U = \Phi V` with :math:`\Phi` the all-pass filter of phase
  :math:`K_k / |K_k|`. The pseudo-inverse is a closed-form spectral (optionally Wiener) filter.

Both act on every channel of ``(C, H, W)`` images independently; the coordinates of the SVD are
listed rank by rank, the channels of one rank next to each other.

References:
    Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022.
    arXiv:2201.11793 (separable deblurring ``H_functions``).
    Hansen, Nagy, O'Leary. Deblurring Images: Matrices, Spectra, and Filtering. SIAM, 2006.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from diffpost.models.operators._common import Constants, image_shape, sort_descending
from diffpost.models.operators._spectral import (
    circular_filter,
    hermitian_response,
    real_fourier_basis,
    spectral_gather,
    spectral_scatter,
)
from diffpost.models.operators.base import SVD, LinearOperator

__all__ = ["Blur", "SeparableBlur", "CircularBlur", "gaussian_kernel", "uniform_kernel"]


def _check_size(name: str, size: int) -> int:
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"{name}: size must be a positive integer; got {size!r}")
    return int(size)


def gaussian_kernel(size: int, std: float | Tensor) -> Tensor:
    """A normalised 1-D Gaussian kernel, centred on ``(size - 1) / 2``.

    Args:
        size: the number of taps.
        std: the standard deviation in pixels, positive: a number, or a 0-d tensor (e.g. a
            latent blur width), in which case the kernel is differentiable in it.

    Returns:
        float64 tensor of shape ``(size,)`` summing to one.
    """
    size = _check_size("gaussian_kernel", size)
    if isinstance(std, Tensor) and std.dim() != 0:
        raise ValueError(f"gaussian_kernel: std must be a number or a 0-d tensor; got {std.shape}")
    value = float(std.detach()) if isinstance(std, Tensor) else std
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"gaussian_kernel: std must be positive and finite; got {value!r}")
    if isinstance(std, Tensor):
        std = std.to(torch.float64).cpu()
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / std) ** 2)
    return kernel / kernel.sum()


def uniform_kernel(size: int) -> Tensor:
    """A normalised 1-D box kernel: float64 tensor of shape ``(size,)`` filled with ``1 / size``."""
    size = _check_size("uniform_kernel", size)
    return torch.full((size,), 1 / size, dtype=torch.float64)


def _as_kernel(kernel: Tensor, dims: int) -> Tensor:
    kernel = torch.as_tensor(kernel)
    if (
        kernel.dim() != dims
        or kernel.numel() == 0
        or kernel.is_complex()
        or kernel.dtype == torch.bool
    ):
        raise ValueError(
            f"Blur expects a non-empty real kernel with {dims} dimension(s); got dtype "
            f"{kernel.dtype}, shape {tuple(kernel.shape)}"
        )
    kernel = kernel.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(kernel).all():
        raise ValueError("Blur: the kernel has non-finite entries")
    return kernel


def _tracks_derivatives(kernel: Tensor) -> bool:
    """Whether a kernel carries a gradient (reverse mode) or a tangent (forward mode)."""
    return kernel.requires_grad or forward_ad.unpack_dual(kernel).tangent is not None


def _rank_major(coordinates: Tensor) -> Tensor:
    """``(B, C, n)`` per-channel coordinates -> ``(B, n C)``, the channels of one rank adjacent."""
    return coordinates.transpose(1, 2).flatten(1)


def _channel_major(z: Tensor, channels: int) -> Tensor:
    """The inverse of :func:`_rank_major`: ``(B, n C) -> (B, C, n)``."""
    return z.reshape(z.shape[0], -1, channels).transpose(1, 2)


class Blur(LinearOperator):
    """Convolution with a kernel: separable with a zero boundary (1-D kernel) or circular (2-D).

    ``Blur(shape, kernel)`` returns a :class:`SeparableBlur` for a 1-D kernel and a
    :class:`CircularBlur` for a 2-D kernel; both map ``(*batch, *shape) -> (*batch, *shape)``.

    Args:
        shape: the image shape ``(H, W)`` or ``(C, H, W)``.
        kernel: ``(L,)`` (separable, the same taps along rows and columns) or ``(kh, kw)``
            (circular); see :func:`gaussian_kernel` and :func:`uniform_kernel`. A kernel that
            requires a gradient (e.g. ``gaussian_kernel(9, width)`` with a latent ``width``)
            keeps ``forward`` and ``adjoint`` differentiable in it; the SVD is of its value.

    Raises:
        ValueError: the kernel is neither 1-D nor 2-D, or does not fit the image.
    """

    def __new__(cls, shape: tuple[int, ...] | None = None, kernel: Tensor | None = None):
        # the defaults let copy and pickle recreate a subclass instance without arguments
        target = cls
        if cls is Blur:
            kernel_shape = tuple(torch.as_tensor(kernel).shape)
            if len(kernel_shape) not in (1, 2):
                raise ValueError(
                    "Blur expects a 1-D (separable) or 2-D (circular) kernel; got shape "
                    f"{kernel_shape}"
                )
            target = SeparableBlur if len(kernel_shape) == 1 else CircularBlur
        return super().__new__(target)


def _convolution_matrix(kernel: Tensor, size: int) -> Tensor:
    """The ``(size, size)`` matrix of the convolution with ``kernel`` centred on tap ``L // 2``."""
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + kernel.shape[0] // 2
    inside = (offsets >= 0) & (offsets < kernel.shape[0])
    return torch.where(inside, kernel[offsets.clamp(0, kernel.shape[0] - 1)], 0.0)


class SeparableBlur(Blur):
    r"""Separable blur with a zero boundary: :math:`Y_c = A_H X_c A_W^\top` for every channel ``c``.

    :math:`(A_n)_{ij} = k_{i - j + L//2}` (zero outside the kernel): a convolution centred on tap
    ``L // 2`` whose output has the input's size. The exact SVD is the Kronecker product of the
    SVDs of :math:`A_H` and :math:`A_W`, sorted by descending singular value, applied with small
    matrix products only.

    Args:
        shape: the image shape ``(H, W)`` or ``(C, H, W)``.
        kernel: the 1-D taps ``(L,)``.

    References:
        Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022.
        arXiv:2201.11793.
    """

    def __init__(self, shape: tuple[int, ...], kernel: Tensor):
        channels, height, width = image_shape("Blur", shape)
        source = torch.as_tensor(kernel)
        kernel = _as_kernel(kernel, 1)
        super().__init__(tuple(shape), tuple(shape))
        self.kernel = kernel
        self._image = (channels, height, width)
        rows, columns = _convolution_matrix(kernel, height), _convolution_matrix(kernel, width)
        # a kernel that carries a gradient (e.g. built from a latent blur width) keeps forward
        # and adjoint differentiable in it; the SVD is of its value
        self._graph = None
        if _tracks_derivatives(source):
            taps = source.to(device="cpu", dtype=torch.float64)
            self._graph = (_convolution_matrix(taps, height), _convolution_matrix(taps, width))
        u_rows, s_rows, vt_rows = torch.linalg.svd(rows)
        u_columns, s_columns, vt_columns = torch.linalg.svd(columns)
        singular_values, permutation = sort_descending(torch.outer(s_rows, s_columns).flatten())
        self._singular_values = singular_values.repeat_interleave(channels)
        self._constants = Constants(
            rows=rows,
            columns=columns,
            u_rows=u_rows,
            u_columns=u_columns,
            v_rows=vt_rows.T,
            v_columns=vt_columns.T,
            permutation=permutation,
            inverse_permutation=torch.argsort(permutation),
        )

    def _matrices(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The row and column convolution matrices on ``like``'s device and dtype."""
        if self._graph is not None:
            return self._graph[0].to(like), self._graph[1].to(like)
        c = self._constants(like)
        return c.rows, c.columns

    def _forward(self, x: Tensor) -> Tensor:
        rows, columns = self._matrices(x)
        return (rows @ x.reshape((-1,) + self._image) @ columns.T).reshape(x.shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        rows, columns = self._matrices(y)
        return (rows.T @ y.reshape((-1,) + self._image) @ columns).reshape(y.shape)

    def _coordinates(self, images: Tensor, side: str) -> Tensor:
        """``side^T`` of images, ``side`` in {"u", "v"}: ``(B, *in_shape) -> (B, d)``."""
        c = vars(self._constants(images))
        rows, columns = c[f"{side}_rows"], c[f"{side}_columns"]
        rotated = rows.T @ images.reshape((-1,) + self._image) @ columns
        return _rank_major(rotated.flatten(2)[:, :, c["permutation"]])

    def _synthesis(self, z: Tensor, side: str) -> Tensor:
        """``side`` applied to coordinates, ``side`` in {"u", "v"}: ``(B, d) -> (B, *in_shape)``."""
        c = vars(self._constants(z))
        rows, columns = c[f"{side}_rows"], c[f"{side}_columns"]
        coefficients = _channel_major(z, self._image[0])[:, :, c["inverse_permutation"]]
        images = rows @ coefficients.reshape((-1,) + self._image) @ columns.T
        return images.reshape((-1,) + tuple(self.in_shape))

    def svd(self) -> SVD:
        return SVD(
            singular_values=self._singular_values,
            vt=lambda x: self._coordinates(x, "v"),
            v=lambda z: self._synthesis(z, "v"),
            ut=lambda y: self._coordinates(y, "u"),
            u=lambda z: self._synthesis(z, "u"),
        )


class CircularBlur(Blur):
    r"""Circular (periodic) convolution with a 2-D kernel through the FFT, per channel.

    :math:`y_{i,j} = \sum_{a,b} k_{a,b}\, x_{i - a + kh//2,\ j - b + kw//2}`, indices modulo the
    image size. The exact SVD lives in the real orthonormal Fourier basis: :math:`s = |K|` sorted in
    descending order, ``V`` the real Fourier basis, ``U`` the same basis after the all-pass filter
    :math:`K / |K|` (see the module docstring). :meth:`pinv` is a closed-form spectral filter.

    Args:
        shape: the image shape ``(H, W)`` or ``(C, H, W)``.
        kernel: the taps ``(kh, kw)`` with ``kh <= H`` and ``kw <= W``.

    References:
        Hansen, Nagy, O'Leary. Deblurring Images: Matrices, Spectra, and Filtering. SIAM, 2006.
    """

    def __init__(self, shape: tuple[int, ...], kernel: Tensor):
        channels, height, width = image_shape("Blur", shape)
        source = torch.as_tensor(kernel)
        kernel = _as_kernel(kernel, 2)
        if kernel.shape[0] > height or kernel.shape[1] > width:
            raise ValueError(
                f"Blur: the 2-D kernel {tuple(kernel.shape)} is larger than the image "
                f"{tuple(shape)}"
            )
        super().__init__(tuple(shape), tuple(shape))
        self.kernel = kernel
        self._image = (channels, height, width)
        response = hermitian_response(kernel, height, width)
        magnitude = response.abs()
        # the all-pass phase K / |K| (1 where K = 0) keeps U orthogonal and real
        phase = torch.where(
            magnitude > 0, response / magnitude.clamp_min(torch.finfo(torch.float64).tiny), 1
        )
        index, scale = real_fourier_basis(height, width)
        singular_values, permutation = sort_descending(magnitude.flatten()[index // 2])
        self._singular_values = singular_values.repeat_interleave(channels)
        half = width // 2 + 1
        self._graph = None  # see SeparableBlur
        if _tracks_derivatives(source):
            taps = source.to(device="cpu", dtype=torch.float64)
            self._graph = hermitian_response(taps, height, width)[:, :half]
        self._constants = Constants(
            response=response[:, :half],
            phase=phase[:, :half],
            index=index[permutation],
            scale=scale[permutation],
        )

    def _response(self, like: Tensor) -> Tensor:
        """The half spectrum of the kernel on ``like``'s device, in its complex dtype."""
        if self._graph is not None:
            return self._graph.to(device=like.device, dtype=self._constants(like).response.dtype)
        return self._constants(like).response

    def _forward(self, x: Tensor) -> Tensor:
        return circular_filter(x, self._response(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return circular_filter(y, self._response(y).conj())

    def _coordinates(self, images: Tensor) -> Tensor:
        c = self._constants(images)
        channels, height, width = self._image
        spectral = spectral_gather(images.reshape(-1, height, width), c.index, c.scale)
        return _rank_major(spectral.reshape(-1, channels, height * width))

    def _synthesis(self, z: Tensor) -> Tensor:
        c = self._constants(z)
        channels, height, width = self._image
        per_channel = _channel_major(z, channels).reshape(-1, height * width)
        images = spectral_scatter(per_channel, c.index, height, width, c.scale)
        return images.reshape((-1,) + tuple(self.in_shape))

    def svd(self) -> SVD:
        return SVD(
            singular_values=self._singular_values,
            vt=self._coordinates,
            v=self._synthesis,
            ut=lambda y: self._coordinates(circular_filter(y, self._constants(y).phase.conj())),
            u=lambda z: circular_filter(self._synthesis(z), self._constants(z).phase),
        )

    def pinv(
        self, y: Tensor, *, tol: float = 1e-6, max_iterations: int = 200, eps: float = 0.0
    ) -> Tensor:
        r"""Closed-form pseudo-inverse, or Wiener (Tikhonov) deconvolution when ``eps > 0``.

        :math:`x = F^{-1}\big[\overline{K} \odot F y / (|K|^2 + \varepsilon)\big]`, frequencies with
        :math:`|K| \le` ``tol`` :math:`\max |K|` set to zero. With ``eps = 0`` this is the
        Moore–Penrose pseudo-inverse (the SVD formula of :meth:`LinearOperator.pinv`); with
        ``eps > 0`` it is :math:`\arg\min_x \|A x - y\|^2 + \varepsilon \|x\|^2`.

        Args:
            y: measurements, shape ``(*batch, *out_shape)``.
            tol: relative threshold below which a frequency is treated as lost.
            max_iterations: unused (closed form); kept for the common :meth:`pinv` signature.
            eps: the Wiener regularisation, non-negative.

        Returns:
            ``(*batch, *in_shape)``.
        """
        if not eps >= 0:
            raise ValueError(f"CircularBlur.pinv: eps must be non-negative; got {eps!r}")
        response = self._constants(y).response
        magnitude = response.abs()
        keep = magnitude > tol * magnitude.max()
        denominator = (magnitude**2 + eps).clamp_min(torch.finfo(magnitude.dtype).tiny)
        inverse = torch.where(keep, response.conj() / denominator, 0)
        return self._batched(
            lambda flat: circular_filter(flat, inverse), y, self.out_shape, self.in_shape, "pinv"
        )


def convolve(x: Tensor, kernel: Tensor) -> Tensor:
    r"""Circular 2-D convolution of images with kernels, one kernel per image, broadcasting.

    The functional form of :class:`CircularBlur` for kernels that change with the image (a
    latent kernel with one value per particle, as in BlindDPS):
    :math:`y_{i,j} = \sum_{a,b} k_{a,b}\, x_{i - a + kh//2,\ j - b + kw//2}`, indices modulo the
    image size, through the FFT; differentiable in both arguments.

    Args:
        x: images ``(*batch, C, H, W)`` (every channel blurred by its image's kernel) or
            ``(*batch, H, W)``.
        kernel: ``(*batch, kh, kw)`` with ``kh <= H``, ``kw <= W``; ``batch`` broadcasts with
            the images'.

    Returns:
        The blurred images, shaped like ``x`` (broadcast with the kernels' batch).
    """
    x, kernel = torch.as_tensor(x), torch.as_tensor(kernel)
    if kernel.dim() < 2 or x.dim() < 2:
        raise ValueError(
            f"convolve expects images (..., H, W) and kernels (..., kh, kw); got {tuple(x.shape)} "
            f"and {tuple(kernel.shape)}"
        )
    height, width = x.shape[-2:]
    kh, kw = kernel.shape[-2:]
    if kh > height or kw > width:
        raise ValueError(
            f"convolve: kernels {(kh, kw)} are larger than the images {(height, width)}"
        )
    psf = kernel.new_zeros(kernel.shape[:-2] + (height, width))
    psf = torch.cat(
        [torch.cat([kernel, psf[..., :kh, kw:]], -1), psf[..., kh:, :]], -2
    )  # the kernel in the top-left corner, differentiably
    psf = torch.roll(psf, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    response = torch.fft.rfft2(psf.to(x.dtype))
    channels = x.dim() - kernel.dim()
    if channels > 0:
        response = response.reshape(response.shape[:-2] + (1,) * channels + response.shape[-2:])
    return torch.fft.irfft2(torch.fft.rfft2(x) * response, s=(height, width))
