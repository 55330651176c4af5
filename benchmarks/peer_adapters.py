"""The peer libraries' posterior samplers (azula, deepinv) run on diffpost's problems.

Every adapter runs a peer's own sampler class on our problem with our exact denoiser
(``problem.prior.denoise``), our noise schedule and the time grid of our engines
(:func:`~diffpost.posterior.engines.common.sampling_grid`, ``t_K > ... > t_1 > t_0 = 0``): the
peer sees the same :math:`(\\alpha_t, \\sigma_t)` at every grid point and makes the same number of
denoiser calls (one per step, ``K`` for ``K`` steps), so that a head-to-head benchmark compares
algorithms on the same work. :data:`AZULA_METHODS` and :data:`DEEPINV_METHODS` map a name to
``run(problem, num_steps, num_samples, seed, **options) -> (num_samples, d)`` float64 draws;
``counter=CallCounter()`` among the options counts the denoiser calls (and the vector-Jacobian
products through it). :data:`ADAPTATIONS` says, per method, every adaptation made.

Self-check (about two CPU-minutes)::

    .venv/bin/python benchmarks/peer_adapters.py
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from diffpost.models.problems import InverseProblem
from diffpost.posterior.engines.common import sampling_grid

try:
    import deepinv
    from azula.denoise import Denoiser as _AzulaDenoiserBase
    from azula.denoise import DiracPosterior
    from azula.guidance import DiffPIRDenoiser, DPSSampler, MMPSDenoiser, PGDMSampler, TDSSampler
    from azula.linalg.covariance import IsotropicCovariance
    from azula.noise import Schedule as _AzulaSchedule
    from azula.sample import DDPMSampler
except ImportError as error:  # pragma: no cover
    raise ImportError(
        "benchmarks/peer_adapters.py needs the peer libraries azula and deepinv: "
        "pip install -e '.[peers]'"
    ) from error

__all__ = ["ADAPTATIONS", "AZULA_METHODS", "DEEPINV_METHODS", "CallCounter"]

F64 = torch.float64


class CallCounter:
    """Counts the denoiser calls made through an adapter, and the VJPs taken through them."""

    def __init__(self) -> None:
        self.calls = 0
        self.vjps = 0

    def __call__(self, denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
        """``denoise(x, t)``, counted; a hook on a copy of ``x`` counts the backward passes that go
        through the denoiser (not those that stop at its output, e.g. azula's ``A^T v``)."""
        self.calls += 1
        if x.requires_grad:
            x = x * 1.0
            x.register_hook(self._count_vjp)
        return denoise(x, t)

    def _count_vjp(self, grad: Tensor) -> None:
        self.vjps += 1


def _grid(problem: InverseProblem, num_steps: int) -> Tensor:
    """Our engines' decreasing grid ``(K + 1,)``, float64, ending at ``t = 0``."""
    return sampling_grid(problem.prior.schedule, num_steps)


def _observation(problem: InverseProblem) -> tuple[Tensor, Tensor, float]:
    return problem.operator.matrix(F64), problem.y.to(F64), float(problem.sigma)


# ------------------------------------------------------------------------------------- azula
class AzulaGridSchedule(_AzulaSchedule):
    """Our schedule read through azula's time: azula's samplers step over ``linspace(1, 0, K + 1)``,
    and ``u = 1 - i / K`` is our ``grid[i]`` exactly (linear in between)."""

    def __init__(self, schedule, grid: Tensor) -> None:
        self.schedule = schedule
        self.times = grid.flip(0)  # increasing: times[j] at u = j / K

    def time(self, u: Tensor) -> Tensor:
        k = self.times.numel() - 1
        position = torch.as_tensor(u, dtype=F64).clamp(0, 1) * k
        nearest = position.round().long()
        low = position.floor().long().clamp(max=k - 1)
        between = self.times[low] + (position - low) * (self.times[low + 1] - self.times[low])
        return torch.where((position - nearest).abs() < 1e-6, self.times[nearest], between)

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule(self.time(u))


class AzulaDenoiser(_AzulaDenoiserBase):
    """Our exact denoiser as an azula denoiser: a Dirac posterior at our :math:`\\hat x_0`."""

    def __init__(self, problem: InverseProblem, grid: Tensor, counter: CallCounter) -> None:
        super().__init__()
        self.prior = problem.prior
        self.schedule = AzulaGridSchedule(problem.prior.schedule, grid)
        self.counter = counter

    def forward(self, x_t: Tensor, t: Tensor, **kwargs) -> DiracPosterior:
        x0 = self.counter(self.prior.denoise, x_t.to(F64), self.schedule.time(t))
        return DiracPosterior(mean=x0)


def _azula(problem, num_steps, counter):
    grid = _grid(problem, num_steps)
    denoiser = AzulaDenoiser(problem, grid, counter or CallCounter())
    settings = {"steps": grid.numel() - 1, "silent": True, "dtype": F64}
    return denoiser, settings, *_observation(problem)


def _draw(sampler, num_samples: int, dim: int, seed: int, chunk: int | None = None, **init) -> Tensor:
    """``sampler.init`` (``N(alpha m, alpha^2 v + sigma^2)`` at ``t_K``) then the sampler, in chunks
    of ``chunk`` draws, under torch's global generator seeded with ``seed`` (restored after)."""
    chunk = chunk or num_samples
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draws = [
            sampler(sampler.init((min(chunk, num_samples - i), dim), dtype=F64, **init))
            for i in range(0, num_samples, chunk)
        ]
    return torch.cat(draws).detach()


def azula_dps(problem, num_steps, num_samples, seed, *, zeta=1.0, chunk=None, counter=None):
    """azula's ``DPSSampler`` (DDPM step, then ``- zeta * grad ||y - A x0||``). ``chunk``: draws per
    sampler call; azula's norm runs over the whole call, ``chunk=1`` makes it per draw (ours)."""
    denoiser, settings, matrix, y, _ = _azula(problem, num_steps, counter)
    sampler = DPSSampler(denoiser, y=y, A=lambda x: x @ matrix.T, zeta=zeta, **settings)
    return _draw(sampler, num_samples, matrix.shape[1], seed, chunk)


def azula_mmps(problem, num_steps, num_samples, seed, *, solver="gmres", iterations=1, counter=None):
    """azula's ``MMPSDenoiser`` (its defaults: GMRES, one iteration) in azula's ``DDPMSampler``."""
    denoiser, settings, matrix, y, sigma = _azula(problem, num_steps, counter)
    posterior_denoiser = MMPSDenoiser(
        denoiser,
        y=y,
        A=lambda x: x @ matrix.T,
        cov_y=IsotropicCovariance(sigma**2),
        solver=solver,
        iterations=iterations,
    )
    sampler = DDPMSampler(posterior_denoiser, **settings)
    return _draw(sampler, num_samples, matrix.shape[1], seed)


def azula_pgdm(problem, num_steps, num_samples, seed, *, eta=1.0, counter=None):
    """azula's ``PGDMSampler`` (DDIM step plus ``alpha_s alpha_t J^T A^+ (y - A x0)``), started as
    ours from ``alpha_T A^+ y + sigma_T z``."""
    denoiser, settings, matrix, y, _ = _azula(problem, num_steps, counter)
    pinv = torch.linalg.pinv(matrix)
    sampler = PGDMSampler(
        denoiser,
        y=y,
        A=lambda x: x @ matrix.T,
        A_inv=lambda v: v @ pinv.T,
        eta=eta,
        **settings,
    )
    return _draw(sampler, num_samples, matrix.shape[1], seed, mean=pinv @ y, var=0.0)


def azula_tds(
    problem, num_steps, num_samples, seed, *, twist="inflated", data_variance=None, counter=None
):
    """azula's ``TDSSampler`` (multinomial resampling at every step, DDPM proposal) with our twist:
    ``N(y; A x0, sigma_y^2 I + rho_t A A^T)``, ``rho_t = tau^2 r_t^2 / (tau^2 + r_t^2)``
    (``"inflated"``, our default) or ``rho_t = 0`` (``"plain"``, the paper's)."""
    denoiser, settings, matrix, y, sigma = _azula(problem, num_steps, counter)
    left, singular, right_t = torch.linalg.svd(matrix, full_matrices=False)
    tau2 = data_variance or float(problem.prior.variance.mean())
    rotated_y = y @ left

    def log_twist(x0: Tensor, ratio: Tensor) -> Tensor:
        r2 = ratio.to(F64) ** 2
        inflation = tau2 * r2 / (tau2 + r2) if twist == "inflated" else 0.0
        variance = sigma**2 + inflation * singular**2
        residual = rotated_y - singular * (x0 @ right_t.T)  # U^T (y - A x0)
        return -0.5 * (residual**2 / variance + torch.log(2 * math.pi * variance)).sum(-1)

    sampler = TDSSampler(denoiser, twist=log_twist, **settings)
    return _draw(sampler, num_samples, matrix.shape[1], seed)


def azula_diffpir(
    problem, num_steps, num_samples, seed, *, lmbda=10.0, iterations=1, counter=None
):
    """azula's ``DiffPIRDenoiser`` (its defaults: lambda 10, one GMRES iteration) in ``DDPMSampler``."""
    denoiser, settings, matrix, y, sigma = _azula(problem, num_steps, counter)
    posterior_denoiser = DiffPIRDenoiser(
        denoiser, y=y, A=lambda x: x @ matrix.T, var_y=sigma**2, lmbda=lmbda, iterations=iterations
    )
    sampler = DDPMSampler(posterior_denoiser, **settings)
    return _draw(sampler, num_samples, matrix.shape[1], seed)


# ------------------------------------------------------------------------------------ deepinv
class DeepinvDenoiser(deepinv.models.Denoiser):
    """Our VP denoiser in deepinv's VE convention ``x = x0 + sigma * noise``:
    ``D(x, sigma) = our D(alpha_t x, t)`` with ``sigma_t / alpha_t = sigma * sigma_scale``; ``t`` is
    the grid time whose noise ratio matches to 1e-6 (deepinv hands float32 sigmas over), else
    the bisection of ``schedule.time_of_noise_ratio``."""

    def __init__(self, problem: InverseProblem, grid: Tensor, counter: CallCounter) -> None:
        super().__init__()
        self.prior, self.schedule = problem.prior, problem.prior.schedule
        self.grid, self.ratios = grid, problem.prior.schedule.noise_ratio(grid)
        self.counter = counter
        self.sigma_scale = 1.0

    def time(self, sigma) -> Tensor:
        ratio = torch.as_tensor(sigma, dtype=F64).flatten() * self.sigma_scale
        ratio = ratio[:1] if bool((ratio == ratio[0]).all()) else ratio
        relative = (ratio[:, None] - self.ratios).abs() / self.ratios.clamp_min(1e-300)
        best = relative.argmin(1)
        on_grid = relative.gather(1, best[:, None])[:, 0] < 1e-6
        t = torch.where(on_grid, self.grid[best], self.schedule.time_of_noise_ratio(ratio))
        return t[0] if t.numel() == 1 else t

    def forward(self, x: Tensor, sigma, **kwargs) -> Tensor:
        t = self.time(sigma)
        alpha = self.schedule.alpha(t)
        alpha = alpha if alpha.dim() == 0 else alpha[:, None]
        return self.counter(self.prior.denoise, alpha * x.to(F64), t)


def _physics(problem: InverseProblem, decomposable: bool = False, noise_scale: float = 1.0):
    """A deepinv ``LinearPhysics`` of our matrix with Gaussian noise ``sigma`` (float64), or a
    ``DecomposablePhysics`` of its SVD ``A = U diag(s) V^T`` with ``mask = s`` padded to ``d``."""
    matrix, _, sigma = _observation(problem)
    noise = deepinv.physics.GaussianNoise(sigma=torch.tensor(sigma * noise_scale, dtype=F64))
    if not decomposable:
        return deepinv.physics.LinearPhysics(
            A=lambda x, **_: x.to(F64) @ matrix.T,
            A_adjoint=lambda v, **_: v.to(F64) @ matrix,
            noise_model=noise,
        )
    m, d = matrix.shape
    left, singular, right_t = torch.linalg.svd(matrix, full_matrices=True)
    mask = torch.zeros(1, d, dtype=F64)
    mask[0, :m] = singular
    return deepinv.physics.DecomposablePhysics(
        U=lambda z: z[:, :m] @ left.T,
        U_adjoint=lambda v: torch.nn.functional.pad(v @ left, (0, d - m)),
        V=lambda z: z @ right_t,
        V_adjoint=lambda x: x @ right_t.T,
        mask=mask,
        noise_model=noise,
    )


def _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter) -> Tensor:
    """deepinv's ``PosteriorDiffusion`` with ``fidelity``: an ``EDMDiffusionSDE`` with ``sigma(t) =
    sigma_t / alpha_t`` and ``s(t) = alpha_t`` (so ``x = s(t) (x0 + sigma(t) z)`` is our ``x_t``),
    solved by ``DDPMSolver`` on our grid; ``minus_one_one=False`` (no [-1, 1] state)."""
    grid = _grid(problem, num_steps)
    schedule = problem.prior.schedule
    denoiser = DeepinvDenoiser(problem, grid, counter or CallCounter())
    sde = deepinv.sampling.EDMDiffusionSDE(
        sigma_t=schedule.noise_ratio,
        scale_t=schedule.alpha,
        alpha=1.0,
        denoiser=denoiser,
        minus_one_one=False,
        dtype=F64,
    )
    solver = deepinv.sampling.DDPMSolver(timesteps=grid, rng=torch.Generator().manual_seed(seed))
    model = deepinv.sampling.PosteriorDiffusion(
        data_fidelity=fidelity,
        denoiser=denoiser,
        sde=sde,
        solver=solver,
        dtype=F64,
        minus_one_one=False,
    )
    y = problem.y.to(F64).expand(num_samples, -1)
    shape = (num_samples, problem.operator.matrix().shape[1])
    with torch.no_grad():
        return model(y, _physics(problem), x_init=shape, seed=seed).detach()


def deepinv_dps(problem, num_steps, num_samples, seed, *, weight=1.0, guidance="norm", counter=None):
    """``PosteriorDiffusion`` with ``DPSDataFidelity(clip=None)``: the score ``D``-score minus
    ``weight * grad ||A D(x) - y||`` (per draw), in the DDPM step."""
    fidelity = deepinv.sampling.DPSDataFidelity(weight=weight, clip=None, guidance=guidance)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter)


def deepinv_pigdm(problem, num_steps, num_samples, seed, *, weight=1.0, counter=None):
    """``PosteriorDiffusion`` with ``PiGDMDataFidelity`` (its ``r_t^2 = sigma^2 / (1 + sigma^2)``)."""
    fidelity = deepinv.sampling.PiGDMDataFidelity(weight=weight)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter)


def deepinv_mmps(problem, num_steps, num_samples, seed, *, cg_max_iter=3, counter=None):
    """``PosteriorDiffusion`` with ``MomentMatchingDataFidelity`` (its default: 3 CG iterations)."""
    fidelity = deepinv.sampling.MomentMatchingDataFidelity(cg_max_iter=cg_max_iter)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter)


def deepinv_ddrm(
    problem, num_steps, num_samples, seed, *, eta=0.85, etab=1.0, undo_sqrt2=False, counter=None
):
    """``deepinv.sampling.DDRM`` on a ``DecomposablePhysics`` of our SVD, with the noise levels
    ``sigma_t / alpha_t`` of ``grid[:-1]`` (``K`` calls; its output is ``D`` at ``t_1``, as ours).
    ``undo_sqrt2``: deepinv divides every noise draw by sqrt(2); passing sqrt(2) times the noise
    levels and ``sigma_y`` and reading the denoiser's sigma divided by sqrt(2) undoes it exactly
    (only its observed-coordinate test ``s_i > sigma_y`` becomes ``s_i > sqrt(2) sigma_y``)."""
    grid = _grid(problem, num_steps)
    denoiser = DeepinvDenoiser(problem, grid, counter or CallCounter())
    scale = math.sqrt(2.0) if undo_sqrt2 else 1.0
    denoiser.sigma_scale = 1.0 / scale
    sigmas = (problem.prior.schedule.noise_ratio(grid[:-1]) * scale).tolist()
    model = deepinv.sampling.DDRM(denoiser, sigmas=sigmas, eta=eta, etab=etab)
    y = problem.y.to(F64).expand(num_samples, -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DDRM seeds torch's global generator only for a truthy seed
        return model(y, _physics(problem, decomposable=True, noise_scale=scale)).detach()


Runner = Callable[..., Tensor]
AZULA_METHODS: dict[str, Runner] = {
    "dps": azula_dps,
    "mmps": azula_mmps,
    "pgdm": azula_pgdm,
    "tds": azula_tds,
    "diffpir": azula_diffpir,
}
DEEPINV_METHODS: dict[str, Runner] = {
    "dps": deepinv_dps,
    "ddrm": deepinv_ddrm,
    "pigdm": deepinv_pigdm,
    "mmps": deepinv_mmps,
}

_AZULA_COMMON = (
    "Our exact denoiser wrapped as an azula Denoiser (Dirac posterior at our x0); our schedule as "
    "an azula Schedule whose time u = 1 - i/K is our grid[i], so azula's linspace(1, 0, K + 1) "
    "steps hit our grid's (alpha, sigma) exactly; float64 times; K denoiser calls; start "
    "sampler.init, i.e. N(0, (alpha^2 + sigma^2) I) at t_K as ours; torch's global RNG seeded "
    "inside fork_rng."
)
_DEEPINV_COMMON = (
    "Our VP denoiser in deepinv's VE convention, D(x, s) = our D(alpha_t x, t) with "
    "sigma_t/alpha_t = s (t snapped to the grid; deepinv casts x and s to float32 before every "
    "call, the wrapper casts back to float64); our matrix and sigma_y (float64) as deepinv physics."
)
ADAPTATIONS: dict[str, str] = {
    "azula.dps": _AZULA_COMMON
    + " DPSSampler with zeta = 1 (azula's default; ours is scale = 0.5) and its residual norm over "
    "the whole batch of a call (the official code's; ours is per draw): chunk=1 gives ours.",
    "azula.mmps": _AZULA_COMMON
    + " MMPSDenoiser with its defaults (GMRES, 1 iteration; ours is CG, 1 iteration: "
    "solver='cg' gives ours) and cov_y = sigma_y^2 I, in DDPMSampler (eta = 1, as ours).",
    "azula.pgdm": _AZULA_COMMON
    + " PGDMSampler with eta = 1 (ours and the paper's; azula's DDIM default is 0); A_inv the "
    "pseudo-inverse of our matrix; started from alpha_T A^+ y + sigma_T z as ours. azula's "
    "guidance is the noiseless form (no sigma_y, r_t^2 = 1): ours uses r_t^2 of the prior's "
    "variance and sigma_y.",
    "azula.tds": _AZULA_COMMON
    + " TDSSampler with our default 'inflated' twist (tau^2 = the prior's mean variance, "
    "evaluated in the SVD basis) given as its twist(x0, sigma_t/alpha_t); azula resamples "
    "multinomially at every step and returns its last particles without a final weight.",
    "azula.diffpir": _AZULA_COMMON
    + " DiffPIRDenoiser with its defaults (lambda = 10, 1 GMRES iteration), var_y = sigma_y^2, in "
    "DDPMSampler (eta = 1); diffpost has no DiffPIR engine to compare with.",
    "deepinv.dps": _DEEPINV_COMMON
    + " PosteriorDiffusion + DPSDataFidelity(clip=None: the DPS class clips x0 to [-1, 1], which "
    "ruins means at +-16), weight 1, 'norm' guidance (per draw); EDMDiffusionSDE with sigma(t) = "
    "sigma_t/alpha_t, s(t) = alpha_t, DDPMSolver on our grid, minus_one_one=False in SDE and "
    "PosteriorDiffusion (no [-1, 1] state or output map); start N(0, sigma_t^2) at t_K.",
    "deepinv.pigdm": _DEEPINV_COMMON
    + " As deepinv.dps with PiGDMDataFidelity (weight 1; its r_t^2 = s^2/(1 + s^2) assumes unit "
    "data variance, ours uses the prior's) as a conditional score in the DDPM step.",
    "deepinv.mmps": _DEEPINV_COMMON
    + " As deepinv.dps with MomentMatchingDataFidelity (3 CG iterations, its default).",
    "deepinv.ddrm": _DEEPINV_COMMON
    + " deepinv.sampling.DDRM (eta 0.85, eta_b 1, as ours) on a DecomposablePhysics of our SVD "
    "(U pads/crops to d, mask = singular values padded with 0), sigmas = sigma_t/alpha_t on "
    "grid[:-1] (K calls, output D at t_1 as ours); it has no [-1, 1] rescaling in 0.5.0. Its "
    "noise draws are divided by sqrt(2) (kept as is; undo_sqrt2=True undoes it exactly).",
    "deepinv.diffpir": "Not provided: deepinv.sampling.DiffPIR hard-codes the DDPM linear betas "
    "1e-4..0.02 over 1000 steps and its own time sequence, maps the state to [-1, 1] and clamps "
    "x0 to [-1, 1] unconditionally; none of these can be switched off through its interface.",
}


# --------------------------------------------------------------------------------- self-check
def _ours(problem: InverseProblem, engine: str, num_steps: int, num_samples: int, seed: int):
    from diffpost import posterior

    result = posterior.sample(
        problem.model,
        getattr(posterior, engine)(num_steps=num_steps),
        num_particles=num_samples,
        num_chains=1,
        seed=seed,
        progress=False,
        model_kwargs=problem.model_kwargs,
    )
    return result.get_samples(seed=seed)["x"]


#: label -> (runner, our matching engine or None)
CHECKS: dict[str, tuple[Runner, str | None]] = {
    "azula.dps": (azula_dps, "DPS"),
    "azula.dps zeta=0.5 chunk=1": (functools.partial(azula_dps, zeta=0.5, chunk=1), "DPS"),
    "azula.mmps": (azula_mmps, "MMPS"),
    "azula.mmps cg": (functools.partial(azula_mmps, solver="cg"), "MMPS"),
    "azula.pgdm": (azula_pgdm, "PiGDM"),
    "azula.tds": (azula_tds, "TDS"),
    "azula.diffpir": (azula_diffpir, None),
    "deepinv.dps": (deepinv_dps, "DPS"),
    "deepinv.pigdm": (deepinv_pigdm, "PiGDM"),
    "deepinv.mmps": (deepinv_mmps, "MMPS"),
    "deepinv.ddrm": (deepinv_ddrm, "DDRM"),
    "deepinv.ddrm undo_sqrt2": (functools.partial(deepinv_ddrm, undo_sqrt2=True), "DDRM"),
}


def main(num_samples: int = 500, seed: int = 0) -> None:
    from diffpost.diagnostics import sliced_wasserstein
    from diffpost.models.problems import gaussian_mixture_benchmark

    def distance(draws: Tensor, reference: Tensor) -> float:
        return sliced_wasserstein(draws, reference, seed=0, num_projections=256, p=2)

    print("| d | d_y | K | method | peer SW | ours SW | floor | calls | VJPs | peer s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim, obs_dim in ((8, 1), (80, 4)):
        problem = gaussian_mixture_benchmark(dim, obs_dim, seed=seed)
        exact = problem.exact_posterior()
        reference = exact.sample((num_samples,), generator=torch.Generator().manual_seed(1))
        other = exact.sample((num_samples,), generator=torch.Generator().manual_seed(2))
        floor = distance(other, reference)
        for num_steps in (20, 100):
            ours: dict[str, float] = {}
            for label, (run, engine) in CHECKS.items():
                counter = CallCounter()
                start = time.perf_counter()
                draws = run(problem, num_steps, num_samples, seed, counter=counter)
                wall = time.perf_counter() - start
                assert draws.shape == (num_samples, dim), draws.shape
                if engine is not None and engine not in ours:
                    ours[engine] = distance(_ours(problem, engine, num_steps, num_samples, seed),
                                            reference)  # fmt: skip
                mine = f"{ours[engine]:.2f} ({engine})" if engine else "-"
                chunks = num_samples if "chunk=1" in label else 1
                print(
                    f"| {dim} | {obs_dim} | {num_steps} | {label} | {distance(draws, reference):.2f}"
                    f" | {mine} | {floor:.2f} | {counter.calls // chunks} | "
                    f"{counter.vjps // chunks} | {wall:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
