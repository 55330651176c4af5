r"""Ready-made inverse problems, each a Pyro model with its data.

:func:`gaussian_mixture_benchmark` is the Gaussian-mixture benchmark of the MCGDiff paper
(Cardoso et al. 2024, appendix "GMM"; official script ``scripts/viz_gaussian.py`` of
gabrielvc/mcg_diff), reproduced from its specification:

- prior: 25 components with means :math:`\mu_{ij} = (8i, 8j, 8i, 8j, \dots) \in \mathbb{R}^d` for
  :math:`(i, j) \in \{-2, \dots, 2\}^2` (``d`` even), identity covariances, weights
  :math:`w_{ij} \propto \xi_{ij}^2`, :math:`\xi \sim \mathcal{N}(0, 1)` ("chi-square" weights);
- diffusion: the official script's discrete schedule, 999 betas decreasing linearly from 0.02 to
  :math:`10^{-4}`, :math:`\bar\alpha_0 = 1` (the paper's text writes :math:`\beta_1 = 0.2`, a typo);
- measurement: :math:`\tilde A \sim \mathcal{N}(0, 1)^{d_y \times d}` with SVD
  :math:`U \operatorname{diag}(\cdot) V^\top`, singular values replaced by :math:`d_y` sorted
  :math:`\mathcal{U}[0, 1]` draws, :math:`A = U \operatorname{diag}(s) V_{1:d_y}^\top`;
  :math:`\sigma_y \sim \mathcal{U}[0, \max_i s_i]`; :math:`x^\star \sim` prior,
  :math:`y = A x^\star + \sigma_y \epsilon`.

Every draw comes from one ``torch.Generator`` seeded by ``seed`` (a seed redraws the prior weights
and the measurement, as in the paper's 20 seeds).

References:
    Cardoso, Janati, Le Corff, Moulines. Monte Carlo guided Diffusion for Bayesian linear inverse
    problems. ICLR 2024. arXiv:2308.07983.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import Tensor

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import Operator
from diffpost.models.operators.basic import Matrix
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.models.schedules import DiscreteVP

__all__ = ["InverseProblem", "gaussian_mixture_benchmark", "mcgdiff_schedule"]


@dataclass
class InverseProblem:
    r"""A prior, a forward model with Gaussian noise, and an observation.

    Use ``problem.model`` as the Pyro model and ``problem.model_kwargs`` as its data::

        posterior.sample(
            problem.model, engine, num_particles=..., model_kwargs=problem.model_kwargs
        )

    Attributes:
        prior: the diffusion prior of the latent ``"x"``.
        operator: the forward model ``A``.
        sigma: noise standard deviation (scalar or per measurement).
        y: the observation, shape ``operator.out_shape``.
        x_true: the signal ``y`` was made from, if known.
        name: a short description.
    """

    prior: DiffusionPrior
    operator: Operator
    sigma: float | Tensor
    y: Tensor
    x_true: Tensor | None = None
    name: str = "inverse problem"
    metadata: dict = field(default_factory=dict)

    def model(self, y: Tensor | None = None) -> Tensor:
        """The Pyro model ``x ~ prior``, ``y ~ GaussianObservation(operator, x, sigma)``."""
        x = pyro.sample("x", self.prior)
        return pyro.sample("y", GaussianObservation(self.operator, x, self.sigma), obs=y)

    @property
    def model_kwargs(self) -> dict[str, Tensor]:
        return {"y": self.y}

    def exact_posterior(self) -> GaussianMixture:
        """The closed-form posterior (Gaussian-mixture priors and linear operators only)."""
        if not isinstance(self.prior, GaussianMixture):
            raise ValueError(f"no closed-form posterior for a {type(self.prior).__name__} prior")
        return self.prior.posterior(self.operator, self.y, self.sigma)


def mcgdiff_schedule() -> DiscreteVP:
    """The MCGDiff benchmark's schedule: ``betas = linspace(0.02, 1e-4, 999)``, ``abar_0 = 1``."""
    return DiscreteVP.from_betas(torch.linspace(0.02, 1e-4, 999, dtype=torch.float64))


def gaussian_mixture_benchmark(
    dim: int = 8,
    obs_dim: int = 1,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> InverseProblem:
    """The MCGDiff Gaussian-mixture benchmark problem (see the module docstring).

    Args:
        dim: signal dimension ``d`` (even; the paper uses 8, 80, 800).
        obs_dim: measurement dimension ``d_y <= d`` (the paper uses 1, 2, 4).
        seed: seed of every random draw.
        dtype: dtype of all tensors.
        device: device of all tensors.

    Returns:
        An :class:`InverseProblem` with a :class:`~diffpost.models.priors.GaussianMixture` prior, a
        :class:`~diffpost.models.operators.Matrix` operator, ``sigma``, ``y`` and ``x_true``.
    """
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2; got {dim!r}")
    if not isinstance(obs_dim, int) or not 1 <= obs_dim <= dim:
        raise ValueError(f"obs_dim must be an integer in [1, dim={dim}]; got {obs_dim!r}")
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(-2, 3, dtype=torch.float64)
    pairs = torch.cartesian_prod(grid, grid) * 8.0  # (25, 2): (8i, 8j)
    means = pairs.repeat(1, dim // 2)
    weights = torch.randn(25, generator=generator, dtype=torch.float64) ** 2
    weights = weights / weights.sum()
    covariances = torch.eye(dim, dtype=torch.float64).expand(25, dim, dim).clone()
    prior = GaussianMixture(weights, means, covariances, mcgdiff_schedule())

    raw = torch.randn(obs_dim, dim, generator=generator, dtype=torch.float64)
    left, _, right_t = torch.linalg.svd(raw, full_matrices=True)
    singular_values = torch.sort(
        torch.rand(obs_dim, generator=generator, dtype=torch.float64), descending=True
    ).values
    matrix = left @ torch.diag(singular_values) @ right_t[:obs_dim]
    sigma = float(torch.rand((), generator=generator, dtype=torch.float64) * singular_values.max())
    x_true = prior.sample(generator=generator)
    y = matrix @ x_true + sigma * torch.randn(obs_dim, generator=generator, dtype=torch.float64)

    def cast(value: Tensor) -> Tensor:
        return value.to(dtype=dtype, device=device)

    prior = GaussianMixture(cast(weights), cast(means), cast(covariances), mcgdiff_schedule())
    return InverseProblem(
        prior=prior,
        operator=Matrix(cast(matrix)),
        sigma=sigma,
        y=cast(y),
        x_true=cast(x_true),
        name=f"MCGDiff Gaussian-mixture benchmark (d={dim}, d_y={obs_dim}, seed={seed})",
        metadata={
            "dim": dim,
            "obs_dim": obs_dim,
            "seed": seed,
            "singular_values": singular_values.tolist(),
        },
    )
