"""Reading ``torch.distributed.checkpoint`` files without unpickling anything but DCP's own data.

DCP's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle`` and
``DefaultLoadPlanner.load_bytes`` loads non-tensor values with ``torch.load`` and weights_only off:
either runs whatever code a crafted checkpoint holds (SPEC.md "Safe loading"). This module gives
both a safe replacement, shared by the online restore and the offline readers:

- ``SafeFileSystemReader(path)``: a ``FileSystemReader`` whose metadata unpickler resolves only
  DCP's metadata classes, ``torch.Size``, dtypes, layouts, memory formats and paths;
- ``SafeLoadPlanner(...)``: a ``DefaultLoadPlanner`` whose ``load_bytes`` uses
  ``torch.load(weights_only=True)`` (tensors are read with ``weights_only=True`` by DCP itself);
- ``UnsafeCheckpointError``: what either raises on anything else (a ``pickle.UnpicklingError``).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

__all__ = ["SafeFileSystemReader", "SafeLoadPlanner", "UnsafeCheckpointError", "load_metadata"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A DCP file that holds something other than DCP's metadata or weights_only values."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"the DCP metadata names {module}.{name}, which is not one of DCP's metadata "
            "types: refusing to unpickle it"
        )


def load_metadata(data: bytes) -> Metadata:
    """Unpickle DCP ``.metadata`` bytes, resolving DCP's metadata types only.

    Raises:
        UnsafeCheckpointError: it names any other global, or is not a ``Metadata``.
    """
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"the DCP metadata holds a {type(metadata).__qualname__}, not a Metadata"
        )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` that unpickles ``.metadata`` through ``load_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that loads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"the value {read_item.dest_index.fqn!r} of the DCP checkpoint does not load "
                f"with weights_only=True: {err}"
            ) from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
