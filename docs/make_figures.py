"""Make the README figures.

``docs/figures/image_grid.png``: 8 x 8 digits inpainting with the exact posterior. The prior is a
Gaussian mixture fitted to scikit-learn's digits (pixels scaled to [0, 1], 20 full-covariance
components, as a stand-in for a learned diffusion prior: its posterior is exact, so the error
bars shown are the true ones); a held-out digit is observed on its top half plus a random quarter
of the bottom half (unobserved pixels in red), with noise ``sigma = 0.05``. The Exact engine
draws 512 posterior samples.

Run from the repository root::

    .venv/bin/python docs/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pyro  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from diffpost import posterior  # noqa: E402
from diffpost.diagnostics import plot_image_grid  # noqa: E402
from diffpost.models import GaussianMixture, GaussianObservation  # noqa: E402
from diffpost.models.operators import Mask  # noqa: E402

FIGURES = ROOT / "docs" / "figures"


def digits_prior(seed: int = 0) -> tuple[GaussianMixture, torch.Tensor]:
    """A 20-component Gaussian mixture fitted to all digits but the last 100, and those 100."""
    images = load_digits().images.reshape(-1, 64) / 16.0
    train, held_out = images[:-100], images[-100:]
    fit = SkGaussianMixture(20, covariance_type="full", reg_covar=1e-3, random_state=seed)
    fit.fit(train)
    prior = GaussianMixture(
        torch.tensor(fit.weights_),
        torch.tensor(fit.means_),
        torch.tensor(fit.covariances_),
        event_shape=(1, 8, 8),
    )
    return prior, torch.tensor(held_out).reshape(-1, 1, 8, 8)


def image_grid(path: Path, seed: int = 0) -> None:
    prior, held_out = digits_prior(seed)
    x_true = held_out[3]
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    mask[:, 4:] = torch.rand(1, 4, 8, generator=generator) < 0.25
    operator = Mask(mask)
    sigma = 0.05
    y = operator(x_true[None])[0] + sigma * torch.randn(
        int(mask.sum()), generator=generator, dtype=x_true.dtype
    )

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)

    result = posterior.sample(
        model, posterior.Exact(), num_particles=512, seed=seed, model_kwargs={"y": y}
    )
    shown = operator.adjoint(y[None])[0].masked_fill(~mask, float("nan"))  # unobserved: red
    figure = plot_image_grid(result, truth=x_true, measurement=shown, num_samples=5)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    FIGURES.mkdir(parents=True, exist_ok=True)
    image_grid(FIGURES / "image_grid.png")
