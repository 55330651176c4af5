r"""Diffusion priors as Pyro distributions, and the exact Gaussian-mixture oracle.

:class:`DiffusionPrior` wraps a :class:`~diffpost.models.denoisers.Denoiser` (which carries its
schedule) as a ``pyro.distributions.TorchDistribution``: ``pyro.sample("x", prior)`` declares a
latent image whose prior is the diffusion model. Its ``sample`` runs an unconditional
reverse-diffusion sampler; its density is intractable and ``log_prob`` says so.

:class:`GaussianMixture` (and :class:`Gaussian`, one component) is a DiffusionPrior whose every
quantity is exact at every ``t``: the diffused marginal
:math:`p_t(x) = \sum_k w_k \mathcal{N}(x; \alpha \mu_k, \alpha^2 \Sigma_k + \sigma^2 I)`, its
score, the Tweedie denoiser, exact samples at ``t = 0``, and, for a linear Gaussian observation
:math:`y = A x + \sigma_y e`, the posterior (again a Gaussian mixture) and the evidence
:math:`\log p(y)` in closed form. It is the test oracle of every engine.

References:
    Cardoso, Janati, Le Corff, Moulines. Monte Carlo guided Diffusion for Bayesian linear inverse
    problems. ICLR 2024. arXiv:2308.07983 (appendix: Gaussian-mixture closed forms).
    Bishop. Pattern Recognition and Machine Learning, 2006, sections 2.3.3 and 9.2.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from diffpost.models import samplers
from diffpost.models.denoisers import Denoiser, broadcast_time
from diffpost.models.operators.base import LinearOperator
from diffpost.models.schedules import VP, Schedule

__all__ = ["DiffusionPrior", "GaussianMixture", "Gaussian", "GaussianMixtureDenoiser"]


def _module_tensor(module: torch.nn.Module) -> Tensor | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor
    return None


class DiffusionPrior(TorchDistribution):
    r"""A diffusion model as a Pyro distribution over signals of shape ``event_shape``.

    Args:
        denoiser: the Tweedie denoiser ``(N, *event_shape), t -> (N, *event_shape)``, with its
            ``schedule``.
        event_shape: the signal's shape, e.g. ``(1, 8, 8)``.
        sampler: unconditional sampler used by :meth:`sample`: ``"ddpm"``, ``"ddim"``,
            ``"euler"`` or ``"heun"`` (see :mod:`diffpost.models.samplers`).
        num_steps: its number of steps (default per sampler).
        eta: DDIM stochasticity (``"ddim"`` only).
        batch_shape: Pyro batch shape (plates expand it).
        validate_args: Pyro's argument validation flag.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        denoiser: Denoiser,
        event_shape: tuple[int, ...],
        *,
        sampler: str = "ddpm",
        num_steps: int | None = None,
        eta: float | None = None,
        batch_shape: tuple[int, ...] = (),
        validate_args: bool | None = None,
    ):
        if not isinstance(denoiser, Denoiser):
            raise ValueError(
                f"DiffusionPrior needs a models.denoisers.Denoiser; got {type(denoiser).__name__} "
                "(wrap a network with EpsilonDenoiser, X0Denoiser, VDenoiser, ...)"
            )
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(samplers.SAMPLERS)}; got {sampler!r}")
        event_shape = torch.Size(event_shape)
        if len(event_shape) == 0 or any(n <= 0 for n in event_shape):
            raise ValueError(
                f"event_shape must be a non-empty shape of positive sizes; got {tuple(event_shape)}"
            )
        declared = getattr(denoiser, "event_shape", None)
        if declared is not None and torch.Size(declared) != event_shape:
            raise ValueError(
                f"event_shape {tuple(event_shape)} does not match the shape the denoiser was "
                f"trained on, {tuple(declared)} (its event_shape)"
            )
        self.denoiser = denoiser
        self.sampler = sampler
        self.num_steps = num_steps
        self.eta = eta
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)
        if self.probe_at_construction:
            self._probe_denoiser()

    #: whether construction calls the denoiser once on a signal of the declared shape (network
    #: denoisers; the exact mixtures' own denoiser is shaped by construction)
    probe_at_construction: bool = True

    def _probe_denoiser(self) -> None:
        """One call of the denoiser on a zero signal ``(1, *event_shape)`` at ``t = 0.5``, so that
        a network that cannot take the declared shape is refused now, not at an engine's first
        step."""
        x = torch.zeros((1,) + tuple(self.event_shape), dtype=self.dtype, device=self.device)
        t = torch.full((1,), 0.5, dtype=self.dtype, device=self.device)
        try:
            with torch.no_grad():
                out = self.denoiser(x, t)
        except Exception as error:  # the network's own shape errors, of any type
            raise ValueError(
                f"the denoiser cannot take signals of event_shape {tuple(self.event_shape)}: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the denoiser maps signals of shape {tuple(x.shape)} (event_shape "
                f"{tuple(self.event_shape)}) to {shape}; it must return the shape it is given"
            )

    @property
    def schedule(self) -> Schedule:
        """The noise schedule of the denoiser."""
        return self.denoiser.schedule

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser's parameters or buffers (default dtype if it has none)."""
        tensor = _module_tensor(self.denoiser)
        return tensor.dtype if tensor is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters or buffers (CPU if it has none)."""
        tensor = _module_tensor(self.denoiser)
        return tensor.device if tensor is not None else torch.device("cpu")

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        new.__dict__.update(self.__dict__)
        TorchDistribution.__init__(
            new, torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        return new

    def denoise(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Tweedie mean :math:`E[x_0 \\mid x_t]`, ``(N, *event) -> (N, *event)``."""
        return self.denoiser(x_t, t)

    def sample_reverse(
        self,
        sample_shape: torch.Size = torch.Size(),
        *,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
    ) -> Tensor:
        """Unconditional samples by reverse diffusion, shape ``sample_shape + batch + event``.

        Args:
            sample_shape: leading sample shape.
            generator: source of randomness; when ``None``, one is seeded from torch's global
                generator so that ``pyro.set_rng_seed`` makes prior-predictive draws reproducible.
            sampler: overrides the prior's sampler.
            num_steps: overrides its number of steps.
            eta: overrides its DDIM eta.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=self.device).manual_seed(seed)
        num = math.prod(shape[: len(shape) - len(self.event_shape)])
        with torch.no_grad():
            draws = samplers.sample(
                self.denoiser,
                (num,) + tuple(self.event_shape),
                generator,
                sampler=sampler or self.sampler,
                num_steps=num_steps or self.num_steps,
                eta=self.eta if eta is None else eta,
                dtype=self.dtype,
                device=self.device,
            )
        return draws.reshape(shape)

    def sample(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Unconditional samples (by :meth:`sample_reverse` with the prior's sampler)."""
        return self.sample_reverse(sample_shape, generator=generator)

    def log_prob(self, value: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no tractable density; engines use its denoiser. "
            "(GaussianMixture and Gaussian priors have an exact log_prob.)"
        )


class GaussianMixtureDenoiser(Denoiser):
    r"""Exact Tweedie denoiser of a Gaussian mixture diffused by ``schedule``.

    With :math:`\Sigma_k = Q_k \operatorname{diag}(\lambda_k) Q_k^\top` and
    :math:`S_k(t) = \alpha^2 \Sigma_k + \sigma^2 I`, the component posterior of :math:`x_0` given
    :math:`x_t` has mean :math:`\hat m_k = \mu_k + \alpha \Sigma_k S_k^{-1} (x_t - \alpha\mu_k)` and
    covariance :math:`\Sigma_k - \alpha^2 \Sigma_k S_k^{-1} \Sigma_k`, and
    :math:`E[x_0 \mid x_t] = \sum_k r_k(x_t) \hat m_k(x_t)` with responsibilities
    :math:`r_k \propto w_k \mathcal{N}(x_t; \alpha\mu_k, S_k)` (computed in the eigenbasis, so a
    call costs :math:`O(N K d^2)`, and :math:`O(N K d)` when every :math:`\Sigma_k` is a multiple of
    the identity).

    Args:
        log_weights: ``(K,)`` normalised log mixture weights.
        means: ``(K, d)``.
        eigenvalues: ``(K, d)`` eigenvalues of the covariances (non-negative).
        eigenvectors: ``(K, d, d)`` orthonormal eigenvectors (columns), or ``None`` when every
            covariance is isotropic.
        schedule: the noise schedule.
        event_shape: shape of one signal, ``prod(event_shape) == d``.
    """

    def __init__(
        self,
        log_weights: Tensor,
        means: Tensor,
        eigenvalues: Tensor,
        eigenvectors: Tensor | None,
        schedule: Schedule,
        event_shape: torch.Size,
    ):
        super().__init__(schedule)
        self.register_buffer("log_weights", log_weights)
        self.register_buffer("means", means)
        self.register_buffer("eigenvalues", eigenvalues)
        self.register_buffer("eigenvectors", eigenvectors)
        self.event_shape = torch.Size(event_shape)

    @property
    def isotropic(self) -> bool:
        return self.eigenvectors is None

    def _scales(self, t: float | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha, sigma`` as ``(1, 1)`` for a scalar ``t`` or ``(N, 1)`` for per-particle
        times."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.reshape(1, 1) if t.dim() == 0 else broadcast_time(t, x)[:, None]
        return self.schedule.alpha(t).to(x), self.schedule.sigma(t).to(x)

    def _isotropic_terms(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``log_joint`` ``(N, K)`` and the gains ``alpha lambda_k / (alpha^2 lambda_k + sigma^2)``,
        through matrix products (no ``(N, K, d)`` tensor)."""
        means = self.means.to(x)
        scale = self.eigenvalues.to(x)[:, 0][None]  # (1, K)
        variance = alpha**2 * scale + sigma**2
        squared = (
            (x**2).sum(-1, keepdim=True)
            - 2 * alpha * (x @ means.T)
            + alpha**2 * (means**2).sum(-1)[None]
        )
        d = x.shape[1]
        log_normal = -0.5 * (squared / variance + d * torch.log(2 * math.pi * variance))
        return self.log_weights.to(x)[None] + log_normal, alpha * scale / variance

    def _full_terms(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``log_joint`` ``(N, K)``, eigenbasis residuals ``(N, K, d)`` and variances
        ``(N|1, K, d)``."""
        eigenvectors = self.eigenvectors.to(x)
        residual = torch.einsum(
            "kde,nkd->nke", eigenvectors, x[:, None, :] - alpha[..., None] * self.means.to(x)[None]
        )
        variances = alpha[..., None] ** 2 * self.eigenvalues.to(x)[None] + sigma[..., None] ** 2
        log_normal = -0.5 * (
            (residual**2 / variances).sum(-1) + torch.log(2 * math.pi * variances).sum(-1)
        )
        return self.log_weights.to(x)[None] + log_normal, residual, variances

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        x = x_t.flatten(1)
        alpha, sigma = self._scales(t, x)
        if self.isotropic:
            log_joint, gain = self._isotropic_terms(x, alpha, sigma)
            responsibilities = torch.softmax(log_joint, dim=-1)
            # sum_k r_k [mu_k + g_k (x - alpha mu_k)] = (r (1 - alpha g)) @ mu + (r g) 1 x
            weighted = responsibilities * gain
            x0 = (responsibilities - alpha * weighted) @ self.means.to(x) + weighted.sum(
                -1, keepdim=True
            ) * x
        else:
            log_joint, residual, variances = self._full_terms(x, alpha, sigma)
            gain = alpha[..., None] * self.eigenvalues.to(x)[None] / variances
            shift = torch.einsum("kde,nke->nkd", self.eigenvectors.to(x), gain * residual)
            component_means = self.means.to(x)[None] + shift
            x0 = (torch.softmax(log_joint, dim=-1)[..., None] * component_means).sum(1)
        return x0.reshape(x_t.shape)

    def marginal_log_prob(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\log p_t(x_t)`, ``(N, *event) -> (N,)``."""
        x = x_t.flatten(1)
        alpha, sigma = self._scales(t, x)
        if self.isotropic:
            log_joint, _ = self._isotropic_terms(x, alpha, sigma)
        else:
            log_joint, _, _ = self._full_terms(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=-1)


class GaussianMixture(DiffusionPrior):
    r"""Gaussian-mixture prior :math:`\sum_k w_k \mathcal{N}(\mu_k, \Sigma_k)`, exact at every
    ``t``.

    Args:
        weights: ``(K,)`` non-negative, summing to one.
        means: ``(K, d)``.
        covariances: ``(K, d, d)`` symmetric positive definite.
        schedule: the diffusion's noise schedule (default :class:`~diffpost.models.schedules.VP`).
        event_shape: the signal's shape (default ``(d,)``), e.g. ``(1, 8, 8)`` for ``d = 64``.
        sampler: sampler used by :meth:`sample_reverse` (``sample`` itself is exact).
        num_steps: its number of steps.
        eta: its DDIM eta.
        allow_singular: accept positive semi-definite covariances (posteriors of noiseless
            observations); the density is then degenerate.

    Raises:
        ValueError: weights that are negative or do not sum to one, shapes that do not match,
            non-finite values, covariances that are not symmetric positive definite.
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        schedule: Schedule | None = None,
        *,
        event_shape: tuple[int, ...] | None = None,
        sampler: str = "ddpm",
        num_steps: int | None = None,
        eta: float | None = None,
        allow_singular: bool = False,
    ):
        weights, means, covariances = (torch.as_tensor(v) for v in (weights, means, covariances))
        dtype = means.dtype if means.is_floating_point() else torch.get_default_dtype()
        weights, means, covariances = (v.to(dtype) for v in (weights, means, covariances))
        _validate_mixture(weights, means, covariances)
        d = means.shape[1]
        event_shape = torch.Size((d,) if event_shape is None else event_shape)
        if math.prod(event_shape) != d:
            raise ValueError(
                f"event_shape {tuple(event_shape)} has {math.prod(event_shape)} entries; the means "
                f"have d={d}"
            )
        eigenvalues, eigenvectors = _decompose(covariances, allow_singular)
        denoiser = GaussianMixtureDenoiser(
            weights.log() - weights.sum().log(),
            means,
            eigenvalues,
            eigenvectors,
            schedule or VP(),
            event_shape,
        )
        self.weights = weights / weights.sum()
        self.means = means
        self.covariances = covariances
        super().__init__(denoiser, event_shape, sampler=sampler, num_steps=num_steps, eta=eta)

    probe_at_construction = False  # the exact denoiser is built for event_shape

    @property
    def mean(self) -> Tensor:
        """Mixture mean, shape ``event_shape``."""
        return (self.weights[:, None] * self.means).sum(0).reshape(self.event_shape)

    @property
    def variance(self) -> Tensor:
        """Per-coordinate mixture variance, shape ``event_shape``."""
        second = self.weights[:, None] * (
            self.covariances.diagonal(dim1=-2, dim2=-1) + self.means**2
        )
        return (second.sum(0) - self.mean.flatten() ** 2).reshape(self.event_shape)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples at ``t = 0``, shape ``sample_shape + batch_shape + event_shape``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        num = math.prod(shape[: len(shape) - len(self.event_shape)])
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(
                int(torch.randint(0, 2**62, (1,)))
            )
        denoiser = self.denoiser
        component = torch.multinomial(
            self.weights.to(self.device), num, replacement=True, generator=generator
        )
        noise = torch.randn(
            num, 1, self.dim, generator=generator, dtype=self.dtype, device=self.device
        )
        scaled = noise * denoiser.eigenvalues[component, None, :].clamp_min(0).sqrt()
        if denoiser.isotropic:
            offsets = scaled[:, 0]
        else:
            offsets = torch.einsum("nde,ne->nd", denoiser.eigenvectors[component], scaled[:, 0])
        return (self.means[component] + offsets).reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """Exact :math:`\\log p(x)` at ``t = 0``, ``(*batch, *event) -> (*batch)``."""
        return self.marginal_log_prob(value, 0.0)

    def marginal_log_prob(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Exact :math:`\\log p_t(x_t)` of the diffused marginal,
        ``(*batch, *event) -> (*batch)``."""
        batch = x_t.shape[: x_t.dim() - len(self.event_shape)]
        flat = x_t.reshape((-1,) + tuple(self.event_shape))
        t = torch.as_tensor(t, dtype=flat.dtype, device=flat.device)
        if t.dim() > 0:
            t = t.reshape(-1)
        return self.denoiser.marginal_log_prob(flat, t).reshape(batch)

    def score(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Exact score :math:`\\nabla \\log p_t(x_t)`, ``(N, *event)`` (Tweedie's identity)."""
        return self.denoiser.score(x_t, t)

    def _observation_terms(self, operator: LinearOperator, y: Tensor, sigma: float | Tensor):
        if not isinstance(operator, LinearOperator):
            raise ValueError(
                f"GaussianMixture.posterior needs a LinearOperator; got {type(operator).__name__}"
            )
        if tuple(operator.in_shape) != tuple(self.event_shape):
            raise ValueError(
                f"the operator's input shape {tuple(operator.in_shape)} does not match the prior's "
                f"event shape {tuple(self.event_shape)}"
            )
        dtype = self.means.dtype
        y = torch.as_tensor(y, dtype=dtype, device=self.means.device)
        if tuple(y.shape) != tuple(operator.out_shape):
            raise ValueError(
                f"y has shape {tuple(y.shape)}; the operator's output shape is "
                f"{tuple(operator.out_shape)}"
            )
        matrix = operator.matrix(dtype=dtype, device=self.means.device)  # (m, d)
        m = matrix.shape[0]
        noise_var = torch.as_tensor(sigma, dtype=dtype, device=self.means.device) ** 2
        noise_var = noise_var.flatten().expand(m) if noise_var.numel() == 1 else noise_var.flatten()
        if noise_var.shape != (m,):
            raise ValueError(
                f"sigma must be a scalar or have {m} entries; got "
                f"{tuple(torch.as_tensor(sigma).shape)}"
            )
        gains = self.covariances @ matrix.T  # (K, d, m): Sigma_k A^T
        predictive = matrix @ gains + torch.diag_embed(noise_var)  # (K, m, m): G_k
        predictive = 0.5 * (predictive + predictive.transpose(-1, -2))
        cholesky, info = torch.linalg.cholesky_ex(predictive)
        if bool((info != 0).any()):
            raise ValueError(
                "the predictive covariance A Sigma_k A^T + sigma^2 I is singular (a noiseless "
                "observation of a direction the prior does not spread over); the posterior is "
                "undefined"
            )
        residual = y.flatten()[None, :] - self.means @ matrix.T  # (K, m)
        return matrix, gains, cholesky, residual

    def log_evidence(self, operator: LinearOperator, y: Tensor, sigma: float | Tensor) -> Tensor:
        r"""Exact :math:`\log p(y) = \log \sum_k w_k \mathcal{N}(y; A\mu_k, A\Sigma_k A^\top +
        \sigma^2 I)`, 0-d."""
        _, _, cholesky, residual = self._observation_terms(operator, y, sigma)
        return torch.logsumexp(self.weights.log() + _gaussian_log_density(residual, cholesky), 0)

    def posterior(
        self, operator: LinearOperator, y: Tensor, sigma: float | Tensor
    ) -> GaussianMixture:
        r"""The exact posterior of :math:`y = A x + \sigma e` as a Gaussian mixture (Kalman form).

        :math:`G_k = A\Sigma_k A^\top + \operatorname{diag}(\sigma^2)`,
        :math:`m_k = \mu_k + \Sigma_k A^\top G_k^{-1} (y - A\mu_k)`,
        :math:`C_k = \Sigma_k - \Sigma_k A^\top G_k^{-1} A \Sigma_k`,
        :math:`\tilde w_k \propto w_k \mathcal{N}(y; A\mu_k, G_k)`. Valid for ``sigma = 0`` whenever
        :math:`A\Sigma_k A^\top` is invertible (the posterior covariances are then singular).

        Args:
            operator: a linear operator (its dense matrix is formed: small problems).
            y: the observation, shape ``operator.out_shape``.
            sigma: noise standard deviation, scalar or one per measurement (``>= 0``).

        Returns:
            A GaussianMixture with the same schedule and event shape.
        """
        matrix, gains, cholesky, residual = self._observation_terms(operator, y, sigma)
        log_weights = self.weights.log() + _gaussian_log_density(residual, cholesky)
        solve = lambda rhs: torch.cholesky_solve(rhs, cholesky)  # noqa: E731
        means = self.means + (gains @ solve(residual[..., None]))[..., 0]
        covariances = self.covariances - gains @ solve(gains.transpose(-1, -2))
        covariances = 0.5 * (covariances + covariances.transpose(-1, -2))
        return GaussianMixture(
            torch.softmax(log_weights, 0),
            means,
            covariances,
            self.schedule,
            event_shape=tuple(self.event_shape),
            sampler=self.sampler,
            num_steps=self.num_steps,
            eta=self.eta,
            allow_singular=True,
        )


class Gaussian(GaussianMixture):
    r"""Gaussian prior :math:`\mathcal{N}(\mu, \Sigma)`: a one-component :class:`GaussianMixture`.

    Args:
        mean: ``(d,)``.
        covariance: ``(d, d)`` symmetric positive definite.
        schedule: the diffusion's noise schedule (default VP).
        event_shape: the signal's shape (default ``(d,)``).
    """

    def __init__(
        self, mean: Tensor, covariance: Tensor, schedule: Schedule | None = None, **kwargs
    ):
        mean, covariance = torch.as_tensor(mean), torch.as_tensor(covariance)
        if mean.dim() != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"Gaussian needs mean (d,) and covariance (d, d); got {tuple(mean.shape)} and "
                f"{tuple(covariance.shape)}"
            )
        super().__init__(
            torch.ones(1, dtype=mean.dtype), mean[None], covariance[None], schedule, **kwargs
        )


def _gaussian_log_density(residual: Tensor, cholesky: Tensor) -> Tensor:
    """``log N(r; 0, L L^T)`` for ``residual`` ``(K, m)`` and ``cholesky`` ``(K, m, m)``, ->
    ``(K,)``."""
    whitened = torch.linalg.solve_triangular(cholesky, residual[..., None], upper=False)[..., 0]
    log_det = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    m = residual.shape[-1]
    return -0.5 * ((whitened**2).sum(-1) + log_det + m * math.log(2 * math.pi))


def _validate_mixture(weights: Tensor, means: Tensor, covariances: Tensor) -> None:
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(
            f"weights must be a non-empty 1-D tensor (K,); got shape {tuple(weights.shape)}"
        )
    k = weights.shape[0]
    if means.dim() != 2 or means.shape[0] != k:
        raise ValueError(f"means must have shape (K, d) with K={k}; got {tuple(means.shape)}")
    d = means.shape[1]
    if covariances.shape != (k, d, d):
        raise ValueError(
            f"covariances must have shape (K, d, d) = ({k}, {d}, {d}); got "
            f"{tuple(covariances.shape)}"
        )
    for name, value in (("weights", weights), ("means", means), ("covariances", covariances)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contain non-finite values")
    if (weights < 0).any():
        raise ValueError(f"weights must be non-negative; got {weights.tolist()}")
    total = float(weights.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to one; they sum to {total:.8g}")
    asymmetry = (covariances - covariances.transpose(-1, -2)).abs().amax()
    if float(asymmetry) > 1e-8 * max(1.0, float(covariances.abs().amax())):
        raise ValueError(
            f"covariances must be symmetric; the largest asymmetry is {float(asymmetry):.3g}"
        )


def _decompose(covariances: Tensor, allow_singular: bool) -> tuple[Tensor, Tensor | None]:
    """Eigendecomposition ``(K, d), (K, d, d)``; eigenvectors ``None`` if all are isotropic."""
    k, d, _ = covariances.shape
    diagonal = covariances.diagonal(dim1=-2, dim2=-1)
    scale = diagonal[:, :1]
    eye = torch.eye(d, dtype=covariances.dtype, device=covariances.device)
    isotropic = bool(
        (
            (covariances - scale[..., None] * eye).abs()
            <= 1e-12 * scale.abs().clamp_min(1e-300)[..., None]
        ).all()
    )
    if isotropic:
        eigenvalues, eigenvectors = scale.expand(k, d).clone(), None
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(covariances.to(torch.float64))
        eigenvalues, eigenvectors = (
            eigenvalues.to(covariances.dtype),
            eigenvectors.to(covariances.dtype),
        )
    floor = eigenvalues.amax(-1, keepdim=True) * 1e-10
    if not allow_singular and bool((eigenvalues <= 0).any()):
        bad = int((eigenvalues <= 0).any(-1).nonzero()[0])
        raise ValueError(f"covariances must be positive definite; component {bad} is not")
    if allow_singular:
        eigenvalues = torch.where(eigenvalues < floor, torch.zeros_like(eigenvalues), eigenvalues)
    return eigenvalues, eigenvectors
