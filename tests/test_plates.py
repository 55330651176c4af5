"""Plates over independent problems: every engine runs B problems in one batched run.

The references are exact: the closed-form posterior of each problem (a Gaussian prior and a linear
Gaussian observation), single runs of the same engine on each problem, and, for a plate of one
problem, the unplated run with the same seed.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianObservation, operators
from diffpost.models.priors import Gaussian

D = torch.float64
_generator = torch.Generator().manual_seed(0)
PRIOR = Gaussian(torch.zeros(3, dtype=D), torch.eye(3, dtype=D))
MATRIX = torch.randn(2, 3, dtype=D, generator=_generator)
A = operators.Matrix(MATRIX)
SIGMA = 0.3
# three problems whose posteriors are far apart (means differ by more than 1 in some coordinate),
# so a particle that saw another problem's observation would be caught
Y = torch.tensor([[3.0, -1.0], [-2.0, 2.0], [0.5, 0.5]], dtype=D)


def plated(y=None, size=3):
    with pyro.plate("images", size):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


def plated_normal(y=None, size=3):
    """The same likelihood, as a plain Normal: read through the model's trace."""
    with pyro.plate("images", size):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", dist.Normal(A(x), SIGMA).to_event(1), obs=y)


def single(y=None):
    x = pyro.sample("x", PRIOR)
    return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


def exact_posterior(y):
    return PRIOR.posterior(A, y, torch.tensor(SIGMA, dtype=D))


def _run(model, engine, y, num_particles=100, seed=0, **options):
    return posterior.sample(
        model,
        engine,
        num_particles=num_particles,
        num_chains=2,
        seed=seed,
        model_kwargs={"y": y},
        **options,
    )


# few steps: these tests check the plate's bookkeeping, not the engines' accuracy
ENGINES = [
    posterior.Exact(),
    posterior.MCGDiff(num_steps=10),
    posterior.FPS(num_steps=10),
    posterior.TDS(num_steps=10),
    posterior.FKSteering(num_steps=10),
    posterior.DDRM(num_steps=10),
    posterior.DDS(num_steps=10),
    posterior.DiffPIR(num_steps=10),
    posterior.DSG(num_steps=10),
    posterior.DPPS(num_steps=10),
    posterior.MCG(num_steps=10),
    posterior.ScoreSDE(num_steps=10),
    posterior.FlowChef(num_steps=10),
    posterior.FlowDPS(num_steps=10),
    posterior.SITCOM(num_steps=5, max_iterations=5),
    posterior.FLAIR(num_steps=10),
    posterior.DPS(num_steps=10),
    posterior.MMPS(num_steps=10),
    posterior.PiGDM(num_steps=10),
    posterior.SNIPS(num_steps=4),
    posterior.DAPS(num_steps=4),
    posterior.DCDP(num_steps=4),
    posterior.ScoreALD(num_steps=10),
    posterior.REDDiff(num_steps=10),
    posterior.RSLD(num_steps=10),
    posterior.FlowVI(num_steps=10),
]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_a_plate_of_one_problem_is_the_single_run(engine):
    """Same seed, same arithmetic: a plate of size 1 reproduces the unplated run (up to the
    rounding of batched against unbatched products)."""
    alone = _run(single, engine, Y[0], num_particles=20)
    one = _run(lambda y=None: plated(y, 1), engine, Y[:1], num_particles=20)
    assert one.values["x"].shape == (2, 20, 1, 3) and one.plate == ("images", 1)
    torch.testing.assert_close(one.select_problem(0).values["x"], alone.values["x"])
    torch.testing.assert_close(one.select_problem(0).log_weights, alone.log_weights)


# settings at which a single run's mean is stable enough to compare: weighted SMC engines with
# 16 independent chains (their weights degenerate within a chain), Langevin engines with enough
# steps to converge
PER_PROBLEM = [
    (engine, 16, 50) if engine.family == "smc" else (engine, 2, 100)
    for engine in ENGINES
    if engine.name not in ("SNIPS", "ScoreALD")
] + [(posterior.SNIPS(num_steps=100), 2, 100), (posterior.ScoreALD(num_steps=200), 2, 100)]


@pytest.mark.parametrize(
    "engine, chains, particles", PER_PROBLEM, ids=lambda v: getattr(v, "name", "")
)
def test_each_problem_of_a_plate_gets_its_own_posterior(engine, chains, particles):
    """Problem b of a plated run against a single run of the same engine on problem b: the
    per-coordinate means agree to the engines' Monte Carlo error (measured over all engines at
    these settings: at most 0.23, FKSteering; posterior sds are 0.2-0.9), while the three problems'
    means are 1.5-5 apart. The bound 0.45 catches any mix-up of observations."""
    options = {"num_particles": particles, "num_chains": chains, "model_kwargs": {"y": Y}}
    result = posterior.sample(plated, engine, seed=0, batch_size=256, **options)
    assert result.values["x"].shape == (chains, particles, 3, 3)
    for b in range(3):
        options["model_kwargs"] = {"y": Y[b]}
        alone = posterior.sample(single, engine, seed=1, **options)
        gap = (result.select_problem(b).mean() - alone.mean()).abs().max()
        assert gap < 0.45, (b, float(gap))


def test_plated_exact_matches_each_closed_form_posterior():
    """Exact draws of 3 problems at once: means within 4.5 standard errors of each problem's
    closed-form mean (sd <= 0.9, 4000 draws: 0.064), variances within 10% (the relative sd of a
    variance estimate from 4000 draws is 2.2%), evidence exactly."""
    result = _run(plated, posterior.Exact(), Y, num_particles=2000)
    for b in range(3):
        exact = exact_posterior(Y[b])
        problem = result.select_problem(b)
        torch.testing.assert_close(problem.mean(), exact.mean, atol=0.064, rtol=0)
        torch.testing.assert_close(problem.var(), exact.variance, rtol=0.1, atol=0)
        evidence = PRIOR.log_evidence(A, Y[b], torch.tensor(SIGMA, dtype=D))
        torch.testing.assert_close(problem.log_evidence, evidence.expand(2))
    torch.testing.assert_close(
        result.mean(), torch.stack([exact_posterior(y).mean for y in Y]), atol=0.064, rtol=0
    )


def test_plated_mcgdiff_is_close_to_each_exact_posterior():
    """MCGDiff on three problems at once, against each closed form: measured over seeds 0-1 and
    (50 or 100 steps, 2 x 1000 or 16 x 250 particles) the largest coordinate error of a
    problem's mean is 0.13 (the finite-step bias of MCGDiff on these tail observations; the
    Monte Carlo error is ~0.03); the bound 0.2 is far below the 1.5-5 separating the problems."""
    result = _run(plated, posterior.MCGDiff(num_steps=50), Y, num_particles=1000, batch_size=500)
    for b in range(3):
        gap = (result.select_problem(b).mean() - exact_posterior(Y[b]).mean).abs().max()
        assert gap < 0.2, (b, float(gap))
    assert result.log_evidence.shape == (2, 3) and result.ess().shape == (2, 3)


@pytest.mark.parametrize(
    "engine",
    [
        posterior.DPS(num_steps=10),
        posterior.DAPS(num_steps=3),
        posterior.TDS(num_steps=8),
        posterior.MCGDiff(num_steps=8),
        posterior.PiGDM(num_steps=8),
        posterior.DDRM(num_steps=8),
    ],
    ids=lambda e: e.name,
)
def test_chunking_does_not_change_a_plated_run(engine):
    """``batch_size`` chunks hold the same rows of every problem (here 2 of each): results
    equal the unchunked run."""
    whole = _run(plated, engine, Y, num_particles=12)
    chunked = _run(plated, engine, Y, num_particles=12, batch_size=7)
    torch.testing.assert_close(chunked.values["x"], whole.values["x"])
    torch.testing.assert_close(chunked.log_weights, whole.log_weights)


def test_a_likelihood_read_through_the_trace_gives_the_structured_run():
    """A plain Normal observation (read through the model's trace, particles passed as
    ``(K, B, *event)``) gives DPS what the GaussianObservation's structure gives."""
    whole = _run(plated, posterior.DPS(num_steps=10), Y, num_particles=12)
    traced = _run(plated_normal, posterior.DPS(num_steps=10), Y, num_particles=12, batch_size=7)
    torch.testing.assert_close(traced.values["x"], whole.values["x"])
    torch.testing.assert_close(traced.log_likelihood, whole.log_likelihood)


def test_problem_chunks_keep_every_problem_in_every_chunk():
    problem = posterior.Problem.from_model(plated, batch_size=7, y=Y)
    chunks = problem.chunks(3 * 10)  # 2 rows of each problem per chunk
    assert [chunk.tolist() for chunk in chunks[:2]] == [
        [0, 1, 10, 11, 20, 21],
        [2, 3, 12, 13, 22, 23],
    ]
    parts = [torch.arange(30)[chunk] for chunk in chunks]
    assert torch.equal(problem.join_chunks(parts, chunks), torch.arange(30))
    x = torch.randn(30, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    expected = torch.cat(
        [GaussianObservation(A, x[10 * b : 10 * (b + 1)], SIGMA).log_prob(Y[b]) for b in range(3)]
    )
    torch.testing.assert_close(problem.log_likelihood(x), expected)


def test_plated_particle_set_views_and_round_trips(tmp_path):
    result = _run(plated, posterior.MCGDiff(num_steps=10), Y, num_particles=50)
    samples = result.get_samples()
    assert samples["x"].shape == (100, 3, 3)
    for b in range(3):
        torch.testing.assert_close(samples["x"][:, b], result.select_problem(b).get_samples()["x"])
    assert result.one_draw_per_chain()["x"].shape == (2, 3, 3)
    assert result.mean().shape == (3, 3) and result.var().shape == (3, 3)
    assert result.stats["ess"].shape == (2, 3, 10)
    torch.testing.assert_close(result.select_problem(2).observed["y"], Y[2])

    tree = result.to_datatree()
    assert tree["posterior"]["x"].dims == ("chain", "draw", "images", "coordinate")
    assert tree["observed_data"]["y"].dims == ("images", "measurement")
    assert tree["sample_stats"]["log_evidence"].dims == ("chain", "images")
    for b in range(3):
        draws = torch.as_tensor(tree["posterior"]["x"].isel(images=b).values)
        expected = result.select_problem(b).get_samples(group_by_chain=True)["x"]
        torch.testing.assert_close(draws, expected)

    result.save(tmp_path / "plated.pt")
    loaded = posterior.ParticleSet.load(tmp_path / "plated.pt")
    assert loaded.plate == ("images", 3)
    torch.testing.assert_close(loaded.values["x"], result.values["x"])
    joined = posterior.ParticleSet.concat([result, loaded])
    assert joined.values["x"].shape == (4, 50, 3, 3)
    assert result.select_chains([1]).values["x"].shape == (1, 50, 3, 3)
    with pytest.raises(ValueError, match="differ in their plate"):
        posterior.ParticleSet.concat([result, result.select_problem(0)])
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\)"):
        result.select_problem(3)


# --------------------------------------------------------------------------------------------
# refusals, before any work
# --------------------------------------------------------------------------------------------


def _nested(y=None):
    with pyro.plate("outer", 2), pyro.plate("images", 3, dim=-2):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


def _subsampled(y=None):
    with pyro.plate("images", 3, subsample_size=2):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


def _observation_outside(y=None):
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
    return pyro.sample("y", dist.Normal(A(x), SIGMA).to_event(2), obs=y)


def _signal_outside(y=None):
    x = pyro.sample("x", PRIOR)
    with pyro.plate("images", 3):
        return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


def _with_a_global(y=None):
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=D)))
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(A, x, sigma), obs=y)


def _per_problem_sigma(y=None):
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
        sigma = torch.tensor([[0.1], [0.2], [0.3]], dtype=D)
        return pyro.sample("y", GaussianObservation(A, x, sigma), obs=y)


def _per_problem_masks(y=None):
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(operators.Mask(masks), x, SIGMA), obs=y)


def _left_plate(y=None):
    with pyro.plate("images", 3, dim=-2):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(A, x, SIGMA), obs=y)


@pytest.mark.parametrize(
    "model, y, message",
    [
        (
            plated,
            Y[:2],
            r"observed site 'y' .* plate 'images' of size 3 its leading size must be 3",
        ),
        (_nested, torch.zeros(3, 2, 2, dtype=D), r"nested plates \['outer', 'images'\]"),
        (_subsampled, Y, "plate 'images' is subsampled"),
        (_observation_outside, Y, "inside plate 'images'.*every observed site"),
        (_signal_outside, Y, r"observed site 'y' is inside plate\(s\) \['images'\] but the signal"),
        (_with_a_global, Y, "plate 'images' over problems and global latents"),
        (_per_problem_sigma, Y, "sigma of shape .* differs between the problems"),
        (_left_plate, Y, r"dim=-2; the plate over problems must be the rightmost"),
        (
            _per_problem_masks,
            Y,
            r"for one operator per problem of plate 'images', give operators.PerProblem",
        ),
    ],
    ids=[
        "leading-size",
        "nested",
        "subsampled",
        "partial",
        "signal-outside",
        "global",
        "sigma",
        "dim",
        "per-problem-mask",
    ],
)
def test_misdeclared_plates_are_refused_naming_the_site_and_sizes(model, y, message):
    with pytest.raises(ValueError, match=message):
        _run(model, posterior.DPS(num_steps=2), y)


# --------------------------------------------------------------------------------------------
# structure detection does not depend on object identity
# --------------------------------------------------------------------------------------------


def _cloned(y=None):
    x = pyro.sample("x", PRIOR)
    return pyro.sample("y", GaussianObservation(A, x.clone(), SIGMA), obs=y)


def _scaled(y=None):
    x = pyro.sample("x", PRIOR)
    return pyro.sample("y", GaussianObservation(A, 2 * x, SIGMA), obs=y)


def test_a_cloned_signal_keeps_the_linear_structure():
    cloned = _run(_cloned, posterior.MCGDiff(num_steps=5), Y[0], num_particles=10)
    direct = _run(single, posterior.MCGDiff(num_steps=5), Y[0], num_particles=10)
    torch.testing.assert_close(cloned.values["x"], direct.values["x"])


def test_a_transformed_signal_is_refused_saying_what_to_change():
    with pytest.raises(ValueError, match=r"whose x is not the signal 'x' itself.*unchanged"):
        _run(_scaled, posterior.MCGDiff(num_steps=5), Y[0])


# --------------------------------------------------------------------------------------------
# one operator per problem
# --------------------------------------------------------------------------------------------

MASKS = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
MASK_PER_PROBLEM = operators.PerProblem([operators.Mask(mask) for mask in MASKS])


def per_problem_masks(y=None):
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(MASK_PER_PROBLEM, x, SIGMA), obs=y)


def single_mask(y=None, b=0):
    x = pyro.sample("x", PRIOR)
    return pyro.sample("y", GaussianObservation(MASK_PER_PROBLEM.operators[b], x, SIGMA), obs=y)


def test_per_problem_operator_applies_each_problems_operator():
    x = torch.randn(5, 3, 3, dtype=D, generator=torch.Generator().manual_seed(0))  # (K, B, d)
    expected = torch.stack([x[:, b][:, MASKS[b]] for b in range(3)], dim=1)
    torch.testing.assert_close(MASK_PER_PROBLEM(x), expected)
    operators.check_adjoint(MASK_PER_PROBLEM.operators[0])
    y = torch.randn(5, 3, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    lhs = (MASK_PER_PROBLEM(x) * y).sum()
    rhs = (x * MASK_PER_PROBLEM.adjoint(y)).sum()
    torch.testing.assert_close(lhs, rhs)
    with pytest.raises(ValueError, match="last batch dim must be the plate's, of size 3"):
        MASK_PER_PROBLEM(torch.zeros(4, 3, dtype=D))
    with pytest.raises(ValueError, match="same shapes"):
        operators.PerProblem([operators.Mask(MASKS[0]), operators.Identity((3,))])


def test_exact_with_one_mask_per_problem_matches_each_closed_form():
    """Means within 4.5 standard errors (sd <= 1, 4000 draws: 0.071); evidence exactly."""
    result = _run(per_problem_masks, posterior.Exact(), Y, num_particles=2000)
    for b in range(3):
        operator = MASK_PER_PROBLEM.operators[b]
        exact = PRIOR.posterior(operator, Y[b], torch.tensor(SIGMA, dtype=D))
        torch.testing.assert_close(result.select_problem(b).mean(), exact.mean, atol=0.071, rtol=0)
        evidence = PRIOR.log_evidence(operator, Y[b], torch.tensor(SIGMA, dtype=D))
        torch.testing.assert_close(result.select_problem(b).log_evidence, evidence.expand(2))


ZERO_FILLED = operators.PerProblem([operators.Diagonal(mask.to(D)) for mask in MASKS])


def zero_filled_masks(y=None):
    with pyro.plate("images", 3):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", GaussianObservation(ZERO_FILLED, x, SIGMA), obs=y)


def test_zero_filled_masks_are_one_vectorised_product_with_masks_posteriors():
    x = torch.randn(5, 3, 3, dtype=D, generator=torch.Generator().manual_seed(0))  # (K, B, d)
    looped = torch.stack([op(x[:, b]) for b, op in enumerate(ZERO_FILLED.operators)], dim=1)
    assert ZERO_FILLED.gains.shape == (3, 3)  # the vectorised path is the one under test
    assert MASK_PER_PROBLEM.gains is None
    torch.testing.assert_close(ZERO_FILLED(x), looped)
    torch.testing.assert_close(ZERO_FILLED.adjoint(x), looped)
    # the same posterior as Mask: y on the observed entries; the others are pure noise, here 5.0
    y = torch.zeros(3, 3, dtype=D)
    y[MASKS] = Y.flatten()[: int(MASKS.sum())]
    y[~MASKS] = 5.0
    sigma = torch.tensor(SIGMA, dtype=D)
    result = _run(zero_filled_masks, posterior.Exact(), y, num_particles=2000)
    for b in range(3):
        exact = PRIOR.posterior(operators.Mask(MASKS[b]), y[b][MASKS[b]], sigma)
        zero_filled = PRIOR.posterior(ZERO_FILLED.operators[b], y[b], sigma)
        torch.testing.assert_close(zero_filled.means, exact.means)
        torch.testing.assert_close(zero_filled.covariances, exact.covariances)
        # the plated run: within 4.5 standard errors as above (sd <= 1, 4000 draws: 0.071)
        torch.testing.assert_close(result.select_problem(b).mean(), exact.mean, atol=0.071, rtol=0)


@pytest.mark.parametrize(
    "engine",
    [
        posterior.PiGDM(num_steps=20),
        posterior.DPS(num_steps=20),
        posterior.DAPS(num_steps=5),
        posterior.DDS(num_steps=20),
        posterior.MMPS(num_steps=20),
    ],
    ids=lambda e: e.name,
)
def test_engines_with_one_mask_per_problem_match_single_runs(engine):
    """As for a shared operator: problem b against a single run with mask b (2 x 100
    particles); the bound 0.45 of the shared-operator test (measured here: at most 0.35, DAPS;
    PiGDM and DPS have the same largest gap, on the coordinate a mask leaves unobserved, where
    both follow the prior with the same noise)."""
    result = _run(per_problem_masks, engine, Y, batch_size=64)
    for b in range(3):
        alone = posterior.sample(
            single_mask,
            engine,
            num_particles=100,
            num_chains=2,
            seed=1,
            model_kwargs={"y": Y[b], "b": b},
        )
        gap = (result.select_problem(b).mean() - alone.mean()).abs().max()
        assert gap < 0.45, (b, float(gap))


@pytest.mark.parametrize(
    "engine",
    [posterior.MCGDiff(num_steps=5), posterior.DDRM(num_steps=5), posterior.FPS(num_steps=5)],
    ids=lambda e: e.name,
)
def test_svd_engines_refuse_one_operator_per_problem(engine):
    message = f"{engine.name} needs a linear operator with an SVD.*GaussianObservation\\(PerProblem"
    with pytest.raises(ValueError, match=message):
        _run(per_problem_masks, engine, Y)
