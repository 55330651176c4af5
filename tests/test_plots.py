"""Tests of diagnostics.plots and diagnostics.compare: every figure is rendered to a file, and what
it drew (axes, titles, images, lines, bars) is checked against the data it was given."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import gaussian_model  # noqa: E402

from diffpost import posterior  # noqa: E402
from diffpost.diagnostics import (  # noqa: E402
    calibration_study,
    compare,
    plot_calibration,
    plot_image_grid,
    plot_rank_histograms,
    plot_traces,
    rank_coverage,
)
from diffpost.models import Gaussian, GaussianMixture  # noqa: E402
from diffpost.models.operators import Mask, Matrix  # noqa: E402
from diffpost.posterior.engines.exact import ExactState  # noqa: E402
from diffpost.posterior.particles import ParticleSet  # noqa: E402

DTYPE = torch.float64


@dataclass(frozen=True)
class PriorDraws(posterior.Engine):
    """A deliberately wrong engine: prior samples whatever the data."""

    requires: ClassVar[frozenset[str]] = frozenset()

    def init(self, problem, num_chains, num_particles, generator):
        x = problem.prior.sample((num_chains * num_particles,), generator=generator)
        uniform = x.new_full((num_chains, num_particles), -math.log(num_particles))
        return ExactState(x, uniform, None)


def image_problem():
    """A smooth Gaussian prior on (1, 4, 4) images; the left half observed with sigma = 0.1."""
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], 1).double()
    covariance = torch.exp(-(torch.cdist(points, points) ** 2) / 4) + 0.05 * torch.eye(16)
    prior = Gaussian(
        torch.full((16,), 0.5, dtype=DTYPE), covariance.double(), event_shape=(1, 4, 4)
    )
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    operator = Mask(mask)
    x_true = prior.sample((), generator=torch.Generator().manual_seed(0))
    y = operator(x_true[None])[0] + 0.1 * torch.randn(
        8, generator=torch.Generator().manual_seed(1), dtype=DTYPE
    )
    return prior, operator, x_true, y, gaussian_model(prior, operator, 0.1)


def run(model, y, engine=None, chains=2, particles=200, seed=0):
    return posterior.sample(
        model,
        engine or posterior.Exact(),
        num_particles=particles,
        num_chains=chains,
        seed=seed,
        progress=False,
        model_kwargs={"y": y},
    )


def titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def saved(figure, path) -> None:
    figure.savefig(path)
    assert path.stat().st_size > 1000
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# image grid
# --------------------------------------------------------------------------------------------


def test_image_grid_of_a_particle_set(tmp_path):
    prior, operator, x_true, y, model = image_problem()
    result = run(model, y)
    shown = operator.adjoint(y[None])[0].masked_fill(~operator.mask, float("nan"))
    figure = plot_image_grid(result, truth=x_true, measurement=shown, num_samples=3)
    assert titles(figure) == [
        "truth",
        "measurement",
        "posterior mean",
        "posterior std",
        "90% interval width",
        "sample 1",
        "sample 2",
        "sample 3",
    ]
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    assert all(len(ax.images) == 1 for ax in panels.values())
    assert len(figure.axes) == 8 + 2  # and the two colour bars of the spread maps
    draws = result.get_samples()["x"]
    image = lambda title: np.asarray(panels[title].images[0].get_array())  # noqa: E731
    np.testing.assert_allclose(image("posterior mean"), draws.mean(0)[0].numpy())
    np.testing.assert_allclose(image("posterior std"), draws.std(0, correction=0)[0].numpy())
    np.testing.assert_allclose(image("truth"), x_true[0].numpy())
    np.testing.assert_allclose(image("sample 2"), draws[1, 0].numpy())
    # the std map is small where observed (sigma = 0.1) and larger on the unobserved half
    std = image("posterior std")
    assert std[:, :2].max() < std[:, 2:].min()
    # unobserved pixels of the measurement are masked (NaN), observed ones keep y
    measured = np.ma.filled(np.ma.masked_invalid(image("measurement")), np.nan)
    assert np.isnan(measured[:, 2:]).all() and np.isfinite(measured[:, :2]).all()
    saved(figure, tmp_path / "grid.png")


def test_image_grid_of_tensors_flat_and_rgb(tmp_path):
    samples = torch.rand(10, 16, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    figure = plot_image_grid(samples, num_samples=2, image_shape=(4, 4), level=0.5)
    assert titles(figure) == [
        "posterior mean",
        "posterior std",
        "50% interval width",
        "sample 1",
        "sample 2",
    ]
    saved(figure, tmp_path / "flat.png")

    rgb = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    low_resolution = torch.rand(3, 2, 2)
    figure = plot_image_grid(rgb, truth=rgb[0], measurement=low_resolution, num_samples=0)
    assert titles(figure) == [
        "truth",
        "measurement",
        "posterior mean",
        "posterior std",
        "90% interval width",
    ]
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    assert panels["posterior mean"].images[0].get_array().shape == (5, 5, 3)  # RGB
    assert panels["measurement"].images[0].get_array().shape == (2, 2, 3)
    assert panels["posterior std"].images[0].get_array().shape == (5, 5)  # channel mean
    saved(figure, tmp_path / "rgb.png")


def test_image_grid_rejects_what_is_not_an_image():
    samples = torch.rand(5, 16)
    with pytest.raises(ValueError, match="image_shape"):
        plot_image_grid(samples)
    with pytest.raises(ValueError, match="entries"):
        plot_image_grid(samples, image_shape=(3, 3))
    with pytest.raises(ValueError, match="not an image"):
        plot_image_grid(samples, image_shape=(4, 4), measurement=torch.rand(5))
    with pytest.raises(ValueError, match="level"):
        plot_image_grid(samples, image_shape=(4, 4), level=1.0)
    with pytest.raises(ValueError, match="ParticleSet or a"):
        plot_image_grid(torch.rand(16))


# --------------------------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------------------------


def test_traces_show_ess_and_cumulative_log_evidence(tmp_path):
    g = torch.Generator().manual_seed(0)
    chains, draws, steps = 3, 40, 12
    increments = torch.randn(chains, steps, generator=g, dtype=DTYPE)
    result = ParticleSet(
        values={"x": torch.randn(chains, draws, 2, generator=g, dtype=DTYPE)},
        log_weights=torch.full((chains, draws), -math.log(draws), dtype=DTYPE),
        log_evidence=increments.sum(1),
        stats={
            "ess": draws * torch.rand(chains, steps, generator=g, dtype=DTYPE),
            "resampled": torch.rand(chains, steps, generator=g) < 0.3,
            "log_evidence_increment": increments,
            "t": torch.linspace(1, 0, steps).expand(chains, steps),
        },
        info={"engine": "MCGDiff", "latent_name": "x"},
    )
    figure = plot_traces(result)
    assert titles(figure) == ["ESS / N", "log-evidence"]
    ess_ax, evidence_ax = figure.axes
    lines = [line for line in ess_ax.lines if line.get_linestyle() == "-"]
    assert len(lines) == chains
    np.testing.assert_allclose(lines[1].get_ydata(), result.stats["ess"][1].numpy() / draws)
    markers = [line for line in ess_ax.lines if line.get_marker() == "."]
    assert [len(m.get_xdata()) for m in markers] == result.stats["resampled"].sum(1).tolist()
    curves = [line for line in evidence_ax.lines if len(line.get_xdata()) == steps]
    np.testing.assert_allclose(curves[2].get_ydata(), increments[2].cumsum(0).numpy())
    finals = [line for line in evidence_ax.lines if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in finals] == pytest.approx(result.log_evidence.tolist())
    assert ess_ax.get_xlabel() == "step"
    saved(figure, tmp_path / "traces.png")

    with pytest.raises(ValueError, match="nothing to trace"):
        plot_traces(ParticleSet(values=result.values, log_weights=result.log_weights))


# --------------------------------------------------------------------------------------------
# calibration plots
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    prior = GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=DTYPE),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=DTYPE),
        torch.eye(2, dtype=DTYPE).expand(2, 2, 2).clone(),
    )
    model = gaussian_model(prior, Matrix(torch.tensor([[1.0, 1.0]], dtype=DTYPE)), 0.5)
    return calibration_study(
        model, posterior.Exact(), 40, num_particles=19, num_projections=3, progress=False
    )


def test_calibration_figure(tmp_path, study):
    figure = plot_calibration(study)
    assert len(figure.axes) == 2
    coverage_ax, uniformity_ax = figure.axes
    assert coverage_ax.get_title() == "coverage"
    assert uniformity_ax.get_title().startswith("rank uniformity (passed")
    # one curve per kind of summary plus the diagonal, each over the study's levels
    curves = {line.get_label(): line for line in coverage_ax.lines}
    assert set(curves) >= {"coordinates", "random projections", "log-likelihood", "TARP (ECP)"}
    coordinates = study.coverage[:, study.columns(["coordinates"])].mean(1).numpy()
    np.testing.assert_allclose(curves["coordinates"].get_ydata(), coordinates)
    np.testing.assert_allclose(curves["TARP (ECP)"].get_xdata(), study.levels.numpy())
    # every summary's p-value is a point; the Bonferroni line sits at alpha / K
    points = sum(len(c.get_offsets()) for c in uniformity_ax.collections)
    assert points == len(study.summaries)
    threshold = [line for line in uniformity_ax.lines if line.get_linestyle() == "--"][0]
    assert threshold.get_ydata()[0] == pytest.approx(0.01 / len(study.summaries))
    saved(figure, tmp_path / "calibration.png")


def test_rank_histograms(tmp_path, study):
    figure = plot_rank_histograms(study, max_panels=4)
    assert len(figure.axes) == 4
    worst = sorted(range(len(study.summaries)), key=lambda k: float(study.p_values[k]))[:4]
    for ax, column in zip(figure.axes, worst, strict=False):
        assert ax.get_title().startswith(study.summaries[column] + " (p = ")
        assert len(ax.patches) == study.num_bins  # one bar per bin
        heights = [bar.get_height() for bar in ax.patches]
        assert sum(heights) == study.num_trials
        expected = np.bincount(
            study.ranks[:, column].numpy() * study.num_bins // (study.num_draws + 1),
            minlength=study.num_bins,
        )
        np.testing.assert_array_equal(heights, expected)
    saved(figure, tmp_path / "ranks.png")
    figure = plot_rank_histograms(study, kinds=["tarp"])
    assert len(figure.axes) == 1 and figure.axes[0].get_title().startswith("tarp")
    plt.close(figure)
    with pytest.raises(ValueError, match="kinds"):
        plot_rank_histograms(study, kinds=["pixels"])


def test_study_tree_works_with_arviz_pit_ecdf(tmp_path, study):
    arviz_plots = pytest.importorskip("arviz_plots")
    tree = study.to_datatree()
    sbc = tree["prior_sbc"]
    assert sbc["coordinates"].dims == ("chain", "draw", "coordinates_summary")
    assert sbc["coordinates"].shape == (1, study.num_trials, 2)
    np.testing.assert_allclose(
        sbc["tarp"].values[0], study.normalized_ranks()[:, study.summaries.index("tarp")]
    )
    collection = arviz_plots.plot_ecdf_pit(tree, var_names=["tarp", "log_likelihood"])
    figure = collection.viz["figure"].item()
    assert len([ax for ax in figure.axes if ax.has_data()]) == 2
    saved(figure, tmp_path / "ecdf.png")


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def test_compare_vectors_against_a_reference(tmp_path):
    prior = GaussianMixture(
        torch.tensor([0.5, 0.5], dtype=DTYPE),
        torch.tensor([[-3.0, 0.0, 0.0], [3.0, 0.0, 1.0]], dtype=DTYPE),
        torch.eye(3, dtype=DTYPE).expand(2, 3, 3).clone(),
    )
    operator = Matrix(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=DTYPE))
    x_true = torch.tensor([2.5, -0.5, 1.0], dtype=DTYPE)
    y = operator(x_true[None])[0] + 0.3
    model = gaussian_model(prior, operator, 0.5)
    results = {
        "exact": run(model, y, seed=1),
        "prior": run(model, y, engine=PriorDraws(), seed=2),
    }
    reference = prior.posterior(operator, y, 0.5).sample(
        (2000,), generator=torch.Generator().manual_seed(3)
    )
    table, figure = compare(results, truth=x_true, reference=reference)
    assert list(table.index) == ["exact", "prior"]
    for column in ("engine", "draws", "nfe", "wall_time", "ess_fraction", "log_evidence", "sw",
                   "sw_floor", "mmd", "gaussian_w2", "psnr", "coverage", "crps"):  # fmt: skip
        assert column in table.columns, column
    assert "ssim" not in table.columns  # not an image
    assert table.loc["exact", "draws"] == 400 and table.loc[
        "exact", "ess_fraction"
    ] == pytest.approx(1.0)
    # Exact sits at the noise floor (400 vs 400 draws: measured sw 0.066, floor 0.075); prior
    # draws are far from the posterior (measured sw 2.14, MMD^2 0.32 vs -0.001, CRPS 0.70 vs
    # 0.18) and have no evidence estimate
    exact, wrong = table.loc["exact"], table.loc["prior"]
    assert exact["sw"] < 2 * exact["sw_floor"]
    assert wrong["sw"] > 5 * wrong["sw_floor"]
    assert wrong["mmd"] > 10 * abs(exact["mmd"]) and wrong["crps"] > exact["crps"]
    assert np.isfinite(exact["log_evidence"]) and np.isnan(wrong["log_evidence"])
    assert [ax.get_title() for ax in figure.axes] == ["exact", "prior"]
    assert all(len(ax.collections) == 3 for ax in figure.axes)  # reference, draws, truth
    saved(figure, tmp_path / "compare_vectors.png")


def test_compare_images(tmp_path):
    prior, operator, x_true, y, model = image_problem()
    results = {"a": run(model, y, seed=1), "b": run(model, y, seed=2, particles=50)}
    reference = prior.posterior(operator, y, 0.1).sample((400,), generator=torch.Generator())
    table, figure = compare(results, truth=x_true, reference=reference)
    assert {"psnr", "ssim", "coverage", "crps"} <= set(table.columns)
    assert table.loc["b", "draws"] == 100
    assert titles(figure) == [
        "truth",
        "reference\nmean",
        "a\nmean",
        "b\nmean",
        "reference\nstd",
        "a\nstd",
        "b\nstd",
    ]
    saved(figure, tmp_path / "compare_images.png")
    with pytest.raises(ValueError, match="at least one"):
        compare({})
    with pytest.raises(ValueError, match="truth"):
        compare(results, truth=torch.zeros(16))
    with pytest.raises(ValueError, match="ParticleSet"):
        compare({"a": torch.zeros(3, 16)})


def test_compare_reads_rank_coverage_from_independent_draws():
    """The ``rank_coverage`` column is calibrated for few draws where ``coverage`` is not, and
    reads an SMC run's independent draws (one per chain)."""
    d = 1000  # independent coordinates: the truth is a draw of the exact posterior given y
    prior = Gaussian(torch.zeros(d, dtype=DTYPE), torch.eye(d, dtype=DTYPE))
    mask = torch.arange(d) % 2 == 0
    operator = Mask(mask)
    x_true = prior.sample((), generator=torch.Generator().manual_seed(0))
    y = operator(x_true[None])[0] + 0.5 * torch.randn(
        d // 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE
    )
    model = gaussian_model(prior, operator, 0.5)
    table, _ = compare({"exact": run(model, y, chains=1, particles=8)}, truth=x_true)
    plt.close("all")
    # 8 exact draws: the empirical 5-95% interval covers about 0.72, the rank reading 0.90.
    # Measured over seeds 0-9 (truth, noise and run): rank_coverage 0.898 +- 0.0045 (sd),
    # coverage 0.717 +- 0.011; here (seed 0) 0.900 and 0.711. Bands: about 4.5 sds
    assert table.loc["exact", "rank_coverage"] == pytest.approx(0.9, abs=0.02)
    assert table.loc["exact", "coverage"] == pytest.approx(0.72, abs=0.05)

    # a resampling filter: its particles are not independent, one draw per chain is read
    smc = {
        "three chains": run(
            model, y, engine=posterior.MCGDiff(num_steps=10), chains=3, particles=20
        ),
        "one chain": run(model, y, engine=posterior.MCGDiff(num_steps=10), chains=1, particles=20),
    }
    table, _ = compare(smc, truth=x_true)
    plt.close("all")
    draws = smc["three chains"].independent_draws()["x"]
    assert draws.shape[0] == 3
    assert table.loc["three chains", "rank_coverage"] == pytest.approx(
        rank_coverage(draws, x_true, [0.9])[0.9], abs=1e-12
    )
    assert math.isnan(table.loc["one chain", "rank_coverage"])


def test_arviz_plots_run_on_the_tree_of_a_run(tmp_path):
    arviz_plots = pytest.importorskip("arviz_plots")
    from diffpost.diagnostics import to_datatree

    prior, operator, x_true, y, model = image_problem()
    tree = to_datatree(run(model, y), forward=operator, x_true=x_true)
    # posterior predictive A(x) against the observed y, and a trace of two pixels
    ppc = arviz_plots.plot_ppc_dist(tree, coords={"measurement": [0, 1]})
    assert ppc.viz["figure"].item().axes
    trace = arviz_plots.plot_trace(tree, coords={"row": [0], "column": [0, 1]})
    figure = trace.viz["figure"].item()
    assert len(figure.axes) == 2  # one panel per selected pixel
    saved(figure, tmp_path / "trace.png")
