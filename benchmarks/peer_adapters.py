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


def _draw(
    sampler, num_samples: int, dim: int, seed: int, chunk: int | None = None, **init
) -> Tensor:
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


def azula_mmps(
    problem, num_steps, num_samples, seed, *, solver="gmres", iterations=1, counter=None
):
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


def azula_diffpir(problem, num_steps, num_samples, seed, *, lmbda=10.0, iterations=1, counter=None):
    """azula's ``DiffPIRDenoiser`` (defaults: lambda 10, 1 GMRES iteration) in ``DDPMSampler``."""
    denoiser, settings, matrix, y, sigma = _azula(problem, num_steps, counter)
    posterior_denoiser = DiffPIRDenoiser(
        denoiser, y=y, A=lambda x: x @ matrix.T, var_y=sigma**2, lmbda=lmbda, iterations=iterations
    )
    sampler = DDPMSampler(posterior_denoiser, **settings)
    return _draw(sampler, num_samples, matrix.shape[1], seed)


# ------------------------------------------------------------------------------------ deepinv
class DeepinvDenoiser(deepinv.models.Denoiser):
    """Our VP denoiser in deepinv's VE convention, in deepinv's units: deepinv's state is
    ``x' = units (x0 + rho z)`` (ours: ``x_t = alpha_t (x0 + rho z)``, ``rho = sigma_t / alpha_t``)
    and it declares the noise level ``sigma' = noise_factor * units * rho``; so
    ``D(x', sigma') = units * our D(alpha_t x' / units, t)``. ``t`` is the grid time whose ``rho``
    matches to 1e-6 (deepinv hands float32 sigmas over), else ``time_of_noise_ratio``."""

    def __init__(self, problem, grid, counter, units=1.0, noise_factor=1.0) -> None:
        super().__init__()
        self.prior, self.schedule = problem.prior, problem.prior.schedule
        self.grid, self.ratios = grid, problem.prior.schedule.noise_ratio(grid)
        self.counter, self.units, self.noise_factor = counter, units, noise_factor

    def time(self, sigma) -> Tensor:
        ratio = torch.as_tensor(sigma, dtype=F64).flatten() / (self.units * self.noise_factor)
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
        x_t = alpha * x.to(F64) / self.units
        return self.units * self.counter(self.prior.denoise, x_t, t)


def _physics(problem, num_samples, units=1.0, noise_factor=1.0, decomposable=False):
    """``(physics, y')``: our matrix as a deepinv ``LinearPhysics``, or as a
    ``DecomposablePhysics`` of its SVD ``A = U diag(s) V^T`` (``mask = s`` padded to ``d``), with
    Gaussian noise ``noise_factor * units * sigma_y`` (float64); ``y' = units * y`` per draw."""
    matrix, y, sigma = _observation(problem)
    noise = deepinv.physics.GaussianNoise(
        sigma=torch.tensor(sigma * units * noise_factor, dtype=F64)
    )
    y = (units * y).expand(num_samples, -1)
    if not decomposable:
        physics = deepinv.physics.LinearPhysics(
            A=lambda x, **_: x.to(F64) @ matrix.T,
            A_adjoint=lambda v, **_: v.to(F64) @ matrix,
            noise_model=noise,
        )
        return physics, y
    m, d = matrix.shape
    left, singular, right_t = torch.linalg.svd(matrix, full_matrices=True)
    mask = torch.zeros(1, d, dtype=F64)
    mask[0, :m] = singular
    physics = deepinv.physics.DecomposablePhysics(
        U=lambda z: z[:, :m] @ left.T,
        U_adjoint=lambda v: torch.nn.functional.pad(v @ left, (0, d - m)),
        V=lambda z: z @ right_t,
        V_adjoint=lambda x: x @ right_t.T,
        mask=mask,
        noise_model=noise,
    )
    return physics, y


def _units(problem, units) -> float:
    """``units`` as a number: ``"unit"`` is one over the prior's rms standard deviation."""
    return 1 / math.sqrt(float(problem.prior.variance.mean())) if units == "unit" else units


def _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter, units):
    """deepinv's ``PosteriorDiffusion`` with ``fidelity``: an ``EDMDiffusionSDE`` with ``sigma(t) =
    units * sigma_t / alpha_t``, ``s(t) = alpha_t`` (its state ``s (x0' + sigma z)`` is ``units``
    times our ``x_t``), ``DDPMSolver`` on our grid, ``minus_one_one=False`` (no [-1, 1] map)."""
    grid, units = _grid(problem, num_steps), _units(problem, units)
    schedule = problem.prior.schedule
    denoiser = DeepinvDenoiser(problem, grid, counter or CallCounter(), units)
    sde = deepinv.sampling.EDMDiffusionSDE(
        sigma_t=lambda t: units * schedule.noise_ratio(t),
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
    physics, y = _physics(problem, num_samples, units)
    shape = (num_samples, problem.operator.matrix().shape[1])
    with torch.no_grad():
        return model(y, physics, x_init=shape, seed=seed).detach() / units


def deepinv_dps(
    problem, num_steps, num_samples, seed, *, weight=1.0, guidance="norm", units=1.0, counter=None
):
    """``PosteriorDiffusion`` with ``DPSDataFidelity(clip=None)``: the prior score minus
    ``weight * grad ||A D(x) - y||`` (per draw) in the DDPM step."""
    fidelity = deepinv.sampling.DPSDataFidelity(weight=weight, clip=None, guidance=guidance)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter, units)


def deepinv_pigdm(problem, num_steps, num_samples, seed, *, weight=1.0, units=1.0, counter=None):
    """``PosteriorDiffusion`` with ``PiGDMDataFidelity`` (``r_t^2 = sigma^2 / (1 + sigma^2)``, unit
    data variance): ``units="unit"`` runs it where that holds, then it is our
    ``PiGDM(guidance="score")``."""
    fidelity = deepinv.sampling.PiGDMDataFidelity(weight=weight)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter, units)


def deepinv_mmps(problem, num_steps, num_samples, seed, *, cg_max_iter=3, units=1.0, counter=None):
    """``PosteriorDiffusion`` with ``MomentMatchingDataFidelity`` (its default: 3 CG iterations)."""
    fidelity = deepinv.sampling.MomentMatchingDataFidelity(cg_max_iter=cg_max_iter)
    return _deepinv_posterior(problem, num_steps, num_samples, seed, fidelity, counter, units)


def deepinv_ddrm(
    problem, num_steps, num_samples, seed, *, eta=0.85, etab=1.0, exact=False, counter=None
):
    """``deepinv.sampling.DDRM`` with the noise levels ``sigma_t / alpha_t`` of ``grid[:-1]`` (``K``
    calls; its output is ``D`` at ``t_1``, as ours). ``exact=True`` undoes its two unit-range
    assumptions by an exact change of units: every noise draw divided by sqrt(2) (declared levels
    and ``sigma_y`` times sqrt(2), the denoiser reads them back) and observed coordinates
    ``s_i > sigma_y`` (data scaled by ``1 / (sqrt(2) rho_T)``, so that the test is the
    official ``s_i rho_T > sigma_y``)."""
    grid = _grid(problem, num_steps)
    ratios = problem.prior.schedule.noise_ratio(grid[:-1])
    factor = math.sqrt(2.0) if exact else 1.0
    units = 1 / (factor * float(ratios[0])) if exact else 1.0
    denoiser = DeepinvDenoiser(problem, grid, counter or CallCounter(), units, factor)
    model = deepinv.sampling.DDRM(
        denoiser, sigmas=(ratios * units * factor).tolist(), eta=eta, etab=etab
    )
    physics, y = _physics(problem, num_samples, units, factor, decomposable=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DDRM seeds torch's global generator only for a truthy seed
        return model(y, physics).detach() / units


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
    "call, the wrapper casts back to float64); our matrix and sigma_y (float64) as deepinv "
    "physics, y repeated per draw. units=c (default 1) hands deepinv the problem scaled by c "
    "(x, y, sigma_y, noise levels) and rescales the draws: an exact change of units."
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
    "guidance is the noiseless form (no sigma_y, r_t^2 = 1); ours uses sigma_y and r_t^2 from the "
    "prior's variance.",
    "azula.tds": _AZULA_COMMON
    + " TDSSampler with our default 'inflated' twist (tau^2 = the prior's mean variance, "
    "evaluated in the SVD basis) as its twist(x0, sigma_t/alpha_t); azula resamples "
    "multinomially at every step (ours: systematic) and returns its last particles unweighted.",
    "azula.diffpir": _AZULA_COMMON
    + " DiffPIRDenoiser with its defaults (lambda = 10, 1 GMRES iteration), var_y = sigma_y^2, in "
    "DDPMSampler (eta = 1): azula's step is DDPM's ancestral step from the proximal estimate, "
    "ours is DiffPIR's (a fraction zeta = 0.1 of fresh noise), and azula solves the proximal "
    "step by one GMRES iteration where ours runs CG to convergence; lambda 10 against our "
    "official 1 (DiffPIR(lambda=10) matches it).",
    "deepinv.dps": _DEEPINV_COMMON
    + " PosteriorDiffusion + DPSDataFidelity(clip=None: the DPS class clips x0 to [-1, 1], which "
    "ruins means at +-16), weight 1, 'norm' guidance (per draw); EDMDiffusionSDE with sigma(t) = "
    "sigma_t/alpha_t and s(t) = alpha_t; DDPMSolver on our grid; minus_one_one=False in the SDE "
    "and in PosteriorDiffusion (no [-1, 1] state, no (x + 1)/2 on the output); start "
    "N(0, sigma_t^2) at t_K (ours: alpha^2 + sigma^2).",
    "deepinv.pigdm": _DEEPINV_COMMON
    + " As deepinv.dps with PiGDMDataFidelity (weight 1), whose r_t^2 = s^2/(1 + s^2) assumes unit "
    "data variance: units='unit' (1/rms prior std) makes that hold and gives our "
    "PiGDM(guidance='score').",
    "deepinv.mmps": _DEEPINV_COMMON
    + " As deepinv.dps with MomentMatchingDataFidelity (3 CG iterations, its default).",
    "deepinv.ddrm": _DEEPINV_COMMON
    + " deepinv.sampling.DDRM (eta 0.85, eta_b 1, as ours) on a DecomposablePhysics of our SVD "
    "(U pads/crops to d, mask = singular values padded with 0); sigmas = sigma_t/alpha_t on "
    "grid[:-1] (K calls, output D at t_1 as ours); it does no [-1, 1] rescaling in 0.5.0 but "
    "divides every noise draw by sqrt(2) and treats s_i <= sigma_y as unobserved (sigmas assumed "
    "to start at 1), both kept; exact=True undoes both by an exact change of units.",
    "deepinv.diffpir": "Not provided: deepinv.sampling.DiffPIR hard-codes the DDPM linear betas "
    "1e-4..0.02 over 1000 steps and its own time sequence, maps the state to [-1, 1] and clamps "
    "x0 to [-1, 1] unconditionally; none of these can be switched off through its interface.",
}


# --------------------------------------------------------------------------------- self-check
def _ours(problem, engine: tuple[str, dict], num_steps: int, num_samples: int, seed: int):
    from diffpost import posterior

    name, settings = engine
    result = posterior.sample(
        problem.model,
        getattr(posterior, name)(num_steps=num_steps, **settings),
        num_particles=num_samples,
        num_chains=1,
        seed=seed,
        progress=False,
        model_kwargs=problem.model_kwargs,
    )
    return result.get_samples(seed=seed)["x"]


#: label -> (runner, our matching engine and its settings, or None)
CHECKS: dict[str, tuple[Runner, tuple[str, dict] | None]] = {
    "azula.dps": (azula_dps, ("DPS", {})),
    "azula.dps zeta=0.5 chunk=1": (functools.partial(azula_dps, zeta=0.5, chunk=1), ("DPS", {})),
    "azula.mmps": (azula_mmps, ("MMPS", {})),
    "azula.mmps solver=cg": (functools.partial(azula_mmps, solver="cg"), ("MMPS", {})),
    "azula.pgdm": (azula_pgdm, ("PiGDM", {})),
    "azula.tds": (azula_tds, ("TDS", {})),
    "azula.tds vs multinomial": (azula_tds, ("TDS", {"resampling": "multinomial"})),
    "azula.diffpir": (azula_diffpir, None),
    "deepinv.dps": (deepinv_dps, ("DPS", {})),
    "deepinv.pigdm": (deepinv_pigdm, ("PiGDM", {})),
    "deepinv.pigdm units=unit": (
        functools.partial(deepinv_pigdm, units="unit"),
        ("PiGDM", {"guidance": "score"}),
    ),
    "deepinv.mmps": (deepinv_mmps, ("MMPS", {"cg_iterations": 3})),
    "deepinv.ddrm": (deepinv_ddrm, ("DDRM", {})),
    "deepinv.ddrm exact": (functools.partial(deepinv_ddrm, exact=True), ("DDRM", {})),
}


def main(num_samples: int = 500, seed: int = 0) -> None:
    from diffpost.diagnostics import sliced_wasserstein
    from diffpost.models.problems import gaussian_mixture_benchmark

    def distance(draws: Tensor, reference: Tensor) -> float:
        return sliced_wasserstein(draws, reference, seed=0, num_projections=256, p=2)

    print("| d | d_y | K | method | peer SW | ours SW (engine) | floor | calls | VJPs | |Δ| | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dim, obs_dim in ((8, 1), (80, 4)):
        problem = gaussian_mixture_benchmark(dim, obs_dim, seed=seed)
        exact = problem.exact_posterior()
        reference = exact.sample((num_samples,), generator=torch.Generator().manual_seed(1))
        other = exact.sample((num_samples,), generator=torch.Generator().manual_seed(2))
        floor = distance(other, reference)
        for num_steps in (20, 100):
            ours: dict[str, float] = {}
            for label, (run, engine) in CHECKS.items():
                key = repr(engine)
                counter = CallCounter()
                start = time.perf_counter()
                draws = run(problem, num_steps, num_samples, seed, counter=counter)
                wall = time.perf_counter() - start
                assert draws.shape == (num_samples, dim), draws.shape
                if engine is not None and key not in ours:
                    ours[key] = _ours(problem, engine, num_steps, num_samples, seed)
                mine, gap = "-", "-"
                if engine is not None:
                    settings = ", ".join(f"{k}={v!r}" for k, v in engine[1].items())
                    mine = f"{distance(ours[key], reference):.2f} ({engine[0]}({settings}))"
                    gap = f"{float((draws - ours[key]).norm(dim=1).median()):.1e}"
                per_draw = num_samples if "chunk=1" in label else 1  # one sampler call per draw
                sw = distance(draws, reference)
                print(
                    f"| {dim} | {obs_dim} | {num_steps} | {label} | {sw:.2f} | {mine} "
                    f"| {floor:.2f} | {counter.calls // per_draw} | {counter.vjps // per_draw} "
                    f"| {gap} | {wall:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
