"""Grid-based engines are right on the EDM schedule: the schedule-aware sampling grid.

A Gaussian prior (d = 6, random covariance), two measurements with sigma = 0.3, the exact
posterior; 8 chains x 500 particles at each engine's default steps. The statistic is the mean
over coordinates of var(engine) / var(exact) (``benchmarks/results/schedule_grids.md`` has every
engine on every schedule).
"""

import pyro
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianObservation, operators
from diffpost.models.priors import Gaussian
from diffpost.models.schedules import EDM, VP, DiscreteVP
from diffpost.posterior.engines.common import sampling_grid

D = torch.float64
_generator = torch.Generator().manual_seed(0)
_factor = torch.randn(6, 6, dtype=D, generator=_generator) / 6**0.5
COVARIANCE = _factor @ _factor.T + 0.5 * torch.eye(6, dtype=D)
OPERATOR = operators.Matrix(torch.randn(2, 6, dtype=D, generator=_generator))
Y = torch.randn(2, dtype=D, generator=_generator)


def variance_ratio(engine, schedule) -> float:
    prior = Gaussian(torch.zeros(6, dtype=D), COVARIANCE, schedule=schedule)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(OPERATOR, x, 0.3), obs=y)

    exact = prior.posterior(OPERATOR, Y, torch.tensor(0.3, dtype=D))
    result = posterior.sample(
        model, engine, num_particles=500, num_chains=8, seed=0, model_kwargs={"y": Y}
    )
    return float((result.get_samples()["x"].var(0) / exact.variance).mean())


@pytest.mark.parametrize(
    "engine, measured_edm, measured_vp",
    [
        # with the earlier uniform-in-t grid on EDM: 0.42, 0.43, 0.14
        (posterior.MCGDiff(), 0.89, 0.94),
        (posterior.TDS(), 0.91, 0.95),
        (posterior.DDRM(), 0.62, 0.68),
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_grid_engines_on_edm_match_their_vp_variance(engine, measured_edm, measured_vp):
    """Two-sided: the measured EDM ratio +- 0.1 (the ratio's sampling error with 4000
    correlated draws in 6 coordinates is a few percent; SMC ancestry widens it), and within 0.15
    of the engine's own VP ratio (what the schedule-aware grid is for)."""
    edm = variance_ratio(engine, EDM())
    assert abs(edm - measured_edm) < 0.1, edm
    assert abs(edm - measured_vp) < 0.15, (edm, measured_vp)


def test_edm_grid_is_karras_spaced_and_others_are_ddim():
    grid = sampling_grid(EDM(), 50)
    noise = EDM().sigma(grid)
    assert grid.shape == (51,) and float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    assert float(noise[-2]) == pytest.approx(0.002)  # Karras et al.'s sigma_min
    assert float(noise[-3]) < 0.01  # no jump from sigma 1.6 to 0 at the end
    vp = sampling_grid(VP(), 50)
    assert torch.allclose(vp[:-1], torch.arange(50, 0, -1, dtype=D) * 20 / 1000 - 19 / 1000)


def test_steps_that_cannot_run_are_said():
    """A DDIM grid cannot hold more steps than the network's training steps: the cap is warned
    about (engines' defaults, e.g. REDDiff's 1000, must still run on a 999-step network)."""
    with pytest.warns(UserWarning, match="num_steps=5000 exceeds the 1000 steps.*running 1000"):
        assert sampling_grid(VP(), 5000).shape == (1001,)
    with pytest.warns(UserWarning, match="num_steps=200 exceeds the 100 steps"):
        assert sampling_grid(DiscreteVP.linear(num_train_steps=100), 200).shape == (101,)
    prior = Gaussian(torch.zeros(6, dtype=D), COVARIANCE)

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(OPERATOR, x, 0.3), obs=y)

    with pytest.warns(UserWarning, match="num_steps=5000 exceeds"):
        result = posterior.sample(
            model, posterior.MCGDiff(num_steps=5000), num_particles=2, model_kwargs={"y": Y}
        )
    assert result.stats["ess"].shape == (1, 1000)
