"""Staging: a copy of the payload that training can no longer change under the writer.

Every tensor of the payload is copied into a host buffer that is allocated on the first save and
reused by the next ones (reallocated only when its shape or dtype changes), so staging costs a
``memcpy`` on the CPU and enqueued copies on CUDA, never fresh pages or ``clone()``. Buffers for
accelerator tensors are pinned, so their copies run asynchronously at full bus speed.

The area holds one copy of the payload: the ``Saver`` stages again only once the previous write
has finished, which is what bounds staging memory to one payload.

Everything else is snapshotted at the ``stage()`` call too (SPEC 5.1), since the writer reads the
staged payload after training has moved on: every container is rebuilt as its own type with its
contents staged (a ``Counter`` stays an equal ``Counter``, a ``defaultdict`` keeps its
``default_factory``, an ``OrderedDict`` its order and attributes, a namedtuple its type), every
other mutable value is copied (``bytearray``, or ``copy.deepcopy`` for objects), and immutable
scalars, strings and bytes are shared. A container met twice is copied once and stays shared;
dict keys are shared (they are hashable, so the dict already relies on them not changing). A
value that cannot be copied, a reference cycle or nesting deeper than ``MAX_DEPTH`` raises a
``TypeError`` naming its place, before any copy is enqueued.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, OrderedDict, defaultdict
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
from ._messages import error_line
from ._payload_check import MAX_DEPTH, Attr, Member, format_path, plain_dense, type_name

_Path = tuple[Any, ...]

# Immutable and holding nothing mutable: the staged payload shares them.
_IMMUTABLE = frozenset(
    {
        int,
        float,
        bool,
        str,
        bytes,
        complex,
        type(None),
        torch.dtype,
        torch.device,
        torch.Size,
        torch.layout,
        torch.memory_format,
        torch.qscheme,
    }
)


class CopyEngine(Protocol):
    def copy(self, pairs: CopyPairs) -> Fence: ...


def default_engine(device: torch.device) -> CopyEngine:
    """A side-stream engine for CUDA devices; a synchronous copy for the CPU and the rest."""
    if device.type == "cuda":
        return DeviceCopyEngine(device)
    return HostCopyEngine()


def _stageable(tensor: torch.Tensor) -> bool:
    """Plain dense tensors go through the reused buffers; anything exotic is copied afresh."""
    return plain_dense(tensor)


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
        run = _Run()
        staged = self._walk(payload, (), run, 0)
        # A tensor that left the payload (a smaller model, a dropped state) frees its buffer.
        for path in self._buffers.keys() - run.used:
            del self._buffers[path]
        fences = [self._engine(device).copy(group) for device, group in group_by_device(run.pairs)]
        return staged, FenceGroup(fences) if fences else DoneFence()

    def _engine(self, device: torch.device) -> CopyEngine:
        if device not in self._engines:
            self._engines[device] = self._engine_for(device)
        return self._engines[device]

    def _walk(self, obj: Any, path: _Path, run: _Run, depth: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._stage_tensor(obj.detach(), path, run.pairs, run.used, run.aliases)
        if type(obj) in _IMMUTABLE:
            return obj
        ident = id(obj)
        if ident in run.copies:
            return run.copies[ident][1]
        if ident in run.open:
            raise TypeError(
                f"cannot stage {format_path(path)}: it is {format_path(run.open[ident])} again, a "
                f"{type_name(type(obj))} that contains itself (a reference cycle); a checkpoint "
                "holds copies of values, so store the data without the cycle"
            )
        if depth >= MAX_DEPTH:
            raise TypeError(
                f"cannot stage {format_path(path)}: it is nested more than {MAX_DEPTH} containers "
                "deep, which torch.save, pickling recursively, may not write; store the data "
                "flatter (e.g. a list of records)"
            )
        run.open[ident] = path
        try:
            staged = self._copy(obj, path, run, depth + 1)
        finally:
            del run.open[ident]
        # The original stays referenced, so its id is not reused by another object in this run.
        run.copies[ident] = (obj, staged)
        return staged

    def _copy(self, obj: Any, path: _Path, run: _Run, depth: int) -> Any:
        """A copy of ``obj`` (not a tensor, not immutable) made of staged contents."""
        cls = type(obj)
        if cls is dict:
            return {
                key: item
                if type(item) in _IMMUTABLE
                else self._walk(item, (*path, key), run, depth)
                for key, item in obj.items()
            }
        if cls is list or cls is tuple:
            if set(map(type, obj)) <= _IMMUTABLE:
                return list(obj) if cls is list else obj
            items = [self._walk(item, (*path, i), run, depth) for i, item in enumerate(obj)]
            return items if cls is list else tuple(items)
        if cls is bytearray:
            return bytearray(obj)
        if isinstance(obj, dict):
            items = [(key, self._walk(item, (*path, key), run, depth)) for key, item in obj.items()]
            attrs = self._walk_attrs(obj, path, run, depth)
            return _rebuilt(obj, path, lambda: _rebuild_mapping(obj, items, attrs))
        if isinstance(obj, (list, tuple)):
            elements = [self._walk(item, (*path, i), run, depth) for i, item in enumerate(obj)]
            attrs = self._walk_attrs(obj, path, run, depth)
            return _rebuilt(obj, path, lambda: _rebuild_sequence(obj, elements, attrs))
        if isinstance(obj, (set, frozenset)):
            members = [self._walk(m, (*path, Member(i)), run, depth) for i, m in enumerate(obj)]
            attrs = self._walk_attrs(obj, path, run, depth)
            return _rebuilt(obj, path, lambda: _rebuild_set(obj, members, attrs))
        # Anything else (a custom object, an array): a deep copy, since the writer reads it later.
        return _rebuilt(obj, path, lambda: copy.deepcopy(obj))

    def _walk_attrs(self, obj: Any, path: _Path, run: _Run, depth: int) -> dict[str, Any]:
        """A container's instance attributes (a state_dict's ``_metadata``), staged."""
        state = getattr(obj, "__dict__", None)
        if not isinstance(state, dict):
            return {}
        return {
            name: self._walk(value, (*path, Attr(name)), run, depth)
            for name, value in state.items()
        }

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


@dataclasses.dataclass
class _Run:
    """The bookkeeping of one ``stage()`` call."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    used: set[_Path] = dataclasses.field(default_factory=set)
    aliases: dict[tuple[Any, ...], torch.Tensor] = dataclasses.field(default_factory=dict)
    # id(original) -> (original, staged copy): a value met twice is copied once and stays shared.
    copies: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    # Containers being copied, id -> path: meeting one again inside itself is a cycle.
    open: dict[int, _Path] = dataclasses.field(default_factory=dict)


def _rebuilt(obj: Any, path: _Path, make: Callable[[], Any]) -> Any:
    """``make()``, with a failure turned into a ``TypeError`` that names ``obj``'s place."""
    try:
        return make()
    except Exception as err:
        raise TypeError(
            f"cannot stage {format_path(path)}: a {type_name(type(obj))} could not be copied "
            f"({error_line(err)}); store a tensor or a Python number/str/list/dict "
            "instead"
        ) from err


def _set_attrs(new: Any, attrs: dict[str, Any]) -> Any:
    if attrs:
        vars(new).update(attrs)
    return new


def _rebuild_mapping(
    obj: dict[Any, Any], items: list[tuple[Any, Any]], attrs: dict[str, Any]
) -> Any:
    """A mapping of ``obj``'s type holding ``items``, in order, and ``attrs``."""
    cls = type(obj)
    new: Any
    if cls is OrderedDict:
        new = OrderedDict(items)
    elif cls is Counter:
        # Not Counter(pairs), which counts the pairs: each key gets its value, whatever it is.
        new = Counter()
        for key, value in items:
            new[key] = value
    elif cls is defaultdict and isinstance(obj, defaultdict):
        new = defaultdict(obj.default_factory, items)
    else:
        # Any other subclass: its own copy (type, default, attributes), then the staged values.
        new = copy.copy(obj)
        for key, value in items:
            new[key] = value
    return _set_attrs(new, attrs)


def _rebuild_sequence(
    obj: list[Any] | tuple[Any, ...], elements: list[Any], attrs: dict[str, Any]
) -> Any:
    """A list or tuple of ``obj``'s type holding ``elements``, and ``attrs``."""
    new: Any
    if isinstance(obj, tuple):
        make = getattr(type(obj), "_make", None)
        # A namedtuple's _make skips a __new__ that takes the fields one by one.
        new = make(elements) if callable(make) else type(obj)(elements)
    else:
        new = copy.copy(obj)
        new[:] = elements
    return _set_attrs(new, attrs)


def _rebuild_set(obj: set[Any] | frozenset[Any], members: list[Any], attrs: dict[str, Any]) -> Any:
    """A set or frozenset of ``obj``'s type holding ``members``, and ``attrs``."""
    if isinstance(obj, frozenset):
        new: Any = type(obj)(members)
    else:
        new = copy.copy(obj)
        new.clear()
        new.update(members)
    return _set_attrs(new, attrs)
