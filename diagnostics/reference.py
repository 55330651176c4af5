r"""Reference posteriors by NumPyro NUTS, for problems with an exact prior and no closed form.

With a Gaussian or Gaussian-mixture prior the posterior density is known up to a constant for
*any* likelihood (phase retrieval, Poisson counts, saturation, unknown noise levels), so
multi-chain NUTS gives a reference that the diffusion engines can be measured against: sliced
Wasserstein and coverage, not only PSNR against the truth.

The mixture is split exactly into its components,

.. math::
    p(x, \theta \mid y) = \sum_k \pi_k\, p_k(x, \theta \mid y), \qquad
    p_k \propto \mathcal N(x; \mu_k, \Sigma_k)\, p(\theta)\, p(y \mid x, \theta), \qquad
    \pi_k \propto w_k Z_k,

and each component posterior is sampled by its own NUTS chains, in whitened coordinates
:math:`x = \mu_k + \Sigma_k^{1/2} v` (the prior term is :math:`-\tfrac12 \lVert v \rVert^2`) with
the global latents :math:`\theta` mapped to an unconstrained space. The steps:

1. ``climbs_per_component`` prior draws per component climb (L-BFGS) to modes of their
   component posterior (:func:`laplace_starts`); since a mode of the likelihood shows in every
   component (a symmetry of the operator: phase retrieval's flips and sign), every component also
   climbs from the modes the others reached, mapped into its own coordinates;
2. each component is split at the distinct modes its climbs reached (:func:`distinct_modes`)
   into cells, the points nearer to one mode than to the others (:func:`nearest_mode`):
   :math:`Z_k = \sum_m Z_{k,m}`; NUTS cannot move between well separated modes, so each mode gets
   its own chains, started from draws of its Laplace approximation with the Laplace covariance as
   their initial inverse mass matrix, and its weight is not left to the chains;
3. a pilot weight of every mode comes from importance sampling around its Laplace approximation;
   modes whose pilot weight is below :data:`RUN_WEIGHT` (and whose pilot estimate is trustworthy:
   importance ESS of at least 400, or the weight below :data:`NEGLIGIBLE_WEIGHT`) get no chains;
4. NUTS runs all remaining chains at once (warm-up adapts the step size and the mass matrix);
5. each cell's integral :math:`Z_{k,m} = \int_{\text{cell}} \mathcal N(v; 0, I)\, p(\theta)\,
   p(y \mid x, \theta)` is estimated by importance sampling: one set of draws per component from
   the mixture of Gaussians fitted to its modes' NUTS draws (covariances inflated by 1.1, equal
   shares) and a 10% share of the whitened prior (a defensive mixture,
   :func:`component_evidence`), each cell counting the draws that fall in it; this also gives
   :math:`\log p(y)`;
6. modes whose chains cross into each other's cells (more than :data:`LEAVE_MAX` of their draws)
   are one basin, not separated modes: they are merged, their chains pooled (R-hat over the
   pooled chains says whether they agree), and the basin's evidence is estimated once over the
   union of its cells, from a mixture of Gaussians fitted to the pooled draws in each cell (a
   single Gaussian misses the ends of a curved basin);
7. the checks (:func:`nuts_reference`) decide whether the result is a reference.

What it cannot do: find a mode that no climb reaches. The climbs start from prior draws of every
component and from every mode found, which covers a likelihood's symmetries; an isolated mode in
a region no prior draw leads to is missed (a missed mode inside a found mode's cell often shows
as a large Pareto :math:`\hat k` of that cell's evidence, which the checks refuse).

The model reaches JAX through a bridge: the log-density and its gradient are the model's own,
evaluated by torch (``Problem.log_likelihood``, ``Problem.log_joint_globals``) inside
``jax.pure_callback`` with a custom VJP; all chains are vectorised, so each leapfrog step is one
batched torch call. Anything the library can trace works: non-linear operators, non-Gaussian
observations, several observed sites, and global latents.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffpost.diagnostics.weights import chain_khat
from diffpost.models.priors import GaussianMixture
from diffpost.posterior.driver import check_model_arguments, check_seed
from diffpost.posterior.engines.common import check_positive_integers
from diffpost.posterior.particles import ParticleSet
from diffpost.posterior.problem import CAPABILITIES, NonFiniteParticles, Problem

__all__ = ["nuts_reference", "ReferenceNotConverged", "NUTSSettings", "default_cache_dir"]

#: acceptance: every quantity of every checked component (Vehtari et al. 2021's thresholds)
RHAT_MAX = 1.01
ESS_MIN = 400
#: acceptance of a component's evidence estimate: importance-sampling ESS and Pareto k-hat
EVIDENCE_ESS_MIN = 400
KHAT_MAX = 0.7
#: components whose posterior weight is at least this are checked
CHECK_WEIGHT = 0.01
#: components whose posterior weight is below this are left out of the particle set
KEEP_WEIGHT = 1e-8
#: components whose pilot (Laplace) weight is below this get no chains
RUN_WEIGHT = 1e-6
#: ... even when the pilot's importance ESS is small: a pilot weight this small would have to be
#: off by a factor of 1e14 to matter
NEGLIGIBLE_WEIGHT = 1e-20
#: a failed evidence estimate (importance ESS or Pareto k-hat out of bounds) is taken to be within
#: this factor of the truth; it refuses the reference only when that much error could move some
#: basin's weight by CHECK_WEIGHT or more (the estimate is unbiased, so an overestimate by this
#: factor has probability at most 1/EVIDENCE_MARGIN; its proposal is fitted to the basin's own
#: NUTS draws, so missing most of the basin's mass is not plausible either)
EVIDENCE_MARGIN = 100.0
#: the draws of a mode's chains that lie nearer another mode of their component: at most this
#: fraction, else the modes are not separated and the split into cells is refused
LEAVE_MAX = 0.01
#: the evidence proposal: the draws' covariance times INFLATION, with a DEFENSIVE share of
#: the whitened prior
INFLATION = 1.1
DEFENSIVE = 0.1
CACHE_FORMAT = "diffpost-nuts-reference-2"


class ReferenceNotConverged(RuntimeError):
    """The NUTS reference failed its acceptance checks (R-hat, bulk ESS, evidence estimate).

    Attributes:
        diagnostics: the per-component numbers the message summarises.
    """

    def __init__(self, message: str, diagnostics: dict[str, Any]):
        super().__init__(message)
        self.diagnostics = diagnostics


@dataclass(frozen=True)
class NUTSSettings:
    """NUTS settings (NumPyro's and Stan's defaults; dense mass matrix for these small d)."""

    num_warmup: int = 1000
    num_samples: int = 1000
    chains_per_component: int = 4
    dense_mass: bool = True
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    evidence_draws: int = 8192
    climbs_per_component: int = 16

    def __post_init__(self):
        check_positive_integers(
            "nuts_reference",
            num_warmup=self.num_warmup,
            num_samples=self.num_samples,
            chains_per_component=self.chains_per_component,
            max_tree_depth=self.max_tree_depth,
            evidence_draws=self.evidence_draws,
            climbs_per_component=self.climbs_per_component,
        )
        if self.chains_per_component < 2:
            raise ValueError(
                "chains_per_component must be at least 2 (R-hat compares chains); got "
                f"{self.chains_per_component}"
            )
        if not isinstance(self.dense_mass, bool):
            raise TypeError(f"dense_mass must be a bool; got {self.dense_mass!r}")
        accept = self.target_accept_prob
        if isinstance(accept, bool) or not isinstance(accept, int | float) or not 0 < accept < 1:
            raise ValueError(f"target_accept_prob must be in (0, 1); got {accept!r}")


def default_cache_dir() -> Path:
    """``$DIFFPOST_CACHE/reference``, else ``$XDG_CACHE_HOME/diffpost/reference`` (``~/.cache``)."""
    if os.environ.get("DIFFPOST_CACHE"):
        return Path(os.environ["DIFFPOST_CACHE"]) / "reference"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffpost" / "reference"


class WhitenedTarget:
    r"""The component posteriors in whitened coordinates, evaluated by torch.

    A position ``u`` ``(B, D)`` is ``[v, z]``: ``v`` ``(B, d)`` with :math:`x = \mu_k +
    \Sigma_k^{1/2} v` and ``z`` the global latents' unconstrained values ``(B, D - d)``.
    """

    def __init__(self, problem: Problem):
        self.problem = problem
        denoiser = problem.prior.denoiser
        self.means = problem.prior.means  # (K, d)
        self.scales = denoiser.eigenvalues.clamp_min(0).sqrt().to(self.means)  # (K, d)
        vectors = denoiser.eigenvectors
        self.vectors = None if vectors is None else vectors.to(self.means)  # (K, d, e)
        self.space = problem.global_space if problem.global_latents else None
        self.d = self.means.shape[1]
        self.dim = self.d + (self.space.dim if self.space is not None else 0)
        self.error: BaseException | None = None
        self.one_row_at_a_time = self.space is not None and not self.broadcasts(problem)

    @staticmethod
    def broadcasts(problem: Problem) -> bool:
        """Whether the model takes one value of the global latents per particle (else every row
        is evaluated alone: slower, as exact)."""
        generator = torch.Generator(device=problem.device).manual_seed(0)
        x = problem.prior.sample((2,), generator=generator)
        try:
            problem.check_particle_broadcasting(x, problem.sample_globals(2, generator))
        except ValueError:
            return False
        return True

    def signal(self, v: Tensor, k: Tensor) -> Tensor:
        """``v`` ``(B, d)`` of components ``k`` ``(B,)`` -> ``x`` ``(B, *event)``."""
        scaled = self.scales[k] * v
        if self.vectors is not None:
            scaled = torch.einsum("bde,be->bd", self.vectors[k], scaled)
        return (self.means[k] + scaled).reshape(v.shape[0], *self.problem.event_shape)

    def whiten(self, x: Tensor, k: int) -> Tensor:
        """The inverse of :meth:`signal` in component ``k``: ``x`` ``(B, d)`` -> ``v``
        ``(B, d)`` (directions of zero prior variance map to 0)."""
        centred = x - self.means[k]
        if self.vectors is not None:
            centred = centred @ self.vectors[k]
        scales = self.scales[k]
        return torch.where(scales > 0, centred / scales.clamp_min(1e-300), 0.0)

    def globals(self, z: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.space.constrain(z)

    def log_density(self, u: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(log target, log p(y | x, theta))`` ``(B,)``, where the target is normalised like
        :math:`\mathcal N(v; 0, I)\, p(\theta) |J|\, p(y \mid x, \theta)`; differentiable."""
        v = u[:, : self.d]
        x = self.signal(v, k)
        log_prior = -0.5 * (v**2).sum(1) - 0.5 * self.d * math.log(2 * math.pi)
        if self.space is None:
            log_likelihood = self.problem.log_likelihood(x)
        else:
            values, log_jacobian = self.globals(u[:, self.d :])
            if self.one_row_at_a_time:
                parts = [
                    self.problem.log_joint_globals(
                        x[i : i + 1], {n: v[i] for n, v in values.items()}
                    )
                    for i in range(x.shape[0])
                ]
                log_globals = torch.stack([part[0] for part in parts])
                log_likelihood = torch.cat([part[1] for part in parts])
            else:
                log_globals, log_likelihood = self.problem.log_joint_globals(x, values)
            log_prior = log_prior + log_globals + log_jacobian
        return log_prior + log_likelihood, log_likelihood

    def potential_and_grad(self, u: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NumPyro's potential (minus the log target) and its gradient, for the JAX callback."""
        try:
            rows = torch.from_numpy(np.array(u, dtype=np.float64).reshape(-1, self.dim))
            rows = rows.to(dtype=self.means.dtype, device=self.means.device)
            components = torch.from_numpy(np.array(k, dtype=np.int64).reshape(-1))
            potential, grad = self.potential_rows(rows, components.to(self.means.device))
        except Exception as error:  # re-raised by the caller: JAX would wrap it in its own error
            self.error = error
            raise
        dtype = np.float64 if u.dtype == np.float64 else np.float32
        return (
            potential.cpu().numpy().astype(dtype).reshape(u.shape[:-1]),
            grad.cpu().numpy().astype(dtype).reshape(u.shape),
        )

    def representable(self, rows: Tensor) -> Tensor:
        """``(B,)``: the position is finite and its global latents' values are finite points of
        their supports (far out in a divergent trajectory a positive scale overflows to ``inf``
        or underflows to 0, which the model's distributions refuse)."""
        finite = torch.isfinite(rows).all(1)
        if self.space is not None:
            with torch.no_grad():
                values, log_jacobian = self.globals(rows[:, self.d :])
            finite &= torch.isfinite(log_jacobian)
            for latent in self.space.latents:
                value = values[latent.name]
                inside = latent.distribution.support.check(value) & torch.isfinite(value)
                finite &= inside.reshape(rows.shape[0], -1).all(1)
        return finite

    def potential_rows(self, rows: Tensor, components: Tensor) -> tuple[Tensor, Tensor]:
        """Potential ``(B,)`` and gradient ``(B, D)``; ``+inf`` and 0 where the position or the
        log-density is not finite (NUTS counts a divergence there)."""
        finite = self.representable(rows)
        if not bool(finite.all()):
            potential = torch.full_like(rows[:, 0], math.inf)
            grad = torch.zeros_like(rows)
            if bool(finite.any()):
                potential[finite], grad[finite] = self.potential_rows(
                    rows[finite], components[finite]
                )
            return potential, grad
        with torch.enable_grad():
            rows = rows.requires_grad_(True)
            try:
                log_target, _ = self.log_density(rows, components)
            except NonFiniteParticles:  # x overflowed far out in a divergent trajectory
                return torch.full_like(rows[:, 0], math.inf).detach(), torch.zeros_like(rows)
            (grad,) = torch.autograd.grad(log_target.sum(), rows)
        bad = ~torch.isfinite(log_target.detach())
        if bool(bad.any()):
            return torch.where(bad, math.inf, -log_target.detach()), torch.where(
                bad[:, None], 0.0, -grad
            )
        return -log_target.detach(), -grad


def run_nuts(
    target: WhitenedTarget,
    positions: np.ndarray,
    inverse_mass: np.ndarray,
    components: np.ndarray,
    settings: NUTSSettings,
    seed: int,
) -> dict[str, np.ndarray]:
    """Run one NUTS chain per row of ``positions`` ``(n, D)`` on its component's target, from
    the initial inverse mass matrices ``(n, D, D)`` (dense) or ``(n, D)``, all vectorised;
    returns the kept draws ``z`` ``(n, S, D)`` and per-draw statistics."""
    try:
        import jax
        import jax.numpy as jnp
        from numpyro.infer.hmc import hmc
    except ImportError as error:
        raise ImportError(
            "nuts_reference needs numpyro and jax: pip install 'diffpost[reference]'"
        ) from error

    def bridge(u, k):
        shapes = (
            jax.ShapeDtypeStruct(u.shape[:-1], u.dtype),
            jax.ShapeDtypeStruct(u.shape, u.dtype),
        )
        return jax.pure_callback(target.potential_and_grad, shapes, u, k, vmap_method="expand_dims")

    @jax.custom_vjp
    def potential(u, k):
        return bridge(u, k)[0]

    def potential_forward(u, k):
        return bridge(u, k)

    def potential_backward(grad, cotangent):
        return cotangent[..., None] * grad, None

    potential.defvjp(potential_forward, potential_backward)
    init_kernel, sample_kernel = hmc(potential_fn_gen=lambda k: lambda u: potential(u, k))

    def chain(key, start, mass, k):
        init_key, _ = jax.random.split(key)
        state = init_kernel(
            start,
            settings.num_warmup,
            inverse_mass_matrix=mass,
            dense_mass=settings.dense_mass,
            target_accept_prob=settings.target_accept_prob,
            max_tree_depth=settings.max_tree_depth,
            model_args=(k,),
            rng_key=init_key,
        )

        def advance(state, _):
            state = sample_kernel(state, model_args=(k,))
            return state, (state.z, state.diverging, state.num_steps, state.accept_prob)

        state, _ = jax.lax.scan(advance, state, None, length=settings.num_warmup)
        state, draws = jax.lax.scan(advance, state, None, length=settings.num_samples)
        return draws + (state.adapt_state.step_size,)

    float64 = target.means.dtype == torch.float64
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", float64)  # the bridge converts with the flag at run time
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            dtype = jnp.float64 if float64 else jnp.float32
            keys = jax.random.split(jax.random.PRNGKey(seed % 2**32), positions.shape[0])
            run = jax.jit(jax.vmap(chain))
            try:
                out = run(
                    keys,
                    jnp.asarray(positions, dtype),
                    jnp.asarray(inverse_mass, dtype),
                    jnp.asarray(components, jnp.int32),
                )
                out = [np.asarray(part) for part in out]
            except Exception:
                if target.error is not None:
                    raise target.error from None
                raise
    finally:
        jax.config.update("jax_enable_x64", previous)
    names = ("z", "diverging", "num_steps", "accept_prob", "step_size")
    return dict(zip(names, out, strict=True))


def laplace_starts(
    target: WhitenedTarget,
    starts: Tensor,
    components: Tensor,
    dense: bool,
    generator: torch.Generator,
    iterations: int = 200,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Starting points and initial inverse mass matrices from Laplace approximations.

    Every row of ``starts`` ``(n, D)`` climbs (L-BFGS, the rows' potentials summed: they are
    independent) to a mode of its component posterior, where the Hessian :math:`H` of the
    potential gives :math:`\mathcal N(\hat u, H^{-1})`; the chain starts from one draw of it with
    :math:`H^{-1}` (eigenvalues of :math:`H` clamped to at least 0.01) as its initial inverse
    mass matrix, ``(n, D, D)`` when ``dense`` else its diagonal ``(n, D)``. Warm-up otherwise
    begins at a prior draw with the identity, where an informative likelihood forces tiny steps
    and trees of the maximum depth. Each row climbs from its own prior draw, so chains that
    reach different modes of one component stay apart and R-hat reports it. A row whose climb
    fails (a non-finite potential) keeps its prior draw and the identity.

    Returns:
        ``(starts, inverse_mass, modes, covariances, potentials)``: the modes ``(n, D)``, the
        Laplace covariances ``(n, D, D)`` and the potentials there ``(n,)`` (``inf`` where the
        climb failed) are also the pilot evidence estimate's proposals.
    """
    n, dim = starts.shape

    def potentials(u: Tensor) -> Tensor:
        inside = target.representable(u.detach())
        values = torch.full_like(u[:, 0], 1e300)
        if bool(inside.any()):
            values = values.masked_scatter(
                inside, -target.log_density(u[inside], components[inside])[0]
            )
        return values

    u = starts.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [u], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_change=1e-12
    )

    def closure():
        optimiser.zero_grad()
        total = potentials(u).sum()
        total.backward()
        return total

    with torch.enable_grad():
        optimiser.step(closure)
        mode = u.detach().clone().requires_grad_(True)
        potential = potentials(mode)
        (grad,) = torch.autograd.grad(potential.sum(), mode, create_graph=True)
        rows = [
            torch.autograd.grad(grad[:, j].sum(), mode, retain_graph=True)[0] for j in range(dim)
        ]
    hessian = torch.stack(rows, dim=1).detach()  # (n, D, D)
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    ok = torch.isfinite(potential.detach()) & (potential.detach() < 1e299)
    ok &= torch.isfinite(hessian).flatten(1).all(1)
    eye = torch.eye(dim, dtype=starts.dtype, device=starts.device)
    hessian = torch.where(ok[:, None, None], hessian, eye)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    scale = eigenvalues.clamp_min(0.01).rsqrt()  # H^{-1/2} = V diag(scale) V^T
    covariance = eigenvectors @ torch.diag_embed(scale**2) @ eigenvectors.transpose(1, 2)
    noise = torch.randn(n, dim, generator=generator, dtype=starts.dtype).to(starts.device)
    draws = mode.detach() + torch.einsum("nde,ne->nd", eigenvectors, scale * noise)
    draws = torch.where(ok[:, None] & target.representable(draws)[:, None], draws, starts)
    mass = covariance if dense else covariance.diagonal(dim1=1, dim2=2)
    best = torch.where(ok, potential.detach(), math.inf)
    return draws, mass, mode.detach(), covariance, best


def component_diagnostics(draws: np.ndarray) -> tuple[float, float, int]:
    """Worst rank-normalised split R-hat, least bulk ESS and its quantity, over the quantities of
    one component's chains ``(C, S, Q)``."""
    from arviz_stats.base import array_stats

    quantities = np.moveaxis(draws, -1, 0)  # (Q, C, S)
    rhat = np.asarray(array_stats.rhat(quantities, chain_axis=-2, draw_axis=-1))
    ess = np.asarray(array_stats.ess(quantities, chain_axis=-2, draw_axis=-1, method="bulk"))
    return float(np.max(rhat)), float(np.min(ess)), int(np.argmin(ess))


def component_evidence(
    target: WhitenedTarget,
    k: int,
    mean: Tensor,
    covariance: Tensor,
    count: int,
    generator: torch.Generator,
    cell: tuple[Tensor, list[int]] | None = None,
    shares: Tensor | None = None,
    return_weights: bool = False,
) -> tuple[float, float, float] | tuple[Tensor, Tensor]:
    r""":math:`\log Z_k` by defensive importance sampling, with the weights' ESS and Pareto
    :math:`\hat k`; with ``cell = (centres, modes)`` (``centres`` ``(M, D)`` the distinct modes of
    component ``k``) the integral over the cells of the listed modes alone, the points nearer to
    one of them than to the other modes (:func:`nearest_mode`): the cells' integrals add up to
    :math:`Z_k`.

    The proposal is :math:`0.9\, \mathcal N(m, 1.1\, C) + 0.1\, q_0`, with ``m`` ``(D,)`` and
    ``C`` ``(D, D)`` the mean and covariance of the component's NUTS draws (or of its Laplace
    approximation, for the pilot estimate) and :math:`q_0` the whitened prior
    :math:`\mathcal N(v; 0, I)` times :math:`\mathcal N(z; m_z, 4 C_{zz})` for the global
    latents: where the posterior's tails follow the prior's (a weakly informative likelihood
    direction, e.g. a Poisson count's low-rate side) a fitted Gaussian alone has lighter tails
    than the target, and the weights' variance is infinite (Hesterberg 1995). With ``mean``
    ``(J, D)``, ``covariance`` ``(J, D, D)`` and ``shares`` ``(J,)`` the fitted part is the
    mixture :math:`\sum_j s_j \mathcal N(m_j, 1.1\, C_j)` (a basin of several modes, a Gaussian
    per mode's cell: a curved basin is covered where one Gaussian would miss its ends).
    ``return_weights``: return the draws ``(count, D)`` and their log-weights ``(count,)``
    instead, for estimates over several cells from one set of draws.
    """
    if mean.dim() == 1:
        mean, covariance = mean[None], covariance[None]
        shares = torch.ones(1, dtype=mean.dtype, device=mean.device)
    J, dim = mean.shape
    shares = shares.to(mean) / shares.sum()
    overall = shares @ mean
    spread = torch.einsum("j,jde->de", shares, covariance) + torch.einsum(
        "j,jd,je->de", shares, mean - overall, mean - overall
    )
    covariance = INFLATION * covariance
    eye = torch.eye(dim, dtype=mean.dtype, device=mean.device)
    fitted = torch.distributions.MultivariateNormal(
        mean,
        covariance
        + 1e-10
        * covariance.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)[:, None, None]
        * eye,
    )
    wide_mean, wide_covariance = torch.zeros_like(overall), eye.clone()
    wide_mean[target.d :] = overall[target.d :]
    wide_covariance[target.d :, target.d :] = 4 * spread[target.d :, target.d :]
    wide = torch.distributions.MultivariateNormal(wide_mean, wide_covariance)
    noise = torch.randn(count, dim, generator=generator, dtype=mean.dtype).to(mean.device)
    defensive = torch.rand(count, generator=generator, dtype=mean.dtype).to(mean.device)
    defensive = (defensive < DEFENSIVE)[:, None]
    which = torch.zeros(count, dtype=torch.long, device=mean.device)
    if J > 1:
        which = torch.multinomial(shares.cpu(), count, True, generator=generator).to(mean.device)
    u = torch.where(
        defensive,
        wide_mean + noise @ wide.scale_tril.T,
        mean[which] + torch.einsum("nde,ne->nd", fitted.scale_tril[which], noise),
    )
    log_fitted = torch.logsumexp(shares.log() + fitted.log_prob(u[:, None, :]), dim=1)
    log_proposal = torch.logaddexp(
        math.log(1 - DEFENSIVE) + log_fitted, math.log(DEFENSIVE) + wide.log_prob(u)
    )
    components = torch.full((count,), k, dtype=torch.long, device=mean.device)
    log_target = torch.full_like(log_proposal, -math.inf)
    inside = target.representable(u)
    with torch.no_grad():
        log_target[inside] = target.log_density(u[inside], components[inside])[0]
    log_weights = log_target - log_proposal
    log_weights = torch.where(torch.isfinite(log_weights), log_weights, -math.inf)
    if return_weights:
        return u, log_weights
    if cell is not None:
        return evidence_summary(log_weights, cell_mask(u, *cell))
    return evidence_summary(log_weights)


def cell_mask(u: Tensor, centres: Tensor, listed: list[int]) -> Tensor:
    """``(B,)``: the rows of ``u`` in the cells of the modes ``listed`` among ``centres``."""
    return torch.isin(nearest_mode(u, centres), torch.tensor(listed, device=u.device))


def evidence_summary(log_weights: Tensor, mask: Tensor | None = None) -> tuple[float, float, float]:
    """``(log Z, importance ESS, Pareto k-hat)`` of importance log-weights ``(N,)``, counting only
    the rows in ``mask`` (the others weigh 0; ``log Z`` is still over all ``N`` draws)."""
    count = log_weights.shape[0]
    if mask is not None:
        log_weights = torch.where(mask, log_weights, -math.inf)
    log_z = float(torch.logsumexp(log_weights, 0) - math.log(count))
    normalised = log_weights - torch.logsumexp(log_weights, 0)
    ess = float(1.0 / normalised.exp().square().sum())
    khat = chain_khat(log_weights.double().cpu().numpy())
    return log_z, ess, khat


def nearest_mode(u: Tensor, centres: Tensor) -> Tensor:
    """``(B,)``: the index of the nearest of the modes ``centres`` ``(M, D)`` to each row of
    ``u`` ``(B, D)``, in the whitened coordinates (Euclidean distance)."""
    return torch.cdist(u, centres).argmin(1)


def distinct_modes(modes: Tensor, covariances: Tensor, potentials: Tensor) -> Tensor:
    r"""Group climbs of one component by the mode they reached: ``(n,)`` labels ``0..M-1``,
    label 0 the mode of lowest potential, each next label a new mode in order of potential.

    A climb joins a mode when it ended inside that mode's Laplace approximation, at a squared
    Mahalanobis distance :math:`\delta^\top H \delta \le D` (the typical radius in ``D``
    dimensions); climbs that failed (an infinite potential) join the best mode, or form one
    together when every climb failed.
    """
    order = potentials.argsort().tolist()
    labels = torch.zeros(len(order), dtype=torch.long)
    centres: list[int] = []
    dim = modes.shape[1]
    for i in order:
        if not math.isfinite(float(potentials[i])):
            labels[i] = 0
            continue
        for label, c in enumerate(centres):
            delta = modes[i] - modes[c]
            if float(delta @ torch.linalg.solve(covariances[c], delta)) <= dim:
                labels[i] = label
                break
        else:
            labels[i] = len(centres)
            centres.append(i)
    return labels


def problem_fingerprint(problem: Problem, settings: NUTSSettings, seed: int) -> str:
    """A key of the problem and the settings: the prior's parameters and the observed values
    bit for bit, and the log-likelihood at eight fixed prior draws (so that operators and noise
    levels the observed values do not show are part of it), rounded to 10 significant digits."""
    prior = problem.prior
    digest = hashlib.sha256()
    for tensor in (prior.weights, prior.means, prior.covariances):
        digest.update(tensor.detach().double().cpu().numpy().tobytes())
    for name in sorted(problem.observed):
        digest.update(name.encode())
        digest.update(problem.observed[name].detach().double().cpu().numpy().tobytes())
    generator = torch.Generator(device=problem.device).manual_seed(20261204)
    x = prior.sample((8,), generator=generator)
    with torch.no_grad():
        if problem.global_latents:
            values = problem.sample_globals(8, generator)
            _, probe = problem.log_joint_globals(x, values)
            probe = probe + problem.log_prior_globals(values)
        else:
            probe = problem.log_likelihood(x)
    description = {
        "format": CACHE_FORMAT,
        "latent": problem.latent_name,
        "event": list(problem.event_shape),
        "dtype": str(problem.dtype),
        "globals": {n: list(latent.shape) for n, latent in problem.global_latents.items()},
        "probe": [f"{float(value):.10g}" for value in probe],
        "settings": asdict(settings),
        "seed": int(seed),
    }
    digest.update(json.dumps(description, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def check_problem(problem: Problem) -> None:
    """Refuse, naming what is missing, a problem NUTS cannot be given here."""
    where = f"the model has {problem.describe_observation()}"
    if not isinstance(problem.prior, GaussianMixture):
        raise ValueError(
            f"nuts_reference needs {CAPABILITIES['exact_prior']} at the signal site "
            f"{problem.latent_name!r}; got {type(problem.prior).__name__}"
        )
    if "finite_likelihood" not in problem.capabilities:
        raise ValueError(f"nuts_reference needs {CAPABILITIES['finite_likelihood']}; {where}")
    if problem.plate is not None:
        raise ValueError(
            f"nuts_reference runs one problem; the model has a plate {problem.plate[0]!r} of "
            f"{problem.plate[1]} problems: call it once per problem"
        )
    if problem.second is not None:
        raise ValueError(
            f"nuts_reference infers one signal; the model has a second DiffusionPrior site "
            f"{problem.second[0]!r}"
        )


def nuts_reference(
    model,
    *,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    chains_per_component: int = 4,
    dense_mass: bool = True,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    evidence_draws: int = 8192,
    climbs_per_component: int = 16,
    seed: int = 0,
    check: bool = True,
    cache: str | Path | bool | None = None,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
) -> ParticleSet:
    r"""A reference posterior by multi-chain NumPyro NUTS (JAX on the CPU), as a ParticleSet.

    Supported: a :class:`~diffpost.models.priors.GaussianMixture` or ``Gaussian`` prior at the
    signal site (exact density), any observation the library can trace with a finite,
    differentiable log-likelihood (non-linear operators, Poisson or other non-Gaussian
    observations, several observed sites) and continuous global latents (noise levels, kernel
    widths: mapped to an unconstrained space, their Jacobian included). Refused by name: other
    priors, noiseless observations, plates over problems, a second signal.

    Each of the ``K`` components is split at the distinct modes that L-BFGS climbs reach (from
    prior draws and from the modes found in the other components); each mode that a pilot
    estimate does not rule out gets ``chains_per_component`` chains, started from its Laplace
    approximation; warm-up adapts the step size and a dense (or diagonal) mass matrix; the
    weights of the modes come from importance-sampled evidences of their cells, and modes whose
    chains cross into each other's cells are merged into one basin (module docstring). The
    result is accepted only when, for every basin of posterior weight at least 0.01, every
    quantity (each coordinate of the signal, each entry of each global latent) has
    rank-normalised split R-hat :math:`\le 1.01` and bulk ESS :math:`\ge 400` (Vehtari et al.
    2021), and every evidence estimate has an importance ESS :math:`\ge 400` and Pareto
    :math:`\hat k < 0.7` unless its failure is immaterial: were every failed estimate off by a
    factor of :data:`EVIDENCE_MARGIN` (100), no basin's weight would move by 0.01
    (``info["evidence_immaterial"]``; e.g. one basin holding all the weight, the others at
    :math:`10^{-20}`). A failed estimate that is material is checked even for a basin below 0.01.

    Args:
        model: the Pyro model (as for :func:`diffpost.posterior.sample`).
        num_samples, num_warmup: NUTS draws kept and warm-up iterations per chain.
        chains_per_component: chains per mixture component (at least 2); the result has this
            many chains.
        dense_mass, target_accept_prob, max_tree_depth: NUTS settings (NumPyro's defaults but
            a dense mass matrix).
        evidence_draws: importance draws per mode for its evidence.
        climbs_per_component: L-BFGS climbs from prior draws per component, to find its modes
            (the climbs from the other components' modes come on top).
        seed: seed of the starting points, the chains and the importance draws.
        check: raise :class:`ReferenceNotConverged` when the checks fail (``False``: return the
            result with ``info["accepted"] = False``).
        cache: a folder to keep references in, keyed by the problem and the settings
            (:func:`problem_fingerprint`); ``None`` is :func:`default_cache_dir`, ``False``
            turns caching off.
        model_args, model_kwargs: the model's arguments.

    Returns:
        A :class:`~diffpost.posterior.ParticleSet`: chain ``j`` holds the ``j``-th NUTS chain of
        every sampled mode of weight at least :math:`10^{-8}`, one after the other, each draw
        weighted by its mode's share of the posterior over ``S`` draws; values
        ``(chains_per_component, M' S, *event)`` and the global latents; ``log_evidence`` the
        estimate of :math:`\log p(y)`; ``stats`` per draw (``diverging``, ``tree_size``,
        ``accept_prob``, ``component``, ``mode``: the index into ``info["modes"]``); ``info`` the
        settings, ``modes`` (a dict per mode found: its ``component``, ``index`` in it,
        ``climbs`` that reached it, ``potential`` there, ``pilot_weight``, ``sampled``,
        ``weight``, the ``group`` of modes it was merged with, ``rhat_max`` and
        ``ess_bulk_min`` of its group's chains, ``evidence_ess``, ``evidence_khat``,
        ``left_cell``: the share of its draws nearer another mode, ``divergences``),
        ``timings`` (seconds in the ``climbs``, the ``pilot`` estimates, ``nuts`` and the
        ``rest``), the
        per-component summaries as lists over all ``K`` components, NaN for those without
        chains (``num_modes``, ``component_weights``, ``pilot_weights``, ``rhat_max``,
        ``ess_bulk_min``, ``evidence_ess``, ``evidence_khat``, ``divergences``), and
        ``sampled_components``, ``checked_components``, ``kept_components``.

    Raises:
        ValueError, TypeError: a model or setting that cannot be handled (before any work).
        ReferenceNotConverged: the acceptance checks failed (with the diagnostics).
        ImportError: numpyro or jax missing (``pip install 'diffpost[reference]'``).

    References:
        Hoffman, Gelman. The No-U-Turn Sampler. JMLR 15, 2014.
        Phan, Pradhan, Jankowiak. Composable Effects for Flexible and Accelerated Probabilistic
        Programming in NumPyro. arXiv:1912.11554, 2019.
        Vehtari, Gelman, Simpson, Carpenter, Buerkner. Rank-normalization, folding, and
        localization: an improved R-hat. Bayesian Analysis 16(2), 2021.
    """
    settings = NUTSSettings(
        num_warmup=num_warmup,
        num_samples=num_samples,
        chains_per_component=chains_per_component,
        dense_mass=dense_mass,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        evidence_draws=evidence_draws,
        climbs_per_component=climbs_per_component,
    )
    check_seed(seed)
    if seed is None:
        raise TypeError("seed must be an integer (references are cached by seed); got None")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool; got {check!r}")
    if cache is not None and cache is not False and not isinstance(cache, str | Path):
        raise TypeError(f"cache must be a folder, None or False; got {cache!r}")
    check_model_arguments(model, model_args, model_kwargs)
    problem = Problem.from_model(model, *model_args, **(model_kwargs or {}))
    check_problem(problem)

    path = None
    if cache is not False:
        folder = default_cache_dir() if cache is None else Path(cache)
        path = folder / f"{problem_fingerprint(problem, settings, seed)}.pt"
        if path.exists():
            result = ParticleSet.load(path, device=problem.device)
            if check and not result.info["accepted"]:
                raise ReferenceNotConverged(result.info["verdict"], result.info)
            return result

    result = sample_reference(problem, settings, int(seed))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    if check and not result.info["accepted"]:
        raise ReferenceNotConverged(result.info["verdict"], result.info)
    return result


def sample_reference(problem: Problem, settings: NUTSSettings, seed: int) -> ParticleSet:
    """Climb to the modes, split each component at its distinct modes, estimate pilot weights,
    run the chains of the modes that matter, estimate their weights again, check, and assemble
    the ParticleSet."""
    start = time.perf_counter()
    target = WhitenedTarget(problem)
    prior = problem.prior
    K, C, S = prior.num_components, settings.chains_per_component, settings.num_samples
    L = settings.climbs_per_component
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    climb_components = torch.arange(K, device=problem.device).repeat_interleave(L)
    starts = torch.randn(
        K * L, target.d, generator=generator, dtype=problem.dtype, device=problem.device
    )
    if target.space is not None:
        values = problem.sample_globals(K * L, generator)
        starts = torch.cat([starts, target.space.unconstrain(values)], dim=1)
    starts, inverse_mass, modes, covariances, potentials = laplace_starts(
        target, starts, climb_components, settings.dense_mass, generator
    )

    def distinct(rows: Tensor) -> list[tuple[list[int], int]]:
        """The distinct modes the climbs ``rows`` of one component reached: (climbs, centre)."""
        labels = distinct_modes(modes[rows], covariances[rows], potentials[rows])
        found = []
        for label in range(int(labels.max()) + 1):
            members = rows[labels == label].tolist()
            centre = members[int(potentials[members].argmin())]
            # chains start from the finite climbs first (a failed one kept its starting point)
            members.sort(key=lambda r: not math.isfinite(float(potentials[r])))
            found.append((members, centre))
        return found

    if K > 1:
        # a mode of the likelihood shows in every component (a symmetry of the operator, e.g.
        # phase retrieval's flips): each component also climbs from the modes the others reached
        reps = [
            centre
            for k in range(K)
            for _, centre in distinct(torch.arange(k * L, (k + 1) * L))
            if math.isfinite(float(potentials[centre]))
        ]
        x = target.signal(modes[reps, : target.d], climb_components[reps]).flatten(1)
        more, more_components = [], []
        for k in range(K):
            others = [i for i, r in enumerate(reps) if int(climb_components[r]) != k]
            if others:
                more.append(
                    torch.cat([target.whiten(x[others], k), modes[reps][others, target.d :]], 1)
                )
                more_components += [k] * len(others)
        if more:
            more_components = torch.tensor(more_components, device=problem.device)
            climbed = laplace_starts(
                target, torch.cat(more), more_components, settings.dense_mass, generator
            )
            starts, inverse_mass, modes, covariances, potentials = (
                torch.cat([old, new])
                for old, new in zip(
                    (starts, inverse_mass, modes, covariances, potentials), climbed, strict=True
                )
            )
            climb_components = torch.cat([climb_components, more_components])

    # the pieces: every distinct mode of every component, with the climbs that reached it
    pieces: list[tuple[int, int, list[int], int]] = []  # (component, index in it, rows, centre)
    centres: list[Tensor] = []  # per component, its modes (M_k, D)
    for k in range(K):
        found = distinct(torch.nonzero(climb_components == k).flatten().cpu())
        for label, (members, centre) in enumerate(found):
            pieces.append((k, label, members, centre))
        centres.append(modes[[centre for _, centre in found]])

    def cells(members: list[int]) -> tuple[Tensor, list[int]] | None:
        """The cells of the modes ``members`` (pieces of one component), None for all of it."""
        k = pieces[members[0]][0]
        if centres[k].shape[0] == len(members):
            return None
        return centres[k], [pieces[p][1] for p in members]

    P = len(pieces)
    piece_component = torch.tensor([piece[0] for piece in pieces])
    log_prior_weights = prior.weights.double().cpu().log()[piece_component]

    timings = {"climbs": time.perf_counter() - start}
    # pilot weights from the Laplace approximation at each mode
    log_z, pilot_ess = [], []
    for p, (k, _, _, centre) in enumerate(pieces):
        estimate = component_evidence(
            target,
            k,
            modes[centre],
            covariances[centre],
            settings.evidence_draws,
            generator,
            cells([p]),
        )
        log_z.append(estimate[0])
        pilot_ess.append(estimate[1])
    pilot = torch.softmax(log_prior_weights + torch.tensor(log_z, dtype=torch.float64), 0)
    # a mode is skipped only on a pilot estimate that can be trusted, or a negligible one
    active = [
        p
        for p in range(P)
        if pilot[p] >= RUN_WEIGHT
        or (pilot_ess[p] < EVIDENCE_ESS_MIN and pilot[p] >= NEGLIGIBLE_WEIGHT)
    ]
    chain_starts, chain_mass = [], []
    for p in active:
        k, _, members, centre = pieces[p]
        chain_starts.append(starts[members[:C]])
        chain_mass.append(inverse_mass[members[:C]])
        extra = C - len(members[:C])
        if extra:  # fewer climbs reached this mode than it gets chains: more Laplace draws
            noise = torch.randn(extra, target.dim, generator=generator, dtype=problem.dtype)
            factor = torch.linalg.cholesky(covariances[centre])
            draws = modes[centre] + noise.to(problem.device) @ factor.T
            draws = torch.where(target.representable(draws)[:, None], draws, modes[centre])
            chain_starts.append(draws)
            chain_mass.append(inverse_mass[centre].expand(extra, *inverse_mass.shape[1:]))
    chain_components = piece_component[active].repeat_interleave(C).to(problem.device)
    timings["pilot"] = time.perf_counter() - start - sum(timings.values())
    out = run_nuts(
        target,
        torch.cat(chain_starts).cpu().numpy(),
        torch.cat(chain_mass).cpu().numpy(),
        chain_components.cpu().numpy(),
        settings,
        seed,
    )

    timings["nuts"] = time.perf_counter() - start - sum(timings.values())
    A = len(active)
    position = {p: a for a, p in enumerate(active)}
    z = torch.tensor(out["z"], dtype=problem.dtype, device=problem.device)  # (A C, S, D)
    flat = z.reshape(A * C * S, target.dim)
    draw_components = chain_components.repeat_interleave(S)
    with torch.no_grad():
        x = target.signal(flat[:, : target.d], draw_components)  # (A C S, *event)
        values = target.globals(flat[:, target.d :])[0] if target.space is not None else {}
        _, log_likelihood = target.log_density(flat, draw_components)

    quantities = [x.reshape(A * C * S, -1)] + [v.reshape(A * C * S, -1) for v in values.values()]
    quantities = torch.cat(quantities, dim=1).reshape(A, C, S, -1).cpu().double().numpy()
    nan = [math.nan] * P
    evidence_ess, evidence_khat, rhat_max, ess_min = list(nan), list(nan), list(nan), list(nan)
    left, divergences, worst = list(nan), [0] * P, [0] * P
    # modes whose chains cross into each other's cells are one basin: union-find over pieces
    piece_of = {(piece[0], piece[1]): p for p, piece in enumerate(pieces)}
    parent = list(range(P))

    def root(p: int) -> int:
        while parent[p] != p:
            p = parent[p]
        return p

    for a, p in enumerate(active):
        k, index = pieces[p][:2]
        left[p] = 0.0
        if centres[k].shape[0] > 1:
            draws = z[a * C : (a + 1) * C].reshape(C * S, -1)
            share = torch.bincount(
                nearest_mode(draws, centres[k]).cpu(), minlength=centres[k].shape[0]
            ).double() / (C * S)
            left[p] = float(1 - share[index])
            for j in torch.nonzero(share > LEAVE_MAX).flatten().tolist():
                parent[root(piece_of[(k, j)])] = root(p)
        divergences[p] = int(out["diverging"][a * C : (a + 1) * C].sum())
    groups: dict[int, list[int]] = {}
    for p in range(P):
        groups.setdefault(root(p), []).append(p)
    groups_list = list(groups.values())
    group_of = [0] * P
    group_log_z = []
    fits: dict[int, list[tuple[Tensor, Tensor, float]]] = {}  # group -> (mean, cov, share)
    for g, members in enumerate(groups_list):
        k = pieces[members[0]][0]
        sampled_members = [p for p in members if p in position]
        for p in members:
            group_of[p] = g
        if not sampled_members:  # the pilot estimates stand
            group_log_z.append(float(torch.logsumexp(torch.tensor([log_z[p] for p in members]), 0)))
            continue
        group_log_z.append(math.nan)  # below
        # a Gaussian fitted to the pooled draws in each of the group's cells that holds enough
        # of them (one over all its draws otherwise)
        draws = torch.cat(
            [z[position[p] * C : (position[p] + 1) * C].reshape(C * S, -1) for p in sampled_members]
        )
        parts = [draws]
        if len(members) > 1:
            nearest = nearest_mode(draws, centres[k])
            parts = [draws[nearest == pieces[p][1]] for p in members]
            parts = [part for part in parts if part.shape[0] >= max(10 * target.dim, 100)]
            parts = parts or [draws]
        total = sum(part.shape[0] for part in parts)
        fits[g] = [
            (
                part.mean(0),
                (part - part.mean(0)).T @ (part - part.mean(0)) / (part.shape[0] - 1),
                part.shape[0] / total,
            )
            for part in parts
        ]
        # pooled chains: their R-hat says whether they agree
        pooled = np.concatenate([quantities[position[p]] for p in sampled_members], axis=0)
        diagnostics = component_diagnostics(pooled)
        for p in sampled_members:
            rhat_max[p], ess_min[p], worst[p] = diagnostics
    # the evidences of a component's sampled groups from one set of importance draws: the
    # proposal mixes every group's Gaussians (equal shares per group), so a basin's tail that
    # reaches into another group's cells is covered by its own Gaussian there
    for k in range(K):
        here = [g for g in fits if pieces[groups_list[g][0]][0] == k]
        if not here:
            continue
        parts = [fit for g in here for fit in fits[g]]
        shares = torch.tensor([fit[2] / len(here) for g in here for fit in fits[g]])
        u, log_weights = component_evidence(
            target,
            k,
            torch.stack([fit[0] for fit in parts]),
            torch.stack([fit[1] for fit in parts]),
            settings.evidence_draws * len(here),
            generator,
            shares=shares,
            return_weights=True,
        )
        nearest = nearest_mode(u, centres[k])  # once for all the component's groups
        for g in here:
            members = groups_list[g]
            listed = cells(members)
            mask = (
                None
                if listed is None
                else torch.isin(nearest, torch.tensor(listed[1], device=u.device))
            )
            estimate = evidence_summary(log_weights, mask)
            group_log_z[g] = estimate[0]
            for p in members:
                log_z[p], evidence_ess[p], evidence_khat[p] = estimate
    group_component = torch.tensor([pieces[members[0]][0] for members in groups_list])
    log_joint = prior.weights.double().cpu().log()[group_component] + torch.tensor(
        group_log_z, dtype=torch.float64
    )
    log_evidence = float(torch.logsumexp(log_joint, 0))
    group_weights = (log_joint - log_evidence).exp()
    # each draw's share of the weights: a group's weight split evenly over its sampled modes,
    # whose chains all cover the group's cells
    weights = torch.zeros(P, dtype=torch.float64)
    for g, members in enumerate(groups_list):
        sampled_members = [p for p in members if p in position] or members
        for p in sampled_members:
            weights[p] = group_weights[g] / len(sampled_members)

    # how far the weights could move if every failed evidence estimate were off by the margin
    failed = torch.tensor(
        [
            any(p in position for p in members)
            and not (
                evidence_ess[members[0]] >= EVIDENCE_ESS_MIN
                and evidence_khat[members[0]] < KHAT_MAX
            )
            for members in groups_list
        ]
    )
    shift = failed.double() * math.log(EVIDENCE_MARGIN)
    upper, lower = group_weights.clone(), group_weights.clone()
    if bool(failed.any()):
        for g in range(len(groups_list)):
            up, down = log_joint - shift, log_joint + shift
            up[g], down[g] = log_joint[g] + shift[g], log_joint[g] - shift[g]
            upper[g], lower[g] = torch.softmax(up, 0)[g], torch.softmax(down, 0)[g]
    material = bool((upper - lower).max() >= CHECK_WEIGHT)

    problems = []
    names = quantity_names(problem, values)
    checked, skipped = [], 0.0
    for g, members in enumerate(groups_list):
        k = pieces[members[0]][0]
        weight = float(group_weights[g])
        sampled_members = [p for p in members if p in position]
        if not sampled_members:
            skipped += weight
            continue
        if weight < CHECK_WEIGHT and not (material and failed[g] and upper[g] >= CHECK_WEIGHT):
            continue
        checked += sampled_members
        indices = "+".join(str(pieces[p][1]) for p in members)
        name = (
            f"component {k}"
            if centres[k].shape[0] == 1
            else f"component {k} (mode {indices})"
            if len(members) == 1
            else f"component {k} (all its {len(members)} modes, one basin)"
            if len(members) == centres[k].shape[0]
            else f"component {k} (modes {indices}, one basin)"
        )
        p = sampled_members[0]
        if not rhat_max[p] <= RHAT_MAX:
            problems.append(f"{name}: R-hat {rhat_max[p]:.3f} > {RHAT_MAX}")
        if not ess_min[p] >= ESS_MIN:
            problems.append(f"{name}: bulk ESS {ess_min[p]:.0f} < {ESS_MIN} ({names[worst[p]]})")
        if failed[g] and material:
            problems.append(
                f"{name}: evidence importance ESS {evidence_ess[p]:.0f} (needs >= "
                f"{EVIDENCE_ESS_MIN}), Pareto k-hat {evidence_khat[p]:.2f} (needs < {KHAT_MAX})"
            )
    if skipped >= CHECK_WEIGHT:
        problems.append(
            f"modes without chains (pilot weight < {RUN_WEIGHT}) carry weight "
            f"{skipped:.3f} after all: the Laplace pilot missed them"
        )
    accepted = not problems
    verdict = (
        "accepted"
        if accepted
        else "the NUTS reference failed its checks: "
        + "; ".join(problems)
        + ". Run longer chains (num_samples, num_warmup), more chains, or a higher "
        "target_accept_prob"
        + ("; for the evidence, more evidence_draws" if "evidence" in " ".join(problems) else "")
    )

    kept = [a for a, p in enumerate(active) if weights[p] >= KEEP_WEIGHT]

    def by_chain(tensor: Tensor) -> Tensor:
        """``(A C S, ...)`` -> ``(C, A' S, ...)``: chain j holds chain j of each kept mode."""
        parts = tensor.reshape(A, C, S, *tensor.shape[1:])[kept]
        return parts.transpose(0, 1).reshape(C, len(kept) * S, *tensor.shape[1:])

    kept_pieces = [active[a] for a in kept]
    log_weights = (weights[kept_pieces].log() - math.log(S)).repeat_interleave(S)
    log_weights = log_weights.to(problem.dtype).to(problem.device).expand(C, -1)
    stats = {
        "diverging": torch.tensor(out["diverging"]).reshape(A * C * S),
        "tree_size": torch.tensor(out["num_steps"]).reshape(A * C * S),
        "accept_prob": torch.tensor(out["accept_prob"]).reshape(A * C * S),
        "component": draw_components.cpu(),
        "mode": torch.tensor(active).repeat_interleave(C * S),
    }

    def per_component(values: list[float], reduce) -> list[float]:
        """A list over the K components of ``reduce`` over the values of their sampled modes."""
        return [
            reduce([values[p] for p in active if pieces[p][0] == k]) if k in sampled else math.nan
            for k in range(K)
        ]

    sampled = sorted({pieces[p][0] for p in active})
    component_log_z = torch.full((K,), -math.inf, dtype=torch.float64)
    for g, members in enumerate(groups_list):
        k = pieces[members[0]][0]
        component_log_z[k] = torch.logaddexp(component_log_z[k], torch.tensor(group_log_z[g]))
    component_weights = torch.zeros(K, dtype=torch.float64).index_add_(0, piece_component, weights)
    pilot_weights = torch.zeros(K, dtype=torch.float64).index_add_(0, piece_component, pilot)
    modes_info = [
        {
            "component": pieces[p][0],
            "index": pieces[p][1],
            "climbs": len(pieces[p][2]),
            "potential": float(potentials[pieces[p][3]]),
            "pilot_weight": float(pilot[p]),
            "pilot_evidence_ess": pilot_ess[p],
            "sampled": p in active,
            "weight": float(weights[p]),
            "group": group_of[p],
            "log_evidence": log_z[p],
            "rhat_max": rhat_max[p],
            "ess_bulk_min": ess_min[p],
            "evidence_ess": evidence_ess[p],
            "evidence_khat": evidence_khat[p],
            "left_cell": left[p],
            "divergences": divergences[p],
        }
        for p in range(P)
    ]
    return ParticleSet(
        values={problem.latent_name: by_chain(x)} | {n: by_chain(v) for n, v in values.items()},
        log_weights=log_weights,
        log_evidence=torch.full((C,), log_evidence, dtype=problem.dtype, device=problem.device),
        log_likelihood=by_chain(log_likelihood),
        observed={name: value.detach() for name, value in problem.observed.items()},
        stats={name: by_chain(value) for name, value in stats.items()},
        info={
            "engine": "NUTSReference",
            "config": asdict(settings),
            "uses_noise_level": True,
            "num_particles": len(kept) * S,
            "num_chains": C,
            "nfe": 0,
            "vjp": 0,
            "wall_time": time.perf_counter() - start,
            "timings": timings | {"rest": time.perf_counter() - start - sum(timings.values())},
            "seed": seed,
            "latent_name": problem.latent_name,
            "device": str(problem.device),
            "independent_particles": False,
            "accepted": accepted,
            "verdict": verdict,
            "pilot_weights": pilot_weights.tolist(),
            "pilot_evidence_ess": [
                min(pilot_ess[p] for p in range(P) if pieces[p][0] == k) for k in range(K)
            ],
            "sampled_components": sampled,
            "checked_components": sorted({pieces[p][0] for p in checked}),
            "num_modes": [int(c.shape[0]) for c in centres],
            "kept_components": sorted({pieces[p][0] for p in kept_pieces}),
            "component_weights": component_weights.tolist(),
            "component_log_evidence": component_log_z.tolist(),
            "rhat_max": per_component(rhat_max, max),
            "ess_bulk_min": per_component(ess_min, min),
            "evidence_ess": per_component(evidence_ess, min),
            "evidence_khat": per_component(evidence_khat, max),
            "divergences": [
                sum(m["divergences"] for m in modes_info if m["component"] == k) for k in range(K)
            ],
            "modes": modes_info,
            "evidence_immaterial": bool(failed.any()) and not material,
            "step_size": out["step_size"].reshape(A, C).tolist(),
        },
    )


def quantity_names(problem: Problem, values: dict[str, Tensor]) -> list[str]:
    """Names of the checked quantities: ``x[i]`` for signal coordinate ``i`` (flat), then each
    global latent's entries."""
    names = [f"{problem.latent_name}[{i}]" for i in range(math.prod(problem.event_shape))]
    for name, value in values.items():
        size = math.prod(value.shape[1:])
        names += [name] if size == 1 else [f"{name}[{i}]" for i in range(size)]
    return names
