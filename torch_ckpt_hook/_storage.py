"""Where checkpoints live: the storage interface the ``Saver`` commits through, and local files.

A ``Saver`` decides *what* (names, retention, the one save in flight); a ``CheckpointStorage``
does the I/O. The call sequence of one save, all on the writer thread except step 1:

1. ``prepare(directory)``: once per directory and saver, before its first save there, on the
   training thread: clean up what killed writes left (never what a live writer is writing).
2. ``write(path, payload)``: the checkpoint, durable when it returns; never visible under
   ``path`` half-written (a temporary name, fsync, rename). A failure leaves nothing at ``path``
   that was not there before.
3. ``write_state(directory, latest, paths)``: the state file, replaced atomically so that it
   names ``latest``. This is the commit point: before it, readers see the previous checkpoint
   as the latest; after it, this one.
4. ``delete(path)`` for each checkpoint that retention dropped, only after step 3, and only for
   paths ``why_not_deletable`` clears right before (a file may change after it was listed).

Reads, for restore, adoption and the CLI: ``read_state``, ``find``, ``check``, ``read``,
``saved_time``, ``exists``, ``is_directory``. Modelled on DCP's ``StorageWriter`` (whose docstring
states its call sequence), torchsnapshot's ``StoragePlugin`` and Ignite's ``BaseSaveHandler``
(``Checkpoint`` decides, ``DiskSaver`` writes). Tests swap in small subclasses (a slow disk, a
full one) instead of patching module globals; sharded and object-store checkpoints are further
implementations.
"""

from __future__ import annotations

import abc
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checkpoint_dir import find_checkpoints
from ._checkpoint_file import CheckpointProblem, check_checkpoint, load_checkpoint, write_checkpoint
from ._fsutil import atomic_write, remove_stray_temp_files
from ._ownership import why_not_deletable
from ._sharded_dir import MANIFEST_NAME, delete_sharded_dir, has_manifest
from ._state_file import CheckpointState, get_checkpoint_state, update_checkpoint_state

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION


class CheckpointStorage(abc.ABC):
    """The I/O of checkpoints and state files; the module docstring gives the call sequence."""

    # -- writing ---------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, directory: str) -> None:
        """Before the first save into ``directory``: remove leftovers of killed writes."""

    @abc.abstractmethod
    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        """Write the checkpoint ``payload`` at ``path``; durable and complete when it returns."""

    @abc.abstractmethod
    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        """Atomically make ``directory``'s state file name ``latest`` and list ``paths``."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete the checkpoint at ``path``.

        Raises:
            FileNotFoundError: nothing is there (deleted behind the saver's back).
            OSError: it could not be deleted.
        """

    @abc.abstractmethod
    def why_not_deletable(self, path: str, directory: str, prefix: str | None) -> str | None:
        """Why a saver of ``prefix`` in ``directory`` must not delete ``path``, or None."""

    def put_file(self, source: str, path: str) -> None:
        """Copy the local checkpoint ``source`` to ``path``, complete or absent (the mirror's copy).

        By default an atomic local copy, as ``write`` makes.
        """
        with open(source, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    # -- reading ---------------------------------------------------------------------------

    @abc.abstractmethod
    def read_state(self, directory: str) -> CheckpointState | None:
        """The state file's checkpoints (existing ones only), or None when it has none."""

    @abc.abstractmethod
    def find(self, directory: str) -> list[tuple[int, str]]:
        """The committed checkpoints in ``directory`` as ``(step, path)``, oldest first."""

    @abc.abstractmethod
    def check(self, path: str) -> CheckpointProblem | None:
        """The problem of the checkpoint at ``path`` (checksum, not its contents), or None."""

    @abc.abstractmethod
    def read(self, path: str, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        """The verified payload of the checkpoint at ``path`` (``weights_only=True``)."""

    @abc.abstractmethod
    def saved_time(self, path: str) -> float:
        """When the checkpoint at ``path`` was written (seconds since the epoch).

        Raises:
            OSError: there is none.
        """

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether anything (a file, a link, a directory) is at ``path``."""

    @abc.abstractmethod
    def is_directory(self, directory: str) -> bool:
        """Whether ``directory`` exists as a directory checkpoints can be written into."""


class LocalStorage(CheckpointStorage):
    """Checkpoints as single ``torch.save`` files on a local (or mounted) file system."""

    def prepare(self, directory: str) -> None:
        remove_stray_temp_files(directory)

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        write_checkpoint(path, payload)

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        update_checkpoint_state(directory, latest, paths)

    def delete(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            delete_sharded_dir(path)
            return
        os.remove(path)

    def why_not_deletable(self, path: str, directory: str, prefix: str | None) -> str | None:
        return why_not_deletable(path, directory, prefix)

    def read_state(self, directory: str) -> CheckpointState | None:
        return get_checkpoint_state(directory)

    def find(self, directory: str) -> list[tuple[int, str]]:
        return find_checkpoints(directory)

    def check(self, path: str) -> CheckpointProblem | None:
        return check_checkpoint(path)

    def read(self, path: str, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        return load_checkpoint(path, map_location)

    def saved_time(self, path: str) -> float:
        if has_manifest(path):
            # A sharded checkpoint was saved when its manifest, written last, was.
            return os.path.getmtime(os.path.join(path, MANIFEST_NAME))
        return os.path.getmtime(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_directory(self, directory: str) -> bool:
        return os.path.isdir(directory)
