"""One SMC run sharded over two gloo processes (posterior.sharding).

The sharded runs are made once per session by two processes of one group on the loopback address
(``tests/sharded_runs.py`` through ``posterior.sharding.launch_local``, killed after 300 s); the
single-process runs are made here with the same seeds and compared.
"""

import sys
from pathlib import Path

import pyro
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianObservation
from diffpost.models.problems import gaussian_mixture_benchmark
from diffpost.posterior.sharding import launch_local

sys.path.insert(0, str(Path(__file__).parent))
import sharded_runs  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Each rank's results of every sharded run of ``sharded_runs.py``."""
    out = tmp_path_factory.mktemp("sharded")
    script = str(Path(sharded_runs.__file__))
    completed = launch_local([script, str(out)], 2, timeout=300)
    for rank, process in enumerate(completed):
        assert process.returncode == 0, f"rank {rank} failed:\n{process.stderr[-4000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("name", list(sharded_runs.cases()))
def test_a_sharded_run_equals_the_single_process_run(sharded, name):
    problem, engine, chains, particles = sharded_runs.cases()[name]
    single = sharded_runs.run(name, problem, engine, chains, particles)
    first, second = (results[name, "global"] for results in sharded)
    for key in ("x", "log_weights", "log_evidence", "ess", "resampled"):
        if single[key] is None:
            assert first[key] is None
            continue
        # every rank returns the whole, identical result
        assert torch.equal(first[key], second[key]), key
        # up to the order of batched reductions (the denoiser sees N/2 particles per call):
        # measured equal bit for bit in float64 on this machine, 1e-9 leaves room for BLAS
        torch.testing.assert_close(first[key], single[key], rtol=1e-9, atol=1e-9, msg=key)
    # the particles really moved between the ranks when they were resampled
    resampled = int(single["resampled"].sum())
    assert resampled > 0, "every case resamples (the exchange is what is tested)"
    assert first["sharding"]["world_size"] == 2 and first["sharding"]["noise"] == "global"
    assert first["sharding"]["exchanges"] > 0 and first["sharding"]["rows_moved"] > 0
    width = first["x"][0, 0].numel() * first["x"].element_size()
    assert first["sharding"]["bytes_moved"] >= first["sharding"]["rows_moved"] * width


@pytest.mark.parametrize("name", list(sharded_runs.cases()))
def test_per_rank_noise_gives_other_draws_the_same_on_every_rank(sharded, name):
    first, second = (results[name, "per_rank"] for results in sharded)
    global_run = sharded[0][name, "global"]
    assert torch.equal(first["x"], second["x"])
    assert not torch.allclose(first["x"], global_run["x"])
    assert first["sharding"]["noise"] == "per_rank"


def test_per_rank_noise_samples_the_same_law_as_the_global_noise(sharded):
    """256 chains x 8 particles of MCGDiff on a 6-D Gaussian, half observed (sigma 0.2), in both
    noise modes: the chains' weighted means and log-evidences, compared by two-sample z-scores
    (the chains are independent, so the standard errors are the chains' spread / 16)."""
    runs = [sharded[0]["law", noise] for noise in ("global", "per_rank")]
    means, evidences = [], []
    for run in runs:
        weights = run["log_weights"].exp()[..., None]
        means.append((weights * run["x"]).sum(1))  # (256, 6): one weighted mean per chain
        evidences.append(run["log_evidence"])  # (256,)
    chains = means[0].shape[0]

    def z_scores(a, b):
        return (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / chains).sqrt()

    # measured |z| <= 1.51 over the six coordinates and 1.23 for the log-evidence; 4 is a
    # two-sided test at about 1e-4 per statistic, while a per-rank stream drawn with the wrong
    # scale or rows shifts the observed coordinates by many standard errors
    assert z_scores(*means).abs().max() < 4, z_scores(*means)
    assert z_scores(*evidences).abs() < 4, z_scores(*evidences)
    # and the two modes are not the same draws
    assert not torch.allclose(means[0], means[1])


def test_sharded_runs_refuse_what_they_cannot_do(sharded):
    assert "must pass the same seed" in sharded[0]["different seeds"]
    assert sharded[0]["different seeds"] == sharded[1]["different seeds"]
    assert "num_particles=7 must be divisible by the 2 processes" in sharded[0]["indivisible"]


def test_sharding_is_refused_before_any_work_without_a_group_or_an_smc_engine():
    problem = gaussian_mixture_benchmark(4, 1, seed=0)

    def run(engine, sharding, **kwargs):
        return posterior.sample(
            problem.model,
            engine,
            num_particles=4,
            seed=0,
            progress=False,
            model_kwargs=problem.model_kwargs,
            sharding=sharding,
            **kwargs,
        )

    with pytest.raises(ValueError, match="noise must be one of"):
        posterior.Sharding(noise="local")
    with pytest.raises(TypeError, match="sharding must be a posterior.Sharding"):
        run(posterior.MCGDiff(), "global")
    with pytest.raises(ValueError, match="DPS is not one"):
        run(posterior.DPS(num_steps=5), posterior.Sharding())
    two = gaussian_mixture_benchmark(4, 1, seed=1)

    def plated(y=None):
        with pyro.plate("images", 2):
            x = pyro.sample("x", two.prior)
            return pyro.sample("y", GaussianObservation(two.operator, x, two.sigma), obs=y)

    with pytest.raises(
        ValueError, match="sharding runs one problem; the model has a plate 'images'"
    ):
        posterior.sample(
            plated,
            posterior.MCGDiff(num_steps=5),
            num_particles=4,
            progress=False,
            model_kwargs={"y": torch.stack([two.y, problem.y])},
            sharding=posterior.Sharding(),
        )
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
            run(posterior.MCGDiff(num_steps=5), posterior.Sharding())


def test_launch_local_kills_a_group_that_runs_too_long(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(Exception, match="timed out"):
        launch_local([str(script)], 2, timeout=2)
