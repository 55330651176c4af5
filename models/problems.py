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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from diffpost.models.observations import GaussianObservation
from diffpost.models.operators.base import Operator
from diffpost.models.operators.basic import Identity, Mask, Matrix
from diffpost.models.operators.blur import Blur, gaussian_kernel
from diffpost.models.priors import DiffusionPrior, GaussianMixture
from diffpost.models.schedules import DiscreteVP, Schedule

__all__ = [
    "HierarchicalProblem",
    "InverseProblem",
    "blur_width_problem",
    "gain_problem",
    "gaussian_mixture_benchmark",
    "IMAGE_TASKS",
    "image_problem",
    "mcgdiff_schedule",
    "noise_level_problem",
]


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
    schedule: Schedule | None = None,
) -> InverseProblem:
    """The MCGDiff Gaussian-mixture benchmark problem (see the module docstring).

    Args:
        dim: signal dimension ``d`` (even; the paper uses 8, 80, 800).
        obs_dim: measurement dimension ``d_y <= d`` (the paper uses 1, 2, 4).
        seed: seed of every random draw.
        dtype: dtype of all tensors.
        device: device of all tensors.
        schedule: the prior's diffusion (default :func:`mcgdiff_schedule`, the paper's); the
            problem and its exact posterior do not depend on it (e.g.
            :class:`~diffpost.models.schedules.RectifiedFlow` for flow engines).

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

    schedule = mcgdiff_schedule() if schedule is None else schedule
    prior = GaussianMixture(cast(weights), cast(means), cast(covariances), schedule)
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


@dataclass
class HierarchicalProblem:
    r"""A linear Gaussian problem with one unknown scalar :math:`\theta` (a noise level, a gain, a
    blur width) whose posterior is known exactly.

    The model is :math:`\theta \sim p(\theta)`, :math:`x \sim` a Gaussian-mixture prior,
    :math:`y \sim \mathcal{N}(A_\theta x, \sigma_\theta^2 I)`. For every :math:`\theta` the
    evidence :math:`p(y \mid \theta)` is closed form
    (:meth:`~diffpost.models.priors.GaussianMixture.log_evidence`), so :math:`p(\theta \mid y)`
    follows by quadrature on :attr:`grid`, and :math:`x \mid \theta, y` is the closed-form
    mixture posterior: the joint posterior is known exactly.

    Attributes:
        prior: the signal's Gaussian-mixture prior (site ``"x"``).
        latent: the global latent's site name.
        latent_prior: :math:`p(\theta)`.
        operator_at: :math:`\theta \mapsto A_\theta`.
        sigma_at: :math:`\theta \mapsto \sigma_\theta`, shaped to broadcast one value per
            particle (``theta[..., None]`` for a noise level).
        y: the observation.
        grid: the quadrature grid of :math:`\theta`.
        x_true, theta_true: what ``y`` was made from.
        name: a short description.
    """

    prior: GaussianMixture
    latent: str
    latent_prior: dist.Distribution
    operator_at: Callable[[Tensor], Operator]
    sigma_at: Callable[[Tensor], Tensor | float]
    y: Tensor
    grid: Tensor
    x_true: Tensor
    theta_true: float
    name: str

    def model(self, y: Tensor | None = None) -> Tensor:
        """:math:`\theta \\sim p(\theta)`, ``x ~ prior``, ``y ~ GaussianObservation``."""
        theta = pyro.sample(self.latent, self.latent_prior)
        x = pyro.sample("x", self.prior)
        observation = GaussianObservation(self.operator_at(theta), x, self.sigma_at(theta))
        return pyro.sample("y", observation, obs=y)

    @property
    def model_kwargs(self) -> dict[str, Tensor]:
        return {"y": self.y}

    def exact_marginal(self) -> tuple[Tensor, Tensor]:
        r"""``(grid, weights)``: :math:`p(\theta \mid y)` normalised on :attr:`grid`."""
        log_density = torch.stack(
            [
                self.prior.log_evidence(self.operator_at(v), self.y, self.sigma_at(v))
                for v in self.grid
            ]
        ) + self.latent_prior.log_prob(self.grid)
        return self.grid, (log_density - log_density.logsumexp(0)).exp()

    def exact_signal_mean(self, stride: int = 20) -> Tensor:
        r""":math:`E[x \mid y] = \int p(\theta \mid y)\, E[x \mid y, \theta]\, d\theta` by
        quadrature on every ``stride``-th grid point, shape ``prior.event_shape``."""
        grid, weights = self.exact_marginal()
        grid, weights = grid[::stride], weights[::stride] / weights[::stride].sum()
        means = []
        for value in grid:
            conditional = self.prior.posterior(
                self.operator_at(value), self.y, self.sigma_at(value)
            )
            means.append(conditional.weights @ conditional.means)
        return (weights @ torch.stack(means)).reshape(self.prior.event_shape)


def _two_mode_prior() -> GaussianMixture:
    dtype = torch.float64
    return GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=dtype),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=dtype),
        torch.stack([torch.eye(2, dtype=dtype) * 0.5, torch.eye(2, dtype=dtype) * 0.8]),
    )


def _four_by_two() -> Tensor:
    return torch.tensor([[1.0, 0.5], [0.3, -1.0], [0.7, 0.2], [-0.4, 0.6]], dtype=torch.float64)


def noise_level_problem(seed: int = 1) -> HierarchicalProblem:
    r"""Unknown noise level: a 2-D two-mode mixture seen through a fixed ``4 x 2`` matrix,
    :math:`\sigma \sim \text{LogNormal}(\log 0.5, 0.7)`, truth :math:`\sigma = 0.4`."""
    dtype = torch.float64
    matrix = _four_by_two()
    generator = torch.Generator().manual_seed(seed)
    x_true = torch.tensor([1.8, 1.2], dtype=dtype)
    y = matrix @ x_true + 0.4 * torch.randn(4, generator=generator, dtype=dtype)
    return HierarchicalProblem(
        prior=_two_mode_prior(),
        latent="sigma",
        latent_prior=dist.LogNormal(
            torch.tensor(math.log(0.5), dtype=dtype), torch.tensor(0.7, dtype=dtype)
        ),
        operator_at=lambda sigma: Matrix(matrix),
        sigma_at=lambda sigma: sigma[..., None],
        y=y,
        grid=torch.linspace(1e-3, 4.0, 4000, dtype=dtype),
        x_true=x_true,
        theta_true=0.4,
        name=f"unknown noise level (2-D mixture, 4 measurements, seed {seed})",
    )


def gain_problem(seed: int = 1) -> HierarchicalProblem:
    r"""Unknown operator gain: :math:`y = g M x + 0.3 e` with the problem of
    :func:`noise_level_problem`, :math:`g \sim \text{LogNormal}(0, 0.3)`, truth :math:`g = 1.3`."""
    dtype = torch.float64
    matrix = _four_by_two()
    generator = torch.Generator().manual_seed(seed)
    torch.randn(4, generator=generator, dtype=dtype)  # the noise level problem's draw
    x_true = torch.tensor([1.8, 1.2], dtype=dtype)
    y = 1.3 * matrix @ x_true + 0.3 * torch.randn(4, generator=generator, dtype=dtype)
    return HierarchicalProblem(
        prior=_two_mode_prior(),
        latent="gain",
        latent_prior=dist.LogNormal(torch.tensor(0.0, dtype=dtype), torch.tensor(0.3, dtype=dtype)),
        operator_at=lambda gain: Matrix(gain * matrix),
        sigma_at=lambda gain: 0.3,
        y=y,
        grid=torch.linspace(0.3, 3.0, 4000, dtype=dtype),
        x_true=x_true,
        theta_true=1.3,
        name=f"unknown operator gain (2-D mixture, 4 measurements, seed {seed})",
    )


def blur_width_problem(
    digit: int = 0, width: float = 1.0, sigma: float = 0.1
) -> HierarchicalProblem:
    r"""Unknown blur width on 8x8 digits: the shipped 20-component digits mixture
    (:func:`~diffpost.models.zoo.digits_gmm`), a separable Gaussian blur of 5 taps with
    :math:`w \sim \text{LogNormal}(0, 0.3)`, noise ``sigma``; held-out digit ``digit``."""
    from diffpost.models import zoo  # the zoo loads weights: only when asked

    dtype = torch.float64
    prior = zoo.digits_gmm(20, dtype=dtype)
    images, _ = zoo.digits_data("heldout", dtype=dtype)
    x_true = images[digit]
    shape = tuple(x_true.shape)

    def operator_at(value: Tensor) -> Operator:
        return Blur(shape, gaussian_kernel(5, value))

    generator = torch.Generator().manual_seed(digit)
    clean = operator_at(torch.tensor(width, dtype=dtype))(x_true[None])[0]
    y = clean + sigma * torch.randn(clean.shape, generator=generator, dtype=dtype)
    return HierarchicalProblem(
        prior=prior,
        latent="width",
        latent_prior=dist.LogNormal(torch.tensor(0.0, dtype=dtype), torch.tensor(0.3, dtype=dtype)),
        operator_at=operator_at,
        sigma_at=lambda value: sigma,
        y=y,
        grid=torch.linspace(0.2, 3.0, 400, dtype=dtype),
        x_true=x_true,
        theta_true=width,
        name=f"unknown blur width (8x8 digit {digit}, digits mixture, sigma {sigma})",
    )


#: task -> (default image, noise standard deviation on the [-1, 1] scale, what is observed)
IMAGE_TASKS = {
    "denoise": ("camera", 2 * 25 / 255, "every pixel (sigma = 25 on the 0..255 scale)"),
    "deblur": ("camera", 0.02, "a Gaussian blur, std 2 pixels (13 taps, zero boundary)"),
    "super_resolution": ("camera", 0.02, "4x4 block averages (4x super-resolution)"),
    "inpaint": ("camera", 0.02, "a random 30% of the pixels"),
    "ct": ("phantom", 1.0, "parallel-beam projections at 30 angles in [0, pi) (sparse-view CT)"),
    "mri": ("brain", 0.02, "a quarter of the k-space lines, the central 8% among them (4x)"),
}


def image_problem(
    task: str,
    image: Tensor | str | None = None,
    *,
    prior: DiffusionPrior | None = None,
    sigma: float | None = None,
    seed: int = 0,
) -> InverseProblem:
    """An image-scale inverse problem of :data:`IMAGE_TASKS` (256x256 with the default images).

    ========================  =============  ==========================================  ======
    task                      default image  operator                                    sigma
    ========================  =============  ==========================================  ======
    ``"denoise"``             camera         :class:`~.operators.Identity`               0.196
    ``"deblur"``              camera         :class:`~.operators.SeparableBlur`, std 2   0.02
    ``"super_resolution"``    camera         :class:`~.operators.Downsample` by 4        0.02
    ``"inpaint"``             camera         :class:`~.operators.Mask`, 30% of pixels    0.02
    ``"ct"``                  phantom        :class:`~.operators.Radon`, 30 angles       1.0
    ``"mri"``                 brain          :class:`~.operators.Fourier`, H/4 lines     0.02
    ========================  =============  ==========================================  ======

    Args:
        task: one of :data:`IMAGE_TASKS`.
        image: the true image ``(1, H, W)`` in ``[-1, 1]``, or a name of
            :data:`diffpost.models.zoo.PHOTOS` (default: the task's image above).
        prior: the prior of ``x`` (default: :func:`~diffpost.models.zoo.natural_patches` of the
            image's shape).
        sigma: the noise standard deviation (default: the task's, above).
        seed: seed of the mask (inpainting and MRI) and of the noise.

    Returns:
        An :class:`InverseProblem` with ``x_true`` and, in ``metadata``, the task.
    """
    from diffpost.models import zoo
    from diffpost.models.operators import Downsample, Fourier, Radon

    if task not in IMAGE_TASKS:
        raise ValueError(f"task must be one of {sorted(IMAGE_TASKS)}; got {task!r}")
    default_image, default_sigma, observed = IMAGE_TASKS[task]
    image = (
        zoo.photo(default_image if image is None else image)
        if not isinstance(image, Tensor)
        else image
    )
    if image.dim() != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be a (1, H, W) tensor; got shape {tuple(image.shape)}")
    sigma = default_sigma if sigma is None else sigma
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma}")
    shape = tuple(image.shape)
    if prior is not None and (
        not isinstance(prior, DiffusionPrior) or tuple(prior.event_shape) != shape
    ):
        raise ValueError(
            f"prior must be a DiffusionPrior of event shape {shape} (the image's); got "
            f"{type(prior).__name__}"
            + (
                f" of event shape {tuple(prior.event_shape)}"
                if hasattr(prior, "event_shape")
                else ""
            )
        )
    generator = torch.Generator().manual_seed(seed)
    if task == "denoise":
        operator = Identity(shape)
    elif task == "deblur":
        operator = Blur(shape, gaussian_kernel(13, 2.0))
    elif task == "super_resolution":
        operator = Downsample(shape, 4)
    elif task == "inpaint":
        operator = Mask(torch.rand(shape, generator=generator) < 0.3)
    elif task == "ct":
        operator = Radon(shape, 30)
    else:
        height = shape[-2]
        total, central = max(2, height // 4), max(2, height * 20 // 256)
        lines = torch.zeros(height, dtype=torch.bool)
        lines[height // 2 - central // 2 : height // 2 - central // 2 + central] = True
        others = (~lines).nonzero().squeeze(1)
        extra = others[torch.randperm(others.numel(), generator=generator)[: total - central]]
        lines[extra] = True
        mask = torch.fft.ifftshift(lines[:, None].expand(height, shape[-1]))
        operator = Fourier(shape, mask)
    clean = operator(image.to(torch.float64)).to(image.dtype)
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)  # CPU draws
    noise = noise.to(device=clean.device, dtype=image.dtype)
    y = clean + sigma * noise
    if prior is None:
        prior = zoo.natural_patches(shape, dtype=image.dtype, device=image.device)
    return InverseProblem(
        prior,
        operator,
        sigma,
        y,
        x_true=image,
        name=f"{task}: {observed}",
        metadata={"task": task},
    )
