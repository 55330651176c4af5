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

1. every chain climbs (L-BFGS) from its own prior draw to a mode of its component posterior and
   starts NUTS from a draw of the Laplace approximation there, with the Laplace covariance as
   its initial inverse mass matrix (:func:`laplace_starts`);
2. a pilot weight of every component comes from importance sampling around its best Laplace
   approximation; components whose pilot weight is below :data:`RUN_WEIGHT` (and whose pilot
   estimate is trustworthy: importance ESS of at least 400) get no chains;
3. NUTS runs all remaining chains at once (warm-up adapts the step size and the mass matrix);
4. NUTS cannot move between well separated modes, so the component weights are not left to the
   chains: each evidence :math:`Z_k = \int \mathcal N(v; 0, I)\, p(\theta)\, p(y \mid x,
   \theta)` is estimated by importance sampling from a Gaussian fitted to that component's NUTS
   draws (covariance inflated by 1.1) mixed with a 10% share of the whitened prior (a defensive
   mixture, :func:`component_evidence`), which also gives :math:`\log p(y)`;
5. the checks (:func:`nuts_reference`) decide whether the result is a reference.

What it cannot do: a component posterior with several separated modes (8x8 phase retrieval at
sigma = 0.05 is one: its climbs end at different modes) gives chains that disagree, and the
R-hat check refuses the result instead of returning a wrong reference.

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
#: the evidence proposal: the draws' covariance times INFLATION, with a DEFENSIVE share of
#: the whitened prior
INFLATION = 1.1
DEFENSIVE = 0.1
CACHE_FORMAT = "diffpost-nuts-reference-1"


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

    def __post_init__(self):
        check_positive_integers(
            "nuts_reference",
            num_warmup=self.num_warmup,
            num_samples=self.num_samples,
            chains_per_component=self.chains_per_component,
            max_tree_depth=self.max_tree_depth,
            evidence_draws=self.evidence_draws,
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
) -> tuple[float, float, float]:
    r""":math:`\log Z_k` by defensive importance sampling, with the weights' ESS and Pareto
    :math:`\hat k`.

    The proposal is :math:`0.9\, \mathcal N(m, 1.1\, C) + 0.1\, q_0`, with ``m`` ``(D,)`` and
    ``C`` ``(D, D)`` the mean and covariance of the component's NUTS draws (or of its Laplace
    approximation, for the pilot estimate) and :math:`q_0` the whitened prior
    :math:`\mathcal N(v; 0, I)` times :math:`\mathcal N(z; m_z, 4 C_{zz})` for the global
    latents: where the posterior's tails follow the prior's (a weakly informative likelihood
    direction, e.g. a Poisson count's low-rate side) a fitted Gaussian alone has lighter tails
    than the target, and the weights' variance is infinite (Hesterberg 1995).
    """
    dim = mean.shape[0]
    covariance = INFLATION * covariance
    eye = torch.eye(dim, dtype=mean.dtype, device=mean.device)
    fitted = torch.distributions.MultivariateNormal(
        mean, covariance + 1e-10 * covariance.diagonal().mean().clamp_min(1e-300) * eye
    )
    wide_mean, wide_covariance = torch.zeros_like(mean), eye.clone()
    wide_mean[target.d :] = mean[target.d :]
    wide_covariance[target.d :, target.d :] = 4 * covariance[target.d :, target.d :] / INFLATION
    wide = torch.distributions.MultivariateNormal(wide_mean, wide_covariance)
    noise = torch.randn(count, dim, generator=generator, dtype=mean.dtype).to(mean.device)
    defensive = torch.rand(count, generator=generator, dtype=mean.dtype).to(mean.device)
    defensive = (defensive < DEFENSIVE)[:, None]
    u = torch.where(
        defensive,
        wide_mean + noise @ wide.scale_tril.T,
        mean + noise @ fitted.scale_tril.T,
    )
    log_proposal = torch.logaddexp(
        math.log(1 - DEFENSIVE) + fitted.log_prob(u), math.log(DEFENSIVE) + wide.log_prob(u)
    )
    components = torch.full((count,), k, dtype=torch.long, device=mean.device)
    log_target = torch.full_like(log_proposal, -math.inf)
    inside = target.representable(u)
    with torch.no_grad():
        log_target[inside] = target.log_density(u[inside], components[inside])[0]
    log_weights = log_target - log_proposal
    log_weights = torch.where(torch.isfinite(log_weights), log_weights, -math.inf)
    log_z = float(torch.logsumexp(log_weights, 0) - math.log(count))
    normalised = log_weights - torch.logsumexp(log_weights, 0)
    ess = float(1.0 / normalised.exp().square().sum())
    khat = chain_khat(log_weights.double().cpu().numpy())
    return log_z, ess, khat


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

    Each of the ``K`` components that a pilot estimate does not rule out gets
    ``chains_per_component`` chains, started from Laplace approximations at the modes L-BFGS
    reaches from prior draws; warm-up adapts the step size and a dense (or diagonal) mass
    matrix; the component weights :math:`\pi_k` come from importance-sampled evidences (module
    docstring). The result is accepted only when, for every component with
    :math:`\pi_k \ge 0.01`, every quantity (each
    coordinate of the signal, each entry of each global latent) has rank-normalised split
    R-hat :math:`\le 1.01` and bulk ESS :math:`\ge 400` (Vehtari et al. 2021), and the
    evidence estimate has an importance ESS :math:`\ge 400` and Pareto :math:`\hat k < 0.7`.

    Args:
        model: the Pyro model (as for :func:`diffpost.posterior.sample`).
        num_samples, num_warmup: NUTS draws kept and warm-up iterations per chain.
        chains_per_component: chains per mixture component (at least 2); the result has this
            many chains.
        dense_mass, target_accept_prob, max_tree_depth: NUTS settings (NumPyro's defaults but
            a dense mass matrix).
        evidence_draws: importance draws per component for its evidence.
        seed: seed of the starting points, the chains and the importance draws.
        check: raise :class:`ReferenceNotConverged` when the checks fail (``False``: return the
            result with ``info["accepted"] = False``).
        cache: a folder to keep references in, keyed by the problem and the settings
            (:func:`problem_fingerprint`); ``None`` is :func:`default_cache_dir`, ``False``
            turns caching off.
        model_args, model_kwargs: the model's arguments.

    Returns:
        A :class:`~diffpost.posterior.ParticleSet`: chain ``j`` holds the ``j``-th NUTS chain of
        every component with :math:`\pi_k \ge 10^{-8}`, one after the other, each draw weighted
        :math:`\pi_k / S`; values ``(chains_per_component, K' S, *event)`` and the global
        latents; ``log_evidence`` the estimate of :math:`\log p(y)`; ``stats`` per draw
        (``diverging``, ``tree_size``, ``accept_prob``, ``component``); ``info`` the settings
        and the per-component diagnostics, lists over all ``K`` components, NaN for those
        without chains (``component_weights``, ``pilot_weights``, ``rhat_max``,
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
    """Climb to the modes, estimate pilot component weights, run the chains of the components
    that matter, estimate their weights again, check, and assemble the ParticleSet."""
    start = time.perf_counter()
    target = WhitenedTarget(problem)
    prior = problem.prior
    K, C, S = prior.num_components, settings.chains_per_component, settings.num_samples
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    components = torch.arange(K, device=problem.device).repeat_interleave(C)  # component-major
    starts = torch.randn(
        K * C, target.d, generator=generator, dtype=problem.dtype, device=problem.device
    )
    if target.space is not None:
        values = problem.sample_globals(K * C, generator)
        starts = torch.cat([starts, target.space.unconstrain(values)], dim=1)
    starts, inverse_mass, modes, covariances, potentials = laplace_starts(
        target, starts, components, settings.dense_mass, generator
    )

    # pilot weights from the Laplace approximation at each component's best mode
    log_prior_weights = prior.weights.double().cpu().log()
    log_z, pilot_ess = [], []
    for k in range(K):
        best = k * C + int(potentials[k * C : (k + 1) * C].argmin())
        estimate = component_evidence(
            target, k, modes[best], covariances[best], settings.evidence_draws, generator
        )
        log_z.append(estimate[0])
        pilot_ess.append(estimate[1])
    pilot = torch.softmax(log_prior_weights + torch.tensor(log_z, dtype=torch.float64), 0)
    # a component is skipped only on a pilot estimate that can be trusted
    active = [k for k in range(K) if pilot[k] >= RUN_WEIGHT or pilot_ess[k] < EVIDENCE_ESS_MIN]
    rows = torch.cat([torch.arange(k * C, (k + 1) * C) for k in active])
    out = run_nuts(
        target,
        starts[rows].cpu().numpy(),
        inverse_mass[rows].cpu().numpy(),
        components[rows].cpu().numpy(),
        settings,
        seed,
    )

    A = len(active)
    z = torch.tensor(out["z"], dtype=problem.dtype, device=problem.device)  # (A C, S, D)
    flat = z.reshape(A * C * S, target.dim)
    draw_components = components[rows].repeat_interleave(S)
    with torch.no_grad():
        x = target.signal(flat[:, : target.d], draw_components)  # (A C S, *event)
        values = target.globals(flat[:, target.d :])[0] if target.space is not None else {}
        _, log_likelihood = target.log_density(flat, draw_components)

    quantities = [x.reshape(A * C * S, -1)] + [v.reshape(A * C * S, -1) for v in values.values()]
    quantities = torch.cat(quantities, dim=1).reshape(A, C, S, -1).cpu().double().numpy()
    nan = [math.nan] * K
    evidence_ess, evidence_khat, rhat_max, ess_min, divergences = (
        list(nan),
        list(nan),
        list(nan),
        list(nan),
        [0] * K,
    )
    worst = [0] * K
    for a, k in enumerate(active):
        rhat_max[k], ess_min[k], worst[k] = component_diagnostics(quantities[a])
        draws = z[a * C : (a + 1) * C].reshape(C * S, -1)
        centred = draws - draws.mean(0)
        log_z[k], evidence_ess[k], evidence_khat[k] = component_evidence(
            target,
            k,
            draws.mean(0),
            centred.T @ centred / (C * S - 1),
            settings.evidence_draws,
            generator,
        )
        divergences[k] = int(out["diverging"][a * C : (a + 1) * C].sum())
    log_joint = log_prior_weights + torch.tensor(log_z, dtype=torch.float64)
    log_evidence = float(torch.logsumexp(log_joint, 0))
    weights = (log_joint - log_evidence).exp()

    checked = [k for k in active if weights[k] >= CHECK_WEIGHT]
    problems = []
    names = quantity_names(problem, values)
    for k in checked:
        if not rhat_max[k] <= RHAT_MAX:
            problems.append(f"component {k}: R-hat {rhat_max[k]:.3f} > {RHAT_MAX}")
        if not ess_min[k] >= ESS_MIN:
            problems.append(
                f"component {k}: bulk ESS {ess_min[k]:.0f} < {ESS_MIN} ({names[worst[k]]})"
            )
        if not (evidence_ess[k] >= EVIDENCE_ESS_MIN and evidence_khat[k] < KHAT_MAX):
            problems.append(
                f"component {k}: evidence importance ESS {evidence_ess[k]:.0f} (needs >= "
                f"{EVIDENCE_ESS_MIN}), Pareto k-hat {evidence_khat[k]:.2f} (needs < {KHAT_MAX})"
            )
    skipped = float(weights[[k for k in range(K) if k not in active]].sum())
    if skipped >= CHECK_WEIGHT:
        problems.append(
            f"components without chains (pilot weight < {RUN_WEIGHT}) carry weight "
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

    kept = [a for a, k in enumerate(active) if weights[k] >= KEEP_WEIGHT]

    def by_chain(tensor: Tensor) -> Tensor:
        """``(A C S, ...)`` -> ``(C, A' S, ...)``: chain j holds chain j of each kept component."""
        parts = tensor.reshape(A, C, S, *tensor.shape[1:])[kept]
        return parts.transpose(0, 1).reshape(C, len(kept) * S, *tensor.shape[1:])

    kept_components = [active[a] for a in kept]
    log_weights = (weights[kept_components].log() - math.log(S)).repeat_interleave(S)
    log_weights = log_weights.to(problem.dtype).to(problem.device).expand(C, -1)
    stats = {
        "diverging": torch.tensor(out["diverging"]).reshape(A * C * S),
        "tree_size": torch.tensor(out["num_steps"]).reshape(A * C * S),
        "accept_prob": torch.tensor(out["accept_prob"]).reshape(A * C * S),
        "component": draw_components.cpu(),
    }
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
            "seed": seed,
            "latent_name": problem.latent_name,
            "device": str(problem.device),
            "independent_particles": False,
            "accepted": accepted,
            "verdict": verdict,
            "pilot_weights": pilot.tolist(),
            "pilot_evidence_ess": pilot_ess,
            "sampled_components": active,
            "checked_components": checked,
            "kept_components": kept_components,
            "component_weights": weights.tolist(),
            "component_log_evidence": log_z,
            "rhat_max": rhat_max,
            "ess_bulk_min": ess_min,
            "evidence_ess": evidence_ess,
            "evidence_khat": evidence_khat,
            "divergences": divergences,
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
