"""The project's bad-input corpus: bad arguments to the public API are refused before any work,
with the exception type and a message that names the argument or site.

Table-driven: each case is ``(id, call, exception type, regex)``; the regex must name what is
wrong (the argument, the site, the field). Add a case with every new public argument.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diffpost import posterior
from diffpost.models import GaussianMixture, GaussianObservation, operators
from diffpost.posterior import ParticleSet

D = torch.float64
PRIOR = GaussianMixture(
    torch.ones(1, dtype=D), torch.zeros(1, 2, dtype=D), torch.eye(2, dtype=D)[None]
)
Y = torch.tensor([0.3, -0.2], dtype=D)


def model(y=None):
    x = pyro.sample("x", PRIOR)
    return pyro.sample("y", GaussianObservation(operators.Identity((2,)), x, 0.5), obs=y)


def model_with(sigma=0.5, operator=None):
    def noisy(y=None):
        x = pyro.sample("x", PRIOR)
        return pyro.sample(
            "y",
            GaussianObservation(
                operators.Identity((2,)) if operator is None else operator, x, sigma
            ),
            obs=y,
        )

    return noisy


def sample(model=model, engine=None, **kwargs):
    kwargs.setdefault("num_particles", 4)
    kwargs.setdefault("model_kwargs", {"y": Y})
    kwargs.setdefault("progress", False)
    return posterior.sample(model, engine or posterior.Exact(), **kwargs)


def exact_set(y=Y, seed=0) -> ParticleSet:
    return sample(model_kwargs={"y": y}, seed=seed, num_chains=2)


CASES: list[tuple[str, object, type, str]] = []


def case(name: str, error: type, pattern: str):
    def register(call):
        CASES.append((name, call, error, pattern))
        return call

    return register


# ---- engine constructors: num_steps of every registered engine ---------------------------
for _name, _cls in posterior.registry().items():
    for _bad in (-1, 1.5, "10", True):
        CASES.append(
            (
                f"{_name}(num_steps={_bad!r})",
                lambda c=_cls, b=_bad: c(num_steps=b),
                ValueError,
                "num_steps",
            )
        )

# ---- posterior.sample arguments ----------------------------------------------------------
for _field in ("num_particles", "num_chains"):
    for _bad in (0, -3, 2.5, True, "8"):
        CASES.append(
            (
                f"sample({_field}={_bad!r})",
                lambda f=_field, b=_bad: sample(**{f: b}),
                ValueError,
                _field,
            )
        )
for _bad, _error in (
    (1.5, TypeError),
    ("abc", TypeError),
    (True, TypeError),
    (2**70, ValueError),
    (-1, ValueError),
    (np.float64(3.0), TypeError),
):
    CASES.append((f"sample(seed={_bad!r})", lambda b=_bad: sample(seed=b), _error, "seed"))
for _bad in (0, -2, 1.5, "4"):
    CASES.append(
        (
            f"sample(batch_size={_bad!r})",
            lambda b=_bad: sample(batch_size=b),
            ValueError,
            "batch_size",
        )
    )
CASES += [
    (
        "sample(engine=class)",
        lambda: sample(engine=posterior.MCGDiff),
        ValueError,
        "engine must be",
    ),
    ("sample(engine=str)", lambda: sample(engine="MCGDiff"), ValueError, "engine must be"),
    ("sample(model_kwargs=list)", lambda: sample(model_kwargs=[Y]), TypeError, "model_kwargs"),
    (
        "sample(model_kwargs misspelled)",
        lambda: sample(model_kwargs={"yy": Y}),
        ValueError,
        r"model_kwargs has \['yy'\]",
    ),
    ("sample(model_args=str)", lambda: sample(model_args="y"), TypeError, "model_args"),
    ("sample(model=None)", lambda: sample(model=None), TypeError, "model must be"),
    ("sample(callback=1)", lambda: sample(callback=1), TypeError, "callback"),
    ("sample(device=meta)", lambda: sample(device="meta"), ValueError, "device='meta'"),
]

# ---- the model's declaration ---------------------------------------------------------------
CASES += [
    (
        "y numpy",
        lambda: sample(model_kwargs={"y": Y.numpy()}),
        TypeError,
        "observed site 'y'.*ndarray",
    ),
    (
        "y list",
        lambda: sample(model_kwargs={"y": [0.3, -0.2]}),
        TypeError,
        "observed site 'y'.*list",
    ),
    (
        "y with NaN",
        lambda: sample(model_kwargs={"y": torch.tensor([float("nan"), 0.0], dtype=D)}),
        ValueError,
        "observed site 'y' contains NaN",
    ),
    (
        "y wrong shape",
        lambda: sample(model_kwargs={"y": torch.zeros(3, dtype=D)}),
        ValueError,
        "observed site 'y' has value of shape",
    ),
    ("sigma string", lambda: sample(model_with(sigma="0.1")), TypeError, "sigma"),
    ("sigma None", lambda: sample(model_with(sigma=None)), TypeError, "sigma"),
    ("sigma negative", lambda: sample(model_with(sigma=-0.1)), ValueError, "sigma"),
    ("sigma NaN", lambda: sample(model_with(sigma=float("nan"))), ValueError, "sigma"),
    (
        "sigma wrong shape",
        lambda: sample(model_with(sigma=torch.ones(3, dtype=D))),
        ValueError,
        "sigma of shape",
    ),
    (
        "operator not an Operator",
        lambda: sample(model_with(operator=torch.eye(2, dtype=D))),
        ValueError,
        "GaussianObservation needs a models.operators.Operator",
    ),
    (
        "operator of another shape",
        lambda: sample(model_with(operator=operators.Identity((3,)))),
        ValueError,
        r"Identity.forward expects a tensor of shape \(\.\.\., 3\); got shape \(2,\)",
    ),
]


@case("no diffusion prior", ValueError, "DiffusionPrior")
def _no_prior():
    def plain(y=None):
        x = pyro.sample("x", dist.Normal(torch.zeros(2, dtype=D), 1.0).to_event(1))
        return pyro.sample("y", dist.Normal(x, 0.5).to_event(1), obs=y)

    sample(plain)


@case("two diffusion priors for a one-signal engine", ValueError, "two DiffusionPrior sites")
def _two_priors():
    def two(y=None):
        x = pyro.sample("x", PRIOR)
        k = pyro.sample("k", PRIOR)
        return pyro.sample("y", GaussianObservation(operators.Identity((2,)), x * k, 0.5), obs=y)

    sample(two)


@case("no observed site", ValueError, "observed site|no observed")
def _unobserved():
    def nothing():
        pyro.sample("x", PRIOR)

    sample(nothing, engine=posterior.DPS(num_steps=2), model_kwargs={})


@case("observation that ignores the signal", ValueError, "no observed site .*'y'.* depends on")
def _ignores_signal():
    def ignoring(y=None):
        pyro.sample("x", PRIOR)
        zero = torch.zeros(2, dtype=D)
        return pyro.sample("y", GaussianObservation(operators.Identity((2,)), zero, 0.5), obs=y)

    sample(ignoring, engine=posterior.DPS(num_steps=2))


@case("discrete global latent", ValueError, "'k'")
def _discrete():
    def discrete(y=None):
        x = pyro.sample("x", PRIOR)
        k = pyro.sample("k", dist.Bernoulli(0.5))
        return pyro.sample("y", GaussianObservation(operators.Identity((2,)), x + k, 0.5), obs=y)

    sample(discrete)


# ---- capabilities the engine needs ---------------------------------------------------------
CASES += [
    (
        "DPS with sigma = 0",
        lambda: sample(model_with(sigma=0.0), posterior.DPS()),
        ValueError,
        "DPS needs a finite log-likelihood",
    ),
    (
        "DPS with a zero among sigmas",
        lambda: sample(model_with(sigma=torch.tensor([0.1, 0.0], dtype=D)), posterior.DPS()),
        ValueError,
        "DPS needs a finite log-likelihood",
    ),
    (
        "TDS with sigma = 0",
        lambda: sample(model_with(sigma=0.0), posterior.TDS()),
        ValueError,
        "TDS needs a finite log-likelihood",
    ),
    (
        "SMCDiff on a noisy matrix",
        lambda: sample(engine=posterior.SMCDiff()),
        ValueError,
        "SMCDiff needs",
    ),
    (
        "MCGDiff on a Laplace observation",
        lambda: sample(_laplace_model(), posterior.MCGDiff()),
        ValueError,
        "MCGDiff needs a GaussianObservation",
    ),
    (
        "Exact on a Laplace observation",
        lambda: sample(_laplace_model(), posterior.Exact()),
        ValueError,
        "Exact needs",
    ),
    (
        "PMMH without global latents",
        lambda: sample(engine=posterior.PMMH()),
        ValueError,
        "PMMH infers global latents, but the model has none",
    ),
    (
        "BlindDPS with one signal",
        lambda: sample(engine=posterior.BlindDPS()),
        ValueError,
        "BlindDPS infers two signals",
    ),
]


def _laplace_model():
    def laplace(y=None):
        x = pyro.sample("x", PRIOR)
        return pyro.sample("y", dist.Laplace(x, 0.5).to_event(1), obs=y)

    return laplace


# ---- engine settings -----------------------------------------------------------------------
CASES += [
    (
        "MCGDiff(ess_threshold=2)",
        lambda: posterior.MCGDiff(ess_threshold=2.0),
        ValueError,
        "ess_threshold",
    ),
    (
        "MCGDiff(resampling='sorted')",
        lambda: posterior.MCGDiff(resampling="sorted"),
        ValueError,
        "resampling",
    ),
    ("DPS(scale=-1)", lambda: posterior.DPS(scale=-1.0), ValueError, "scale"),
    (
        "REDDiff(learning_rate=0)",
        lambda: posterior.REDDiff(learning_rate=0.0),
        ValueError,
        "learning_rate",
    ),
    (
        "REDDiff(weighting='cubic')",
        lambda: posterior.REDDiff(weighting="cubic"),
        ValueError,
        "weighting",
    ),
    (
        "REDDiff(initialization='ones')",
        lambda: posterior.REDDiff(initialization="ones"),
        ValueError,
        "initialization",
    ),
    (
        "REDDiff(adam_betas=(1, 0.9))",
        lambda: posterior.REDDiff(adam_betas=(1.0, 0.9)),
        ValueError,
        "adam_betas",
    ),
    ("RSLD(gamma=-1)", lambda: posterior.RSLD(gamma=-1.0), ValueError, "gamma"),
    (
        "REDDiff(learning_rate=inf)",
        lambda: posterior.REDDiff(learning_rate=float("inf")),
        ValueError,
        "learning_rate must be finite",
    ),
    ("DPS(scale=nan)", lambda: posterior.DPS(scale=float("nan")), ValueError, "scale"),
    (
        "DAPS(step_size=inf)",
        lambda: posterior.DAPS(step_size=float("inf")),
        ValueError,
        "step_size must be finite",
    ),
    (
        "FlowVI(prior_density='score')",
        lambda: posterior.FlowVI(prior_density="score"),
        ValueError,
        "prior_density",
    ),
    ("FlowVI(batch_size=0)", lambda: posterior.FlowVI(batch_size=0), ValueError, "batch_size"),
    (
        "FlowVI(gradient_clip=0)",
        lambda: posterior.FlowVI(gradient_clip=0.0),
        ValueError,
        "gradient_clip",
    ),
    ("PMMH(warmup=-1)", lambda: posterior.PMMH(warmup=-1), ValueError, "warmup"),
    ("Gibbs(step_size=-1)", lambda: posterior.Gibbs(step_size=-1.0), ValueError, "step_size"),
    (
        "DCDP(purification_start=2)",
        lambda: posterior.DCDP(purification_start=2.0),
        ValueError,
        "purification_end <= purification_start <= 1",
    ),
]

# ---- results -------------------------------------------------------------------------------
CASES += [
    (
        "ParticleSet NaN weights",
        lambda: ParticleSet({"x": torch.zeros(1, 2, 2)}, torch.tensor([[0.0, float("nan")]])),
        ValueError,
        "log_weights has NaN",
    ),
    (
        "ParticleSet all-zero weights",
        lambda: ParticleSet({"x": torch.zeros(1, 2, 2)}, torch.full((1, 2), -float("inf"))),
        ValueError,
        "log_weights: some chain has no draw",
    ),
    (
        "ParticleSet weights of the wrong shape",
        lambda: ParticleSet({"x": torch.zeros(1, 2, 2)}, torch.zeros(2)),
        ValueError,
        "log_weights must be",
    ),
    (
        "ParticleSet values of the wrong shape",
        lambda: ParticleSet({"x": torch.zeros(1, 3, 2)}, torch.zeros(1, 2)),
        ValueError,
        "value 'x' has shape",
    ),
    ("concat of nothing", lambda: ParticleSet.concat([]), ValueError, "at least one set"),
    (
        "concat of different observations",
        lambda: ParticleSet.concat([exact_set(), exact_set(y=2 * Y)]),
        ValueError,
        "observed value of site 'y'",
    ),
    (
        "concat of different engines",
        lambda: ParticleSet.concat(
            [exact_set(), sample(engine=posterior.DPS(num_steps=2), num_chains=2)]
        ),
        ValueError,
        "differ in their engine",
    ),
    (
        "select_problem without a plate",
        lambda: exact_set().select_problem(0),
        ValueError,
        "no plate",
    ),
    (
        "independent_draws beyond the draws",
        lambda: exact_set().independent_draws(10**6),
        ValueError,
        "draws",
    ),
    (
        "draw_layout(num_draws=0)",
        lambda: posterior.draw_layout(posterior.Exact(), 0),
        ValueError,
        "num_draws",
    ),
    (
        "draw_layout(particles_per_chain=1.5)",
        lambda: posterior.draw_layout(posterior.MCGDiff(), 8, particles_per_chain=1.5),
        ValueError,
        "particles_per_chain",
    ),
]

CASES += [
    (
        "to_datatree coords of the wrong length",
        lambda: exact_set().to_datatree(coords={"coordinate": [0, 1, 2]}),
        ValueError,
        r"coords\['coordinate'\] has 3 values; dim 'coordinate' has size 2",
    ),
    (
        "to_datatree x_true of the wrong shape",
        lambda: exact_set().to_datatree(x_true=torch.zeros(3)),
        ValueError,
        "x_true must have the event shape",
    ),
    (
        "to_datatree dims of an unknown site",
        lambda: exact_set().to_datatree(dims={"z": ["a"]}),
        ValueError,
        "dims names \\['z'\\]",
    ),
]

# ---- priors and operators ----------------------------------------------------------------
CASES += [
    (
        "GaussianMixture negative weight",
        lambda: GaussianMixture(
            torch.tensor([1.5, -0.5]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)
        ),
        ValueError,
        "weights",
    ),
    (
        "GaussianMixture covariance not PD",
        lambda: GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None]),
        ValueError,
        "covarian",
    ),
    (
        "GaussianMixture means of another size",
        lambda: GaussianMixture(torch.ones(1), torch.zeros(1, 3), torch.eye(2)[None]),
        ValueError,
        "shape|means",
    ),
    (
        "GaussianMixture event shape of another size",
        lambda: GaussianMixture(
            torch.ones(1), torch.zeros(1, 4), torch.eye(4)[None], event_shape=(1, 3, 3)
        ),
        ValueError,
        "event_shape",
    ),
    ("Matrix of 1-D", lambda: operators.Matrix(torch.ones(3)), ValueError, "2-D"),
    (
        "Mask observing nothing",
        lambda: operators.Mask(torch.zeros(4, dtype=torch.bool)),
        ValueError,
        "observes no entry",
    ),
    (
        "Mask of repeated coordinates",
        lambda: operators.Mask(torch.tensor([1, 1]), shape=(4,)),
        ValueError,
        "distinct",
    ),
]


# ---- beyond one process: sharding and many runs --------------------------------------------
CASES += [
    (
        "sharding not a Sharding",
        lambda: sample(engine=posterior.MCGDiff(num_steps=3), sharding="global"),
        TypeError,
        "sharding must be a posterior.Sharding",
    ),
    (
        "sharding an engine that is not SMC",
        lambda: sample(engine=posterior.DDRM(num_steps=3), sharding=posterior.Sharding()),
        ValueError,
        "sharding splits the particles of the SMC engines; DDRM is not one",
    ),
    (
        "Sharding noise unknown",
        lambda: posterior.Sharding(noise="local"),
        ValueError,
        "noise must be one of",
    ),
    (
        "sample_many observations not dicts",
        lambda: posterior.sample_many(model, posterior.Exact(), [Y], num_particles=2),
        (TypeError, ValueError),
        "observations",
    ),
    (
        "sample_many executor without submit",
        lambda: posterior.sample_many(
            model, posterior.Exact(), [{"y": Y}], num_particles=2, executor=object()
        ),
        (TypeError, ValueError),
        "executor",
    ),
    (
        "sample_many negative retries",
        lambda: posterior.sample_many(
            model, posterior.Exact(), [{"y": Y}], num_particles=2, retries=-1
        ),
        (TypeError, ValueError),
        "retries",
    ),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_what_is_wrong(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_the_corpus_has_at_least_a_hundred_cases():
    assert len(CASES) >= 100, len(CASES)


# ---- files -----------------------------------------------------------------------------------
def _file(tmp_path_factory, name: str, content: bytes | None):
    path = tmp_path_factory.mktemp("files") / name
    if content is not None:
        path.write_bytes(content)
    return path


def _truncated(tmp_path_factory, kind: str):
    path = tmp_path_factory.mktemp("files") / f"good.{kind}"
    result = exact_set()
    if kind == "pt":
        result.save(path)
    else:
        from diffpost import diagnostics

        diagnostics.save_datatree(result.to_datatree(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


FILE_CASES = [
    ("ParticleSet.load missing", "pt", None, FileNotFoundError, "no file at .*missing.pt"),
    (
        "ParticleSet.load foreign",
        "pt",
        b"not a torch file",
        ValueError,
        "foreign.pt is not a readable ParticleSet file",
    ),
    (
        "ParticleSet.load truncated",
        "pt",
        "truncated",
        ValueError,
        "good.pt is not a readable ParticleSet file",
    ),
    ("load_datatree missing", "nc", None, FileNotFoundError, "no file at .*missing.nc"),
    (
        "load_datatree foreign",
        "nc",
        b"not a netCDF file",
        ValueError,
        "foreign.nc is not a readable netCDF-4 DataTree",
    ),
    (
        "load_datatree truncated",
        "nc",
        "truncated",
        ValueError,
        "good.nc is not a readable netCDF-4 DataTree",
    ),
]


@pytest.mark.parametrize(
    "kind, content, error, pattern", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_a_file_that_cannot_be_read_is_refused_naming_its_path(
    tmp_path_factory, kind, content, error, pattern
):
    from diffpost import diagnostics

    if content == "truncated":
        path = _truncated(tmp_path_factory, kind)
    else:
        path = _file(
            tmp_path_factory, ("missing." if content is None else "foreign.") + kind, content
        )
    load = ParticleSet.load if kind == "pt" else diagnostics.load_datatree
    with pytest.raises(error, match=pattern):
        load(path)


def test_saving_is_atomic_and_refuses_a_missing_folder(tmp_path, monkeypatch):
    from diffpost import diagnostics

    path = tmp_path / "run.pt"
    first = exact_set()
    first.save(path)
    before = path.read_bytes()

    def interrupted(data, file):
        with open(file, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exact_set(seed=1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the good file is still there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary left
    torch.testing.assert_close(ParticleSet.load(path).values["x"], first.values["x"])
    with pytest.raises(FileNotFoundError, match="the folder .*nowhere does not exist"):
        first.save(tmp_path / "nowhere" / "run.pt")
    with pytest.raises(FileNotFoundError, match="the folder .*nowhere does not exist"):
        diagnostics.save_datatree(first.to_datatree(), tmp_path / "nowhere" / "run.nc")


def test_a_network_that_cannot_take_the_declared_shape_is_refused_at_construction():
    from diffpost.models import DiffusionPrior, zoo
    from diffpost.models.denoisers import EpsilonDenoiser
    from diffpost.models.networks import UNet
    from diffpost.models.schedules import VP

    digits = zoo.digits()  # trained on (1, 8, 8), declared by the zoo
    with pytest.raises(ValueError, match=r"event_shape \(1, 16, 16\) does not match .*\(1, 8, 8\)"):
        DiffusionPrior(digits.denoiser, (1, 16, 16))
    # undeclared: one call at construction finds what the network cannot take
    net = UNet(channels=1, base_channels=8, channel_multipliers=(1, 2, 2))
    denoiser = EpsilonDenoiser(net, VP())
    assert DiffusionPrior(denoiser, (1, 8, 8)).event_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"cannot take signals of event_shape \(1, 9, 9\)"):
        DiffusionPrior(denoiser, (1, 9, 9))
    with pytest.raises(
        ValueError, match=r"cannot take signals of event_shape \(2, 8, 8\).*channels"
    ):
        DiffusionPrior(denoiser, (2, 8, 8))


def test_a_memory_request_that_cannot_succeed_is_refused_with_the_estimate(monkeypatch):
    calls = []
    with pytest.raises(
        MemoryError, match=r"10000000000000 particles of shape \(2,\).*GiB.*at most"
    ):
        sample(num_particles=10**13, callback=lambda *a: calls.append(a))
    assert not calls  # before any work

    # the particles fit but the denoiser's activations do not: say which batch_size to pass
    def exhausted(self, x_t, t):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(posterior.Problem, "denoise", exhausted)
    with pytest.raises(MemoryError, match=r"called on 64 particles at once: pass batch_size=16"):
        sample(engine=posterior.DDRM(num_steps=3), num_particles=32, num_chains=2)
    with pytest.raises(MemoryError, match=r"called on 8 particles at once: pass batch_size=2"):
        sample(engine=posterior.DDRM(num_steps=3), num_particles=32, num_chains=2, batch_size=8)
