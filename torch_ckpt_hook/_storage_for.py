"""Which storage a checkpoint location gets, and the public readers' path for fsspec URLs.

``storage_for``: a local path (or a ``file://`` URL, made a path first) gets ``LocalStorage``;
any other URL the process's shared ``FsspecStorage``. ``DefaultStorage``, the default ``Saver``
storage, routes each call that way, so one saver writes local paths and URLs, and local files go
through ``LocalStorage``'s own code, byte for byte as before. The ``remote_*`` functions are what
``latest_checkpoint``, ``get_checkpoint_state``, ``restorable_checkpoint``, ``load_checkpoint``
and ``verify_checkpoint`` dispatch to for a URL (imported lazily there: fsspec is imported only
when a URL reaches one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checkpoint_file import CheckpointProblem
from ._fsspec_storage import FsspecStorage
from ._paths import is_url
from ._state_file import STATE_FILENAME, CheckpointState
from ._storage import CheckpointStorage, LocalStorage

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION


_REMOTE: FsspecStorage | None = None


def remote_storage() -> FsspecStorage:
    """The process's ``FsspecStorage`` with fsspec's default options (stateless: shared)."""
    global _REMOTE
    if _REMOTE is None:
        _REMOTE = FsspecStorage()
    return _REMOTE


def storage_for(path: str) -> CheckpointStorage:
    """``LocalStorage`` for a local path, ``FsspecStorage`` for an fsspec URL."""
    return remote_storage() if is_url(path) else LocalStorage()


class DefaultStorage(LocalStorage):
    """The default ``Saver`` storage: local files as ``LocalStorage``, URLs through fsspec."""

    def __init__(self, remote: FsspecStorage | None = None) -> None:
        self._remote = remote

    def _at(self, path: str) -> FsspecStorage | None:
        if not is_url(path):
            return None
        return self._remote if self._remote is not None else remote_storage()

    def prepare(self, directory: str) -> None:
        r = self._at(directory)
        return super().prepare(directory) if r is None else r.prepare(directory)

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        r = self._at(path)
        return super().write(path, payload) if r is None else r.write(path, payload)

    def put_file(self, source: str, path: str) -> None:
        r = self._at(path)
        return super().put_file(source, path) if r is None else r.put_file(source, path)

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        r = self._at(directory)
        if r is None:
            return super().write_state(directory, latest, paths)
        return r.write_state(directory, latest, paths)

    def delete(self, path: str) -> None:
        r = self._at(path)
        return super().delete(path) if r is None else r.delete(path)

    def why_not_deletable(self, path: str, directory: str, prefix: str | None) -> str | None:
        r = self._at(directory)
        if r is None:
            return super().why_not_deletable(path, directory, prefix)
        return r.why_not_deletable(path, directory, prefix)

    def read_state(self, directory: str) -> CheckpointState | None:
        r = self._at(directory)
        return super().read_state(directory) if r is None else r.read_state(directory)

    def find(self, directory: str) -> list[tuple[int, str]]:
        r = self._at(directory)
        return super().find(directory) if r is None else r.find(directory)

    def check(self, path: str) -> CheckpointProblem | None:
        r = self._at(path)
        return super().check(path) if r is None else r.check(path)

    def read(self, path: str, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        r = self._at(path)
        return super().read(path, map_location) if r is None else r.read(path, map_location)

    def saved_time(self, path: str) -> float:
        r = self._at(path)
        return super().saved_time(path) if r is None else r.saved_time(path)

    def exists(self, path: str) -> bool:
        r = self._at(path)
        return super().exists(path) if r is None else r.exists(path)

    def is_directory(self, directory: str) -> bool:
        r = self._at(directory)
        return super().is_directory(directory) if r is None else r.is_directory(directory)


# -- the public readers, for a URL (dispatched to from _checkpoint_dir, _state_file, ...) -------


def remote_state(directory: str, latest_filename: str | None) -> CheckpointState | None:
    return remote_storage().state(directory.rstrip("/"), latest_filename)


def remote_candidates(directory: str, latest_filename: str | None = None) -> list[str]:
    """``restore_candidates`` of a URL: the state file's list newest first, then the others."""
    directory = directory.rstrip("/")
    state = remote_state(directory, latest_filename)
    ordered: list[str] = []
    if state is not None:
        listed = [p for p in state.all_model_checkpoint_paths if p != state.model_checkpoint_path]
        ordered = [state.model_checkpoint_path, *reversed(listed)]
    if latest_filename not in (None, "", STATE_FILENAME):
        return ordered
    seen = set(ordered)
    ordered += [p for _, p in reversed(remote_storage().find(directory)) if p not in seen]
    return ordered


def remote_latest(directory: str, latest_filename: str | None) -> str | None:
    candidates = remote_candidates(directory, latest_filename)
    return candidates[0] if candidates else None


def remote_restorable(directory: str, latest_filename: str | None) -> str | None:
    from ._checkpoint_dir import choose_restore

    storage = remote_storage()
    return choose_restore(remote_candidates(directory, latest_filename), storage.check).path


def remote_check(path: str) -> CheckpointProblem | None:
    return remote_storage().check(path)


def remote_load(path: str, map_location: MAP_LOCATION, *, verify: bool) -> dict[str, Any]:
    return remote_storage().load(path, map_location, verify=verify)


def check_remote_writable(directory: str) -> None:
    remote_storage().check_writable(directory)
