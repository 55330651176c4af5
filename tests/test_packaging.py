"""Packaging: one import namespace (``diffpost``), a wheel that holds the library and its shipped
priors and nothing else, dependencies that match the imports, and a library that lives beside a
user project with its own ``models`` and ``diagnostics`` modules."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: repository folder -> its name in the namespace
FOLDERS = {
    "diffpost": "diffpost",
    "models": "diffpost.models",
    "posterior": "diffpost.posterior",
    "diagnostics": "diffpost.diagnostics",
}
SHIPPED = [
    "digits.pt",
    "digits16.pt",
    "digits_gmm.pt",
    "digits.npz",
    "mnist.pt",
    "mnist_heldout.npz",
    "natural_patches.pt",
    "photos.npz",
    "QUALITY.md",
    "quality.json",
]


def _source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` in the mapped folders, as a dotted namespace name."""
    names = set()
    for folder, namespace in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            names.add(".".join((namespace, *parts)))
    return names


def test_pyproject_lists_every_subpackage():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _source_packages()
    assert config["package-dir"] == {namespace: folder for folder, namespace in FOLDERS.items()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (what ``pip install .`` installs)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("needs pip")
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in (*FOLDERS, "scripts", "tests"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q"]
        + ["-w", str(tmp_path / "dist"), *isolation],
        check=True,
        capture_output=True,
    )
    (built,) = (tmp_path / "dist").glob("*.whl")
    return built


def test_wheel_installs_one_top_level_package_with_the_zoo(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(metadata.replace("METADATA", "entry_points.txt")).decode()
    top_level = {name.split("/")[0] for name in names}
    version = importlib.metadata.version("diffpost")
    assert top_level == {"diffpost", f"diffpost-{version}.dist-info"}
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
    assert packages == _source_packages()
    for name in SHIPPED:
        assert f"diffpost/models/zoo/{name}" in names, name
    # the zoo's training scripts, the tests and the benchmarks are not in the import path
    scripts = r"(train_digits|train_patches|quality|make_digits_data)\.py"
    assert not [n for n in names if re.search(scripts, n)]
    assert not [n for n in names if "/tests/" in n or "benchmarks" in n]
    assert "diffpost = diffpost.cli:main" in entry_points


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level module names imported by a file: ``(at module level, inside functions)``."""
    tree = ast.parse(path.read_text())
    eager, lazy = set(), set()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        (lazy if id(node) in inside else eager).update(m.split(".")[0] for m in modules)
    return eager, lazy


def test_declared_dependencies_are_what_the_library_imports():
    eager, lazy = set(), set()
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            more_eager, more_lazy = _imports(path)
            eager |= more_eager
            lazy |= more_lazy
    ours = {"diffpost", "__future__"} | set(sys.stdlib_module_names)
    eager, lazy = eager - ours, lazy - ours - eager
    distributions = importlib.metadata.packages_distributions()

    def normalise(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    def distribution(module: str) -> str:
        assert module in distributions, f"{module} is imported but not installed"
        return normalise(distributions[module][0])

    core, extras = set(), {}
    for requirement in importlib.metadata.requires("diffpost"):
        name = normalise(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
        marker = re.search(r'extra == "(\w+)"', requirement)
        if marker:
            extras.setdefault(marker.group(1), set()).add(name)
        else:
            core.add(name)
    # h5netcdf is never imported: diagnostics/convert.py names it as xarray's netCDF engine
    eager, lazy = {distribution(m) for m in eager}, {distribution(m) for m in lazy}
    assert eager <= core, "imported at module level but not a dependency"
    assert core == eager | (lazy & core) | {"h5netcdf"}, "declared but never imported"
    # imported only inside the function that needs it: diffusers, for DiffusersDenoiser;
    # numpyro and jax, for diagnostics.nuts_reference
    assert lazy - core == extras["diffusers"] | extras["reference"]
    assert extras["diffusers"] == {"diffusers"} and extras["reference"] == {"numpyro", "jax"}
    # ArviZ's plotting library works on a run's DataTree (tests/test_plots.py); never imported
    assert extras["plots"] == {"arviz-plots"}
    # the peer libraries, for benchmarks/peers.py only: never imported by the library
    assert extras["peers"] == {"azula", "deepinv"}
    assert not extras["peers"] & (eager | lazy)
    # Dask (the distributed extra) runs sample_many and calibration_study on a cluster: the user
    # passes its executor, so the library never imports it (tests and benchmarks do)
    assert not {"dask", "distributed"} & (eager | lazy)


USER_PROJECT = {
    "models/__init__.py": "WHOSE = 'user models package'\n",
    "diagnostics.py": "WHOSE = 'user diagnostics module'\n",
    "posterior.py": "WHOSE = 'user posterior module'\n",
    "run.py": textwrap.dedent(
        """
        import sys
        import pyro
        import torch

        import diagnostics, models, posterior  # the user's own modules, first on sys.path

        import diffpost
        from diffpost import posterior as dp
        from diffpost.models import Gaussian, GaussianObservation, operators

        assert models.WHOSE == "user models package"
        assert diagnostics.WHOSE == "user diagnostics module"
        assert posterior.WHOSE == "user posterior module"
        print(diffpost.models.__file__)

        prior = Gaussian(torch.zeros(2, dtype=torch.float64),
                         torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64))
        operator = operators.Matrix(torch.tensor([[1.0, 0.5]], dtype=torch.float64))
        y = torch.tensor([0.7], dtype=torch.float64)

        def model(y=None):
            x = pyro.sample("x", prior)
            return pyro.sample("y", GaussianObservation(operator, x, 0.3), obs=y)

        exact = prior.posterior(operator, y, 0.3)
        mean, sd = exact.means[0], exact.covariances[0].diagonal().sqrt()
        for engine, chains, particles, tolerance in [
            # exact draws: 4 standard errors of a mean of 4000 draws (measured 0.016-0.031)
            (dp.Exact(), 1, 4000, 4 / 4000**0.5),
            # MCGDiff, 30 steps, 8 filters of 256: measured 0.02-0.06 posterior sd on seeds 1-5
            # (0.03 at seed 0); 0.15 is over twice the largest, far below a wrong posterior's
            (dp.MCGDiff(num_steps=30), 8, 256, 0.15),
        ]:
            result = dp.sample(model, engine, num_particles=particles, num_chains=chains,
                               seed=0, progress=False, model_kwargs={"y": y})
            error = ((result.mean() - mean) / sd).abs().max()
            assert error < tolerance, (engine, float(error))
            print(type(engine).__name__, float(error))
        """
    ),
}


def _run_user_project(tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    project = tmp_path / "user_project"
    for name, text in USER_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    return subprocess.run(
        [sys.executable, "run.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_a_user_project_with_its_own_models_and_diagnostics_runs_an_engine(tmp_path):
    """Run from the root of a project whose ``models``, ``diagnostics`` and ``posterior`` would
    have shadowed the library's before the namespace (and been shadowed by it)."""
    completed = _run_user_project(tmp_path)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # the library's models (from this checkout or an installed copy), not the user's
    library_models = Path(lines[0]).resolve()
    assert library_models.name == "__init__.py" and not library_models.is_relative_to(tmp_path)
    assert [line.split()[0] for line in lines[1:]] == ["Exact", "MCGDiff"]


def test_the_built_wheel_runs_the_user_project_and_loads_the_zoo(wheel, tmp_path):
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    env = {"PATH": "", "PYTHONPATH": str(installed)}
    completed = _run_user_project(tmp_path, env)
    assert completed.returncode == 0, completed.stderr
    assert Path(completed.stdout.splitlines()[0]).is_relative_to(installed)
    script = (
        "from diffpost.models import zoo; import pathlib, sys\n"
        "assert pathlib.Path(zoo.__file__).is_relative_to(sys.argv[1]), zoo.__file__\n"
        "zoo.digits(); zoo.digits16(); zoo.digits_gmm(20); zoo.digits_data('heldout')\n"
        "zoo.mnist(); zoo.mnist_data(); zoo.natural_patches((1, 32, 48)); zoo.photo('camera')\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(installed)],
        check=True,
        cwd=installed,
        env=env,
        timeout=120,
    )
