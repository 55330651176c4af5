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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffpost.posterior.problem import Problem

__all__ = ["Engine", "EngineFailed"]


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

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(
                f"{self.name}: num_steps must be a non-negative integer; got {self.num_steps!r}"
            )

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

    def fitted(self, problem: Problem, state) -> dict[str, Any]:
        """What the run fitted besides the particles (default none), kept in
        :attr:`ParticleSet.fitted <posterior.ParticleSet.fitted>`; e.g. a variational family that
        can draw more samples."""
        return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
