"""APS: one conditional flow trained over measurements, against the exact posterior of each new
measurement; its refusals and its output."""

import statistics
import sys
from pathlib import Path

import pyro
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianObservation, operators

sys.path.insert(0, str(Path(__file__).parent))
from test_conformance import make_problem  # noqa: E402

D = torch.float64


class _AnyEngine:
    requires = frozenset()


def _setting():
    """The conformance suite's Gaussian problem (d = 4, two measurements, sigma = 0.3): the
    model, its prior and operator, 2000 training and 20 test measurements simulated from it."""
    model, y, _ = make_problem("gaussian", "vp_linear", _AnyEngine())
    problem = posterior.Problem.from_model(model, y=y)
    prior, operator = problem.prior, problem.gaussian.operator

    def simulate(count, seed):
        generator = torch.Generator().manual_seed(seed)
        x = prior.sample((count,), generator=generator)
        return operator(x) + 0.3 * torch.randn(count, 2, generator=generator, dtype=D)

    return model, prior, operator, simulate(2000, 1), simulate(20, 2)


@pytest.mark.parametrize(
    "density, mean_bound, band",
    [
        # measured over seeds 0, 1, 2 (20 test measurements, 2000 draws each): mean over
        # measurements of the largest mean error 0.138, 0.081, 0.111 posterior sds; mean variance
        # ratio 1.06, 1.02, 0.93. An untrained flow (N(0, I)) is 1.2 sds off on average.
        ("exact", 0.25, (0.8, 1.2)),
        # the denoising bound as the prior term: 0.163, 0.230, 0.103 and 0.89, 0.93, 0.96
        ("dsm", 0.35, (0.75, 1.15)),
    ],
)
def test_aps_draws_near_the_exact_posterior_of_new_measurements(density, mean_bound, band):
    model, prior, operator, train, test = _setting()
    aps = posterior.APS(num_steps=600, num_flow_steps=4, hidden_features=64, prior_density=density)
    fitted = aps.fit(model, train, seed=0)
    assert fitted.info["prior_density"] == density and len(fitted.info["losses"]) == 600
    assert (fitted.info["nfe"] > 0) == (density == "dsm")
    errors, ratios = [], []
    for y in test:
        exact = prior.posterior(operator, y, torch.tensor(0.3, dtype=D))
        result = fitted.sample(y, 2000, seed=3)
        assert result.values["x"].shape == (1, 2000, 4) and result.info["nfe"] == 0
        mean, variance = result.mean().reshape(-1), result.var().reshape(-1)
        errors.append(float(((mean - exact.mean) / exact.variance.sqrt()).abs().max()))
        ratios.append(float((variance / exact.variance).mean()))
    assert statistics.mean(errors) < mean_bound, errors
    assert band[0] < statistics.mean(ratios) < band[1], ratios


def test_aps_sampling_repeats_with_a_seed_and_checks_its_input():
    model, _, _, train, test = _setting()
    fitted = posterior.APS(num_steps=5, num_flow_steps=1, hidden_features=8).fit(model, train)
    first, again = fitted.sample(test[0], 10, seed=1), fitted.sample(test[0], 10, seed=1)
    assert torch.equal(first.values["x"], again.values["x"])
    assert not torch.equal(first.values["x"], fitted.sample(test[0], 10, seed=2).values["x"])
    assert torch.equal(first.observed["y"], test[0])
    with pytest.raises(
        ValueError, match="y has 3 entries; the sampler was trained on measurements of 2"
    ):
        fitted.sample(torch.zeros(3, dtype=D), 10)
    with pytest.raises(ValueError, match="num_draws must be a positive integer"):
        fitted.sample(test[0], 0)


def test_aps_refuses_what_it_cannot_train_on():
    model, _, _, train, _ = _setting()
    aps = posterior.APS(num_steps=2)
    with pytest.raises(ValueError, match=r"site 'y' has value of shape \(1,\).*expects \(2,\)"):
        aps.fit(model, train[:, :1])
    with pytest.raises(ValueError, match=r"measurements must be a tensor \(M, \*out_shape\)"):
        aps.fit(model, train[0])
    with pytest.raises(ValueError, match="at least 2 measurements"):
        aps.fit(model, train[:1])
    noise = pyro.distributions.HalfNormal(torch.tensor(1.0, dtype=D))
    prior = posterior.Problem.from_model(model, y=train[0]).prior

    def with_noise_level(y=None):
        x = pyro.sample("x", prior)
        sigma = pyro.sample("sigma", noise)
        matrix = torch.ones(2, 4, dtype=D)
        return pyro.sample("y", GaussianObservation(operators.Matrix(matrix), x, sigma), obs=y)

    with pytest.raises(ValueError, match="APS needs a model whose only latent is the signal"):
        aps.fit(with_noise_level, train)
    with pytest.raises(ValueError, match="APS: prior_density must be"):
        posterior.APS(prior_density="ode")
    with pytest.raises(ValueError, match="APS: num_steps must be a positive integer"):
        posterior.APS(num_steps=0)
