"""One checkpoint file on disk: a ``torch.save`` zip archive of the session's payload.

Writes are atomic (``atomic_write``): a checkpoint is complete under its final name or absent.
Every file carries a CRC32 of its bytes (``_integrity``), checked before anything is parsed.
Reads always use ``torch.load(..., weights_only=True)``, which unpickles only tensors, containers
and plain values, so a crafted file cannot run code; nothing in the package ever turns
``weights_only`` off.

Failures keep damage apart from everything else, because a user deletes a "corrupted" file:
``CheckpointCorruptedError`` only when the bytes are damaged; ``CheckpointUnloadableError`` for a
file that shows no damage but cannot be loaded as asked; ``ValueError`` for a path that is not a
regular file (never opened, so a FIFO cannot hang the read); ``OSError`` when it cannot be read.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import CheckpointCorruptedError, CheckpointUnloadableError
from ._fsutil import NotRegularFileError, atomic_write, open_regular_file
from ._integrity import CheckpointProblem as CheckpointProblem  # re-exported: the verdict type
from ._integrity import (
    PendingChecksum,
    check_file,
    checksum_problem,
    save_with_checksum,
    start_checksum,
)
from ._messages import error_line
from ._paths import is_url, normalize
from ._sharded_read import check_directory, is_sharded_checkpoint, load_directory

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION


def write_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` durably: temporary file, fsync, rename, fsync of the dir.

    The checksum is computed over the bytes as they are written, on the calling thread (the
    background writer's, for an asynchronous save).
    """
    atomic_write(path, lambda f: save_with_checksum(payload, f))


def check_checkpoint(path: str | os.PathLike[str]) -> CheckpointProblem | None:
    """The problem found in the checkpoint at ``path``, with its kind, or None when it is intact.

    ``kind`` is ``corrupted`` (damaged bytes), ``unloadable`` (no checksum: a plain
    ``torch.save`` file), ``unreadable`` (missing, no permission, an I/O error) or ``not_a_file``
    (a directory, FIFO, socket or device, never opened). Only the checksum is checked; nothing is
    unpickled, so a file that passes can still be unloadable (``load_checkpoint`` says why).
    A sharded checkpoint directory is checked against its manifest (``_sharded_read``).
    """
    path = normalize(os.fspath(path))
    if is_url(path):
        from ._storage_for import remote_check

        return remote_check(path)
    if is_sharded_checkpoint(path):
        return check_directory(path)
    return check_file(path)


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """The problem found in the checkpoint at ``path``, or None when it is intact.

    The problem is ``check_checkpoint``'s message, one line: truncated, checksum mismatch, no
    checksum (a file not written by this package), unreadable (missing, no permission), or not
    a regular file (a directory, a FIFO, a device). Only the checksum is checked; nothing is
    unpickled. A sharded checkpoint directory: its manifest, every file it lists, and the DCP
    metadata (unpickled by a restricted unpickler).
    """
    problem = check_checkpoint(path)
    return None if problem is None else problem.message


def load_checkpoint(
    path: str | os.PathLike[str], map_location: MAP_LOCATION = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Read the payload of the checkpoint at ``path`` with ``weights_only=True``.

    ``path`` may be a sharded checkpoint directory: its full, unsharded payload is assembled in
    this process, with no process group (``_sharded_read.load_directory``).

    Args:
        verify: check the checksum first. ``False`` loads a file that has none (written by plain
            ``torch.save``), still with ``weights_only=True``; damage then shows only where
            parsing fails.

    Raises:
        ValueError: ``path`` does not exist or is not a regular file (a directory, a FIFO, a
            device), or ``map_location`` names no device.
        CheckpointCorruptedError: the file is damaged: truncated, its checksum does not match,
            or (unverified) torch cannot parse it.
        CheckpointUnloadableError: nothing shows damage, but the file cannot be loaded as
            asked: it holds an object ``weights_only`` loading refuses, it has no checksum (with
            ``verify``), ``map_location`` names a device this machine does not have, it holds
            no torch_ckpt_hook payload, or this torch cannot parse a file whose checksum holds.
        OSError: the file cannot be opened or read (no permission, an I/O error).
    """
    path = normalize(os.fspath(path))
    if is_url(path):
        from ._storage_for import remote_load

        return remote_load(path, map_location, verify=verify)
    if is_sharded_checkpoint(path):
        return load_directory(path, map_location, verify=verify)
    try:
        f = open_regular_file(path)
    except FileNotFoundError:
        raise ValueError(
            f"The passed save_path is not a valid checkpoint: {path} does not exist"
        ) from None
    except NotRegularFileError as err:
        raise ValueError(f"The passed save_path is not a valid checkpoint: {err}") from None
    with f:
        _check_map_location(map_location)
        # The CRC runs on a helper thread while torch.load reads the same open file: one pass
        # over the page cache instead of two. Nothing of the file reaches the caller before its
        # checksum held, and the thread is done before the file closes.
        pending = _start_verify(path, f) if verify else None
        try:
            missing = _missing_device(map_location)
            if missing is not None:
                _finish_verify(path, pending)  # damage is reported as damage first
                intact = " (the file itself is intact)" if verify else ""
                raise CheckpointUnloadableError(
                    f"Checkpoint {path} cannot be loaded with map_location={map_location!r}"
                    f"{intact}: {missing}; pass map_location='cpu', or a device this machine has"
                )
            loaded = _read_payload(path, f, map_location, verified=verify, pending=pending)
        finally:
            if pending is not None:
                pending.wait()
    return _as_payload(path, loaded)


def _start_verify(path: str, f: io.BufferedReader) -> PendingChecksum | None:
    """The file's checksum, running; raises at once for what its trailer already shows."""
    verdict = start_checksum(f)
    if isinstance(verdict, PendingChecksum):
        return verdict
    _raise_for_problem(path, verdict)
    return None


def _finish_verify(path: str, pending: PendingChecksum | None) -> None:
    """Wait for the checksum started by ``_start_verify``; raise for a problem it found."""
    if pending is not None:
        _raise_for_problem(path, pending.result())


def _raise_for_problem(path: str, problem: CheckpointProblem | None) -> None:
    if problem is None:
        return
    if problem.kind == "corrupted":
        raise CheckpointCorruptedError(f"Checkpoint {path} is corrupted: {problem.message}")
    raise CheckpointUnloadableError(
        f"Checkpoint {path} cannot be loaded: {problem.message}; if you trust it, "
        "load_checkpoint(path, verify=False) loads it, still with weights_only=True "
        "(torch-ckpt inspect --no-verify shows it)"
    )


def _check_map_location(map_location: MAP_LOCATION) -> None:
    # A bad device string would otherwise surface from inside torch.load, where it is
    # indistinguishable from a damaged file and would be reported as corruption.
    for target in _device_targets(map_location):
        try:
            torch.device(target)
        except RuntimeError as err:
            raise ValueError(
                f"map_location must name a torch device, got {target!r}: "
                f"{error_line(err, with_type=False)}"
            ) from err


def _device_targets(map_location: MAP_LOCATION) -> list[str | torch.device]:
    """The devices ``map_location`` moves tensors to, where it names them (not a callable)."""
    if isinstance(map_location, (str, torch.device)):
        return [map_location]
    if isinstance(map_location, Mapping):
        return [value for value in map_location.values() if isinstance(value, (str, torch.device))]
    return []


def _missing_device(map_location: MAP_LOCATION) -> str | None:
    """Why a device ``map_location`` names does not exist on this machine, or None."""
    for target in _device_targets(map_location):
        device = torch.device(target)
        if device.type in ("cpu", "meta"):
            continue
        # torch.cuda, torch.mps, torch.xpu, ...: the module torch.load itself asks.
        module = getattr(torch, device.type, None)
        is_available = getattr(module, "is_available", None)
        if not callable(is_available):
            continue  # a backend torch.load knows better than this check: let it decide
        backend = device.type.upper()
        if not is_available():
            return (
                f"this machine has no {backend} device (torch.{device.type}.is_available() "
                "is False)"
            )
        device_count = getattr(module, "device_count", None)
        if device.index is not None and callable(device_count):
            count = int(device_count())
            if device.index >= count:
                return (
                    f"this machine has {count} {backend} device{'' if count == 1 else 's'}, "
                    f"so {device} does not exist"
                )
    return None


def _read_payload(
    path: str,
    f: io.BufferedReader,
    map_location: MAP_LOCATION,
    *,
    verified: bool,
    pending: PendingChecksum | None = None,
) -> Any:
    # From the file opened and verified, not from the path again: the bytes loaded are the bytes
    # checked, and a FIFO swapped in under the name since cannot hang the load.
    f.seek(0)
    try:
        loaded = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:
        # The checksum's verdict first: a damaged file is reported as damaged, whatever torch
        # made of it.
        try:
            _finish_verify(path, pending)
        except CheckpointCorruptedError as damaged:
            raise damaged from err
        # RuntimeError and OSError from the zip reader, UnpicklingError from the weights_only
        # unpickler (refused globals, damaged pickles), EOFError, and others.
        refused = _refused_global(err)
        if refused is not None:
            # Never torch's advice: turning weights_only off or allowlisting the global would
            # let the file run code. Saver.save refuses such values, so the file came from
            # elsewhere or from an older version.
            raise CheckpointUnloadableError(
                f"Checkpoint {path} cannot be loaded: weights_only loading refused an object it "
                f"holds ({refused}); a checkpoint may hold only tensors and plain Python values "
                "(numbers, strings, lists, dicts), so this one must be written again with such "
                "values"
            ) from err
        device = _device_error(err)
        if device is not None:
            raise CheckpointUnloadableError(
                f"Checkpoint {path} cannot be loaded with map_location={map_location!r}: "
                f"{device}; pass map_location='cpu', or a device this machine has"
            ) from err
        reason = _describe(err)
        if verified:
            # The checksum held a moment ago, so the bytes are those that were written. Unless
            # they changed since (checked again), this torch cannot parse what a torch wrote,
            # a newer one say: not damage, and the file must not be mistaken for damaged.
            problem = checksum_problem(f)
            if problem is not None and problem.kind == "corrupted":
                raise CheckpointCorruptedError(
                    f"Checkpoint {path} is corrupted: {problem.message} (it changed while it "
                    "was being loaded)"
                ) from err
            raise CheckpointUnloadableError(
                f"Checkpoint {path} cannot be loaded: its checksum holds, so its bytes are as "
                f"they were written, but torch {torch.__version__} cannot parse them ({reason}); "
                "a newer torch may"
            ) from err
        f.seek(0)
        if not zipfile.is_zipfile(f):
            reason = f"it is not a torch.save zip archive ({reason})"
        raise CheckpointCorruptedError(
            f"Checkpoint {path} is corrupted: torch.load cannot parse it: {reason} (its checksum "
            "was not checked: verify=False)"
        ) from err
    _finish_verify(path, pending)  # a payload that failed its checksum is dropped, never returned
    return loaded


_REFUSED = (
    re.compile(r"GLOBAL \S+ was not an allowed global by default"),
    re.compile(r"GLOBAL \S+ whose module \S+ is blocked"),
)
_WEIGHTS_ONLY_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the doc|$)", re.S)
_DEVICE_ERROR = re.compile(r"Attempting to deserialize object on .*?\.(?=\s|$)")


def _refused_global(err: Exception) -> str | None:
    """``"GLOBAL numpy.dtype was not an allowed global by default"`` for a refusal, else None."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    for pattern in _REFUSED:
        match = pattern.search(str(err))
        if match is not None:
            return match[0]
    return None


def _device_error(err: Exception) -> str | None:
    """torch's "Attempting to deserialize object on a CUDA device but ..." sentence, or None."""
    if not isinstance(err, RuntimeError):
        return None
    match = _DEVICE_ERROR.search(str(err))
    return None if match is None else match[0].rstrip(".")


def _describe(err: Exception) -> str:
    """Why torch.load failed, in one line for the message that quotes it."""
    message = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in message:
        # torch's message leads with advice to turn weights_only off, which is never the fix
        # here; what the unpickler found ("Unsupported operand 149") is further down.
        match = _WEIGHTS_ONLY_DETAIL.search(message)
        detail = " ".join(match[1].split()) if match is not None else ""
        return f"the weights_only unpickler failed: {detail or 'no details'}"
    # The first line says what failed; torch's further lines are advice.
    return error_line(err, first_line=True)


def _as_payload(path: str, loaded: Any) -> dict[str, Any]:
    if isinstance(loaded, dict) and "format_version" in loaded:
        return loaded
    if isinstance(loaded, dict):
        what = f"a dict with keys {sorted(map(str, loaded))}"
    else:
        what = f"a {type(loaded).__qualname__}"
    # The file loaded, so nothing is damaged: it is another program's file, not a checkpoint.
    raise CheckpointUnloadableError(
        f"Checkpoint {path} holds no torch_ckpt_hook payload: expected a dict with "
        f"'format_version', got {what}; it loads, but is not a checkpoint this package wrote"
    )
