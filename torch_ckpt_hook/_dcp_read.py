"""Reading ``torch.distributed.checkpoint`` files without ever unpickling code.

DCP itself unpickles two things unsafely: ``FileSystemReader.read_metadata`` loads ``.metadata``
with plain ``pickle``, and ``DefaultLoadPlanner.load_bytes`` loads every non-tensor value (an
optimizer's param groups) with ``torch.load`` with weights-only loading turned off. Either lets
a crafted checkpoint run code. This module is the package's only way into DCP reads; the API,
for the offline loader (``_sharded_read``) and for the distributed restore alike:

- ``read_safe_metadata(directory) -> Metadata``: ``.metadata`` through an unpickler that finds
  only DCP's metadata dataclasses, ``torch.Size``, torch dtypes and layouts, paths and the
  standard containers (``METADATA_GLOBALS``).
- ``safe_reader(directory) -> SafeFileSystemReader``: a ``FileSystemReader`` whose metadata is
  read that way, eagerly (so a refusal surfaces here, as this package's error, rather than from
  inside DCP's collectives), and which refuses metadata naming a file outside the directory or
  one that is not a regular file (a FIFO would hang the read).
- ``SafeLoadPlanner`` (a ``DefaultLoadPlanner``) and ``SafeEmptyLoadPlanner`` (DCP's planner
  that rebuilds the state dict from the metadata, as ``dcp_to_torch_save`` uses):
  ``load_bytes`` uses ``torch.load(..., weights_only=True)``.
- ``load_full_state(directory)``: the whole unsharded state dict in this process, with no
  process group.
- ``load_outline(directory)``: the same, every tensor a ``meta`` tensor (nothing read but the
  non-tensor values).
- ``first_failure(err)``: the exception a rank raised inside DCP's ``CheckpointException``.

Usage for a distributed restore, after the manifest verified::

    dcp.load(state_dict, storage_reader=safe_reader(directory), planner=SafeLoadPlanner())

Errors: ``CheckpointUnloadableError`` for an object the restricted unpicklers refuse, or
metadata that does not describe files of this directory; ``CheckpointCorruptedError`` for a
``.metadata`` that does not unpickle at all (the caller, who knows whether the manifest's
checksums held, may reclassify that: intact bytes that do not parse are not damage).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import stat
from collections import OrderedDict
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ._errors import CheckpointCorruptedError, CheckpointUnloadableError
from ._fsutil import open_regular_file

METADATA_NAME = ".metadata"

# (module, name) -> the object: everything a DCP ``.metadata`` of torch 2.x pickles by reference.
METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", cls.__name__): cls
        for cls in (
            dcp_metadata.Metadata,
            dcp_metadata.TensorStorageMetadata,
            dcp_metadata.BytesStorageMetadata,
            dcp_metadata.ChunkStorageMetadata,
            dcp_metadata.TensorProperties,
            dcp_metadata.StorageMeta,
            dcp_metadata.MetadataIndex,
            dcp_metadata._MEM_FORMAT_ENCODING,
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    # torch.layout pickles as a call of this lookup by name (torch.strided).
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
    **{
        ("pathlib", cls.__name__): cls
        for cls in (
            pathlib.PosixPath,
            pathlib.PurePosixPath,
            pathlib.WindowsPath,
            pathlib.PureWindowsPath,
        )
    },
}


class _MetadataUnpickler(pickle.Unpickler):
    """Finds only ``METADATA_GLOBALS`` and torch dtypes; no persistent ids (the default)."""

    def find_class(self, module: str, name: str) -> Any:
        found = METADATA_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_safe_metadata(directory: str | os.PathLike[str]) -> dcp_metadata.Metadata:
    """The DCP metadata of ``directory``, unpickled by the restricted unpickler.

    Raises:
        CheckpointUnloadableError: it refers to an object that is not DCP metadata.
        CheckpointCorruptedError: it does not unpickle (truncated, not a pickle).
        OSError: it cannot be opened or read (``FileNotFoundError``: missing).
        NotRegularFileError: it is not a regular file.
    """
    path = os.path.join(os.fspath(directory), METADATA_NAME)
    with open_regular_file(path) as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            if "is not allowed in DCP metadata" in str(err):
                raise CheckpointUnloadableError(
                    f"DCP metadata {path} cannot be loaded: {err}; it may hold only DCP's "
                    "metadata classes, so it was not written by torch.distributed.checkpoint "
                    "(or it was crafted) and is never unpickled further"
                ) from err
            raise CheckpointCorruptedError(f"DCP metadata {path} does not unpickle: {err}") from err
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            raise CheckpointCorruptedError(
                f"DCP metadata {path} does not unpickle: {type(err).__name__}: {err}"
            ) from err
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointUnloadableError(
            f"DCP metadata {path} holds a {type(metadata).__qualname__}, not DCP Metadata"
        )
    return metadata


def referenced_files(metadata: dcp_metadata.Metadata) -> set[str]:
    """The relative paths of the data files ``metadata`` reads from.

    Raises:
        CheckpointUnloadableError: its storage data is not ``FileSystemWriter``'s.
    """
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(
        isinstance(info, dcp_filesystem._StorageInfo) and isinstance(info.relative_path, str)
        for info in storage.values()
    ):
        raise CheckpointUnloadableError(
            "DCP metadata has no FileSystemWriter storage data (relative paths of .distcp "
            "files); it was not written by a torch.distributed.checkpoint FileSystemWriter"
        )
    return {info.relative_path for info in storage.values()}


def _check_referenced(directory: str, metadata: dcp_metadata.Metadata) -> None:
    for name in sorted(referenced_files(metadata)):
        parts = pathlib.PurePosixPath(name).parts
        if not parts or name.startswith("/") or "\\" in name or ".." in parts:
            raise CheckpointUnloadableError(
                f"DCP metadata in {directory} names the data file {name!r}, which is not a "
                "file inside the checkpoint directory; refusing to read it"
            )
        path = os.path.join(directory, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise CheckpointCorruptedError(
                f"Checkpoint {directory} is corrupted: its data file {name} is missing"
            ) from None
        if not stat.S_ISREG(mode):
            raise CheckpointUnloadableError(
                f"Checkpoint {directory}: its data file {name} is not a regular file"
            )


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` that hands DCP metadata read by ``read_safe_metadata``."""

    def __init__(
        self, path: str | os.PathLike[str], metadata: dcp_metadata.Metadata | None = None
    ) -> None:
        super().__init__(path)
        self._directory = os.fspath(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            # DCP's fallback to rank-local metadata, which this package never writes.
            raise FileNotFoundError(f"{self._directory} has no rank-local DCP metadata")
        if self._metadata is None:
            self._metadata = read_safe_metadata(self._directory)
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: dcp_metadata.Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        _check_referenced(self._directory, metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


def safe_reader(directory: str | os.PathLike[str]) -> SafeFileSystemReader:
    """A reader of the DCP checkpoint in ``directory``, its metadata already read (safely).

    Raises:
        As ``read_safe_metadata``, and ``CheckpointUnloadableError`` for metadata naming a file
        outside ``directory``.
    """
    metadata = read_safe_metadata(directory)
    _check_referenced(os.fspath(directory), metadata)
    return SafeFileSystemReader(directory, metadata)


_REFUSED_GLOBAL = re.compile(
    r"GLOBAL \S+ (?:was not an allowed global by default|whose module \S+ is blocked)"
)


def _load_bytes(fqn: str, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        match = _REFUSED_GLOBAL.search(str(err))
        what = match[0] if match else "the weights_only unpickler failed"
        raise CheckpointUnloadableError(
            f"the DCP value {fqn!r} cannot be loaded: weights_only loading refused it ({what}); "
            "a checkpoint may hold only tensors and plain Python values"
        ) from err


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values load with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = _load_bytes(fqn, value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner, SafeLoadPlanner):
    """DCP's planner that builds the state dict from the metadata, loading values safely
    (``SafeLoadPlanner.load_bytes``: ``_EmptyStateDictLoadPlanner`` does not override it)."""


def load_full_state(
    directory: str | os.PathLike[str], keys: set[str] | None = None
) -> dict[str, Any]:
    """The full, unsharded state dict of the DCP checkpoint in ``directory``, on the CPU.

    In this process alone, with no process group (``torch.distributed`` need not be
    initialized); every tensor whole, however many ranks wrote it. ``keys`` limits it to those
    top-level keys.
    """
    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state,
            storage_reader=safe_reader(directory),
            planner=SafeEmptyLoadPlanner(keys=keys),  # type: ignore[no-untyped-call]
            no_dist=True,
        )
    except CheckpointException as err:
        raise first_failure(err) from err
    return state


def load_outline(directory: str | os.PathLike[str], keys: set[str] | None = None) -> dict[str, Any]:
    """``load_full_state`` with every tensor a ``meta`` tensor of its saved shape and dtype.

    Only the non-tensor values (param groups) are read: what ``torch-ckpt inspect`` shows of a
    model too large for one process's memory.
    """
    reader = safe_reader(directory)
    metadata = reader.read_metadata()
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tensors: dict[tuple[Any, ...], torch.Tensor] = {}
    byte_keys: set[str] = set()
    for fqn, item in metadata.state_dict_metadata.items():
        path = tuple(paths.get(fqn, (fqn,)))
        if keys is not None and path[0] not in keys:
            continue
        if isinstance(item, dcp_metadata.TensorStorageMetadata):
            tensors[path] = torch.empty(item.size, dtype=item.properties.dtype, device="meta")
        else:
            byte_keys.add(fqn)
    state: dict[str, Any] = {}
    if byte_keys:
        try:
            _load_state_dict(
                state,
                storage_reader=reader,
                planner=SafeEmptyLoadPlanner(keys=byte_keys),  # type: ignore[no-untyped-call]
                no_dist=True,
            )
        except CheckpointException as err:
            raise first_failure(err) from err
    for path, tensor in tensors.items():
        set_element(state, path, tensor)
    return state


def first_failure(err: CheckpointException) -> BaseException:
    """The exception of the lowest rank that failed, which DCP wrapped in ``err``.

    DCP reports any failure, even in one process, as a ``CheckpointException`` (a
    ``BaseException``) holding each rank's exception; this package's errors inside it
    (``CheckpointUnloadableError``) are what a caller handles.
    """
    failures = err.failures
    return failures[min(failures)][0] if failures else err
