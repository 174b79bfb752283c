"""Copying tensors into staging buffers, and the fences that say when those copies are done.

On the CPU a copy is a synchronous ``memcpy`` into a preallocated buffer, done when ``copy``
returns, spread over every core (``_parallel_copy``). On CUDA the copies are enqueued,
``non_blocking``, on a side stream that first waits on an event recorded on the current stream
(so they read the state after the step that was just enqueued), and a second event recorded
after them is the fence:

- the writer thread waits for it on the host (``wait_on_host``) before serializing;
- the training thread never waits on the host: the next in-place update of a saved tensor is
  made to wait on the device (``wait_on_device``: the current stream waits on the event).

Every stream and event operation goes through a small ``StreamBackend``, so the ordering logic of
``DeviceCopyEngine`` runs in CPU tests against a recording backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from ._parallel_copy import CopyPool, shared_pool

CopyPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (destination, source)


class Fence(Protocol):
    """The completion of one batch of copies."""

    on_device: bool

    def wait_on_host(self) -> None:
        """Block the calling thread until the copies are done."""

    def wait_on_device(self) -> None:
        """Make work enqueued from now on (current stream) wait for the copies, without blocking."""


class DoneFence:
    """The fence of copies that finished before ``copy`` returned."""

    on_device = False

    def wait_on_host(self) -> None:
        pass

    def wait_on_device(self) -> None:
        pass


class FenceGroup:
    """Several fences (one per device) as one."""

    def __init__(self, fences: Sequence[Fence]) -> None:
        self._fences = list(fences)
        self.on_device = any(f.on_device for f in self._fences)

    def wait_on_host(self) -> None:
        for fence in self._fences:
            fence.wait_on_host()

    def wait_on_device(self) -> None:
        for fence in self._fences:
            fence.wait_on_device()


class HostCopyEngine:
    """Copies from CPU tensors: a ``memcpy`` done before ``copy`` returns, on every core.

    The pieces run on ``pool``'s threads (default: the process's shared pool, one thread per
    usable core) while the calling thread waits (``_parallel_copy``); a pool of one worker
    copies on the calling thread.
    """

    def __init__(self, pool: CopyPool | None = None) -> None:
        self._pool = pool if pool is not None else shared_pool()

    def copy(self, pairs: CopyPairs) -> Fence:
        self._pool.copy(pairs)
        return DoneFence()


class StreamBackend(Protocol):
    """The stream and event operations ``DeviceCopyEngine`` needs (CUDA's, or a test's)."""

    def current_stream(self, device: torch.device) -> Any: ...

    def new_stream(self, device: torch.device) -> Any: ...

    def new_event(self) -> Any: ...

    def record(self, event: Any, stream: Any) -> None: ...

    def stream_wait(self, stream: Any, event: Any) -> None: ...

    def use_stream(self, stream: Any) -> AbstractContextManager[Any]: ...

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def synchronize(self, event: Any) -> None: ...


class CudaBackend:
    """``StreamBackend`` on ``torch.cuda``."""

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def new_event(self) -> Any:
        return torch.cuda.Event()  # type: ignore[no-untyped-call]

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def stream_wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def use_stream(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def synchronize(self, event: Any) -> None:
        event.synchronize()


class DeviceFence:
    """The event recorded on the side stream after a batch of copies."""

    on_device = True

    def __init__(self, backend: StreamBackend, device: torch.device, event: Any) -> None:
        self._backend = backend
        self._device = device
        self._event = event

    def wait_on_host(self) -> None:
        self._backend.synchronize(self._event)

    def wait_on_device(self) -> None:
        self._backend.stream_wait(self._backend.current_stream(self._device), self._event)


class DeviceCopyEngine:
    """Copies from one accelerator's tensors into pinned host buffers, on a side stream."""

    def __init__(self, device: torch.device, backend: StreamBackend | None = None) -> None:
        self._device = device
        self._backend: StreamBackend = backend if backend is not None else CudaBackend()
        self._side_stream = self._backend.new_stream(device)

    def copy(self, pairs: CopyPairs) -> Fence:
        backend = self._backend
        ready = backend.new_event()
        backend.record(ready, backend.current_stream(self._device))
        backend.stream_wait(self._side_stream, ready)
        with backend.use_stream(self._side_stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                # The allocator must not hand src's memory to the current stream while the side
                # stream may still read it (an optimizer state replaced before the copy ran).
                backend.record_stream(src, self._side_stream)
        done = backend.new_event()
        backend.record(done, self._side_stream)
        return DeviceFence(backend, self._device, done)


def group_by_device(pairs: CopyPairs) -> Iterator[tuple[torch.device, CopyPairs]]:
    """The pairs split by their source's device, in first-seen order."""
    groups: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in pairs:
        groups.setdefault(src.device, []).append((dst, src))
    yield from groups.items()
