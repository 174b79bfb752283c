"""``Saver``: names checkpoints, commits them, and decides which ones are kept."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from ._checkpoint_file import load_checkpoint, write_checkpoint
from ._fsutil import path_key, remove_stray_temp_files
from ._ownership import inside, why_not_deletable
from ._payload_check import check_payload
from ._staging import StagingArea
from ._state_file import STATE_FILENAME, get_checkpoint_state, update_checkpoint_state
from ._writer import SaveHandle, start_write

if TYPE_CHECKING:
    from ._copy_engine import Fence
    from ._session import Session

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Entry:
    """One checkpoint on the saver's list."""

    path: str
    saved_at: float
    # The name's prefix once the entry is known to be this saver's to delete: set for a save it
    # committed itself, and for an adopted one once it passed ``why_not_deletable``.
    prefix: str | None = None
    vetted: bool = False


def _check_max_to_keep(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_to_keep must be None or an int >= 0, got {value!r}")
    return value


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"drain_timeout_secs must be None or a number > 0, got {value!r}")
    return float(value)


def _on_device(obj: Any) -> bool:
    """Whether ``obj`` (a nested state dict) holds a tensor that is not on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu"
    if isinstance(obj, dict):
        return any(_on_device(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_on_device(v) for v in obj)
    return False


def _check_hours(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"keep_checkpoint_every_n_hours must be a number > 0, got {value!r}")
    return float(value)


class Saver:
    """Writes checkpoints with ``torch.save``, keeps the ``checkpoint`` state file, prunes old ones.

    A save stages the session's state into reused host buffers on the calling thread (a memcpy on
    the CPU, side-stream copies on CUDA), then a writer thread waits for the copies and commits:
    the file (temporary name, fsync, rename, directory fsync), then the state file the same way,
    and only then deletes the checkpoints that retention drops. At every instant the state file
    names complete checkpoints. At most one save is in flight: a save requested while one is
    still being written waits for it, with a warning.

    ``max_to_keep`` of ``None`` or ``0`` keeps and lists every checkpoint. A popped checkpoint
    younger than the keep-every-N-hours threshold is deleted; an older one stays on disk
    (unlisted) and moves the threshold N hours on, as in TensorFlow. ``drain_timeout_secs``
    bounds how long ``wait_until_finished()`` (and so a runner's close) and a save waiting for the
    previous one block; ``None`` waits as long as the write takes.
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        *,
        drain_timeout_secs: float | None = 1800.0,
    ) -> None:
        self._max_to_keep = _check_max_to_keep(max_to_keep)
        self._keep_every_secs = _check_hours(keep_checkpoint_every_n_hours) * 3600.0
        self._drain_timeout = _check_timeout(drain_timeout_secs)
        self._next_checkpoint_time = time.time() + self._keep_every_secs
        # The latest save time seen, to notice a wall clock that jumped backwards.
        self._last_clock: float | None = None
        # Oldest first, every directory's; the writer thread appends, so reads take the lock.
        self._last_checkpoints: list[_Entry] = []
        self._lock = threading.Lock()
        # Directories whose stray temporary files were removed, and whose list was adopted.
        self._cleaned_dirs: set[str] = set()
        self._recovered_dirs: set[str] = set()
        self._staging = StagingArea()
        # Saves not yet known to be fine: the one in flight, and failures nobody was told of.
        self._handles: list[SaveHandle] = []

    @property
    def drain_timeout_secs(self) -> float | None:
        """How long waiting for an in-flight save may block before it is an error."""
        return self._drain_timeout

    @property
    def last_checkpoints(self) -> list[str]:
        """The checkpoints this saver manages, oldest first."""
        with self._lock:
            return [entry.path for entry in self._last_checkpoints]

    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: bool = True,
    ) -> Any:
        """Write ``session``'s state to ``f"{save_path}-{global_step}"`` (or ``save_path``).

        Returns the checkpoint's path, or with ``blocking=False`` a handle (``done()``,
        ``result()``) as soon as the state is staged; the write goes on in the background.
        ``global_step`` only names the file: the payload holds ``session.global_step``.

        Raises:
            TypeError: a value of the payload would not load with ``weights_only=True`` (the
                message names it); nothing is staged or written.
            ValueError: the parent directory of the checkpoint does not exist.
            CheckpointSaveError: (blocking) the write failed; the original error is the cause.
                Also when the previous save is still being written after ``drain_timeout_secs``.
        """
        path = self._checkpoint_path(save_path, global_step)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError(f"Parent directory of {path} doesn't exist, can't save.")
        state = session.state_dict()
        # Before anything is staged or written: a value weights_only loading refuses would make
        # this checkpoint, and every later one, unrestorable.
        check_payload(state)
        self._wait_for_previous(path)
        self._open_directory(directory)
        prefix = None if global_step is None else os.path.basename(os.fspath(save_path))
        self._vet_adopted(directory, prefix)
        payload, fence = self._staging.stage(state)
        if fence.on_device:
            session._protect_until_copied(fence, coarse=_on_device(state["extra_state"]))
        saved_at = self._clock()  # the save's time is the call's, as in TensorFlow
        handle = start_write(path, lambda: self._write(path, payload, fence, saved_at, prefix))
        self._handles = [h for h in self._handles if h.failed() and not h.reported]
        self._handles.append(handle)
        return handle.result() if blocking else handle

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Block until every pending save is durable.

        ``timeout`` defaults to ``drain_timeout_secs``.

        Raises:
            CheckpointSaveError: a save failed and no handle has reported it yet (each failure
                is raised once), or a save is still being written after the timeout.
        """
        timeout = self._drain_timeout if timeout is None else timeout
        for handle in list(self._handles):
            if not (handle.failed() and handle.reported):
                handle.result(timeout)
        self._handles = [h for h in self._handles if not h.done()]

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
        """Adopt ``checkpoint_paths`` (oldest first), dropping missing ones; mtimes become ages.

        An adopted path is deleted by retention only once it has proved to be a checkpoint of
        the first save into its directory (``_ownership``); the others are dropped then, with a
        warning, and left on disk.
        """
        recovered = []
        for path in checkpoint_paths:
            try:
                recovered.append(_Entry(path, os.path.getmtime(path)))
            except OSError:
                logger.warning("Checkpoint %s is missing; it is no longer managed.", path)
        with self._lock:
            self._last_checkpoints = recovered

    def recover_last_checkpoints_from(self, checkpoint_dir: str) -> None:
        """Adopt the list in ``checkpoint_dir``'s state file (a restart resumes retention)."""
        directory = os.path.abspath(checkpoint_dir)
        state = get_checkpoint_state(directory)
        paths = list(state.all_model_checkpoint_paths) if state else []
        outside = [p for p in paths if not inside(p, directory)]
        if outside:
            logger.warning(
                "The state file of %s lists checkpoints outside that directory; they are not "
                "managed here and never deleted: %s",
                directory,
                ", ".join(outside),
            )
        self.recover_last_checkpoints([p for p in paths if p not in outside])
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

    def _wait_for_previous(self, path: str) -> None:
        """At most one save in flight: the staging buffers are the previous save's until then."""
        in_flight = [h for h in self._handles if not h.done()]
        if not in_flight:
            return
        logger.warning(
            "Saving %s waits for the previous save (%s), which is still being written: the "
            "save interval is shorter than a save takes.",
            path,
            in_flight[0].path,
        )
        for handle in in_flight:
            handle.wait(self._drain_timeout)

    def _open_directory(self, directory: str) -> None:
        """On the first save into a directory: clean up after a killed save, adopt its list."""
        if directory not in self._cleaned_dirs:
            remove_stray_temp_files(directory)
            self._cleaned_dirs.add(directory)
        if directory not in self._recovered_dirs and not self.last_checkpoints:
            self.recover_last_checkpoints_from(directory)
        self._recovered_dirs.add(directory)

    def _clock(self) -> float:
        """``time.time()``, with the keep-every-N-hours threshold following a clock set back."""
        now = time.time()
        if self._last_clock is not None and now < self._last_clock:
            # The wall clock jumped backwards (NTP, a VM restored). The threshold and the save
            # times already listed move back with it (as if no time had passed since the last
            # save, the best a wall clock can tell), or no checkpoint would be kept for as long
            # as the jump.
            jump = self._last_clock - now
            self._next_checkpoint_time -= jump
            with self._lock:
                for entry in self._last_checkpoints:
                    entry.saved_at -= jump
        self._last_clock = now
        return now

    def _vet_adopted(self, directory: str, prefix: str | None) -> None:
        """Drop the adopted entries of ``directory`` that this saver may not delete, with a warning.

        Entries of other directories wait for a save into theirs.
        """
        with self._lock:
            entries = list(self._last_checkpoints)
        dropped: list[tuple[str, str]] = []
        for entry in entries:
            if entry.vetted or not inside(entry.path, directory):
                continue
            if not os.path.lexists(entry.path):
                # Deleted behind the saver's back: it stays listed, as in TensorFlow (the state
                # file names only existing files), and there is nothing to delete.
                continue
            reason = why_not_deletable(entry.path, directory, prefix)
            if reason is None:
                entry.vetted, entry.prefix = True, prefix
            else:
                dropped.append((entry.path, reason))
        if not dropped:
            return
        for path, reason in dropped:
            logger.warning(
                "The state file of %s lists %s, which is not a checkpoint this saver committed "
                "(%s): it is no longer listed, and never deleted.",
                directory,
                path,
                reason,
            )
        gone = {path_key(path) for path, _ in dropped}
        with self._lock:
            self._last_checkpoints = [
                e for e in self._last_checkpoints if path_key(e.path) not in gone
            ]

    def _write(
        self,
        path: str,
        payload: dict[str, Any],
        fence: Fence,
        saved_at: float,
        prefix: str | None,
    ) -> None:
        """The writer thread's part: wait for the staging copies, then commit."""
        try:
            fence.wait_on_host()
            self._commit(path, payload, saved_at, prefix)
        except BaseException as err:
            logger.error("Saving %s failed: %s", path, err)
            raise

    def _commit(
        self, path: str, payload: dict[str, Any], saved_at: float, prefix: str | None
    ) -> None:
        """Write the file, then the state file, then delete what retention dropped."""
        write_checkpoint(path, payload)
        directory = os.path.dirname(os.path.abspath(path))
        dropped = self._record(_Entry(path, saved_at, prefix, vetted=True), directory)
        listed = [p for p in self.last_checkpoints if inside(p, directory)]
        # A managed file deleted behind the saver's back (by a user, with its directory) stays in
        # the saver's list, as in TensorFlow, but the state file only ever names existing files.
        listed = [p for p in listed if p == path or os.path.exists(p)]
        update_checkpoint_state(directory, path, listed or [path])
        for old in dropped:
            self._delete(old, directory)

    def _record(self, entry: _Entry, directory: str) -> list[_Entry]:
        """Append ``entry``; return the entries of its directory over ``max_to_keep`` to delete.

        Every checkpoint over the limit is dropped at once (TensorFlow dropped one per save).
        The limit is per directory: saving into a second directory never deletes the newest
        checkpoints of the first.
        """
        # A path given relative and recovered absolute is one entry.
        key = path_key(entry.path)
        with self._lock:
            kept = [e for e in self._last_checkpoints if path_key(e.path) != key]
            kept.append(entry)
            here = [e for e in kept if inside(e.path, directory)]
            dropped: list[_Entry] = []
            while self._max_to_keep and len(here) > self._max_to_keep:
                old = here.pop(0)
                kept.remove(old)
                if old.saved_at > self._next_checkpoint_time:
                    self._next_checkpoint_time += self._keep_every_secs
                    if self._next_checkpoint_time <= old.saved_at:
                        # Behind by more than an interval (a clock that jumped forwards, or
                        # saves further apart than N hours): one kept per N hours from here,
                        # not every checkpoint until the threshold catches up.
                        self._next_checkpoint_time = old.saved_at + self._keep_every_secs
                    logger.info("Keeping %s (keep_checkpoint_every_n_hours).", old.path)
                else:
                    dropped.append(old)
            self._last_checkpoints = kept
        return dropped

    @staticmethod
    def _delete(entry: _Entry, directory: str) -> None:
        path = entry.path
        if not os.path.lexists(path):
            logger.warning("Hit FileNotFoundError when deleting '%s'.", path)
            return
        # Checked again at the last moment: the file may have been replaced since it was listed.
        reason = why_not_deletable(path, directory, entry.prefix) if entry.vetted else "unvetted"
        if reason is not None:
            logger.warning(
                "Not deleting %s, which retention dropped from the list: %s.", path, reason
            )
            return
        try:
            os.remove(path)
        except FileNotFoundError:
            logger.warning("Hit FileNotFoundError when deleting '%s'.", path)
        except OSError as err:
            logger.warning("Ignoring: %s", err)
