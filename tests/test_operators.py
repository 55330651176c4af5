"""The operator library: one property suite over a registry, plus one independent construction each.

A new operator joins the suite by one entry in ``LINEAR`` or ``NONLINEAR`` (a factory on small
shapes). Closed forms are compared in float64 against dense matrices built column by column
(``LinearOperator.matrix``) or against a direct construction that shares no code with the
operator (``torch.fft``, ``conv2d``, ``grid_sample``, ``torch.roll`` sums).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from diffpost.models import operators as ops

DOUBLE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype=DOUBLE) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed), dtype=dtype)


def _mask(*shape: int, seed: int, fraction: float = 0.5) -> torch.Tensor:
    return torch.rand(shape, generator=_generator(seed)) < fraction


LINEAR = {
    "identity": lambda: ops.Identity((2, 3)),
    "matrix": lambda: ops.Matrix(_randn(5, 7, seed=1)),
    "mask-image": lambda: ops.Mask(_mask(2, 5, 4, seed=2)),
    "mask-coordinates": lambda: ops.Mask(torch.tensor([5, 0, 3]), shape=(8,)),
    # gains of both signs, ties and zeros (a zero-filled mask is a 0/1 Diagonal)
    "diagonal": lambda: ops.Diagonal(
        torch.tensor([[2.0, -0.5, 0.0], [0.0, 2.0, -3.0]], dtype=DOUBLE)
    ),
    "downsample": lambda: ops.Downsample((2, 6, 4), 2),
    "downsample-gray": lambda: ops.Downsample((6, 9), 3),
    "blur-separable": lambda: ops.Blur((2, 6, 5), ops.gaussian_kernel(5, 1.0)),
    "blur-circular": lambda: ops.Blur((2, 6, 5), torch.rand(3, 2, generator=_generator(3)) + 0.5),
    "colorization": lambda: ops.Colorization((3, 4, 5)),
    "fourier": lambda: ops.Fourier((8, 6), _mask(8, 6, seed=4)),
    "fourier-odd": lambda: ops.Fourier((1, 5, 7), _mask(5, 7, seed=5, fraction=0.7)),
    "radon": lambda: ops.Radon((1, 7, 6), 4),
    "compose-linear": lambda: ops.Compose(
        ops.Downsample((6, 6), 2), ops.Blur((6, 6), ops.uniform_kernel(3))
    ),
}
NONLINEAR = {
    "phase-retrieval": lambda: ops.PhaseRetrieval((2, 5, 4)),
    "saturation": lambda: ops.Saturation(ops.Blur((5, 4), ops.gaussian_kernel(3, 1.0)), level=0.5),
    "compose-nonlinear": lambda: ops.Compose(
        ops.Mask(_mask(10, 8, seed=6)), ops.PhaseRetrieval((5, 4))
    ),
}
OPERATORS = {**LINEAR, **NONLINEAR}
WITH_SVD = [name for name, factory in LINEAR.items() if factory().svd() is not None]


def _size(shape: torch.Size) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------- property suite


def test_registry_covers_the_library():
    # every structured operator that has an SVD runs the SVD checks; Radon and Compose do not
    assert set(WITH_SVD) == set(LINEAR) - {"radon", "compose-linear"}
    assert all(LINEAR[name]().is_linear for name in LINEAR)
    assert not any(NONLINEAR[name]().is_linear for name in NONLINEAR)


@pytest.mark.parametrize("name", LINEAR)
def test_adjoint_is_exact(name):
    # a correct adjoint is exact up to round-off: about 1e-16 in float64 for every operator here
    assert ops.check_adjoint(LINEAR[name]()) < 1e-10


@pytest.mark.parametrize("name", WITH_SVD)
def test_svd_reproduces_forward(name):
    op = LINEAR[name]()
    x = _randn(3, *op.in_shape)
    applied = op.svd().apply(x, _size(op.out_shape))
    torch.testing.assert_close(applied, op.forward(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", WITH_SVD)
def test_svd_factors_are_orthogonal(name):
    op = LINEAR[name]()
    svd = op.svd()
    for flat, back, shape in ((svd.vt, svd.v, op.in_shape), (svd.ut, svd.u, op.out_shape)):
        n = _size(shape)
        identity = torch.eye(n, dtype=DOUBLE)
        dense = flat(identity.reshape((n,) + tuple(shape)))  # rows: coordinates of basis vectors
        assert dense.shape == (n, n)
        torch.testing.assert_close(dense @ dense.T, identity, rtol=0, atol=1e-12)
        signal = _randn(2, *shape, seed=7)
        torch.testing.assert_close(back(flat(signal)), signal, rtol=0, atol=1e-12)
        z = _randn(2, n, seed=8)
        torch.testing.assert_close(flat(back(z)), z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", WITH_SVD)
def test_thin_svd_maps_match_the_full_rotation(name):
    """vt_head / v_head (thin for Matrix and Mask, full rotation otherwise) agree with vt / v."""
    op = LINEAR[name]()
    svd = op.svd()
    n = _size(op.in_shape)
    k = max(1, min(svd.rank_bound, n) // 2)
    x = _randn(3, *op.in_shape, seed=11)
    torch.testing.assert_close(svd.vt_head(x, k), svd.vt(x)[:, :k], rtol=0, atol=1e-12)
    head = _randn(3, k, seed=12)
    padded = torch.cat([head, head.new_zeros(3, n - k)], dim=1)
    torch.testing.assert_close(
        svd.v_head(head, tuple(op.in_shape)), svd.v(padded), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", WITH_SVD)
def test_singular_values_match_the_dense_matrix(name):
    op = LINEAR[name]()
    s = op.svd().singular_values
    assert s.shape == (min(_size(op.in_shape), _size(op.out_shape)),)
    assert bool((s >= 0).all())
    expected = torch.linalg.svdvals(op.matrix())
    torch.testing.assert_close(
        torch.sort(s.to(DOUBLE), descending=True).values, expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", LINEAR)
def test_pinv_recovers_the_row_space_component(name):
    op = LINEAR[name]()
    x = _randn(3, *op.in_shape, seed=9)
    y = op.forward(x)
    # the SVD pinv drops singular values below tol * max(s); the dense reference uses the same cut
    recovered = op.pinv(y, tol=1e-6, max_iterations=1000)
    matrix = op.matrix()
    expected = (torch.linalg.pinv(matrix, rtol=1e-6) @ matrix @ x.reshape(3, -1).T).T
    # conjugate gradient stops at a relative residual of 1e-6: its error is of that order
    atol = 1e-10 if op.svd() is not None else 1e-5
    torch.testing.assert_close(recovered.reshape(3, -1), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["unbatched", "batch", "batch2d"])
@pytest.mark.parametrize("name", OPERATORS)
def test_batch_dimensions(name, batch):
    op = OPERATORS[name]()
    x = _randn(*batch, *op.in_shape, seed=10)
    y = op.forward(x)
    assert y.shape == batch + tuple(op.out_shape)
    one_by_one = torch.stack([op.forward(item) for item in x.reshape((-1,) + tuple(op.in_shape))])
    torch.testing.assert_close(y.reshape(one_by_one.shape), one_by_one, rtol=0, atol=1e-12)
    if op.is_linear:
        w = _randn(*batch, *op.out_shape, seed=11)
        assert op.adjoint(w).shape == batch + tuple(op.in_shape)
        assert op.pinv(w).shape == batch + tuple(op.in_shape)


@pytest.mark.parametrize("name", OPERATORS)
def test_float32_in_float32_out(name):
    op = OPERATORS[name]()
    x = _randn(2, *op.in_shape, seed=12)
    single = op.forward(x.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), op.forward(x), rtol=1e-4, atol=1e-5)
    if not op.is_linear:
        return
    y = _randn(2, *op.out_shape, seed=13).float()
    assert op.adjoint(y).dtype == torch.float32
    assert op.pinv(y).dtype == torch.float32
    svd = op.svd()
    if svd is not None:
        coordinates = svd.vt(x.float())
        assert coordinates.dtype == svd.v(coordinates).dtype == svd.ut(y).dtype == torch.float32
        assert svd.u(svd.ut(y)).dtype == torch.float32
        assert svd.apply(x.float(), _size(op.out_shape)).dtype == torch.float32


@pytest.mark.parametrize("name", OPERATORS)
def test_wrong_shape_names_both_shapes(name):
    op = OPERATORS[name]()
    cases = [(op.forward, op.in_shape)]
    if op.is_linear:
        cases += [(op.adjoint, op.out_shape), (op.pinv, op.out_shape)]
    for method, shape in cases:
        bad = torch.zeros(2, *shape[:-1], shape[-1] + 1, dtype=DOUBLE)
        with pytest.raises(ValueError) as error:
            method(bad)
        message = str(error.value)
        assert ", ".join(map(str, shape)) in message  # the expected shape
        assert str(tuple(bad.shape)) in message  # the shape given


@pytest.mark.parametrize("name", OPERATORS)
def test_forward_is_differentiable(name):
    op = OPERATORS[name]()
    x = _randn(2, *op.in_shape, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(op.forward, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(op.forward, (x,), fast_mode=True)
    if op.is_linear:
        y = _randn(2, *op.out_shape, seed=15).requires_grad_()
        assert torch.autograd.gradcheck(op.adjoint, (y,), fast_mode=True)


@pytest.mark.parametrize("name", OPERATORS)
def test_operators_survive_copy_and_pickle(name):
    op = OPERATORS[name]()
    x = _randn(2, *op.in_shape, seed=16)
    op.forward(x.float())  # fills the per-dtype caches, which must copy too
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert type(clone) is type(op)
        torch.testing.assert_close(clone.forward(x), op.forward(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", OPERATORS)
def test_device_follows_the_input(name):
    op = OPERATORS[name]()
    x = _randn(2, *op.in_shape, seed=16)
    on_device = op.forward(x.cuda())
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device.cpu(), op.forward(x), rtol=1e-10, atol=1e-10)
    if op.is_linear:
        y = _randn(2, *op.out_shape, seed=17)
        torch.testing.assert_close(
            op.adjoint(y.cuda()).cpu(), op.adjoint(y), rtol=1e-10, atol=1e-10
        )
        svd = op.svd()
        if svd is not None:
            torch.testing.assert_close(svd.vt(x.cuda()).cpu(), svd.vt(x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------- independent constructions


def test_downsample_matches_the_dense_averaging_matrix():
    channels, height, width, k = 2, 4, 6, 2
    op = ops.Downsample((channels, height, width), k)
    dense = torch.zeros(channels, height // k, width // k, channels, height, width, dtype=DOUBLE)
    for c in range(channels):
        for i in range(height // k):
            for j in range(width // k):
                dense[c, i, j, c, i * k : (i + 1) * k, j * k : (j + 1) * k] = 1 / k**2
    torch.testing.assert_close(op.matrix(), dense.reshape(op.matrix().shape), rtol=0, atol=1e-15)
    assert torch.allclose(op.svd().singular_values, torch.tensor(1 / k, dtype=DOUBLE))


def test_colorization_is_the_channel_mean():
    op = ops.Colorization((3, 4, 5))
    x = _randn(2, 3, 4, 5)
    torch.testing.assert_close(op.forward(x), x.mean(-3, keepdim=True), rtol=0, atol=1e-15)
    assert torch.allclose(op.svd().singular_values, torch.tensor(1 / math.sqrt(3), dtype=DOUBLE))


def test_fourier_matches_torch_fft():
    mask = _mask(8, 6, seed=4)
    x = _randn(3, 1, 8, 6)
    spectrum = torch.fft.fft2(x[:, 0], norm="ortho")
    expected = torch.stack([spectrum.real[:, mask], spectrum.imag[:, mask]], dim=1)
    torch.testing.assert_close(
        ops.Fourier((1, 8, 6), mask).forward(x), expected, rtol=0, atol=1e-14
    )


def test_fourier_singular_values_follow_the_conjugate_pairs():
    # DC kept (1 and a zero for its imaginary part), (0, 1) and (0, 3) mirror each other (two 1s and
    # two zeros), (1, 1) kept alone (two 1/sqrt 2)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[0, 3] = mask[1, 1] = True
    s = ops.Fourier((4, 4), mask).svd().singular_values
    expected = torch.tensor([1, 1, 1, 0.5**0.5, 0.5**0.5, 0, 0, 0], dtype=DOUBLE)
    torch.testing.assert_close(torch.sort(s, descending=True).values, expected, rtol=0, atol=1e-15)
    full = ops.Fourier((5, 4), torch.ones(5, 4, dtype=torch.bool))
    x = _randn(2, 5, 4)
    torch.testing.assert_close(full.pinv(full.forward(x)), x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", [(2, 9, 7), (6, 8)])
def test_separable_blur_matches_zero_padded_conv2d(shape):
    kernel = torch.tensor(
        [0.1, 0.5, 0.2, 0.15, 0.05], dtype=DOUBLE
    )  # asymmetric: orientation matters
    op = ops.Blur(shape, kernel)
    assert isinstance(op, ops.SeparableBlur)
    x = _randn(2, *shape)
    images = x.reshape(-1, 1, *shape[-2:])
    weight = torch.outer(kernel, kernel).flip(0, 1)[
        None, None
    ]  # conv2d correlates: flip for a convolution
    expected = F.conv2d(images, weight, padding=len(kernel) // 2).reshape(x.shape)
    torch.testing.assert_close(op.forward(x), expected, rtol=0, atol=1e-14)


def test_circular_blur_matches_rolled_sums():
    kernel = torch.rand(3, 4, generator=_generator(18), dtype=DOUBLE)
    op = ops.Blur((2, 7, 6), kernel)
    assert isinstance(op, ops.CircularBlur)
    x = _randn(2, 2, 7, 6)
    expected = torch.zeros_like(x)
    for a in range(3):
        for b in range(4):
            expected += kernel[a, b] * torch.roll(x, shifts=(a - 3 // 2, b - 4 // 2), dims=(-2, -1))
    torch.testing.assert_close(op.forward(x), expected, rtol=0, atol=1e-14)


def test_circular_blur_wiener_pinv_is_tikhonov():
    op = ops.Blur((5, 6), torch.rand(3, 3, generator=_generator(19), dtype=DOUBLE))
    y = _randn(2, 5, 6)
    matrix, eps = op.matrix(), 0.1
    normal = matrix.T @ matrix + eps * torch.eye(30, dtype=DOUBLE)
    expected = torch.linalg.solve(normal, matrix.T @ y.reshape(2, -1).T).T
    torch.testing.assert_close(op.pinv(y, eps=eps).reshape(2, -1), expected, rtol=0, atol=1e-12)


def _rotated_sums(image: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate with grid_sample (bilinear, zeros outside) and sum along the rays: ``(A, D)``."""
    height, width = image.shape
    detectors = math.ceil(math.hypot(height, width))
    positions = torch.arange(detectors, dtype=DOUBLE) - (detectors - 1) / 2
    t, s = torch.meshgrid(positions, positions, indexing="ij")
    projections = []
    for angle in angles.tolist():
        column = (width - 1) / 2 + t * math.cos(angle) - s * math.sin(angle)
        row = (height - 1) / 2 + t * math.sin(angle) + s * math.cos(angle)
        grid = torch.stack([(2 * column + 1) / width - 1, (2 * row + 1) / height - 1], dim=-1)
        sampled = F.grid_sample(image[None, None], grid[None], mode="bilinear", align_corners=False)
        projections.append(sampled[0, 0].sum(-1))
    return torch.stack(projections)


def test_radon_matches_grid_sample_rotation():
    angles = torch.tensor([0.0, 0.4, 1.3, 2.9], dtype=DOUBLE)
    image = _randn(9, 8)
    projections = ops.Radon((9, 8), angles).forward(image)
    torch.testing.assert_close(projections, _rotated_sums(image, angles), rtol=0, atol=1e-12)


def test_radon_of_a_disc_and_of_a_point():
    size = 32
    op = ops.Radon((size, size), 12)
    coordinates = torch.arange(size, dtype=DOUBLE) - (size - 1) / 2
    radius = torch.hypot(coordinates[:, None], coordinates[None, :])
    disc = (radius < 10).to(DOUBLE)
    projections = op.forward(disc)
    # the disc looks the same from every angle, up to the pixelation of its edge
    spread = (projections - projections.mean(0)).abs().max() / projections.max()
    assert spread < 0.08
    # every projection keeps the total mass (bilinear weights sum to one per sample), to 1%
    torch.testing.assert_close(projections.sum(-1), disc.sum().expand(12), rtol=1e-2, atol=0)
    point = torch.zeros(size, size, dtype=DOUBLE)
    point[10, 20] = 2.0
    # a point's mass is kept exactly at 0 and pi/2; at other angles the bilinear tent summed on a
    # rotated unit grid deviates by up to 7% here (measured: 1.86 to 2.14)
    torch.testing.assert_close(
        op.forward(point).sum(-1), torch.full((12,), 2.0, dtype=DOUBLE), rtol=0.1, atol=0
    )
    torch.testing.assert_close(op.forward(point)[0].sum(), torch.tensor(2.0, dtype=DOUBLE))


def test_phase_retrieval_is_the_oversampled_fourier_magnitude():
    op = ops.PhaseRetrieval((2, 5, 4), oversampling=2.0)
    assert op.out_shape == (2, 10, 8)
    x = _randn(3, 2, 5, 4)
    centred = F.pad(x, (2, 2, 3, 2))  # where the image sits in the padded frame does not matter
    expected = torch.fft.fft2(centred, norm="ortho").abs()
    torch.testing.assert_close(op.forward(x), expected, rtol=0, atol=1e-13)


def test_saturation_is_a_soft_clip():
    inner = ops.Blur((5, 4), ops.gaussian_kernel(3, 1.0))
    op = ops.Saturation(inner, level=0.5)
    x = 3 * _randn(2, 5, 4)
    torch.testing.assert_close(op.forward(x), 0.5 * torch.tanh(inner.forward(x) / 0.5))
    assert op.forward(x).abs().max() < 0.5


def test_compose_is_sequential_application():
    outer, inner = ops.Downsample((6, 6), 2), ops.Blur((6, 6), ops.uniform_kernel(3))
    op = ops.Compose(outer, inner)
    assert isinstance(op, ops.LinearOperator) and isinstance(op, ops.Compose)
    assert op.svd() is None
    x, y = _randn(2, 6, 6), _randn(2, 3, 3)
    torch.testing.assert_close(op.forward(x), outer.forward(inner.forward(x)), rtol=0, atol=0)
    torch.testing.assert_close(op.adjoint(y), inner.adjoint(outer.adjoint(y)), rtol=0, atol=0)
    nonlinear = ops.Compose(ops.PhaseRetrieval((3, 3)), outer)
    assert not isinstance(nonlinear, ops.LinearOperator)
    torch.testing.assert_close(
        nonlinear.forward(x), torch.fft.fft2(outer.forward(x), s=(6, 6), norm="ortho").abs()
    )
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(3, 3\)"):
        ops.Compose(inner, outer)


def test_kernels():
    gaussian = ops.gaussian_kernel(5, 1.5)
    torch.testing.assert_close(gaussian.sum(), torch.tensor(1.0, dtype=DOUBLE))
    torch.testing.assert_close(gaussian, gaussian.flip(0))
    torch.testing.assert_close(
        gaussian[1] / gaussian[2], torch.tensor(math.exp(-1 / (2 * 1.5**2)), dtype=DOUBLE)
    )
    torch.testing.assert_close(ops.uniform_kernel(4), torch.full((4,), 0.25, dtype=DOUBLE))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ops.Downsample((2, 6, 5), 2), "divide"),
        (lambda: ops.Downsample((6, 6), 0), "positive integer"),
        (lambda: ops.Downsample((2, 2, 6, 6), 2), "image shape"),
        (lambda: ops.Colorization((4, 5)), r"\(C, H, W\)"),
        (lambda: ops.Blur((6, 6), torch.ones(2, 2, 2)), "1-D"),
        (lambda: ops.Blur((6, 6), torch.ones(7, 3)), "larger than the image"),
        (lambda: ops.Blur((6, 6), torch.tensor([1.0, float("nan")])), "non-finite"),
        (lambda: ops.gaussian_kernel(5, 0.0), "std"),
        (lambda: ops.uniform_kernel(0), "positive integer"),
        (lambda: ops.Fourier((2, 6, 6), torch.ones(6, 6, dtype=torch.bool)), r"\(1, H, W\)"),
        (lambda: ops.Fourier((6, 6), torch.ones(6, 5, dtype=torch.bool)), r"\(6, 6\)"),
        (lambda: ops.Fourier((6, 6), torch.zeros(6, 6, dtype=torch.bool)), "no frequency"),
        (lambda: ops.Radon((6, 6), 0), "positive"),
        (lambda: ops.Radon((6, 6), torch.tensor([[0.0]])), "1-D"),
        (lambda: ops.PhaseRetrieval((6, 6), 0.5), "oversampling"),
        (lambda: ops.Saturation(ops.Identity((3,)), level=0.0), "level"),
        (lambda: ops.Compose(ops.Identity((3,)), "not an operator"), "inner must be an Operator"),
    ],
)
def test_constructors_validate_their_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_spectral_norm_by_svd_and_by_power_iteration():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(matrix, 2))
    assert ops.Matrix(matrix).norm() == pytest.approx(exact, rel=1e-12)  # from the SVD
    radon = ops.Radon((1, 8, 8), 6)  # no SVD: power iteration
    dense = float(torch.linalg.matrix_norm(radon.matrix(), 2))
    # measured relative error 1e-8 (power iteration from below, stopping at a 1e-7 change)
    assert radon.norm() == pytest.approx(dense, rel=1e-6)
    assert radon.norm() <= dense * (1 + 1e-12)
