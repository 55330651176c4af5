r"""Guidance through the denoiser: the Tweedie estimate, its Jacobian and the data residual.

The explicit-approximation engines (DPS, ΠGDM, MMPS, ...) replace the intractable
:math:`p(y \mid x_t)` by a function of the Tweedie estimate :math:`\hat x_0 = D(x_t, t) =
\mathbb{E}[x_0 \mid x_t]` and move the particles along products of the denoiser's Jacobian
:math:`J = \partial D / \partial x_t` with vectors. Two kinds of products appear:

- the gradient of a per-particle objective of :math:`\hat x_0` (DPS: the residual norm
  :math:`\lVert y - \mathbb{E}[y \mid \hat x_0] \rVert`), one vector-Jacobian product (VJP) at each
  step: :meth:`diffpost.posterior.Problem.denoise_with_vjp`, used by
      :func:`denoise_with_residual_gradient`;
- :math:`J^\top w` for cotangents ``w`` computed from :math:`\hat x_0`, possibly several at the same
  :math:`x_t` (MMPS solves a linear system whose matrix holds :math:`J`):
  :func:`denoise_with_jacobian`, which runs the denoiser once per chunk of ``batch_size``
  particles, keeps that chunk's graph while the caller takes as many VJPs as it needs, then frees
  it, so a large batch never holds all its activations at once.

Every call counts one NFE in ``problem.nfe`` and its VJPs in ``problem.vjp`` (one VJP is one
backward pass over all particles), as :meth:`~diffpost.posterior.Problem.denoise_with_vjp` does.

**Tweedie covariance.** Differentiating Tweedie's formula :math:`\alpha_t D = x_t + \sigma_t^2
\nabla \log p_t(x_t)` once more gives the second moment (Efron 2011; Meng et al. 2021;
Rozet et al. 2024)

.. math:: \operatorname{Cov}[x_0 \mid x_t]
   = \frac{\sigma_t^2}{\alpha_t}\, \frac{\partial D}{\partial x_t},

(:func:`tweedie_covariance_scale` is the factor :math:`\sigma_t^2 / \alpha_t`; with :math:`\alpha =
1`, :math:`\sigma_t^2 J` as in the EDM notation). :math:`J` is symmetric for an exact denoiser (the
Hessian of a log-density), so :math:`J w` is computed as the VJP :math:`J^\top w`. For an isotropic
Gaussian prior of variance :math:`\tau^2` the covariance is :math:`r_t^2 I` with :math:`r_t^2 =
\tau^2 \rho_t^2 / (\tau^2 + \rho_t^2)`, :math:`\rho_t = \sigma_t / \alpha_t`
(:func:`tweedie_variance`); ΠGDM uses it with :math:`\tau = 1` (its :math:`r_t^2 = \sigma^2 / (1 +
\sigma^2)`, i.e. :math:`1 - \bar\alpha_t` under VP).

References:
    Efron. Tweedie's formula and selection bias. JASA 2011.
    Meng, Choi, Song, Ermon. Estimating High Order Gradients of the Data Distribution by
    Denoising. NeurIPS 2021. arXiv:2111.04726.
    Chung, Kim, Mccann, Klasky, Ye. Diffusion Posterior Sampling for General Noisy Inverse
    Problems. ICLR 2023. arXiv:2209.14687.
    Song, Vahdat, Mardani, Kautz. Pseudoinverse-Guided Diffusion Models for Inverse Problems.
    ICLR 2023.
    Rozet, Andry, Lanusse, Louppe. Learning Diffusion Priors from Observations by Expectation
    Maximization. NeurIPS 2024. arXiv:2405.13712.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffpost.models.schedules import Schedule
from diffpost.posterior.problem import Problem

__all__ = [
    "VJP",
    "denoise_with_cotangent",
    "denoise_with_jacobian",
    "denoise_with_residual_gradient",
    "measurement_inverse",
    "observation_residual",
    "prior_variance",
    "residual_norm",
    "tweedie_covariance_scale",
    "tweedie_variance",
]

#: ``vjp(w) -> J^T w`` for cotangents ``w`` shaped like the chunk's particles
VJP = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------- moments
def tweedie_covariance_scale(schedule: Schedule, t: Tensor) -> Tensor:
    r""":math:`\sigma_t^2 / \alpha_t`, so that :math:`\operatorname{Cov}[x_0 \mid x_t] =
    (\sigma_t^2 / \alpha_t) J` (0-d)."""
    return schedule.sigma(t) ** 2 / schedule.alpha(t)


def tweedie_variance(schedule: Schedule, t: Tensor, data_variance: float) -> Tensor:
    r""":math:`r_t^2 = \tau^2 \rho_t^2 / (\tau^2 + \rho_t^2)`, the variance of :math:`x_0` given
    :math:`x_t` under an isotropic Gaussian prior of variance :math:`\tau^2` (0-d; ``inf`` never:
    :math:`\tau^2` at :math:`\rho_t = \infty`)."""
    ratio = schedule.noise_ratio(t) ** 2
    if bool(torch.isinf(ratio)):
        return torch.as_tensor(data_variance, dtype=ratio.dtype, device=ratio.device)
    return data_variance * ratio / (data_variance + ratio)


def prior_variance(problem: Problem) -> float:
    """The prior's mean per-coordinate variance where it exposes one (Gaussian mixtures), else 1."""
    try:
        return float(problem.prior.variance.mean())
    except (AttributeError, NotImplementedError):
        return 1.0


def measurement_inverse(problem: Problem, y: Tensor) -> Tensor:
    r"""The pseudo-inverse :math:`A^+ y` that starts PiGDM and RED-diff, with the directions the
    noise swamps left at zero: singular values :math:`s_i \le \max\sigma_y` are dropped
    (there the component :math:`y_i / s_i` carries noise of standard deviation
    :math:`\sigma_y / s_i \ge 1`, the data's own scale), as the official codes' operators do for
    blur (DDRM's ``H_functions`` zero the 1-D singular values below ``3e-2``). Without the cut a
    13-tap blur's :math:`A^+ y` reaches :math:`10^4` and, even at :math:`\alpha_T \approx
    10^{-3}`, swamps the first step. Noiseless observations and operators without an SVD
    (conjugate gradient, itself regularising) keep the plain :meth:`pinv`.

    Args:
        problem: a problem with a linear Gaussian observation.
        y: ``(n, *out_shape)``.

    Returns:
        ``(n, *event)``.
    """
    gaussian = problem.gaussian
    operator = gaussian.operator
    decomposition = operator.svd()
    tol = 1e-6
    if decomposition is not None and bool((gaussian.sigma > 0).all()):
        largest = float(decomposition.singular_values.abs().max())
        if largest > 0:
            tol = max(tol, float(gaussian.sigma.max()) / largest)
    return operator.pinv(y, tol=tol)


# ---------------------------------------------------------------------------------- residuals
def observation_residual(problem: Problem, x0: Tensor) -> Tensor:
    r"""The data residual :math:`y - \mathbb{E}[y \mid x_0]` of every observed site, ``(n, m)``.

    For a :class:`~diffpost.models.observations.GaussianObservation` it is :math:`y - A(x_0)`; for
    any other observed distribution (e.g. ``Poisson(rate(x)).to_event(1)``) the distribution's
    ``mean`` at :math:`x_0` is subtracted. Sites are flattened and concatenated in model order.
    Differentiable in ``x0``.

    Args:
        problem: the inverse problem.
        x0: ``(n, *event)``.

    Raises:
        ValueError: the model has no observed site, a ``pyro.factor`` term (no data to take a
            residual of), or a site whose mean does not carry the particle dimension.
    """
    gaussian = problem.gaussian
    if gaussian is not None:
        return (gaussian.y_for(x0.shape[0]).to(x0) - gaussian.operator(x0)).flatten(1)
    names = [name for name in problem.likelihood_sites if name in problem.observed]
    if len(names) != len(problem.likelihood_sites) or not names:
        missing = sorted(set(problem.likelihood_sites) - set(names))
        raise ValueError(
            "a residual y - E[y | x0] needs observed data at every likelihood site; "
            + (f"site(s) {missing} carry a factor without data" if missing else "none is observed")
        )
    trace = problem.trace_signal(x0)
    residuals = []
    for name in names:
        mean = trace.nodes[name]["fn"].mean
        value = problem.observed[name].to(mean)
        if problem.plate is not None:  # (n / B, B, *obs) means; (B, *obs) observations
            mean = problem.site_rows(mean, x0.shape[0])
            value = value[0]  # the shape check below is per problem
            rows = problem.observed[name].to(mean)
            rows = rows.repeat_interleave(x0.shape[0] // problem.num_problems, dim=0)
        if mean.dim() != value.dim() + 1 or mean.shape[0] != x0.shape[0]:
            raise ValueError(
                f"observed site {name!r}: the distribution's mean has shape "
                f"{tuple(mean.shape)} for {x0.shape[0]} particles and an observation of shape "
                f"{tuple(value.shape)}; the model must broadcast over a leading particle "
                "dimension (declare it with .to_event(k))"
            )
        residuals.append(((value if problem.plate is None else rows) - mean).flatten(1))
    return torch.cat(residuals, dim=1)


def residual_norm(problem: Problem, x0: Tensor) -> Tensor:
    r""":math:`\lVert y - \mathbb{E}[y \mid x_0] \rVert_2` per particle, ``(n, *event) -> (n,)``."""
    return torch.linalg.vector_norm(observation_residual(problem, x0), dim=1)


def denoise_with_residual_gradient(
    problem: Problem, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""DPS's guidance: :math:`\hat x_0`, the residual norm and its gradient in :math:`x_t`.

    :math:`\nabla_{x_t} \lVert y - \mathbb{E}[y \mid \hat x_0(x_t)] \rVert_2` through the denoiser
    (one NFE and one VJP, chunked by ``batch_size``).

    Returns:
        ``(x0, norm, grad)``: ``(n, *event)``, ``(n,)``, ``(n, *event)``, detached.
    """
    norms: list[Tensor] = []

    def objective(x0: Tensor) -> Tensor:
        norm = residual_norm(problem, x0)
        norms.append(norm.detach())
        return norm

    x0, grad = problem.denoise_with_vjp(x_t, t, objective)
    return x0, problem.join_chunks(norms, problem.chunks(x_t.shape[0])), grad


# ---------------------------------------------------------------------------------- Jacobian
def denoise_with_jacobian(
    problem: Problem,
    x_t: Tensor,
    t: float | Tensor,
    apply: Callable[[Tensor, VJP], Tensor | tuple[Tensor, ...]],
) -> Tensor | tuple[Tensor, ...]:
    r"""Run ``apply(x0, vjp)`` on each chunk, with :math:`\hat x_0` and :math:`w \mapsto J^\top w`.

    The denoiser runs once per chunk of ``problem.batch_size`` particles with its graph kept;
    ``apply`` receives the chunk's detached :math:`\hat x_0` and a function ``vjp`` that returns
    :math:`J^\top w` (detached) for a cotangent ``w`` of the chunk's shape, and may call it any
    number of times (e.g. inside a conjugate-gradient solve). The graph is freed before the next
    chunk. Counted as one NFE and, in ``problem.vjp``, the largest number of ``vjp`` calls of a
    chunk.

    Args:
        problem: the inverse problem (denoiser, ``batch_size``, counters).
        x_t: ``(N, *event)``.
        t: scalar or ``(N,)``.
        apply: ``(x0, vjp) -> tensor or tuple of tensors`` with a leading chunk dimension.

    Returns:
        ``apply``'s outputs concatenated over chunks (a tensor or a tuple, as ``apply`` returns).
    """
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    outputs: list[tuple[Tensor, ...]] = []
    most_calls = 0
    single = False
    chunks = problem.chunks(x_t.shape[0])
    for chunk in chunks:
        result, calls = _apply_to_chunk(problem, x_t[chunk], t if t.dim() == 0 else t[chunk], apply)
        most_calls = max(most_calls, calls)
        single = isinstance(result, Tensor)
        outputs.append((result,) if single else tuple(result))
    problem.nfe += 1
    problem.vjp += most_calls
    merged = tuple(problem.join_chunks(list(parts), chunks) for parts in zip(*outputs, strict=True))
    return merged[0] if single else merged


def _apply_to_chunk(
    problem: Problem,
    x_t: Tensor,
    t: Tensor,
    apply: Callable[[Tensor, VJP], Tensor | tuple[Tensor, ...]],
) -> tuple[Tensor | tuple[Tensor, ...], int]:
    """``apply(x0, vjp)`` on one chunk and the number of VJPs it took; the graph dies on return."""
    calls = 0
    with torch.enable_grad():
        part = x_t.detach().requires_grad_(True)
        x0 = problem.prior.denoise(part, t)

        def vjp(cotangent: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            (grad,) = torch.autograd.grad(x0, part, cotangent.to(x0), retain_graph=True)
            return grad

        result = apply(x0.detach(), vjp)
    return result, calls


def denoise_with_cotangent(
    problem: Problem, x_t: Tensor, t: float | Tensor, cotangent: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    r""":math:`\hat x_0` and :math:`J^\top w` for a cotangent computed from :math:`\hat x_0`.

    One NFE and one VJP, chunked. ``cotangent`` maps the (detached) chunk of :math:`\hat x_0`,
    ``(n, *event)``, to ``w`` of the same shape; e.g. ΠGDM's :math:`A^\top (r_t^2 A A^\top +
    \sigma_y^2 I)^{-1} (y - A \hat x_0)`.

    Returns:
        ``(x0, J^T w)``, both ``(N, *event)`` and detached.
    """
    return denoise_with_jacobian(problem, x_t, t, lambda x0, vjp: (x0, vjp(cotangent(x0))))
