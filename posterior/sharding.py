r"""One SMC run sharded over the processes of a ``torch.distributed`` group.

Launched with ``torchrun --nproc-per-node R`` (``gloo`` on CPU, ``nccl`` on GPUs), every process
calls :func:`diffpost.posterior.sample` with the same model, engine, seed and
``sharding=Sharding()``. The ``N`` particles of each chain are split into ``R`` contiguous slices
of ``N / R``: rank ``r`` holds particles ``r N/R, ..., (r + 1) N/R - 1`` of every chain, so its
denoiser calls, proposals and memory are ``1 / R`` of the run's. One step of the shared
Feynman–Kac core (:mod:`diffpost.posterior.engines.smc.core`) then does

1. **reweight**: each rank computes the incremental log-weights of its particles; they are
   gathered (``all_gather`` of ``(chains, N/R)``, small) so that every rank holds the whole
   ``(chains, N)`` log-weights, the ESS and the log-evidence;
2. **resample**: every rank draws the same ancestor indices from the run's generator (the same
   seed on every rank), so no index is sent;
3. **move**: a rank receives only the ancestors of its slots held by other ranks
   (``all_to_all_single`` with per-rank counts; particles that stay on their rank are not sent),
   with everything the engine carries per particle (its cache) in the same message.

The particles' noise comes in two modes (:class:`Sharding`'s ``noise``):

- ``"global"`` (default): every rank draws the noise of the whole run from the shared generator
  and keeps its rows, so the run equals the single-process run with the same seed up to the
  floating-point order of batched reductions (tested with two ``gloo`` processes). Drawing costs
  the whole run's noise on every rank (time and a transient ``(chains * N, *event)`` buffer).
- ``"per_rank"``: each rank draws only its rows, from its own generator seeded by the run's seed
  and its rank: the same law, other draws, and nothing drawn for the other ranks (the mode for
  runs whose noise would not fit in one process).

Chain-level draws (FPS's and SMCDiff's measurement paths) and the resampling uniforms always come
from the shared generator. The final particles are gathered on every rank, so each returns the
whole :class:`~diffpost.posterior.ParticleSet`.

On one machine, :func:`launch_local` starts such a group without ``torchrun`` (a file rendezvous
and ``gloo`` sockets on the loopback address; ``torchrun``'s TCP store listens on every
interface): the tests and ``benchmarks/sharded.py`` use it. A script that runs under both calls
:func:`init_process_group`.

Limits: SMC engines only (the family ``"smc"``), no plate, ``num_particles`` divisible by the
world size. An exception on one rank (e.g. the denoiser failing) is not seen by the others, which
wait in their next collective until the process group's timeout (set it with
``init_process_group(timeout=...)``); non-finite particles and collapsed weights are agreed on by
all ranks and raise :class:`~diffpost.posterior.EngineFailed` everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NOISE_MODES",
    "ParticleShard",
    "Sharding",
    "active_shard",
    "agreed_seed",
    "current_shard",
    "init_process_group",
    "launch_local",
    "particle_noise",
    "process_group_module",
    "take_ancestors",
]

#: how the particles' noise is drawn under sharding (see the module docstring)
NOISE_MODES = ("global", "per_rank")


@dataclass(frozen=True)
class Sharding:
    """How :func:`~diffpost.posterior.sample` splits one SMC run over a process group.

    Attributes:
        group: the ``torch.distributed`` process group (``None``: the default group, set up by
            ``torch.distributed.init_process_group`` before the call).
        noise: ``"global"`` (the single-process run's draws, every rank drawing all of them) or
            ``"per_rank"`` (each rank draws its own rows from its own stream).
    """

    group: Any = None
    noise: str = "global"

    def __post_init__(self):
        if not isinstance(self.noise, str) or self.noise not in NOISE_MODES:
            raise ValueError(f"Sharding: noise must be one of {NOISE_MODES}; got {self.noise!r}")


@dataclass
class ParticleShard:
    """This process's slice of a sharded run, and the collectives the SMC core calls.

    Attributes:
        rank, world_size: this process's rank in ``group`` and the group's size ``R``.
        num_chains: chains of the run (every rank holds a slice of each).
        num_particles: ``N``, particles per chain of the whole run.
        noise: the noise mode of :class:`Sharding`.
        group: the process group.
        generator: this rank's own generator (``noise="per_rank"``), else ``None``.
        rows_moved, bytes_moved: particle rows and bytes this rank sent to others so far.
        device: where the run's tensors live (the collectives' flags go there for nccl).
        exchanges: ancestor moves so far (collective calls of :meth:`take`).
    """

    rank: int
    world_size: int
    num_chains: int
    num_particles: int
    noise: str = "global"
    group: Any = None
    generator: torch.Generator | None = None
    rows_moved: int = 0
    bytes_moved: int = 0
    exchanges: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def create(
        cls, sharding: Sharding, num_chains: int, num_particles: int, seed: int, device
    ) -> ParticleShard:
        """The shard of this process for a run of ``num_chains x num_particles`` particles.

        Raises:
            RuntimeError: no initialised ``torch.distributed`` process group.
            ValueError: ``num_particles`` not divisible by the world size.
        """
        dist = process_group_module()
        world = dist.get_world_size(sharding.group)
        rank = dist.get_rank(sharding.group)
        if num_particles % world:
            raise ValueError(
                f"num_particles={num_particles} must be divisible by the {world} processes of "
                "the sharded run (each holds the same slice of every chain)"
            )
        generator = None
        if sharding.noise == "per_rank":
            entropy = np.random.SeedSequence([int(seed), rank]).generate_state(2, np.uint64)
            generator = torch.Generator(device=device).manual_seed(int(entropy[0]) & (2**63 - 1))
        return cls(
            rank=rank,
            world_size=world,
            num_chains=num_chains,
            num_particles=num_particles,
            noise=sharding.noise,
            group=sharding.group,
            generator=generator,
            device=torch.device(device),
        )

    # ------------------------------------------------------------------ layout
    @property
    def local_particles(self) -> int:
        """``N / R``: particles per chain on each rank."""
        return self.num_particles // self.world_size

    def local_count(self, count: int) -> int:
        """This rank's rows of a run-wide particle count ``chains * N``."""
        if count != self.num_chains * self.num_particles:
            raise ValueError(
                f"a sharded run draws its {self.num_chains} x {self.num_particles} particles "
                f"at once; got a draw of {count}"
            )
        return self.num_chains * self.local_particles

    def rows(self, value: Tensor) -> Tensor:
        """This rank's rows ``(chains * N/R, ...)`` of a run-wide ``(chains * N, ...)`` tensor."""
        n, start = self.local_particles, self.rank * self.local_particles
        shaped = value.reshape(self.num_chains, self.num_particles, *value.shape[1:])
        return shaped[:, start : start + n].reshape(-1, *value.shape[1:])

    # ------------------------------------------------------------------ collectives
    def _all_gather(self, value: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        value = value.contiguous()
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value, group=self.group)
        return parts

    def gather_columns(self, value: Tensor) -> Tensor:
        """``(chains, N/R)`` per rank -> ``(chains, N)`` on every rank (log-weights)."""
        return torch.cat(self._all_gather(value), dim=1)

    def gather_rows(self, value: Tensor) -> Tensor:
        """``(chains * N/R, ...)`` per rank -> ``(chains * N, ...)`` on every rank, chain-major
        (the final particles)."""
        parts = [
            part.reshape(self.num_chains, self.local_particles, *value.shape[1:])
            for part in self._all_gather(value.detach())
        ]
        return torch.cat(parts, dim=1).reshape(-1, *value.shape[1:])

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce of a byte)."""
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def draw_noise(
        self, shape: tuple[int, ...], generator: torch.Generator, dtype, device
    ) -> Tensor:
        """Standard normal noise for this rank's particles, ``shape = (chains * N/R, ...)``."""
        if self.noise == "per_rank":
            return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)
        whole = (self.num_chains * self.num_particles, *shape[1:])
        return self.rows(torch.randn(whole, generator=generator, dtype=dtype, device=device))

    def take(self, indices: Tensor, tensors: tuple[Tensor | None, ...]) -> tuple:
        """Each tensor's rows at the ancestors ``indices`` (run-wide flat indices
        ``(chains * N,)``, the same on every rank) for this rank's slots; ``None`` passes."""
        n, local, rank = self.num_particles, self.local_particles, self.rank
        chains = self.num_chains
        position = torch.arange(chains * n, device=indices.device)
        destination = (position % n) // local
        source = (indices % n) // local
        source_row = (indices // n) * local + (indices % n) % local  # row on the source rank
        mine = destination == rank
        if not bool((source != destination).any()):  # nothing changes rank anywhere
            rows = source_row[mine]
            return tuple(None if t is None else t[rows] for t in tensors)
        self.exchanges += 1
        present = [t for t in tensors if t is not None]
        flat = [t.detach().reshape(t.shape[0], -1) for t in present]
        dtypes = list(dict.fromkeys(t.dtype for t in flat))
        received = {}
        for dtype in dtypes:  # one message per dtype (usually one)
            group = [t for t in flat if t.dtype == dtype]
            widths = [t.shape[1] for t in group]
            joined = torch.cat(group, dim=1)
            out = self._exchange(joined, source, destination, source_row, mine)
            received[dtype] = list(torch.split(out, widths, dim=1))
        results = []
        for t in tensors:
            if t is None:
                results.append(None)
                continue
            part = received[t.dtype].pop(0)
            results.append(part.reshape(-1, *t.shape[1:]))
        return tuple(results)

    def _exchange(
        self, rows: Tensor, source: Tensor, destination: Tensor, source_row: Tensor, mine: Tensor
    ) -> Tensor:
        """``rows`` ``(chains * N/R, width)`` of this rank -> the rows of its slots' ancestors."""
        import torch.distributed as dist

        rank, world = self.rank, self.world_size
        # what this rank sends: its rows wanted by each other rank, in the order of their slots
        sending = (source == rank) & (destination != rank)
        order = torch.argsort(destination[sending], stable=True)
        send_rows = source_row[sending][order]
        send_counts = torch.bincount(destination[sending], minlength=world).tolist()
        # what it receives: its slots' ancestors held elsewhere, grouped by source rank
        receiving = mine & (source != rank)
        slot = torch.nonzero(mine).flatten()  # run-wide positions of this rank's slots
        local_slot = torch.arange(slot.shape[0], device=slot.device)
        away = receiving[slot]
        by_source = torch.argsort(source[slot][away], stable=True)
        recv_slots = local_slot[away][by_source]
        recv_counts = torch.bincount(source[slot][away], minlength=world).tolist()

        outgoing = rows[send_rows].contiguous()
        incoming = rows.new_empty((sum(recv_counts), rows.shape[1]))
        dist.all_to_all_single(
            incoming,
            outgoing,
            output_split_sizes=recv_counts,
            input_split_sizes=send_counts,
            group=self.group,
        )
        self.rows_moved += outgoing.shape[0]
        self.bytes_moved += outgoing.numel() * outgoing.element_size()
        result = rows[source_row[slot]]  # the rows that stay here (the others are replaced)
        result[recv_slots] = incoming
        return result

    def summary(self) -> dict[str, Any]:
        """What the run records in ``info["sharding"]``."""
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "noise": self.noise,
            "rows_moved": self.rows_moved,
            "bytes_moved": self.bytes_moved,
            "exchanges": self.exchanges,
        }


def process_group_module():
    """``torch.distributed``, once a process group is initialised.

    Raises:
        RuntimeError: no initialised process group (how to start one).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sharding needs an initialised torch.distributed process group: launch with "
            "torchrun and call torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    return dist


def agreed_seed(seed: int | None, sharding: Sharding, device: torch.device) -> int:
    """The seed every rank of a sharded run uses: rank 0's draw when ``seed`` is ``None``;
    otherwise ``seed``, which must be the same on every rank (one ``all_gather`` of two
    integers).

    Raises:
        RuntimeError: no initialised process group.
        ValueError: ranks passed different seeds (on every rank).
    """
    dist = process_group_module()
    backend_device = device if dist.get_backend(sharding.group) == "nccl" else "cpu"
    mine = secrets.randbits(63) if seed is None else int(seed)
    value = torch.tensor([mine, seed is None], dtype=torch.int64, device=backend_device)
    seeds = [torch.empty_like(value) for _ in range(dist.get_world_size(sharding.group))]
    dist.all_gather(seeds, value, group=sharding.group)
    passed = [None if bool(v[1]) else int(v[0]) for v in seeds]
    if len(set(passed)) > 1:
        raise ValueError(f"every rank of a sharded run must pass the same seed; got {passed}")
    return int(seeds[0][0])


_SHARD: contextvars.ContextVar[ParticleShard | None] = contextvars.ContextVar(
    "diffpost_particle_shard", default=None
)


def current_shard() -> ParticleShard | None:
    """The shard of the sharded run in progress in this context, or ``None``."""
    return _SHARD.get()


@contextlib.contextmanager
def active_shard(shard: ParticleShard | None) -> Iterator[ParticleShard | None]:
    """Make ``shard`` the current one for the duration of a run (the driver's job)."""
    token = _SHARD.set(shard)
    try:
        yield shard
    finally:
        _SHARD.reset(token)


def particle_noise(shape: tuple[int, ...], generator: torch.Generator, dtype, device) -> Tensor:
    """Standard normal noise for the particles of a step, ``shape = (particles, *event)``: a plain
    ``torch.randn`` in one process, this rank's rows of the run's noise under sharding."""
    shard = _SHARD.get()
    if shard is None:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return shard.draw_noise(tuple(shape), generator, dtype, device)


def take_ancestors(indices: Tensor, *tensors: Tensor | None) -> tuple:
    """Each tensor's rows at the resampled ancestors ``indices`` (flat ``(chains * N,)``);
    ``None`` passes through. Under sharding, only the rows that change rank are sent."""
    shard = _SHARD.get()
    if shard is None:
        return tuple(None if t is None else t[indices] for t in tensors)
    return shard.take(indices, tensors)


#: the environment variable :func:`launch_local` passes its rendezvous in
INIT_METHOD_VARIABLE = "DIFFPOST_INIT_METHOD"


def init_process_group(backend: str = "gloo", **kwargs) -> None:
    """``torch.distributed.init_process_group`` for a process started by ``torchrun`` or by
    :func:`launch_local`: the rank and world size from ``RANK`` and ``WORLD_SIZE``, the
    rendezvous from :func:`launch_local`'s file when there is one (``env://`` otherwise).

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process).
        kwargs: passed on (e.g. ``timeout=datetime.timedelta(seconds=120)``).
    """
    import torch.distributed as dist

    dist.init_process_group(
        backend,
        init_method=os.environ.get(INIT_METHOD_VARIABLE, "env://"),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        **kwargs,
    )


def launch_local(
    argv: Sequence[str], num_processes: int, *, timeout: float
) -> list[subprocess.CompletedProcess]:
    """Run ``python argv...`` in ``num_processes`` processes of one process group on this
    machine, bounded in time, and wait for all of them.

    The processes find each other through a file in a fresh temporary folder (nothing listens on
    a network port for the rendezvous), ``gloo`` and NCCL's bootstrap bind to the loopback
    interface (``GLOO_SOCKET_IFNAME=lo``, ``NCCL_SOCKET_IFNAME=lo``); each process gets ``RANK``,
    ``LOCAL_RANK`` and ``WORLD_SIZE`` and calls :func:`init_process_group`.

    Args:
        argv: the script and its arguments.
        num_processes: the group's size.
        timeout: seconds for the whole group; on expiry every process is killed.

    Returns:
        One ``CompletedProcess`` per rank (``returncode``, ``stdout``, ``stderr`` as text).

    Raises:
        subprocess.TimeoutExpired: the group did not finish in ``timeout`` (all killed).
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer; got {num_processes!r}")
    with tempfile.TemporaryDirectory(prefix="diffpost-group-") as folder:
        base = dict(os.environ)
        base.update(
            {
                INIT_METHOD_VARIABLE: f"file://{folder}/rendezvous",
                "WORLD_SIZE": str(num_processes),
                "GLOO_SOCKET_IFNAME": "lo",
                "NCCL_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", "1"),
            }
        )
        processes = [
            subprocess.Popen(
                [sys.executable, *argv],
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(num_processes)
        ]
        try:
            outputs = [process.communicate(timeout=timeout) for process in processes]
        except subprocess.TimeoutExpired:
            for process in processes:
                process.kill()
                process.communicate()
            raise
        return [
            subprocess.CompletedProcess(process.args, process.returncode, out, err)
            for process, (out, err) in zip(processes, outputs, strict=True)
        ]
