"""``Saver``: names checkpoints, commits them, and decides which ones are kept."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ._checkpoint_file import load_checkpoint, write_checkpoint
from ._errors import CheckpointSaveError
from ._fsutil import path_key, remove_stray_temp_files
from ._staging import stage_to_cpu
from ._state_file import STATE_FILENAME, get_checkpoint_state, update_checkpoint_state

if TYPE_CHECKING:
    from ._session import Session

logger = logging.getLogger(__name__)


class SaveHandle:
    """A save in progress: ``done()`` says whether it finished, ``result()`` waits for its path."""

    def __init__(self, path: str, error: BaseException | None = None) -> None:
        self._path = path
        self._error = error

    def done(self) -> bool:
        return True

    def result(self) -> str:
        """The checkpoint's path once durable; a failure re-raises as ``CheckpointSaveError``."""
        if self._error is not None:
            raise CheckpointSaveError(f"Saving {self._path} failed: {self._error}") from self._error
        return self._path


def _check_max_to_keep(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_to_keep must be None or an int >= 0, got {value!r}")
    return value


def _check_hours(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"keep_checkpoint_every_n_hours must be a number > 0, got {value!r}")
    return float(value)


class Saver:
    """Writes checkpoints with ``torch.save``, keeps the ``checkpoint`` state file, prunes old ones.

    A save commits the file (temporary name, fsync, rename, directory fsync), then the state file
    the same way, and only then deletes the checkpoints that retention drops: at every instant the
    state file names complete checkpoints. ``max_to_keep`` of ``None`` or ``0`` keeps and lists
    every checkpoint. A popped checkpoint younger than the keep-every-N-hours threshold is deleted;
    an older one stays on disk (unlisted) and moves the threshold N hours on, as in TensorFlow.
    """

    def __init__(
        self, max_to_keep: int | None = 5, keep_checkpoint_every_n_hours: float = 10000.0
    ) -> None:
        self._max_to_keep = _check_max_to_keep(max_to_keep)
        self._keep_every_secs = _check_hours(keep_checkpoint_every_n_hours) * 3600.0
        self._next_checkpoint_time = time.time() + self._keep_every_secs
        # (path, save time), oldest first.
        self._last_checkpoints: list[tuple[str, float]] = []
        # Directories whose stray temporary files were removed, and whose list was adopted.
        self._cleaned_dirs: set[str] = set()
        self._recovered_dirs: set[str] = set()

    @property
    def last_checkpoints(self) -> list[str]:
        """The checkpoints this saver manages, oldest first."""
        return [path for path, _ in self._last_checkpoints]

    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: bool = True,
    ) -> Any:
        """Write ``session``'s state to ``f"{save_path}-{global_step}"`` (or ``save_path``).

        Returns the checkpoint's path, or with ``blocking=False`` a handle whose ``result()`` is
        that path. ``global_step`` only names the file: the payload holds ``session.global_step``.
        """
        path = self._checkpoint_path(save_path, global_step)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError(f"Parent directory of {path} doesn't exist, can't save.")
        self._open_directory(directory)
        payload = stage_to_cpu(session.state_dict())
        try:
            self._commit(path, payload)
        except Exception as err:
            if blocking:
                raise CheckpointSaveError(f"Saving {path} failed: {err}") from err
            return SaveHandle(path, err)
        return path if blocking else SaveHandle(path)

    def wait_until_finished(self) -> None:
        """Block until every pending save is durable (saves are synchronous for now)."""

    def restore(self, session: Session, save_path: str) -> None:
        """Load the checkpoint at ``save_path`` into ``session``."""
        if save_path is None:
            raise ValueError("Can't load save_path when it is None.")
        if not os.path.isfile(save_path):
            raise ValueError(f"The passed save_path is not a valid checkpoint: {save_path}")
        logger.info("Restoring parameters from %s", save_path)
        session.load_state_dict(load_checkpoint(save_path))
        session._restored_from = os.path.abspath(save_path)

    def recover_last_checkpoints(self, checkpoint_paths: list[str]) -> None:
        """Adopt ``checkpoint_paths`` (oldest first), dropping missing ones; mtimes become ages."""
        recovered = []
        for path in checkpoint_paths:
            try:
                recovered.append((path, os.path.getmtime(path)))
            except OSError:
                logger.warning("Checkpoint %s is missing; it is no longer managed.", path)
        self._last_checkpoints = recovered

    def recover_last_checkpoints_from(self, checkpoint_dir: str) -> None:
        """Adopt the list in ``checkpoint_dir``'s state file (a restart resumes retention)."""
        directory = os.path.abspath(checkpoint_dir)
        state = get_checkpoint_state(directory)
        self.recover_last_checkpoints(list(state.all_model_checkpoint_paths) if state else [])
        self._recovered_dirs.add(directory)

    def _checkpoint_path(self, save_path: str, global_step: int | None) -> str:
        if not isinstance(save_path, (str, os.PathLike)):
            raise TypeError(f"save_path must be a path, got {type(save_path).__qualname__}")
        save_path = os.fspath(save_path)
        if global_step is None:
            if os.path.basename(save_path) == STATE_FILENAME:
                raise ValueError(
                    f"'latest_filename' collides with 'save_path': '{STATE_FILENAME}' and "
                    f"'{save_path}'"
                )
            return save_path
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            raise TypeError(f"global_step must be an int or None, got {global_step!r}")
        return f"{save_path}-{global_step}"

    def _open_directory(self, directory: str) -> None:
        """On the first save into a directory: clean up after a killed save, adopt its list."""
        if directory not in self._cleaned_dirs:
            remove_stray_temp_files(directory)
            self._cleaned_dirs.add(directory)
        if directory not in self._recovered_dirs and not self._last_checkpoints:
            self.recover_last_checkpoints_from(directory)
        self._recovered_dirs.add(directory)

    def _commit(self, path: str, payload: dict[str, Any]) -> None:
        """Write the file, then the state file, then delete what retention dropped."""
        write_checkpoint(path, payload)
        dropped = self._record(path)
        directory = os.path.dirname(os.path.abspath(path))
        listed = [
            p for p, _ in self._last_checkpoints if os.path.dirname(os.path.abspath(p)) == directory
        ]
        update_checkpoint_state(directory, path, listed or [path])
        for old in dropped:
            self._delete(old)

    def _record(self, path: str) -> list[str]:
        """Append ``path`` to the managed list; return the paths over ``max_to_keep`` to delete.

        Every checkpoint over the limit is dropped at once (TensorFlow dropped one per save).
        """
        # A path given relative and recovered absolute is one entry.
        key = path_key(path)
        self._last_checkpoints = [(p, t) for p, t in self._last_checkpoints if path_key(p) != key]
        self._last_checkpoints.append((path, time.time()))
        dropped: list[str] = []
        if not self._max_to_keep:
            return dropped
        while len(self._last_checkpoints) > self._max_to_keep:
            old, saved_at = self._last_checkpoints.pop(0)
            if saved_at > self._next_checkpoint_time:
                self._next_checkpoint_time += self._keep_every_secs
                logger.info("Keeping %s (keep_checkpoint_every_n_hours).", old)
            else:
                dropped.append(old)
        return dropped

    @staticmethod
    def _delete(path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            logger.warning("Hit FileNotFoundError when deleting '%s'.", path)
        except OSError as err:
            logger.warning("Ignoring: %s", err)
