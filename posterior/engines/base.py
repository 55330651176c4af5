"""What every engine is: a frozen dataclass of hyperparameters with ``init`` and ``step``.

An engine holds no state of its own. ``init(problem, num_chains, num_particles, generator)``
returns a state (a ``NamedTuple``) with at least

- ``particles``: ``(num_chains * num_particles, *event)``, chains stacked along the first dim;
- ``log_weights``: ``(num_chains, num_particles)`` normalised per chain (zeros minus
  ``log num_particles`` for unweighted engines);
- ``log_evidence``: ``(num_chains,)`` running estimate of ``log p(y)``, or ``None``;

and ``step(problem, state, generator) -> (state, info)`` advances it by one iteration, with
``info`` a dict of per-step statistics (tensors of shape ``(num_chains,)`` or scalars). The driver
(:func:`diffpost.posterior.sample`) owns the loop, the progress bar, callbacks and the statistics.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffpost.posterior.problem import NonFiniteParticles, Problem
from diffpost.posterior.sharding import current_shard

__all__ = [
    "FAMILIES",
    "Draws",
    "Engine",
    "EngineFailed",
    "EngineState",
    "check_state",
    "import_engines",
    "registry",
    "run",
]

#: engine families, in the order :func:`registry` lists them
FAMILIES = ("exact", "smc", "explicit", "langevin", "variational", "hierarchical")

_REGISTRY: dict[str, type[Engine]] = {}


class EngineFailed(RuntimeError):
    """An engine produced non-finite particles or collapsed weights.

    Attributes:
        engine: the engine's name.
        step: the iteration (0 is ``init``).
        t: the diffusion time of that step, if the engine has one.
        reason: what went wrong.
    """

    def __init__(self, engine: str, step: int, t: float | None, reason: str):
        self.engine, self.step, self.t, self.reason = engine, step, t, reason
        where = f"step {step}" + (f" (t = {t:.4g})" if t is not None else "")
        super().__init__(f"{engine} failed at {where}: {reason}")


@runtime_checkable
class EngineState(Protocol):
    """The fields every engine's state shares (each engine's state is its own ``NamedTuple`` with
    these first, then what its algorithm carries).

    Attributes:
        particles: ``(num_chains * num_particles, *event)``, chains stacked along the first dim.
        log_weights: ``(num_chains, num_particles)``, normalised per chain (``-log N`` for
            unweighted engines).
        log_evidence: ``(num_chains,)`` running estimate of ``log p(y)``, or ``None``.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor | None


class Draws(NamedTuple):
    """What a run returns, before the driver wraps it into a
    :class:`~diffpost.posterior.particles.ParticleSet`.

    Attributes:
        values: site name -> ``(chains, draws, *shape)``: the signal, and the global latents of
            engines that infer them.
        log_weights: ``(chains, draws)``, normalised per chain.
        log_evidence: ``(chains,)`` or ``None``.
        log_likelihood: ``(chains, draws)`` of each draw, or ``None`` (the driver then computes it
            for the signal when the likelihood is finite).
    """

    values: dict[str, Tensor]
    log_weights: Tensor
    log_evidence: Tensor | None = None
    log_likelihood: Tensor | None = None


@dataclass(frozen=True)
class Engine:
    """Base class of inference engines.

    Attributes:
        num_steps: number of iterations the driver runs after ``init``.
        requires: capabilities the problem must offer (see
            :data:`diffpost.posterior.problem.CAPABILITIES`).
    """

    num_steps: int = 0
    requires: ClassVar[frozenset[str]] = frozenset()
    #: whether the engine infers global latents (noise levels, operator parameters) besides the
    #: signal; a problem with free global latents is refused to every other engine
    infers_globals: ClassVar[bool] = False
    #: whether ``step`` may reorder or duplicate particles (resampling): per-particle side
    #: information, such as one global-latent value per particle, cannot follow them
    reorders_particles: ClassVar[bool] = False
    #: whether the final state's ``log_evidence`` estimates log p(y) without bias in p(y)
    #: (exact, or an SMC estimate), as particle marginal Metropolis-Hastings needs
    estimates_evidence: ClassVar[bool] = False
    #: whether the engine infers two signals with diffusion priors (an image and its kernel)
    infers_two_signals: ClassVar[bool] = False
    #: whether the particles of one chain are independent draws (after their weights); False for
    #: resampling filters, interacting particles and MCMC chains, whose independent draws are one
    #: per chain (:meth:`~diffpost.posterior.ParticleSet.independent_draws`)
    independent_particles: ClassVar[bool] = True
    #: whether the update reads the observation's noise level; False for DPS and BlindDPS,
    #: whose step normalises by the residual norm (the official rule): their draws do not
    #: change with sigma, which the run records as ``info["uses_noise_level"]``
    uses_noise_level: ClassVar[bool] = True

    #: the engine's family (one of :data:`FAMILIES`), set by the class keyword ``family=`` that
    #: also registers the engine (:func:`registry`); ``None`` for bases and unregistered engines
    family: ClassVar[str | None] = None

    def __init_subclass__(cls, family: str | None = None, **kwargs):
        """``class MyEngine(Engine, family="smc")`` registers ``MyEngine`` under its class name:
        it then appears in :func:`registry`, in :mod:`diffpost.posterior` and in the conformance
        suite. Subclasses without the keyword inherit the family and are not registered."""
        super().__init_subclass__(**kwargs)
        if family is None:
            return
        if family not in FAMILIES:
            raise ValueError(f"{cls.__name__}: family must be one of {FAMILIES}; got {family!r}")
        known = _REGISTRY.get(cls.__name__)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"an engine named {cls.__name__!r} is already registered (from {known.__module__})"
            )
        cls.family = family
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self):
        if (
            isinstance(self.num_steps, bool)
            or not isinstance(self.num_steps, int)
            or self.num_steps < 0
        ):
            raise ValueError(
                f"{self.name}: num_steps must be a non-negative integer; got {self.num_steps!r}"
            )
        for field in dataclasses.fields(self):  # e.g. learning_rate=inf, which fails at step 1
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{self.name}: {field.name} must be finite; got {value}")

    @property
    def name(self) -> str:
        return type(self).__name__

    def config(self) -> dict[str, Any]:
        """The hyperparameters as a JSON-able dict."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def init(
        self, problem: Problem, num_chains: int, num_particles: int, generator: torch.Generator
    ):
        raise NotImplementedError

    def iterations(self, state) -> int:
        """How many times the driver calls :meth:`step` after ``init`` (default ``num_steps``)."""
        return self.num_steps

    def step(
        self, problem: Problem, state, generator: torch.Generator
    ) -> tuple[Any, dict[str, Tensor]]:
        raise NotImplementedError

    def draws(self, problem: Problem, state, num_chains: int) -> Draws:
        """The run's result from its final state (default: the particles under the signal's
        name, with the state's weights and evidence)."""
        particles = state.particles.detach()
        shape = (num_chains, -1) + tuple(problem.event_shape)
        evidence = getattr(state, "log_evidence", None)
        return Draws(
            values={problem.latent_name: particles.reshape(shape)},
            log_weights=state.log_weights.detach(),
            log_evidence=None if evidence is None else evidence.detach(),
        )

    def particle_time(self, state) -> float | None:
        """The diffusion time of ``state.particles`` (their noise level), or ``None`` when the
        particles are not points of the diffusion at one time."""
        return None

    def fitted(self, problem: Problem, state) -> dict[str, Any]:
        """What the run fitted besides the particles (default none), kept in
        :attr:`ParticleSet.fitted <posterior.ParticleSet.fitted>`; e.g. a variational family that
        can draw more samples."""
        return {}


def registry(family: str | None = None) -> dict[str, type[Engine]]:
    """The registered engines, name -> class, by family (in :data:`FAMILIES` order) then name.

    Args:
        family: only this family's engines (default all).

    Raises:
        ValueError: an unknown family.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    ordered = sorted(_REGISTRY.items(), key=lambda item: (FAMILIES.index(item[1].family), item[0]))
    return {name: cls for name, cls in ordered if family in (None, cls.family)}


def import_engines(package: str, path: Iterable[str]) -> dict[str, type[Engine]]:
    """Import every module under ``package`` (``__name__`` and ``__path__`` of a package's
    ``__init__``) and return the engines registered from it: how the engine packages export
    their engines without a hand-kept list."""
    for module in pkgutil.walk_packages(path, prefix=package + "."):
        importlib.import_module(module.name)
    return {
        name: cls
        for name, cls in registry().items()
        if cls.__module__ == package or cls.__module__.startswith(package + ".")
    }


def check_state(engine: Engine, state: Any, step: int, t: float | None) -> None:
    """Raise :class:`EngineFailed` on non-finite particles or collapsed weights, and
    ``TypeError`` on an initial state without the shared fields of :class:`EngineState` (checked
    once: the Protocol check costs more than the step of a small problem's cheap engines)."""
    if step == 0 and not isinstance(state, EngineState):  # the type is fixed by init
        missing = [f for f in ("particles", "log_weights", "log_evidence") if not hasattr(state, f)]
        raise TypeError(
            f"{engine.name}.init returned a {type(state).__name__} "
            f"without the EngineState fields {missing}"
        )
    particles = state.particles  # one reduction: a finite sum has no inf or nan term, and a sum
    # that overflows (every term finite but huge) is settled by the element-wise check
    finite = bool(torch.isfinite(particles.sum())) or bool(torch.isfinite(particles).all())
    shard = current_shard()
    if shard is not None:  # every rank of a sharded run fails together, or none does
        finite = shard.all_true(finite)
    if not finite:
        raise EngineFailed(engine.name, step, t, "non-finite particles")
    log_weights = state.log_weights
    if torch.isnan(log_weights).any() or not torch.isfinite(torch.logsumexp(log_weights, -1)).all():
        raise EngineFailed(
            engine.name, step, t, "collapsed weights (no particle has positive weight)"
        )


def run(
    engine: Engine,
    problem: Problem,
    num_chains: int,
    num_particles: int,
    generator: torch.Generator,
    *,
    steps: Callable[[Iterable[int]], Iterable[int]] | None = None,
    callback: Callable[[int, Any, dict[str, Tensor]], None] | None = None,
) -> tuple[Any, list[dict[str, Tensor]]]:
    """Run ``engine`` on ``problem`` to the end: ``init``, then every ``step``.

    The loop of :func:`~diffpost.posterior.sample`, also used by engines that run others (the
    hierarchical mechanisms). Non-finite particles, collapsed weights and non-finite particles
    reaching the likelihood raise :class:`EngineFailed` with the step.

    Args:
        engine, problem: what to run on what (``problem.require(engine)`` already checked).
        num_chains, num_particles: the state's sizes.
        generator: every random draw.
        steps: wraps the range of step indices (e.g. a progress bar).
        callback: ``callback(step, state, info)`` after every step.

    Returns:
        ``(state, infos)``: the final state and the per-step ``info`` dicts.
    """
    try:
        state = engine.init(problem, num_chains, num_particles, generator)
    except NonFiniteParticles as error:
        raise EngineFailed(engine.name, 0, None, str(error)) from error
    check_state(engine, state, 0, None)
    records = []
    indices: Iterable[int] = range(engine.iterations(state))
    for step in indices if steps is None else steps(indices):
        try:
            state, info = engine.step(problem, state, generator)
        except NonFiniteParticles as error:
            raise EngineFailed(engine.name, step + 1, None, str(error)) from error
        t = info.get("t")
        check_state(
            engine, state, step + 1, None if t is None else float(torch.as_tensor(t).reshape(-1)[0])
        )
        records.append(info)
        if callback is not None:
            callback(step, state, info)
    return state, records


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
