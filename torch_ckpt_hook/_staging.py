"""Staging: a copy of the payload that training can no longer change under the writer.

Every tensor of the payload is copied into a host buffer that is allocated on the first save and
reused by the next ones (reallocated only when its shape or dtype changes), so staging costs a
``memcpy`` on the CPU and enqueued copies on CUDA, never fresh pages or ``clone()``. Buffers for
accelerator tensors are pinned, so their copies run asynchronously at full bus speed.

The area holds one copy of the payload: the ``Saver`` stages again only once the previous write
has finished, which is what bounds staging memory to one payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ._copy_engine import (
    CopyPairs,
    DeviceCopyEngine,
    DoneFence,
    Fence,
    FenceGroup,
    HostCopyEngine,
    group_by_device,
)

_Path = tuple[Any, ...]


class CopyEngine(Protocol):
    def copy(self, pairs: CopyPairs) -> Fence: ...


def default_engine(device: torch.device) -> CopyEngine:
    """A side-stream engine for CUDA devices; a synchronous copy for the CPU and the rest."""
    if device.type == "cuda":
        return DeviceCopyEngine(device)
    return HostCopyEngine()


def _stageable(tensor: torch.Tensor) -> bool:
    """Plain dense tensors go through the reused buffers; anything exotic is copied afresh."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
    )


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tensor.dtype,
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


class StagingArea:
    """Host buffers for one payload's tensors, kept across saves."""

    def __init__(self, engine_for: Callable[[torch.device], CopyEngine] = default_engine) -> None:
        self._engine_for = engine_for
        self._engines: dict[torch.device, CopyEngine] = {}
        self._buffers: dict[_Path, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the staging buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, payload: Any) -> tuple[Any, Fence]:
        """``payload`` rebuilt with every tensor replaced by its buffer, and the copies' fence.

        The buffers may still be filling on a device when this returns: read them only after
        ``fence.wait_on_host()``, and make the next in-place update of a source tensor wait for
        ``fence.wait_on_device()``.
        """
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        used: set[_Path] = set()
        aliases: dict[tuple[Any, ...], torch.Tensor] = {}
        staged = self._walk(payload, (), pairs, used, aliases)
        # A tensor that left the payload (a smaller model, a dropped state) frees its buffer.
        for path in self._buffers.keys() - used:
            del self._buffers[path]
        fences = [self._engine(device).copy(group) for device, group in group_by_device(pairs)]
        return staged, FenceGroup(fences) if fences else DoneFence()

    def _engine(self, device: torch.device) -> CopyEngine:
        if device not in self._engines:
            self._engines[device] = self._engine_for(device)
        return self._engines[device]

    def _walk(
        self,
        obj: Any,
        path: _Path,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        used: set[_Path],
        aliases: dict[tuple[Any, ...], torch.Tensor],
    ) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._stage_tensor(obj.detach(), path, pairs, used, aliases)
        if isinstance(obj, dict):
            return type(obj)(
                (key, self._walk(value, (*path, key), pairs, used, aliases))
                for key, value in obj.items()
            )
        if isinstance(obj, list):
            return [self._walk(v, (*path, i), pairs, used, aliases) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            items = [self._walk(v, (*path, i), pairs, used, aliases) for i, v in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        return obj

    def _stage_tensor(
        self,
        tensor: torch.Tensor,
        path: _Path,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        used: set[_Path],
        aliases: dict[tuple[Any, ...], torch.Tensor],
    ) -> torch.Tensor:
        if not _stageable(tensor):
            return tensor.to("cpu", copy=True)
        key = _alias_key(tensor)
        if key in aliases:
            # Tied weights: one copy, and the file keeps them one storage.
            return aliases[key]
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(
                tensor.shape,
                dtype=tensor.dtype,
                pin_memory=tensor.device.type == "cuda",
            )
            self._buffers[path] = buffer
        used.add(path)
        aliases[key] = buffer
        pairs.append((buffer, tensor))
        return buffer
