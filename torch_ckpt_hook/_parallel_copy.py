"""Host-to-host tensor copies spread over every core, for the time the training loop is blocked.

Staging on the CPU is a ``memcpy`` the loop waits for, and one thread copies at a fraction of the
machine's memory bandwidth. ``copy_`` releases the GIL, so the copies are cut into pieces of
about ``chunk_bytes`` (large tensors split along a dimension, small ones grouped) and run on a
pool of threads, one per core this process may use. torch's own intra-op thread count
(``torch.set_num_threads``) is the user's setting for their step and is left alone.

``parallel_copy`` returns only once every piece has finished, well or not: no worker still
writes a buffer after it returns, and the first error of a worker is raised on the calling
thread (any others are logged at debug: one is enough to fail the save).

Threads: the pool's workers only run ``copy_`` on pieces the calling thread handed them; the
destination buffers belong to the caller (the staging area) before and after the call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import torch

logger = logging.getLogger(__name__)

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (destination, source)

# Below this many bytes in all, one thread copies: handing pieces to a pool costs tens of
# microseconds, which a copy this small does not repay.
PARALLEL_MIN_BYTES = 4 << 20
# The piece size bounds: small enough that the workers finish together, large enough that the
# per-piece overhead (a future, a narrow) stays far below the copy itself.
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20


def usable_cores() -> int:
    """How many cores this process may run on (its affinity mask, where the OS has one)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    def run() -> None:
        for dst, src in pairs:
            dst.copy_(src)

    return run


def _copy_narrow(
    dst: torch.Tensor, src: torch.Tensor, dim: int, start: int, length: int
) -> Callable[[], None]:
    def run() -> None:
        dst.narrow(dim, start, length).copy_(src.narrow(dim, start, length))

    return run


def _split(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int) -> list[Callable[[], None]]:
    """Pieces of ``dst.copy_(src)`` of about ``chunk_bytes`` each (one piece when it is small).

    Contiguous pairs are cut along their flat view; others along the first dimension with
    enough rows, so that each piece is a plain strided copy of disjoint destination memory.
    """
    pieces = min(-(-_nbytes(dst) // chunk_bytes), dst.numel())
    whole = [_copy_all([(dst, src)])]
    if pieces <= 1 or dst.shape != src.shape:
        return whole  # a broadcast copy, or nothing worth splitting
    if dst.is_contiguous() and src.is_contiguous():
        dst, src, dim = dst.view(-1), src.view(-1), 0
    else:
        dim = next((d for d in range(dst.dim()) if dst.shape[d] >= pieces), -1)
        if dim < 0:
            return whole
    size = dst.shape[dim]
    step = -(-size // pieces)
    return [_copy_narrow(dst, src, dim, a, min(step, size - a)) for a in range(0, size, step)]


def plan(pairs: Pairs, workers: int, chunk_bytes: int | None = None) -> list[Callable[[], None]]:
    """The copies of ``pairs`` as pieces of similar size for ``workers`` threads.

    ``chunk_bytes`` (default: a quarter of each worker's share, within 1-64 MiB) is the piece
    size: a tensor that large is split, smaller ones are grouped up to it.
    """
    if chunk_bytes is None:
        total = sum(_nbytes(dst) for dst, _ in pairs)
        share = total // (4 * max(1, workers))
        chunk_bytes = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, share))
    chunk = max(1, chunk_bytes)
    tasks: list[Callable[[], None]] = []
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            tasks.append(_copy_all(group))
        group, group_bytes = [], 0

    for dst, src in pairs:
        nbytes = _nbytes(dst)
        if nbytes >= chunk:
            tasks.extend(_split(dst, src, chunk))
            continue
        group.append((dst, src))
        group_bytes += nbytes
        if group_bytes >= chunk:
            flush()
    flush()
    return tasks


class CopyPool:
    """A lazily started pool of copy threads, restarted in a forked child (threads do not fork)."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        min_bytes: int = PARALLEL_MIN_BYTES,
        chunk_bytes: int | None = None,
    ) -> None:
        self.workers = usable_cores() if workers is None else max(1, workers)
        # Below min_bytes in all, the calling thread copies alone; chunk_bytes: see plan().
        self._min_bytes = min_bytes
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def _executor(self) -> futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # A pool inherited through fork has no threads behind it: never reuse it.
                self._pool = futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="torch_ckpt_hook-copy"
                )
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        """Stop the threads (a later ``copy`` starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def copy(self, pairs: Pairs) -> None:
        """``dst.copy_(src)`` for every pair, on all workers; returns when every copy is done.

        Raises:
            Exception: the first error a piece raised, once every other piece has finished.
        """
        total = sum(_nbytes(dst) for dst, _ in pairs)
        # Only host memory is copied from several threads: another backend's copies (MPS, XPU)
        # may not be safe to issue concurrently, and they go through its own queue anyway.
        host = all(src.device.type == "cpu" for _, src in pairs)
        if self.workers == 1 or total < self._min_bytes or not host:
            for dst, src in pairs:
                dst.copy_(src)
            return
        tasks = plan(pairs, self.workers, self._chunk_bytes)
        pending = [self._executor().submit(task) for task in tasks]
        # Every piece finishes before this returns, failed or not: none may still write a
        # buffer that the caller goes on to hand to the writer.
        futures.wait(pending)
        errors = [err for err in (f.exception() for f in pending) if err is not None]
        for extra in errors[1:]:
            logger.debug("Another staging copy failed too: %r", extra)
        if errors:
            raise errors[0]


_shared: CopyPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> CopyPool:
    """The process's copy pool, shared by every saver (its threads start on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CopyPool()
        return _shared
