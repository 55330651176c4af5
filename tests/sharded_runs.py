"""The sharded runs of ``tests/test_sharding.py``: started by the test in two processes of one
gloo group (``posterior.sharding.launch_local``, loopback only), or imported by it for the
single-process runs. ``torchrun --nproc-per-node 2 tests/sharded_runs.py OUT`` runs them too.

Every case of :func:`cases` runs sharded in both noise modes; each rank saves its results to
``OUT/rank{r}.pt``.
"""

import sys
from datetime import timedelta

import torch

from diffpost import posterior
from diffpost.models import GaussianMixture, operators
from diffpost.models.problems import InverseProblem, gaussian_mixture_benchmark
from diffpost.models.schedules import VP

DTYPE = torch.float64


def _inpainting():
    """A 2-D two-component mixture with its first coordinate observed (SMCDiff's case)."""
    prior = GaussianMixture(
        torch.tensor([0.9, 0.1], dtype=DTYPE),
        torch.tensor([[0.0, -3.0], [1.5, 3.0]], dtype=DTYPE),
        torch.stack([torch.eye(2, dtype=DTYPE) * v for v in (1.0, 0.1)]),
        VP(),
    )
    return InverseProblem(
        prior, operators.Mask(torch.tensor([True, False])), 0.0, torch.tensor([1.5], dtype=DTYPE)
    )


def cases():
    """name -> (problem, engine, num_chains, num_particles): every SMC engine, resampling often
    so that particles change rank."""
    mixture = gaussian_mixture_benchmark(8, 2, seed=3)
    return {
        "MCGDiff": (mixture, posterior.MCGDiff(num_steps=12, ess_threshold=1.0), 3, 8),
        "MCGDiff-default": (mixture, posterior.MCGDiff(num_steps=12), 2, 16),
        "FPS": (mixture, posterior.FPS(num_steps=12, ess_threshold=1.0), 3, 8),
        "TDS": (mixture, posterior.TDS(num_steps=12, ess_threshold=1.0), 2, 8),
        "FKSteering": (mixture, posterior.FKSteering(num_steps=12, resampling="multinomial"), 2, 8),
        "SMCDiff": (_inpainting(), posterior.SMCDiff(num_steps=12, ess_threshold=1.0), 3, 8),
    }


def law_case():
    """A 6-D Gaussian prior, half of it observed with noise: 256 chains x 8 particles."""
    prior = GaussianMixture(
        torch.ones(1, dtype=DTYPE),
        torch.linspace(-1, 1, 6, dtype=DTYPE)[None],
        torch.diag(torch.linspace(0.5, 2.0, 6, dtype=DTYPE))[None],
        VP(),
    )
    operator = operators.Mask(torch.tensor([True, False] * 3))
    y = torch.tensor([0.4, -0.8, 1.1], dtype=DTYPE)
    return InverseProblem(prior, operator, 0.2, y), posterior.MCGDiff(num_steps=20), 256, 8


def run(name, problem, engine, chains, particles, seed=11, sharding=None):
    """One run's results as plain tensors."""
    result = posterior.sample(
        problem.model,
        engine,
        num_particles=particles,
        num_chains=chains,
        seed=seed,
        progress=False,
        model_kwargs=problem.model_kwargs,
        sharding=sharding,
    )
    return {
        "x": result.values["x"],
        "log_weights": result.log_weights,
        "log_evidence": result.log_evidence,
        "ess": result.stats["ess"],
        "resampled": result.stats["resampled"],
        "sharding": result.info.get("sharding"),
    }


def main(out: str) -> None:
    import torch.distributed as dist

    from diffpost.posterior.sharding import init_process_group

    init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    results = {}
    for name, (problem, engine, chains, particles) in cases().items():
        for noise in ("global", "per_rank"):
            sharding = posterior.Sharding(noise=noise)
            results[name, noise] = run(name, problem, engine, chains, particles, sharding=sharding)
    # the law of the per-rank mode: many chains of a Gaussian problem, against Exact
    problem, engine, chains, particles = law_case()
    for noise in ("global", "per_rank"):
        sharding = posterior.Sharding(noise=noise)
        results["law", noise] = run("law", problem, engine, chains, particles, sharding=sharding)
    # refused on every rank: different seeds, particles that do not split evenly
    try:
        run("MCGDiff", *cases()["MCGDiff"][:3], 8, seed=rank, sharding=posterior.Sharding())
    except ValueError as error:
        results["different seeds"] = str(error)
    try:
        run("MCGDiff", *cases()["MCGDiff"][:3], 7, sharding=posterior.Sharding())
    except ValueError as error:
        results["indivisible"] = str(error)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
