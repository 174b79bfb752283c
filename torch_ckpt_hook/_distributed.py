"""The package's own process group for checkpoint collectives (SPEC.md section 5.2).

When ``torch.distributed`` is initialized with more than one rank, a runner opens a
``CheckpointGroup`` at session creation and closes it at close. It holds two gloo groups of its
own, so checkpoint collectives never interleave with the training's (NCCL or gloo) collectives,
nor with each other:

- the *step* group, used on the training thread only: the per-step trigger and stop agreement,
  gathering per-rank state at a save, the restore choice;
- the *writer* group, used on the writer thread only: DCP's planning collectives and the commit
  agreement of a save, which run while training goes on.

Everything exchanged is small and lives on the CPU, so gloo serves NCCL training as well. Objects
travel as ``torch.save`` bytes and are read back with ``weights_only=True``, like a checkpoint.
``SingleProcessGroup`` is the trivial implementation: one rank, no collectives (a process
without ``torch.distributed``, and tests).
"""

from __future__ import annotations

import abc
import datetime
import io
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The gloo timeout of the package's groups: how long a rank waits for the others at a
# collective (a step's agreement waits for the slowest rank's step). torch's default.
TIMEOUT_ENV = "TORCH_CKPT_HOOK_DIST_TIMEOUT_SECS"
DEFAULT_TIMEOUT_SECS = 1800.0


def _encode(obj: object) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _decode(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


class CheckpointGroup(abc.ABC):
    """The ranks of a run, as the checkpoint machinery sees them."""

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's rank."""

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """How many ranks take part."""

    @property
    def is_chief(self) -> bool:
        """Whether this rank writes the replicated files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    @property
    @abc.abstractmethod
    def writer_process_group(self) -> Any:
        """The ``ProcessGroup`` for the writer thread's collectives (DCP), or None."""

    @property
    @abc.abstractmethod
    def step_process_group(self) -> Any:
        """The ``ProcessGroup`` for the training thread's collectives (DCP restore), or None."""

    @abc.abstractmethod
    def max_all(self, values: list[int]) -> list[int]:
        """Element-wise maximum of ``values`` over the ranks (training thread)."""

    @abc.abstractmethod
    def all_gather(self, obj: object, *, writer: bool = False) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank (``writer``: on the writer thread)."""

    @abc.abstractmethod
    def broadcast(self, obj: object) -> Any:
        """The chief's ``obj`` on every rank (training thread)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the groups (idempotent)."""


class SingleProcessGroup(CheckpointGroup):
    """One rank, no collectives."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def writer_process_group(self) -> Any:
        return None

    @property
    def step_process_group(self) -> Any:
        return None

    def max_all(self, values: list[int]) -> list[int]:
        return list(values)

    def all_gather(self, obj: object, *, writer: bool = False) -> list[Any]:
        return [obj]

    def broadcast(self, obj: object) -> Any:
        return obj

    def close(self) -> None:
        pass


class GlooCheckpointGroup(CheckpointGroup):
    """Two gloo groups over every rank of the default group (a collective to create)."""

    def __init__(self, timeout_secs: float) -> None:
        dist = torch.distributed
        timeout = datetime.timedelta(seconds=timeout_secs)
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()
        self._step: Any = dist.new_group(backend="gloo", timeout=timeout)
        self._writer: Any = dist.new_group(backend="gloo", timeout=timeout)
        self._closed = False

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def writer_process_group(self) -> Any:
        return self._writer

    @property
    def step_process_group(self) -> Any:
        return self._step

    def max_all(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(tensor, torch.distributed.ReduceOp.MAX, group=self._step)
        return [int(v) for v in tensor.tolist()]

    def all_gather(self, obj: object, *, writer: bool = False) -> list[Any]:
        dist = torch.distributed
        group = self._writer if writer else self._step
        data = _encode(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self._world_size)]
        dist.all_gather(parts, padded, group=group)
        return [_decode(p[: int(s.item())]) for p, s in zip(parts, sizes, strict=True)]

    def broadcast(self, obj: object) -> Any:
        dist = torch.distributed
        data = _encode(obj) if self.is_chief else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(size, 0, group=self._step)
        buffer = data if self.is_chief else torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buffer, 0, group=self._step)
        return obj if self.is_chief else _decode(buffer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dist = torch.distributed
        if not dist.is_initialized():
            return  # the default group went first: ours went with it
        for group in (self._step, self._writer):
            try:
                dist.destroy_process_group(group)
            except Exception:  # a peer died: the group is gone either way
                logger.debug("Could not destroy a checkpoint process group", exc_info=True)


def timeout_secs() -> float:
    """The collectives' timeout: ``TORCH_CKPT_HOOK_DIST_TIMEOUT_SECS``, else 30 minutes."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_SECS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def open_checkpoint_group() -> CheckpointGroup:
    """The run's group: gloo groups of its own when ``torch.distributed`` runs several ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GlooCheckpointGroup(timeout_secs())
    return SingleProcessGroup()
