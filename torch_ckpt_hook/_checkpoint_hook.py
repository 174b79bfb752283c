"""``CheckpointSaverHook``: when to save and under what name; the ``Saver`` does the rest."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import CheckpointSaveError
from ._fsutil import same_path
from ._hooks import SessionRunContext, SessionRunHook, SessionRunValues
from ._listeners import CheckpointSaverListener
from ._saver import Saver
from ._scaffold import Scaffold
from ._state_file import latest_checkpoint
from ._timer import SecondOrStepTimer

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session

logger = logging.getLogger(__name__)


@dataclass
class _PendingSave:
    """A save whose listeners' ``after_save`` has not run yet."""

    handle: Any
    step: int
    # A stop asked by after_save counts only for saves made from after_run (TensorFlow).
    may_stop: bool


def _check_listeners(listeners: object) -> list[CheckpointSaverListener]:
    if listeners is None:
        return []
    if not isinstance(listeners, Iterable):
        raise TypeError(
            "listeners must be a list of CheckpointSaverListener, "
            f"got {type(listeners).__qualname__}"
        )
    result = list(listeners)
    for index, listener in enumerate(result):
        if not isinstance(listener, CheckpointSaverListener):
            raise TypeError(
                f"listeners[{index}] must be a CheckpointSaverListener, "
                f"got {type(listener).__qualname__}"
            )
    return result


def check_writable_dir(directory: str) -> None:
    """Create ``directory`` if needed and prove a file can be written there.

    Raises:
        ValueError: the path is a file, cannot be created, or is not writable.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"checkpoint_dir must be a directory, but {directory!r} is a file")
    try:
        os.makedirs(directory, exist_ok=True)
        # A probe rather than os.access(): access() says yes to root on a read-only mount.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(
            f"checkpoint_dir {directory!r} must be a writable directory: {err.strerror or err}"
        ) from err


class CheckpointSaverHook(SessionRunHook):
    """Saves a checkpoint every ``save_secs`` seconds or every ``save_steps`` steps.

    It saves at session creation (unless the newest checkpoint already holds that step), whenever
    the timer fires for the new global step after a run, and in ``end()`` when the last step is
    unsaved. With ``async_save`` the write happens in the background and listeners' ``after_save``
    runs on the training thread at the first hook call after the file is durable.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        save_secs: float | None = None,
        save_steps: int | None = None,
        saver: Saver | None = None,
        checkpoint_basename: str = "model.ckpt",
        scaffold: Scaffold | None = None,
        listeners: Iterable[CheckpointSaverListener] | None = None,
        *,
        async_save: bool = True,
    ) -> None:
        logger.info("Create CheckpointSaverHook.")
        if saver is not None and scaffold is not None:
            raise ValueError("You cannot provide both saver and scaffold.")
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(
                f"checkpoint_dir must be a path, got {type(checkpoint_dir).__qualname__}"
            )
        if not isinstance(checkpoint_basename, str) or not checkpoint_basename:
            raise ValueError(
                f"checkpoint_basename must be a non-empty file name, got {checkpoint_basename!r}"
            )
        if os.sep in checkpoint_basename or (os.altsep and os.altsep in checkpoint_basename):
            raise ValueError(
                "checkpoint_basename must be a file name without directories, "
                f"got {checkpoint_basename!r}"
            )
        if saver is not None and not isinstance(saver, Saver):
            raise TypeError(f"saver must be a Saver or None, got {type(saver).__qualname__}")
        if scaffold is not None and not isinstance(scaffold, Scaffold):
            raise TypeError(
                f"scaffold must be a Scaffold or None, got {type(scaffold).__qualname__}"
            )
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool, got {async_save!r}")
        self._checkpoint_dir = os.fspath(checkpoint_dir)
        self._save_path = os.path.join(self._checkpoint_dir, checkpoint_basename)
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps)
        self._saver = saver
        self._scaffold = scaffold
        self._listeners = _check_listeners(listeners)
        self._async_save = async_save
        self._pending: list[_PendingSave] = []
        self._stop_pending = False
        # The session of the latest hook call, for after_save calls made from wait_until_finished.
        self._session: Session | None = None

    # -- the hook protocol -------------------------------------------------------------------

    def begin(self) -> None:
        check_writable_dir(self._checkpoint_dir)
        for listener in self._listeners:
            listener.begin()

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        self._poll(session)
        global_step = session.global_step
        # The state may be what was just restored from the newest checkpoint: re-saving it only
        # costs time (TensorFlow did; users saw training "stuck" at "Saving checkpoints for 0").
        # A file of that name that the session did not come from is overwritten.
        path = self._checkpoint_path(global_step)
        latest = latest_checkpoint(self._checkpoint_dir)
        just_restored = (
            latest is not None
            and session.restored_from is not None
            and same_path(latest, path)
            and same_path(session.restored_from, path)
        )
        if not just_restored:
            self._save(session, global_step, may_stop=False)
        self._timer.update_last_triggered_step(global_step)
        self._poll(session)

    def before_run(self, run_context: SessionRunContext) -> None:
        self._poll(run_context.session)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        session = run_context.session
        self._poll(session)
        global_step = session.global_step
        if self._timer.should_trigger_for_step(global_step):
            self._timer.update_last_triggered_step(global_step)
            self._save(session, global_step, may_stop=True)
            self._poll(session)
        if self._stop_pending:
            self._stop_pending = False
            run_context.request_stop()

    def end(self, session: Session) -> None:
        self._poll(session)
        last_step = session.global_step
        if last_step != self._timer.last_triggered_step():
            self._save(session, last_step, may_stop=False)
        self.wait_until_finished()
        for listener in self._listeners:
            listener.end(session, last_step)

    # -- saving ------------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Block until every save is durable, then run the listeners' pending ``after_save``.

        A failed save raises ``CheckpointSaveError`` (once), after the ``after_save`` calls of
        the saves before it. Waiting is bounded by the saver's ``drain_timeout_secs``.
        """
        saver = self._get_saver()
        for pending in self._pending:
            pending.handle.wait(saver.drain_timeout_secs)
        if self._session is not None:
            self._poll(self._session)
        saver.wait_until_finished()

    def _get_saver(self) -> Saver:
        if self._saver is not None:
            return self._saver
        if self._scaffold is not None:
            return self._scaffold.get_saver()
        self._saver = Saver()
        return self._saver

    def _checkpoint_path(self, step: int) -> str:
        return f"{self._save_path}-{step}"

    def _save(self, session: Session, step: int, *, may_stop: bool) -> None:
        self._finish_previous_save(session, step)
        logger.info("Calling checkpoint listeners before saving checkpoint %d...", step)
        for listener in self._listeners:
            listener.before_save(session, step)
        logger.info("Saving checkpoints for %d into %s.", step, self._save_path)
        if not os.path.isdir(self._checkpoint_dir):
            # Deleted under the running hook: a failed save like any other, which the loop can
            # catch and train on (saves resume once the directory is back).
            missing = FileNotFoundError(
                errno.ENOENT, os.strerror(errno.ENOENT), self._checkpoint_dir
            )
            raise CheckpointSaveError(
                f"Saving {self._checkpoint_path(step)} failed: checkpoint_dir "
                f"{self._checkpoint_dir!r} no longer exists"
            ) from missing
        handle = self._get_saver().save(session, self._save_path, global_step=step, blocking=False)
        self._pending.append(_PendingSave(handle, step, may_stop))
        if not self._async_save:
            handle.result()

    def _finish_previous_save(self, session: Session, step: int) -> None:
        """Wait for a save still being written, and run its ``after_save``, before the next one.

        The saver would wait anyway (one save in flight); waiting here, before ``before_save``,
        keeps every listener's calls paired as in TensorFlow: ``after_save(N)`` comes before
        ``before_save(N+1)``, and while checkpoint N still exists (N+1's retention may delete it).
        """
        in_flight = [pending for pending in self._pending if not pending.handle.done()]
        if in_flight:
            logger.warning(
                "Saving checkpoint %d waits for the save of step %d, which is still being "
                "written: the save interval is shorter than a save takes.",
                step,
                in_flight[0].step,
            )
            timeout = self._get_saver().drain_timeout_secs
            for pending in in_flight:
                pending.handle.wait(timeout)
        self._poll(session)

    def _poll(self, session: Session) -> None:
        """Run ``after_save`` for every save that is durable; surface a failed one."""
        self._session = session
        while self._pending and self._pending[0].handle.done():
            pending = self._pending.pop(0)
            pending.handle.result()
            logger.info("Calling checkpoint listeners after saving checkpoint %d...", pending.step)
            for listener in self._listeners:
                if listener.after_save(session, pending.step):
                    logger.info(
                        "A CheckpointSaverListener requested that training be stopped. "
                        "listener: %s",
                        listener,
                    )
                    if pending.may_stop:
                        self._stop_pending = True
