"""``Saver``: names checkpoints, commits them through a storage, and applies retention.

A save enters here once (``save``, on the training thread: check, stage, hand off) and once more
on the writer thread (``_commit``: write, list, delete). Policy lives beside it, I/O behind it:
``_retention`` decides what is kept, ``_ownership`` (through the storage) what may be deleted,
``_in_flight`` owns the save being written, and a ``CheckpointStorage`` does every read and write.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from ._checkpoint_dir import checkpoint_name, step_of
from ._dist_save import SHARDED_KEYS, commit_everywhere, gather_payload
from ._fsspec_storage import FsspecStorage
from ._fsutil import path_key
from ._in_flight import InFlight
from ._paths import abspath, dirname, inside, is_url, normalize
from ._payload_check import check_payload
from ._retention import Entry, Retention, RetentionPolicy
from ._session import PAYLOAD_KEYS
from ._sharded_dir import FileDigest
from ._sharded_read import fit_to_session, is_sharded_checkpoint
from ._sharded_storage import ShardedStorage, read_sharded
from ._staging import StagingArea
from ._state_file import STATE_FILENAME
from ._stateful_capture import needs_coarse_guard
from ._storage import CheckpointStorage
from ._storage_for import DefaultStorage, storage_for
from ._validation import check_int, check_number, check_type, repr_with_type
from ._writer import SaveHandle, start_write

if TYPE_CHECKING:
    from ._copy_engine import Fence
    from ._distributed import CheckpointGroup
    from ._session import Session

logger = logging.getLogger(__name__)


# Keys the payload has or may have (SPEC.md sections 4 and 5.2): never set by ``extra_payload``.
_RESERVED_KEYS = frozenset(PAYLOAD_KEYS) | {"rank_rng", "rank_state"}


def _with_extra_payload(
    state: dict[str, Any], extra_payload: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``state`` with ``extra_payload``'s keys added; none may replace one of the payload's own."""
    if extra_payload is None:
        return state
    if not isinstance(extra_payload, Mapping):
        raise TypeError(
            "extra_payload must be a dict of str -> value or None, "
            f"got {repr_with_type(extra_payload)}"
        )
    for key in extra_payload:
        if not isinstance(key, str):
            raise TypeError(f"extra_payload keys must be str, got {repr_with_type(key)}")
        if key in _RESERVED_KEYS or key in state:
            raise ValueError(
                f"extra_payload must not set {key!r}, a key of the checkpoint payload itself "
                f"(reserved: {sorted(_RESERVED_KEYS | set(state))}); give it another name"
            )
    return {**state, **extra_payload}


@dataclasses.dataclass(frozen=True)
class _Job:
    """One staged save, handed to the writer thread."""

    path: str
    directory: str
    prefix: str | None
    payload: dict[str, Any]
    # Staging buffers: filled by the copy engine, read by the writer thread once the fence
    # passes; the saver stages again only after this job finished.
    fence: Fence
    saved_at: float
    # False for a save that must not make retention delete anything (checkpoint_on_error).
    apply_retention: bool = True
    # A save every rank of ``group`` takes part in (_dist_save); ``sharded``: through DCP.
    group: CheckpointGroup | None = None
    sharded: bool = False


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
    (unlisted) and moves the threshold N hours on, as in TensorFlow. With
    ``keep_checkpoint_every_n_steps``, a popped checkpoint whose step (the number its name ends
    with) is a positive multiple of it stays on disk (unlisted) too. ``drain_timeout_secs``
    bounds how long ``wait_until_finished()`` (and so a runner's close) and a save waiting for the
    previous one block; ``None`` waits as long as the write takes.
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        keep_checkpoint_every_n_steps: int | None = None,
        *,
        drain_timeout_secs: float | None = 1800.0,
        storage: CheckpointStorage | None = None,
    ) -> None:
        check_type("storage", storage, CheckpointStorage, "a CheckpointStorage", allow_none=True)
        hours = check_number(
            "keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours, positive=True
        )
        timeout = check_number(
            "drain_timeout_secs", drain_timeout_secs, positive=True, allow_none=True
        )
        every_steps = check_int(
            "keep_checkpoint_every_n_steps",
            keep_checkpoint_every_n_steps,
            minimum=1,
            allow_none=True,
        )
        self._retention: Retention = RetentionPolicy(
            check_int("max_to_keep", max_to_keep, minimum=0, allow_none=True),
            float(hours) * 3600.0,
            time.time(),
            every_steps,
        )
        self._in_flight = InFlight(None if timeout is None else float(timeout))
        # The default routes each path: local files as LocalStorage, fsspec URLs as FsspecStorage.
        self._storage = storage if storage is not None else DefaultStorage()
        # Oldest first, every directory's; the writer thread appends, so reads take the lock.
        self._last_checkpoints: list[Entry] = []
        self._lock = threading.Lock()
        # Directories prepared (stray temporary files removed), and whose list was adopted.
        self._prepared_dirs: set[str] = set()
        self._recovered_dirs: set[str] = set()
        self._staging = StagingArea()

    @property
    def drain_timeout_secs(self) -> float | None:
        """How long waiting for an in-flight save may block before it is an error."""
        return self._in_flight.timeout

    @property
    def storage(self) -> CheckpointStorage:
        """Where this saver reads and writes checkpoints."""
        return self._storage

    @property
    def last_checkpoints(self) -> list[str]:
        """The checkpoints this saver manages, oldest first."""
        with self._lock:
            return [entry.path for entry in self._last_checkpoints]

    @overload
    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: Literal[True] = True,
        apply_retention: bool = True,
        extra_payload: Mapping[str, Any] | None = None,
        collective: bool | None = None,
    ) -> str: ...

    @overload
    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: Literal[False],
        apply_retention: bool = True,
        extra_payload: Mapping[str, Any] | None = None,
        collective: bool | None = None,
    ) -> SaveHandle: ...

    @overload
    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: bool,
        apply_retention: bool = True,
        extra_payload: Mapping[str, Any] | None = None,
        collective: bool | None = None,
    ) -> str | SaveHandle: ...

    def save(
        self,
        session: Session,
        save_path: str,
        global_step: int | None = None,
        *,
        blocking: bool = True,
        apply_retention: bool = True,
        extra_payload: Mapping[str, Any] | None = None,
        collective: bool | None = None,
    ) -> str | SaveHandle:
        """Write ``session``'s state to ``f"{save_path}-{global_step}"`` (or ``save_path``).

        Returns the checkpoint's path, or with ``blocking=False`` a ``SaveHandle`` (``done()``,
        ``result()``) as soon as the state is staged; the write goes on in the background.
        ``global_step`` only names the file: the payload holds ``session.global_step``.
        With ``apply_retention=False`` the checkpoint is listed as the latest but retention deletes
        nothing for it (a save made on the way out of an error); the next save applies it again.
        ``extra_payload`` adds top-level keys to this checkpoint's payload (``metrics`` for
        ``BestCheckpointSaverHook``); restore ignores them. ``collective``: whether every rank
        of the session's group makes this save together (the default when there are several
        ranks, or the model is sharded); ``False`` for a save the chief makes alone (a hook that
        runs on the chief only), which a sharded model cannot have.

        Raises:
            TypeError: a value of the payload would not load with ``weights_only=True`` (the
                message names it); nothing is staged or written.
            ValueError: the parent directory of the checkpoint does not exist, or a key of
                ``extra_payload`` is one of the payload's own.
            CheckpointSaveError: (blocking) the write failed; the original error is the cause.
                Also when the previous save is still being written after ``drain_timeout_secs``.
        """
        path = self._checkpoint_path(save_path, global_step)
        directory = dirname(abspath(path))
        if not self._storage.is_directory(directory):
            raise ValueError(f"Parent directory of {path} doesn't exist, can't save.")
        if collective is None:
            collective = session.checkpoint_group.distributed or session.sharded
        if collective:
            handle = self._save_everywhere(
                session, path, directory, save_path, global_step, apply_retention, extra_payload
            )
            return handle.result() if blocking else handle
        if session.sharded:
            raise ValueError(
                "collective=False: a sharded model (DTensor parameters) is saved by every rank "
                "together; save it with collective=None on every rank"
            )
        state = _with_extra_payload(session.state_dict(), extra_payload)
        # Before anything is staged or written: a value weights_only loading refuses would make
        # this checkpoint, and every later one, unrestorable.
        check_payload(state)
        self._in_flight.wait_for_previous(path)
        prefix = None if global_step is None else os.path.basename(os.fspath(save_path))
        self._open_directory(directory, prefix)
        payload, fence = self._stage(session, state, state["extra_state"])
        handle = self._start(
            _Job(path, directory, prefix, payload, fence, self._clock(), apply_retention)
        )
        return handle.result() if blocking else handle

    def _save_everywhere(
        self,
        session: Session,
        path: str,
        directory: str,
        save_path: str,
        global_step: int | None,
        apply_retention: bool,
        extra_payload: Mapping[str, Any] | None,
    ) -> SaveHandle:
        """A save every rank makes together: the chief's file, or every rank's shards."""
        group = session.checkpoint_group
        sharded = session.sharded
        state = _with_extra_payload(session.state_dict(), extra_payload)
        payload = gather_payload(state, session.local_rank_state(), group, sharded=sharded)
        self._in_flight.wait_for_previous(path)
        prefix = None if global_step is None else os.path.basename(os.fspath(save_path))
        if group.is_chief:
            self._open_directory(directory, prefix)
        shards: dict[str, Any] = {}
        if sharded:
            from torch.distributed.checkpoint.staging import BlockingAsyncStager

            # A copy on the CPU, taken now: the save holds this step's state whatever
            # training does next (DCP's own stager).
            parts = {key: state[key] for key in SHARDED_KEYS if state[key] is not None}
            shards = BlockingAsyncStager().stage(parts)
        rest = {k: v for k, v in (payload or {}).items() if not (sharded and k in SHARDED_KEYS)}
        staged, fence = self._stage(session, rest, state["extra_state"])
        return self._start(
            _Job(
                path,
                directory,
                prefix,
                {**staged, **shards},
                fence,
                self._clock(),
                apply_retention,
                group=group,
                sharded=sharded,
            )
        )

    def _stage(
        self, session: Session, state: Any, extra_state: Mapping[str, Any]
    ) -> tuple[Any, Fence]:
        """Stage ``state`` into the reused buffers; on a device, guard the staged tensors.

        The next in-place update of a staged tensor then waits, on the device, for its copy
        (coarsely when ``extra_state`` holds device tensors the guard cannot see).
        """
        payload, fence = self._staging.stage(state)
        if fence.on_device:
            session.protect_until_copied(fence, coarse=needs_coarse_guard(extra_state))
        return payload, fence

    def _start(self, job: _Job) -> SaveHandle:
        """Hand ``job`` to a writer thread; it is the save in flight from now on."""
        handle = start_write(job.path, functools.partial(self._commit, job))
        self._in_flight.add(handle)
        return handle

    def save_in_flight(self) -> bool:
        """Whether a save is still being written (a save started now would wait); never blocks."""
        return self._in_flight.busy()

    def wait_for_previous_save(self, next_name: str | None = None) -> None:
        """Wait for the save still being written, if any (before saving ``next_name``).

        With ``next_name``, logs that the save interval is shorter than a save takes. A failure
        of that save is not raised here: its handle reports it.

        Raises:
            CheckpointSaveError: it is still being written after ``drain_timeout_secs``.
        """
        self._in_flight.wait_for_previous(next_name)

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Block until every pending save is durable.

        ``timeout`` defaults to ``drain_timeout_secs``.

        Raises:
            CheckpointSaveError: a save failed and no handle has reported it yet (each failure
                is raised once), or a save is still being written after the timeout.
        """
        self._in_flight.drain(timeout)

    def restore(self, session: Session, save_path: str) -> None:
        """Load the checkpoint at ``save_path`` into ``session``."""
        if save_path is None:
            raise ValueError("Can't load save_path when it is None.")
        logger.info("Restoring parameters from %s", save_path)
        if not is_url(save_path) and is_sharded_checkpoint(save_path):
            # Read into the session's own (possibly sharded) state: DCP reshards.
            payload = read_sharded(session, save_path)
        else:
            # A URL (a mirror's checkpoint) through fsspec, whatever storage this saver writes
            # with.
            storage = self._storage
            if is_url(save_path) and not isinstance(storage, (DefaultStorage, FsspecStorage)):
                storage = storage_for(save_path)
            # A file exported from a sharded checkpoint keys its optimizer state by parameter
            # name (``torch-ckpt export``): into this session's parameter ids here.
            payload = fit_to_session(storage.read(save_path), session)
        session.load_state_dict(payload, restored_from=abspath(save_path))

    def recover_last_checkpoints(self, checkpoint_paths: list[str]) -> None:
        """Adopt ``checkpoint_paths`` (oldest first), dropping missing ones; mtimes become ages.

        An adopted path is deleted by retention only once it has proved to be a checkpoint of
        the first save into its directory (``_ownership``); the others are dropped then, with a
        warning, and left on disk.
        """
        recovered = []
        for path in checkpoint_paths:
            try:
                recovered.append(Entry(path, self._storage.saved_time(path), step=step_of(path)))
            except OSError:
                logger.warning("Checkpoint %s is missing; it is no longer managed.", path)
        with self._lock:
            self._last_checkpoints = recovered

    def recover_last_checkpoints_from(self, checkpoint_dir: str) -> None:
        """Adopt the list in ``checkpoint_dir``'s state file (a restart resumes retention)."""
        directory = abspath(checkpoint_dir)
        state = self._storage.read_state(directory)
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

    # -- the training thread's part --------------------------------------------------------

    def _checkpoint_path(self, save_path: str, global_step: int | None) -> str:
        if not isinstance(save_path, (str, os.PathLike)):
            raise TypeError(f"save_path must be a path, got {type(save_path).__qualname__}")
        save_path = normalize(os.fspath(save_path))
        check_int("global_step", global_step, allow_none=True)
        if global_step is None:
            if os.path.basename(save_path) == STATE_FILENAME:
                raise ValueError(
                    f"'latest_filename' collides with 'save_path': '{STATE_FILENAME}' and "
                    f"'{save_path}'"
                )
            return save_path
        return checkpoint_name(save_path, global_step)

    def _clock(self) -> float:
        """``time.time()`` at the save call (TensorFlow's save time), shown to retention."""
        now = time.time()
        with self._lock:
            self._retention.observe_clock(now, self._last_checkpoints)
        return now

    def _open_directory(self, directory: str, prefix: str | None) -> None:
        """On the first save into a directory: clean up after a killed save, adopt its list.

        Then drop the adopted entries of ``directory`` that this saver may not delete.
        """
        if directory not in self._prepared_dirs:
            self._storage.prepare(directory)
            self._prepared_dirs.add(directory)
        if directory not in self._recovered_dirs and not self.last_checkpoints:
            self.recover_last_checkpoints_from(directory)
        self._recovered_dirs.add(directory)
        self._vet_adopted(directory, prefix)

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
            if not self._storage.exists(entry.path):
                # Deleted behind the saver's back: it stays listed, as in TensorFlow (the state
                # file names only existing files), and there is nothing to delete.
                continue
            reason = self._storage.why_not_deletable(entry.path, directory, prefix)
            if reason is None:
                entry.vetted, entry.prefix = True, prefix
            else:
                dropped.append((entry.path, reason))
        for path, reason in dropped:
            logger.warning(
                "The state file of %s lists %s, which is not a checkpoint this saver committed "
                "(%s): it is no longer listed, and never deleted.",
                directory,
                path,
                reason,
            )
        if dropped:
            gone = {path_key(path) for path, _ in dropped}
            with self._lock:
                self._last_checkpoints = [
                    e for e in self._last_checkpoints if path_key(e.path) not in gone
                ]

    # -- the writer thread's part ----------------------------------------------------------

    def _commit(self, job: _Job) -> None:
        """Wait for the staging copies; write the file, then the state file, then delete."""
        if job.group is not None:
            self._commit_everywhere(job, job.group)
            return
        try:
            job.fence.wait_on_host()
            self._storage.write(job.path, job.payload)
            deleted = self._record(
                Entry(job.path, job.saved_at, job.prefix, vetted=True, step=step_of(job.path)), job
            )
            listed = [p for p in self.last_checkpoints if inside(p, job.directory)]
            # A managed file deleted behind the saver's back (by a user, with its directory)
            # stays in the saver's list, as in TensorFlow, but the state file only ever names
            # existing files.
            listed = [p for p in listed if p == job.path or self._storage.exists(p)]
            # The state file names the last listed: the newest, or for a ranked policy the best.
            latest = listed[-1] if listed else job.path
            self._storage.write_state(job.directory, latest, listed or [job.path])
        except BaseException as err:
            logger.error("Saving %s failed: %s", job.path, err)
            raise
        for entry in deleted:
            self._delete(entry, job.directory)

    def _commit_everywhere(self, job: _Job, group: CheckpointGroup) -> None:
        """A distributed save's writer thread, on every rank (``_dist_save``)."""
        sharded = ShardedStorage(group, self._storage) if job.sharded else None

        def write_local() -> dict[str, tuple[int, int]]:
            job.fence.wait_on_host()
            if sharded is not None:
                sharded.write(job.path, job.payload)
                return {n: (d.size, d.crc32) for n, d in sharded.digests(job.path).items()}
            if group.is_chief:
                self._storage.write(job.path, job.payload)
            return {}

        def commit(files: dict[str, tuple[int, int]]) -> list[Entry]:
            if sharded is not None:
                digests = {name: FileDigest(*value) for name, value in files.items()}
                sharded.finish(job.path, int(job.payload["global_step"]), digests)
            entry = Entry(job.path, job.saved_at, job.prefix, vetted=True, step=step_of(job.path))
            deleted = self._record(entry, job)
            listed = [p for p in self.last_checkpoints if inside(p, job.directory)]
            listed = [p for p in listed if p == job.path or self._storage.exists(p)]
            latest = listed[-1] if listed else job.path
            self._storage.write_state(job.directory, latest, listed or [job.path])
            return deleted

        try:
            deleted = commit_everywhere(group, job.path, write_local, commit)
        except BaseException as err:
            logger.error("Saving %s failed: %s", job.path, err)
            raise
        for entry in deleted or []:
            self._delete(entry, job.directory)

    def _record(self, entry: Entry, job: _Job) -> list[Entry]:
        """Append ``entry``; return the entries of its directory that retention deletes.

        The limit is per directory: saving into a second directory never deletes the newest
        checkpoints of the first.
        """
        # A path given relative and recovered absolute is one entry.
        key = path_key(entry.path)
        with self._lock:
            kept = [e for e in self._last_checkpoints if path_key(e.path) != key]
            kept.append(entry)
            if not job.apply_retention:
                self._last_checkpoints = kept
                return []
            verdict = self._retention.apply([e for e in kept if inside(e.path, job.directory)])
            for old in verdict.preserved:
                logger.info(
                    "Keeping %s (keep_checkpoint_every_n_hours or _every_n_steps).", old.path
                )
            dropped = {id(e) for e in (*verdict.deleted, *verdict.preserved)}
            # The directory's entries take its slots in retention's order (the same for the
            # age policy; best last for a ranked one), the other directories' stay put.
            order = iter(verdict.listed)
            ranked = {id(e) for e in verdict.listed}
            self._last_checkpoints = [
                next(order) if id(e) in ranked else e for e in kept if id(e) not in dropped
            ]
        return verdict.deleted

    def _delete(self, entry: Entry, directory: str) -> None:
        path = entry.path
        if not self._storage.exists(path):
            logger.warning("Hit FileNotFoundError when deleting '%s'.", path)
            return
        # Checked again at the last moment: the file may have been replaced since it was listed.
        reason = (
            self._storage.why_not_deletable(path, directory, entry.prefix)
            if entry.vetted
            else "it was never checked to be this saver's"
        )
        if reason is not None:
            logger.warning(
                "Not deleting %s, which retention dropped from the list: %s.", path, reason
            )
            return
        try:
            self._storage.delete(path)
        except FileNotFoundError:
            logger.warning("Hit FileNotFoundError when deleting '%s'.", path)
        except OSError as err:
            logger.warning("Ignoring: %s", err)
