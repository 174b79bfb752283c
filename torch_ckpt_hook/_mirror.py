"""The mirror tier: each checkpoint committed locally is copied to ``mirror_dir`` in the background.

Threads: ``submit`` and ``drain`` / ``close`` run on the training thread; the copying, the
mirror's state file, its retention and the status file are the mirror thread's alone (one
thread, started at the first ``submit``, at a lower CPU priority like the writer). The training
loop never waits for it: ``submit`` puts a path on a queue.

One copy (``_copy_once``): check the local file's checksum (a damaged file is never mirrored),
copy it to ``mirror_dir`` under its local name as one atomic publication (``put_file``), make the
mirror's own state file name it (the commit point on the mirror), then apply the mirror's
retention (``mirror_max_to_keep``; never the checkpoint just copied nor the one the local tier
lists as its newest), deleting only what its ownership proof clears. A failed copy is retried
(``RetryPolicy``) with back-off, logged, and recorded; it is never raised into training.

``drain`` (the hook's ``wait_until_finished`` and ``end``) returns once every checkpoint
submitted is on the mirror or its copy failed; while it waits, a copy that failed is not retried
again, so an unreachable mirror holds it for one failed attempt per checkpoint.

Every outcome is written to the status file ``checkpoint.mirror`` (JSON) in the local directory,
which ``torch-ckpt ls`` reads. Its name starts with ``checkpoint``, so no reader takes it for
another series' state file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from typing import Any

from ._checkpoint_dir import latest_checkpoint, step_of
from ._checkpoint_file import check_checkpoint
from ._errors import CheckpointSaveError
from ._fsspec_storage import require_fsspec
from ._fsutil import atomic_write, path_key
from ._messages import error_line
from ._mirror_policy import RetryPolicy, mirror_retention
from ._paths import basename, inside, is_url, join, normalize
from ._storage import CheckpointStorage
from ._storage_for import DefaultStorage
from ._validation import check_int
from ._writer import SaveHandle, _lower_this_threads_priority

logger = logging.getLogger(__name__)

STATUS_FILENAME = "checkpoint.mirror"
# How often the mirror thread looks up from a local save it waits for, to see whether to hurry.
_POLL_SECS = 0.05
# Outcomes kept in the status file: the newest ones.
_STATUS_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class MirrorOutcome:
    """What became of one checkpoint's copy."""

    name: str
    state: str
    """``mirrored``, ``failed`` (every attempt failed) or ``skipped`` (gone or damaged locally)."""
    detail: str
    attempts: int
    time: float


class _Skip(Exception):
    """The checkpoint is not to be copied at all (no retry)."""


class Mirror:
    """Copies the committed checkpoints of ``local_dir`` (series ``prefix``) to ``mirror_dir``."""

    def __init__(
        self,
        local_dir: str,
        mirror_dir: str,
        max_to_keep: int | None,
        prefix: str,
        *,
        retry: RetryPolicy | None = None,
        storage: CheckpointStorage | None = None,
    ) -> None:
        self.local_dir = local_dir
        self.mirror_dir = mirror_dir.rstrip("/") if is_url(mirror_dir) else mirror_dir
        self.max_to_keep = max_to_keep
        self.prefix = prefix
        self.retry = retry if retry is not None else RetryPolicy()
        self._storage = storage if storage is not None else DefaultStorage()
        self._queue: queue.Queue[str | SaveHandle | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # Set while the training thread waits in drain(): a failed copy is not retried again.
        self._hurry = threading.Event()
        # The mirror thread's own: its checkpoints, oldest first (adopted at its first copy).
        self._listed: list[str] | None = None
        self._lock = threading.Lock()
        self._outcomes: dict[str, MirrorOutcome] = {}

    # -- the training thread's part --------------------------------------------------------

    def submit(self, save: str | SaveHandle) -> None:
        """Queue a save for copying: a committed path, or the handle of a save being written.

        Never blocks. A handle's checkpoint is copied as soon as it commits (the mirror thread
        waits for it, without reporting its failure: that is the hook's), not at the next hook
        call.
        """
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name=f"torch_ckpt_hook-mirror:{self.mirror_dir}", daemon=True
            )
            self._thread.start()
        self._queue.put(save)

    def drain(self) -> None:
        """Return once every submitted checkpoint is on the mirror or its copy failed."""
        if self._thread is None:
            return
        self._hurry.set()
        try:
            self._queue.join()
        finally:
            self._hurry.clear()

    def close(self) -> None:
        """``drain``, then stop the mirror thread (a later ``submit`` starts another)."""
        self.drain()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def outcomes(self) -> dict[str, MirrorOutcome]:
        """The latest outcome of each checkpoint's copy, by name."""
        with self._lock:
            return dict(self._outcomes)

    # -- the mirror thread's part ----------------------------------------------------------

    def _run(self) -> None:
        _lower_this_threads_priority()
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                path = item if isinstance(item, str) else self._committed(item)
                if path is not None:
                    self._copy(path)
            except Exception:  # a bug here must not end the thread with copies queued
                logger.exception("Mirroring %s to %s failed", item, self.mirror_dir)
            finally:
                self._queue.task_done()

    def _committed(self, handle: SaveHandle) -> str | None:
        """The path of ``handle``'s checkpoint once committed; None when it failed or is still
        being written when ``drain`` asks to hurry (a hung disk must not hold close())."""
        while True:
            try:
                handle.wait(_POLL_SECS)
                break
            except CheckpointSaveError:  # still being written
                if self._hurry.is_set():
                    self._record(
                        MirrorOutcome(
                            basename(handle.path),
                            "skipped",
                            "its local save had not committed when the mirror closed",
                            0,
                            time.time(),
                        )
                    )
                    return None
        if handle.failed():
            self._record(
                MirrorOutcome(
                    basename(handle.path), "skipped", "its local save failed", 0, time.time()
                )
            )
            return None
        return handle.path

    def _copy(self, local_path: str) -> None:
        name = basename(local_path)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._copy_once(local_path, join(self.mirror_dir, name))
            except _Skip as skip:
                logger.warning("Not mirroring %s: %s", local_path, skip)
                self._record(MirrorOutcome(name, "skipped", str(skip), attempt, time.time()))
                return
            except Exception as err:
                reason = error_line(err)
                last = attempt >= self.retry.attempts or self._hurry.is_set()
                delay = self.retry.delay(attempt)
                if not last:
                    logger.warning(
                        "Mirroring %s to %s failed (attempt %d of %d), retrying in %.3g s: %s",
                        name,
                        self.mirror_dir,
                        attempt,
                        self.retry.attempts,
                        delay,
                        reason,
                    )
                if last or self._hurry.wait(delay):
                    logger.error(
                        "Mirroring %s to %s failed after %d attempt%s; the checkpoint stays on "
                        "the local tier only: %s",
                        name,
                        self.mirror_dir,
                        attempt,
                        "" if attempt == 1 else "s",
                        reason,
                    )
                    self._record(MirrorOutcome(name, "failed", reason, attempt, time.time()))
                    return
            else:
                logger.info("Mirrored %s to %s", name, self.mirror_dir)
                self._record(MirrorOutcome(name, "mirrored", "", attempt, time.time()))
                return

    def _copy_once(self, local_path: str, target: str) -> None:
        if not os.path.exists(local_path):
            raise _Skip("it was deleted from the local tier (retention) before it was copied")
        problem = check_checkpoint(local_path)
        if problem is not None and problem.kind == "corrupted":
            raise _Skip(f"the local file is damaged: {problem.message}")
        if problem is not None:
            raise OSError(problem.message)
        if not is_url(self.mirror_dir):
            os.makedirs(self.mirror_dir, exist_ok=True)
        self._storage.put_file(local_path, target)
        # Oldest step first: a copy made out of order (a retry, a re-copy) takes its place.
        listed = sorted({*self._adopted(), target}, key=lambda p: (_step(p), p != target, p))
        protected = {target}
        local_latest = latest_checkpoint(self.local_dir)
        if local_latest is not None:
            protected.add(join(self.mirror_dir, basename(local_latest)))
        kept, dropped = mirror_retention(listed, self.max_to_keep, protected)
        # The commit point on the mirror: from here latest_checkpoint(mirror_dir) is its newest.
        self._storage.write_state(self.mirror_dir, kept[-1], kept)
        self._listed = kept
        for path in dropped:
            self._delete(path)

    def _adopted(self) -> list[str]:
        if self._listed is None:
            state = self._storage.read_state(self.mirror_dir)
            paths = list(state.all_model_checkpoint_paths) if state is not None else []
            self._listed = [p for p in paths if inside(p, self.mirror_dir)]
        return self._listed

    def _delete(self, path: str) -> None:
        reason = self._storage.why_not_deletable(path, self.mirror_dir, self.prefix)
        if reason is not None:
            logger.warning("Not deleting %s from the mirror: %s.", path, reason)
            return
        try:
            self._storage.delete(path)
        except FileNotFoundError:
            logger.warning("Hit FileNotFoundError when deleting '%s' from the mirror.", path)
        except OSError as err:
            logger.warning("Ignoring: %s", err)

    def _record(self, outcome: MirrorOutcome) -> None:
        with self._lock:
            self._outcomes.pop(outcome.name, None)
            self._outcomes[outcome.name] = outcome
            while len(self._outcomes) > _STATUS_LIMIT:
                self._outcomes.pop(next(iter(self._outcomes)))
            doc = {
                "mirror_dir": self.mirror_dir,
                "checkpoints": [dataclasses.asdict(o) for o in self._outcomes.values()],
            }
        data = json.dumps(doc, indent=1).encode("utf-8")
        try:
            atomic_write(join(self.local_dir, STATUS_FILENAME), lambda f: f.write(data))
        except OSError as err:
            logger.warning("Could not write the mirror status file in %s: %s", self.local_dir, err)


def _step(path: str) -> int:
    step = step_of(path)
    return -1 if step is None else step


def read_mirror_status(local_dir: str) -> dict[str, Any] | None:
    """The mirror status file of ``local_dir`` (``mirror_dir`` and the outcomes), or None."""
    try:
        with open(join(local_dir, STATUS_FILENAME), "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints"), list):
        return None
    return doc


def mirror_for_hook(
    checkpoint_dir: str, mirror_dir: object, mirror_max_to_keep: object, prefix: str
) -> Mirror | None:
    """The hook's mirror for its arguments (checked), or None without a ``mirror_dir``."""
    if mirror_dir is None:
        if mirror_max_to_keep is not None:
            raise ValueError(
                f"mirror_max_to_keep={mirror_max_to_keep!r} needs a mirror_dir to apply to; "
                "give mirror_dir, or leave mirror_max_to_keep None"
            )
        return None
    if not isinstance(mirror_dir, (str, os.PathLike)):
        raise TypeError(f"mirror_dir must be a path or None, got {type(mirror_dir).__qualname__}")
    keep = check_int("mirror_max_to_keep", mirror_max_to_keep, minimum=0, allow_none=True)
    if is_url(checkpoint_dir):
        raise ValueError(
            f"mirror_dir needs a local checkpoint_dir to mirror (the fast tier), got "
            f"{checkpoint_dir!r}; write to the remote location as the mirror_dir instead"
        )
    target = normalize(os.fspath(mirror_dir))
    if is_url(target):
        require_fsspec(target, "mirror_dir")
    if same_location(target, checkpoint_dir):
        raise ValueError(
            f"mirror_dir must be another location than checkpoint_dir, got {target!r} for both"
        )
    return Mirror(checkpoint_dir, target, keep, prefix)


def same_location(a: str, b: str) -> bool:
    """Whether two locations (paths or URLs) are one."""
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return path_key(a) == path_key(b)
