"""One checkpoint file on disk: a ``torch.save`` zip archive of the session's payload.

Writes are atomic (``atomic_write``): a checkpoint is complete under its final name or absent.
Every file carries a CRC32 of its bytes (``_integrity``), checked before anything is parsed.
Reads always use ``torch.load(..., weights_only=True)``, which unpickles only tensors, containers
and plain values, so a crafted file cannot run code; nothing in the package ever turns
``weights_only`` off.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import CheckpointCorruptedError
from ._fsutil import atomic_write
from ._integrity import save_with_checksum, verify, verify_open_file

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION


def write_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` durably: temporary file, fsync, rename, fsync of the dir.

    The checksum is computed over the bytes as they are written, on the calling thread (the
    background writer's, for an asynchronous save).
    """
    atomic_write(path, lambda f: save_with_checksum(payload, f))


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """The problem found in the checkpoint at ``path``, or None when it is intact.

    The problem is one line: truncated, checksum mismatch, no checksum trailer (a file not
    written by this package), or unreadable (missing, a directory, no permission). Only the
    checksum is checked; nothing is unpickled.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "unreadable: it is a directory, not a file"
    return verify(path)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: MAP_LOCATION = "cpu"
) -> dict[str, Any]:
    """Read the payload of the checkpoint at ``path`` with ``weights_only=True``.

    Raises:
        ValueError: ``path`` does not exist or is a directory, or ``map_location`` names no device.
        CheckpointCorruptedError: the file cannot be loaded (truncated, not a ``torch.save``
            archive, or holding objects ``weights_only`` refuses), or it holds no checkpoint
            payload, or its checksum does not match (a flipped bit, a truncation). The loader's
            error is the ``__cause__``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"The passed save_path is not a valid checkpoint: {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(
            f"The passed save_path is not a valid checkpoint: {path} is a directory, not a file"
        )
    _check_map_location(map_location)
    # A file that cannot be opened (no permission) is the OSError it is, not a damaged file.
    with open(path, "rb") as f:
        problem = verify_open_file(f)
    if problem is not None:
        raise CheckpointCorruptedError(f"Checkpoint {path} is corrupted: {problem}")
    return _as_payload(path, _read_payload(path, map_location))


def _check_map_location(map_location: MAP_LOCATION) -> None:
    # A bad device string would otherwise surface from inside torch.load, where it is
    # indistinguishable from a damaged file and would be reported as corruption.
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except RuntimeError as err:
            raise ValueError(
                f"map_location must name a torch device, got {map_location!r}: {err}"
            ) from err


def _read_payload(path: str, map_location: MAP_LOCATION) -> Any:
    # The file opened for its checksum, so every error here means "this file does not load":
    # torch.load reports a damaged archive as OSError too (EINVAL from its zip reader).
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        # RuntimeError and OSError from the zip reader, UnpicklingError from the weights_only
        # unpickler (refused globals, files that are not archives), EOFError, and others.
        reason = _describe(err)
        if not zipfile.is_zipfile(path):
            reason = f"it is not a torch.save zip archive ({reason})"
        raise CheckpointCorruptedError(
            f"Checkpoint {path} is corrupted or unreadable: {reason}"
        ) from err


def _describe(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError) and lines[:1] and "Weights only" in lines[0]:
        # torch's message leads with advice to turn weights_only off, which is never the fix
        # here; the refused global ("GLOBAL posix.system") is further down.
        detail = next((line for line in lines[1:] if "GLOBAL" in line), None)
        if detail is not None:
            # And the advice to allowlist the refused global (exec, os.system) goes too.
            detail = detail.split(" Please use", 1)[0]
        refused = "weights_only loading refused an object it holds"
        return f"{refused}: {detail}" if detail else refused
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _as_payload(path: str, loaded: Any) -> dict[str, Any]:
    if isinstance(loaded, dict) and "format_version" in loaded:
        return loaded
    if isinstance(loaded, dict):
        what = f"a dict with keys {sorted(map(str, loaded))}"
    else:
        what = f"a {type(loaded).__qualname__}"
    raise CheckpointCorruptedError(
        f"Checkpoint {path} holds no torch_ckpt_hook payload: expected a dict with "
        f"'format_version', got {what}"
    )
