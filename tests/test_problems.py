"""The MCGDiff Gaussian-mixture benchmark generator follows its specification."""

import pytest
import torch

from diffpost.models.problems import gaussian_mixture_benchmark, mcgdiff_schedule


def test_benchmark_prior_and_measurement_follow_the_specification():
    problem = gaussian_mixture_benchmark(dim=8, obs_dim=2, seed=3)
    prior = problem.prior
    assert prior.num_components == 25 and prior.dim == 8
    expected_pairs = {(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)}
    assert {tuple(m[:2].tolist()) for m in prior.means} == expected_pairs
    assert torch.equal(prior.means[:, :2].repeat(1, 4), prior.means)  # (8i, 8j, 8i, 8j, ...)
    assert torch.equal(prior.covariances, torch.eye(8, dtype=torch.float64).expand(25, 8, 8))
    torch.testing.assert_close(prior.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    singular_values = torch.linalg.svdvals(problem.operator.weight)
    assert torch.all((singular_values >= 0) & (singular_values <= 1))
    assert 0 <= problem.sigma <= float(singular_values.max())
    torch.testing.assert_close(
        singular_values, torch.tensor(problem.metadata["singular_values"], dtype=torch.float64)
    )
    residual = problem.y - problem.operator(problem.x_true)
    assert residual.abs().max() < 6 * problem.sigma + 1e-12


def test_benchmark_schedule_is_the_official_one():
    schedule = mcgdiff_schedule()
    betas = torch.linspace(0.02, 1e-4, 999, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0)
    times = torch.arange(1, 1000, dtype=torch.float64) / 999
    torch.testing.assert_close(schedule.alpha(times) ** 2, expected, rtol=1e-12, atol=0)


def test_benchmark_is_seeded():
    a, b, c = (gaussian_mixture_benchmark(4, 1, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.y, b.y) and torch.equal(a.prior.weights, b.prior.weights)
    assert not torch.equal(a.prior.weights, c.prior.weights)
    assert gaussian_mixture_benchmark(4, 1, dtype=torch.float32).y.dtype == torch.float32


@pytest.mark.parametrize("dim, obs_dim", [(7, 1), (8, 0), (8, 9)])
def test_benchmark_rejects_bad_sizes(dim, obs_dim):
    with pytest.raises(ValueError):
        gaussian_mixture_benchmark(dim, obs_dim)
