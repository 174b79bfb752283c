"""``ShardedStorage``: a sharded checkpoint written through DCP, the storage seam's second side.

One save, on the writer thread of every rank (``Saver`` drives it, see ``_dist_save``):

1. ``write(path, payload)``: every rank writes its shards of ``payload["model"]`` and
   ``payload["optimizer"]`` with ``torch.distributed.checkpoint.save`` on the writer group (DCP
   fsyncs each file and writes ``.metadata`` once every rank's shards are written); the chief
   then writes the rest of the payload as ``payload.pt`` (``_sharded_dir``);
2. ``digests(path, rank)``: the size and CRC32 of the files this rank wrote;
3. ``write_manifest(path, step, world_size, digests)``: the chief, after every rank reported
   its files durable, writes the manifest that makes the directory a checkpoint.

The reads (``read_sharded``) verify the manifest, then read the shards with the safe reader of
``_dcp_read`` into the session's own state (so DCP reshards to the current world size).
Everything else (the state file, retention, listing) is the wrapped file storage's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._checkpoint_file import CheckpointProblem, load_checkpoint, write_checkpoint
from ._dist_save import SHARDED_KEYS
from ._distributed import CheckpointGroup
from ._errors import CheckpointCorruptedError, CheckpointError
from ._fsutil import fsync_dir
from ._sharded_dir import (
    MANIFEST_NAME,
    PAYLOAD_NAME,
    SHARDED_KEY,
    FileDigest,
    Manifest,
    digest_file,
    write_manifest,
)
from ._sharded_read import check_directory
from ._state_file import CheckpointState
from ._storage import CheckpointStorage, LocalStorage

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION

    from ._session import Session

# Every rank writes into ``<path>.partial``; the chief renames it to ``<path>`` once the manifest
# is in it, so a directory under a checkpoint's name is always complete, and re-saving a step
# never writes into the committed directory of that step.
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def _rank_files(path: str, rank: int, is_chief: bool) -> list[str]:
    """The files of ``path`` written by ``rank``: its shards, and for the chief the rest."""
    names = []
    for name in sorted(os.listdir(path)):
        if name == MANIFEST_NAME:
            continue
        if name.startswith(f"__{rank}_") or (is_chief and not name.startswith("__")):
            names.append(name)
    return names


@contextlib.contextmanager
def _single_process(group: CheckpointGroup) -> Iterator[bool]:
    """Yield DCP's ``no_dist``; without several ranks, silence DCP's warning that it is so.

    (``catch_warnings`` swaps the process's filters for the call: only that message is added.)
    """
    if group.distributed:
        yield False
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield True


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: _clone(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_clone(value) for value in obj]
    return obj


def read_sharded(session: Session, path: str, *, verify: bool = True) -> dict[str, Any]:
    """The verified payload of the sharded checkpoint ``path``, its shards read for ``session``.

    Every rank of the session's group calls it together (DCP reads collectively). The shards
    are read into a copy of the session's own state (``get_state_dict``), so the session is
    untouched until ``Session.load_state_dict``. ``verify=False`` skips the manifest check, for
    ranks whose chief has just checked the same files (a restore at session creation): every
    rank reading every file would multiply the reads by the world size.

    Raises:
        CheckpointCorruptedError: a file does not match the manifest, or there is none.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    from ._dcp_read import SafeLoadPlanner, first_failure, safe_reader

    problem = check_directory(path) if verify else None
    if problem is not None:
        if problem.kind == "unreadable":
            raise OSError(problem.message)
        raise CheckpointCorruptedError(problem.message)
    payload = load_checkpoint(os.path.join(path, PAYLOAD_NAME))
    keys = list(payload.get(SHARDED_KEY) or [])
    model_state, optim_state = session.sharded_state()
    template = {"model": model_state, "optimizer": optim_state}
    target = {key: _clone(template[key]) for key in keys if template.get(key) is not None}
    group = session.checkpoint_group
    with _single_process(group) as no_dist:
        try:
            load(
                target,
                storage_reader=safe_reader(path),
                planner=SafeLoadPlanner(),
                process_group=group.step_process_group,
                no_dist=no_dist,
            )
        except CheckpointException as err:
            # DCP wraps every failure (a BaseException): ours are raised as they are, the rest
            # mean the checkpoint holds other keys or shapes than this session's state.
            cause = first_failure(err)
            if isinstance(cause, CheckpointError):
                raise cause from err
            raise ValueError(
                f"{path} does not fit this session's model and optimizer: {cause}; restore it "
                "into the model (and optimizer) it was saved from"
            ) from err
    payload.update(target)
    payload.setdefault("optimizer", None)
    return payload


class ShardedStorage(CheckpointStorage):
    """Sharded checkpoints (directories) written by every rank of ``group``; reads delegate."""

    def __init__(self, group: CheckpointGroup, files: CheckpointStorage | None = None) -> None:
        self._group = group
        self._files = files if files is not None else LocalStorage()

    # -- writing ---------------------------------------------------------------------------

    def prepare(self, directory: str) -> None:
        self._files.prepare(directory)

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save

        staging = path + PARTIAL_SUFFIX
        os.makedirs(staging, exist_ok=True)
        sharded = {key: payload[key] for key in SHARDED_KEYS if payload.get(key) is not None}
        group = self._group
        with _single_process(group) as no_dist:
            save(
                sharded,
                storage_writer=FileSystemWriter(staging, sync_files=True, overwrite=True),
                process_group=group.writer_process_group,
                no_dist=no_dist,
            )
        if group.is_chief:
            rest = {key: value for key, value in payload.items() if key not in sharded}
            rest[SHARDED_KEY] = sorted(sharded)
            write_checkpoint(os.path.join(staging, PAYLOAD_NAME), rest)

    def digests(self, path: str) -> dict[str, FileDigest]:
        """The files this rank wrote into ``path``, by name."""
        staging = path + PARTIAL_SUFFIX
        names = _rank_files(staging, self._group.rank, self._group.is_chief)
        return {name: digest_file(os.path.join(staging, name)) for name in names}

    def finish(self, path: str, step: int, files: Mapping[str, FileDigest]) -> None:
        """Write the manifest and move the directory into place (the chief, once every rank's
        files are durable). A directory already there (the same step saved again) is replaced.
        """
        staging = path + PARTIAL_SUFFIX
        for name, digest in sorted(files.items()):
            try:
                size = os.path.getsize(os.path.join(staging, name))
            except OSError:
                size = -1
            if size != digest.size:
                raise FileNotFoundError(
                    f"{staging} does not hold {name} as its rank wrote it ({digest.size} bytes): "
                    "a sharded checkpoint needs one file system that every rank writes to and "
                    "the chief reads (a shared mount)"
                )
        write_manifest(staging, Manifest(step, self._group.world_size, dict(files)))
        replaced = None
        if os.path.lexists(path):
            replaced = path + REPLACED_SUFFIX
            if os.path.isdir(replaced):
                shutil.rmtree(replaced)
            os.rename(path, replaced)
        os.rename(staging, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        self._files.write_state(directory, latest, paths)

    def delete(self, path: str) -> None:
        self._files.delete(path)

    def why_not_deletable(self, path: str, directory: str, prefix: str | None) -> str | None:
        return self._files.why_not_deletable(path, directory, prefix)

    # -- reading ---------------------------------------------------------------------------

    def read_state(self, directory: str) -> CheckpointState | None:
        return self._files.read_state(directory)

    def find(self, directory: str) -> list[tuple[int, str]]:
        return self._files.find(directory)

    def check(self, path: str) -> CheckpointProblem | None:
        if os.path.isdir(path):
            return check_directory(path)
        return self._files.check(path)

    def read(self, path: str, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        if os.path.isdir(path):
            raise TypeError(
                f"{path} is a sharded checkpoint: it is read into a session (Saver.restore), "
                "or assembled by load_checkpoint"
            )
        return self._files.read(path, map_location)

    def saved_time(self, path: str) -> float:
        return self._files.saved_time(path)

    def exists(self, path: str) -> bool:
        return self._files.exists(path)

    def is_directory(self, directory: str) -> bool:
        return self._files.is_directory(directory)
