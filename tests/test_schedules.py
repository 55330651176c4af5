"""Tests for models.schedules: boundary values, monotonicity, derivatives, time grids.

Every closed form below is recomputed independently (Python loops, ``math``) rather than read
back from the module under test. Everything is float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import all_schedules

from diffpost.models.schedules import (
    EDM,
    VE,
    VP,
    DiscreteVP,
    RectifiedFlow,
    ddpm_linear_betas,
    time_grid,
)

F64 = torch.float64
N_TRAIN = 1000


SCHEDULES = all_schedules()
NAMES = sorted(SCHEDULES)


def t64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64)


def ddpm_alphas_cumprod_loop(
    num_steps: int = N_TRAIN, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> list[float]:
    """Ho et al.'s bar-alpha_n, n = 1..N, from a plain Python loop (no torch)."""
    product, out = 1.0, []
    for i in range(num_steps):
        beta = beta_start + (beta_end - beta_start) * i / (num_steps - 1)
        product *= 1.0 - beta
        out.append(product)
    return out


# --------------------------------------------------------------------------- boundary values


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_vp_boundary_values(kind):
    schedule = VP(kind)
    alpha, sigma = schedule(t64([0.0, 1.0]))
    assert alpha[0].item() == pytest.approx(1.0, abs=1e-15)
    assert sigma[0].item() == 0.0
    if kind == "linear":
        # log alpha(1) = -(beta_max - beta_min)/4 - beta_min/2 = -5.025 (Song et al. 2021, eq. 33)
        expected = math.exp(-(20.0 - 0.1) / 4 - 0.1 / 2)
    else:
        # Nichol & Dhariwal f(t)/f(0) with s = 0.008, truncated at tau = 0.999
        angle = lambda u: 0.5 * math.pi * (u + 0.008) / 1.008  # noqa: E731
        expected = math.cos(angle(0.999)) / math.cos(angle(0.0))
    assert alpha[1].item() == pytest.approx(expected, rel=1e-12)
    assert alpha[1].item() < 1e-2
    t = torch.linspace(0, 1, 1001, dtype=F64)
    alpha, sigma = schedule(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)


def test_vp_cosine_matches_nichol_dhariwal_alpha_bar():
    schedule = VP("cosine")
    t = torch.linspace(0, 1, 257, dtype=F64)
    f = lambda u: math.cos(0.5 * math.pi * (u + 0.008) / 1.008) ** 2  # noqa: E731
    expected = t64([f(0.999 * u) / f(0.0) for u in t.tolist()])
    torch.testing.assert_close(schedule.alpha(t) ** 2, expected, rtol=1e-12, atol=0)


def test_discrete_vp_linear_matches_python_cumprod():
    schedule = DiscreteVP.linear()
    expected = t64(ddpm_alphas_cumprod_loop())
    torch.testing.assert_close(schedule.alphas_cumprod, expected, rtol=1e-12, atol=0)
    n = torch.arange(1, N_TRAIN + 1, dtype=F64)
    alpha, sigma = schedule(n / N_TRAIN)
    torch.testing.assert_close(alpha**2, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma**2, 1 - expected, rtol=1e-12, atol=0)
    assert schedule.alpha(t64(0.0)).item() == 1.0
    assert schedule.sigma(t64(0.0)).item() == 0.0
    t = torch.linspace(0, 1, 3001, dtype=F64)
    alpha, sigma = schedule(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)


def test_discrete_vp_scalar_times_are_memoised_without_sharing_the_result():
    """A 0-d CPU time is looked up in a memo; the value equals the batched interpolation for
    float64 and float32 times, and a caller's in-place change of it does not reach the memo."""
    schedule = DiscreteVP.linear()
    times = torch.tensor([0.0, 1e-3, 0.0015, 0.37, 0.5, 0.999, 1.0], dtype=F64)
    batched = schedule.log_alpha(times)
    for dtype in (F64, torch.float32):
        for _ in range(2):  # the second pass reads the memo
            scalar = torch.stack([schedule.log_alpha(t) for t in times.to(dtype)])
            assert scalar.dtype == dtype
            torch.testing.assert_close(scalar, batched.to(dtype), rtol=1e-6, atol=0)
    value = schedule.log_alpha(times[3])
    value.add_(1.0)
    assert schedule.log_alpha(times[3]).item() == batched[3].item()
    leaf = torch.tensor(0.37, dtype=F64, requires_grad=True)  # not memoised: differentiable
    (gradient,) = torch.autograd.grad(schedule.log_alpha(leaf), leaf)
    assert gradient.item() < 0


def test_discrete_vp_from_betas_and_validation():
    betas = ddpm_linear_betas(50, 1e-3, 0.2)
    schedule = DiscreteVP.from_betas(betas)
    expected = t64(ddpm_alphas_cumprod_loop(50, 1e-3, 0.2))
    torch.testing.assert_close(schedule.alpha(torch.arange(1, 51, dtype=F64) / 50) ** 2, expected)
    with pytest.raises(ValueError):
        DiscreteVP(t64([0.9, 0.95]))  # increasing
    with pytest.raises(ValueError):
        DiscreteVP(t64([1.0, 0.5]))  # not in (0, 1)
    with pytest.raises(ValueError):
        DiscreteVP(t64([]))


def test_ve_boundary_values():
    schedule = VE(sigma_min=0.01, sigma_max=50.0)
    t = torch.linspace(0, 1, 101, dtype=F64)
    torch.testing.assert_close(schedule.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    sigma = schedule.sigma(t64([0.0, 0.5, 1.0]))
    torch.testing.assert_close(sigma, t64([0.01, math.sqrt(0.01 * 50.0), 50.0]), rtol=1e-14, atol=0)


def test_edm_boundary_values():
    schedule = EDM()
    t = torch.linspace(0, 1, 101, dtype=F64)
    torch.testing.assert_close(schedule.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(schedule.sigma(t64([0.0, 1.0])), t64([0.0, 80.0]), rtol=0, atol=0)


def test_rectified_flow_boundary_values():
    alpha, sigma = RectifiedFlow()(t64([0.0, 0.25, 1.0]))
    torch.testing.assert_close(alpha, t64([1.0, 0.75, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(sigma, t64([0.0, 0.25, 1.0]), rtol=0, atol=0)


def test_invalid_schedule_arguments():
    with pytest.raises(ValueError):
        VP("quadratic")
    with pytest.raises(ValueError):
        VP(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError):
        VP("cosine", cosine_end=1.0)
    with pytest.raises(ValueError):
        VE(sigma_min=1.0, sigma_max=0.1)
    with pytest.raises(ValueError):
        EDM(sigma_max=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_follow_shape_and_dtype_of_t(name):
    schedule = SCHEDULES[name]
    t = torch.rand(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    for method in (
        schedule.alpha,
        schedule.sigma,
        schedule.alpha_derivative,
        schedule.sigma_derivative,
        schedule.log_snr,
    ):
        out = method(t)
        assert out.shape == t.shape and out.dtype == F64, method.__name__


# --------------------------------------------------------------------------- monotonicity


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_strictly_decreasing(name):
    schedule = SCHEDULES[name]
    # 20001 points: 20 per DiscreteVP segment, so interpolation inside segments is exercised.
    t = torch.linspace(0, 1, 20001, dtype=F64)[1:-1]
    log_snr = schedule.log_snr(t)
    assert torch.isfinite(log_snr).all()
    assert (log_snr[1:] < log_snr[:-1]).all()


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_equals_naive_formula_where_accurate(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.02, 0.98, 97, dtype=F64)
    naive = 2 * torch.log(schedule.alpha(t) / schedule.sigma(t))
    torch.testing.assert_close(schedule.log_snr(t), naive, rtol=1e-10, atol=1e-12)


def test_vp_log_snr_is_accurate_near_zero():
    # For t -> 0: alpha^2 = exp(-beta_min t + O(t^2)), sigma^2 = beta_min t + O(t^2), so
    # log_snr = -log(beta_min t) + O(t). The naive 1 - alpha^2 loses all digits at t = 1e-14.
    t = t64([1e-14, 1e-12])
    expected = -torch.log(0.1 * t) - 0.5 * 0.1 * t  # next-order term negligible here
    torch.testing.assert_close(VP().log_snr(t), expected, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- derivatives

INTERIOR = [0.013, 0.1237, 0.3371, 0.5003, 0.7777, 0.9531]


def interior_times(name: str) -> torch.Tensor:
    if name == "discrete_linear":
        # strictly inside DiscreteVP segments: (k + 0.37) / N, away from the knots k / N
        return t64([(math.floor(u * N_TRAIN) + 0.37) / N_TRAIN for u in INTERIOR])
    return t64(INTERIOR)


def autograd_derivative(function, t: torch.Tensor) -> torch.Tensor:
    t = t.clone().requires_grad_(True)
    value = function(t)
    if not value.requires_grad:  # a constant, e.g. alpha = 1 on VE / EDM
        return torch.zeros_like(t)
    (grad,) = torch.autograd.grad(value.sum(), t, allow_unused=True)
    return torch.zeros_like(t) if grad is None else grad


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autograd(name):
    schedule = SCHEDULES[name]
    t = interior_times(name)
    for value, derivative in (
        (schedule.alpha, schedule.alpha_derivative),
        (schedule.sigma, schedule.sigma_derivative),
    ):
        expected = autograd_derivative(value, t)
        torch.testing.assert_close(derivative(t), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_central_differences(name):
    # A second, autograd-free check; h = 1e-6 stays inside the DiscreteVP segments.
    schedule = SCHEDULES[name]
    t, h = interior_times(name), 1e-6
    for value, derivative in (
        (schedule.alpha, schedule.alpha_derivative),
        (schedule.sigma, schedule.sigma_derivative),
    ):
        difference = (value(t + h) - value(t - h)) / (2 * h)
        torch.testing.assert_close(derivative(t), difference, rtol=1e-6, atol=1e-8)


def test_vp_linear_beta_is_song_et_al():
    # d log alpha / dt = -beta(t) / 2 with beta(t) = 0.1 + 19.9 t.
    t = t64(INTERIOR)
    schedule = VP()
    expected = -0.5 * (0.1 + 19.9 * t)
    torch.testing.assert_close(schedule.alpha_derivative(t) / schedule.alpha(t), expected)


# --------------------------------------------------------------------------- continuous vs DDPM


def test_vp_linear_is_continuous_limit_of_ddpm_linear():
    discrete, continuous = DiscreteVP.linear(), VP("linear")
    n = torch.arange(1, N_TRAIN + 1, dtype=F64)
    t = n / N_TRAIN
    relative = (discrete.alpha(t) / continuous.alpha(t) - 1).abs()
    # Measured: max relative discrepancy 3.33e-2 at t = 1; 1.05e-2 at t = 0.7; 3.0e-3 at t = 0.5.
    # It is the second-order term of log(1 - beta) = -beta - beta^2/2 - ..., which the
    # continuous limit drops: sum(beta^2)/4 over 1000 steps is ~0.034 in log alpha.
    assert relative[t <= 0.65].max() < 1e-2
    assert relative.max() < 3.5e-2
    # With that term removed (first order only), the two agree to 1.2e-3 in log alpha everywhere:
    first_order = -0.5 * torch.cumsum(ddpm_linear_betas(), 0)
    assert (first_order - continuous.log_alpha(t)).abs().max() < 1.5e-3


# --------------------------------------------------------------------------- noise ratio inverse


@pytest.mark.parametrize("name", NAMES)
def test_time_of_noise_ratio_inverts_noise_ratio(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    ratio = schedule.noise_ratio(t)
    torch.testing.assert_close(schedule.noise_ratio(t), schedule.sigma(t) / schedule.alpha(t))
    torch.testing.assert_close(schedule.time_of_noise_ratio(ratio), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        schedule.noise_ratio(schedule.time_of_noise_ratio(ratio)), ratio, rtol=1e-10, atol=0
    )


def test_time_of_noise_ratio_endpoints():
    assert RectifiedFlow().time_of_noise_ratio(t64(math.inf)).item() == 1.0
    assert RectifiedFlow().time_of_noise_ratio(t64(0.0)).item() == 0.0
    assert EDM().time_of_noise_ratio(t64(80.0)).item() == 1.0
    assert VP().time_of_noise_ratio(t64(0.0)).item() == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- time grids


def assert_valid_grid(grid: torch.Tensor, num_steps: int):
    assert grid.shape == (num_steps + 1,)
    assert grid.dtype == F64
    assert grid[-1].item() == 0.0
    assert (grid[1:] < grid[:-1]).all()


def karras_ratios(ratio_max: float, ratio_min: float, num: int, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) eq. 5, sigma_i for i = 0..num-1, by a plain loop."""
    high, low = ratio_max ** (1 / rho), ratio_min ** (1 / rho)
    return [(high + i / (num - 1) * (low - high)) ** rho for i in range(num)]


@pytest.mark.parametrize("t_max", [1.0, 0.8])
def test_time_grid_uniform(t_max):
    grid = time_grid(10, "uniform", t_max=t_max)
    assert_valid_grid(grid, 10)
    torch.testing.assert_close(grid, t64([t_max * (10 - i) / 10 for i in range(11)]))


def test_time_grid_karras_edm_is_eq5():
    num_steps = 18  # the EDM paper's CIFAR-10 setting
    grid = time_grid(num_steps, "karras", schedule=EDM(), noise_min=0.002)
    assert_valid_grid(grid, num_steps)
    assert grid[0].item() == 1.0
    expected = t64(karras_ratios(80.0, 0.002, num_steps))
    torch.testing.assert_close(EDM().noise_ratio(grid[:-1]), expected, rtol=1e-12, atol=0)
    assert EDM().sigma(grid[-2]).item() == pytest.approx(0.002, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "t_max", "noise_min"),
    [
        ("vp_linear", 1.0, 2e-3),
        ("vp_cosine", 1.0, 2e-3),
        ("discrete_linear", 1.0, 2e-3),
        ("ve", 1.0, 2e-2),
        ("rectified_flow", 0.99, 2e-3),
        ("vp_linear", 0.6, 1e-2),
    ],
)
def test_time_grid_karras_by_bisection(name, t_max, noise_min):
    schedule = SCHEDULES[name]
    num_steps = 12
    grid = time_grid(num_steps, "karras", schedule=schedule, t_max=t_max, noise_min=noise_min)
    assert_valid_grid(grid, num_steps)
    assert grid[0].item() == t_max
    ratio_max = float(schedule.noise_ratio(t64(t_max)))
    expected = t64(karras_ratios(ratio_max, noise_min, num_steps))
    torch.testing.assert_close(schedule.noise_ratio(grid[:-1]), expected, rtol=1e-9, atol=0)


def test_time_grid_karras_single_step():
    grid = time_grid(1, "karras", schedule=VP())
    torch.testing.assert_close(grid, t64([1.0, 0.0]), rtol=0, atol=0)


@pytest.mark.parametrize(("num_steps", "num_train_steps"), [(50, 1000), (10, 1000)])
def test_time_grid_ddim_uniform_skip(num_steps, num_train_steps):
    grid = time_grid(num_steps, "ddim", num_train_steps=num_train_steps)
    assert_valid_grid(grid, num_steps)
    # Official DDIM code (skip_type="uniform"): seq = range(0, N, N // K), network steps 0-based,
    # noise level alphas_cumprod[seq_i] = bar-alpha_{seq_i + 1}, i.e. t = (seq_i + 1) / N.
    skip = num_train_steps // num_steps
    seq = list(range(0, num_train_steps, skip))
    expected = [(n + 1) / num_train_steps for n in reversed(seq)] + [0.0]
    torch.testing.assert_close(grid, t64(expected), rtol=0, atol=0)


@pytest.mark.parametrize(("num_steps", "num_train_steps"), [(7, 100), (500, 999), (20, 999)])
def test_time_grid_ddim_spreads_over_the_whole_range_when_steps_do_not_divide(
    num_steps, num_train_steps
):
    grid = time_grid(num_steps, "ddim", num_train_steps=num_train_steps)
    assert_valid_grid(grid, num_steps)
    # evenly spread: n_i = floor(i N / K) + 1, so the first time is within one skip of t = 1
    expected = [
        (math.floor(i * num_train_steps / num_steps) + 1) / num_train_steps
        for i in reversed(range(num_steps))
    ]
    torch.testing.assert_close(grid, t64(expected + [0.0]), rtol=0, atol=0)
    assert grid[0] > 1 - 2 / num_steps


def test_time_grid_dtype_and_device():
    grid = time_grid(5, "uniform", dtype=torch.float32, device="cpu")
    assert grid.dtype == torch.float32 and grid.device.type == "cpu"
    grid = time_grid(5, "karras", schedule=VP(), dtype=torch.float32)
    assert grid.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_steps=0),
        dict(num_steps=-3),
        dict(num_steps=2.0),
        dict(num_steps=True),
        dict(num_steps=5, kind="linear"),
        dict(num_steps=5, t_max=0.0),
        dict(num_steps=5, t_max=1.5),
        dict(num_steps=5, kind="karras"),  # no schedule
        dict(num_steps=5, kind="karras", schedule=EDM(), noise_min=0.0),
        dict(num_steps=5, kind="karras", schedule=EDM(), noise_min=80.0),
        dict(num_steps=5, kind="karras", schedule=EDM(), rho=0.0),
        dict(num_steps=5, kind="karras", schedule=VE()),  # noise_min 2e-3 < sigma_min 1e-2
        dict(num_steps=5, kind="karras", schedule=RectifiedFlow()),  # infinite ratio at t = 1
        dict(num_steps=1001, kind="ddim"),
        dict(num_steps=5, kind="ddim", num_train_steps=10.0),
    ],
)
def test_time_grid_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        time_grid(**kwargs)
