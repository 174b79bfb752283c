"""``CheckpointSaverHook``: when to save and under what name; the ``Saver`` does the rest.

Faults in the user's code stay contained. An error met part-way through a hook call (a
listener that raises, a background save that failed) is collected, the call's work is finished
(the save made, every other listener called, the pending saves accounted for), and only then is
the first error raised, the same object the listener raised, with a note naming the listener
and the method. The others of that call are logged with their tracebacks. A
``KeyboardInterrupt`` or ``SystemExit`` (not an ``Exception``) propagates at once: a second
Ctrl-C must get out of a listener that hangs.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._checkpoint_dir import checkpoint_name, latest_checkpoint
from ._errors import CheckpointSaveError
from ._faults import Failures
from ._fsspec_storage import require_fsspec
from ._fsutil import same_path
from ._hooks import SessionRunContext, SessionRunHook, SessionRunValues
from ._if_busy import BusyPolicy, check_if_busy
from ._listeners import CheckpointSaverListener
from ._messages import os_error_reason
from ._mirror import mirror_for_hook
from ._paths import is_url, join, normalize
from ._saver import Saver
from ._scaffold import Scaffold
from ._storage_for import check_remote_writable
from ._timer import SecondOrStepTimer
from ._validation import check_bool, check_int, check_number, check_type
from ._writer import SaveHandle

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session

logger = logging.getLogger(__name__)
# TensorFlow's log lines, word for word, on a child logger of their own: a program can silence
# them by name (the demo does) and keep "Saving checkpoints for N" and the warnings.
tf_logger = logging.getLogger(f"{__name__}.tensorflow")


@dataclass
class _PendingSave:
    """A save whose listeners' ``after_save`` has not run yet."""

    handle: SaveHandle
    step: int
    # A stop asked by after_save counts only for saves made from after_run (TensorFlow).
    may_stop: bool
    # The listeners whose before_save(step) returned: they, and only they, get after_save(step).
    listeners: list[CheckpointSaverListener] = field(default_factory=list)


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
        check_bool(f"listeners[{index}].run_after_commit", listener.run_after_commit)
    return result


def check_writable_dir(directory: str) -> None:
    """Create ``directory`` if needed and prove a file can be written there.

    Raises:
        ValueError: the path is a file, cannot be created, or is not writable.
    """
    if is_url(directory):
        return check_remote_writable(directory)  # an object store: a probe object
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"checkpoint_dir must be a directory, but {directory!r} is a file")
    try:
        os.makedirs(directory, exist_ok=True)
        # A probe rather than os.access(): access() says yes to root on a read-only mount.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(
            f"checkpoint_dir {directory!r} must be a writable directory: {os_error_reason(err)}"
        ) from err


class CheckpointSaverHook(SessionRunHook):
    """Saves a checkpoint every ``save_secs`` seconds or every ``save_steps`` steps.

    It saves at session creation (unless the newest checkpoint already holds that step), whenever
    the timer fires for the new global step after a run, and in ``end()`` when the last step is
    unsaved. With ``async_save`` the write happens in the background. ``if_busy`` says what a
    trigger does while the previous save is still being written: ``"wait"`` (the default) waits
    for it; ``"skip"`` skips the trigger (counted in ``skipped_saves``) and saves after the next
    step that finds the writer free (``_if_busy``). A save that a listener with
    ``run_after_commit = False`` (the default) takes part in is waited for in the hook call that
    made it, and ``after_save`` runs there, at the save step; with only ``run_after_commit``
    listeners, or none, training never waits for the disk and ``after_save`` runs at the first
    hook call after the file is durable (see ``CheckpointSaverListener``).

    An error in a hook call (a listener raising, a failed background save) is raised at the end
    of that call, once the save it was part of is made and every other listener was called (see
    the module docstring). ``end()`` always attempts the save of the last step unless it is
    already durable, waits for it, and only then raises an earlier failure nobody was told of.
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
        mirror_dir: str | None = None,
        mirror_max_to_keep: int | None = None,
        if_busy: str = "wait",
    ) -> None:
        tf_logger.info("Create CheckpointSaverHook.")
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
        check_type("saver", saver, Saver, "a Saver", allow_none=True)
        check_type("scaffold", scaffold, Scaffold, "a Scaffold", allow_none=True)
        check_bool("async_save", async_save)
        self._busy = BusyPolicy(check_if_busy(if_busy))
        # Checked here, under the user's names: the timer would name its own every_secs/steps.
        # 0 is accepted (TensorFlow): a save at every step that advanced.
        if save_secs is not None:
            check_number("save_secs", save_secs, minimum=0)
        if save_steps is not None:
            check_int("save_steps", save_steps, minimum=0)
        self._checkpoint_dir = normalize(os.fspath(checkpoint_dir))
        if is_url(self._checkpoint_dir):
            require_fsspec(self._checkpoint_dir)
        self._save_path = join(self._checkpoint_dir, checkpoint_basename)
        # The mirror tier (SPEC 5.4): each committed checkpoint copied there in the background.
        self._mirror = mirror_for_hook(
            self._checkpoint_dir, mirror_dir, mirror_max_to_keep, checkpoint_basename
        )
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps)
        self._saver = saver
        self._scaffold = scaffold
        self._listeners = _check_listeners(listeners)
        self._async_save = async_save
        self._pending: list[_PendingSave] = []
        self._stop_pending = False
        # The step of the newest checkpoint known to be durable (committed by this hook, or just
        # restored from): end() saves the last step unless it is this one.
        self._committed_step: int | None = None
        # The session of the latest hook call, for after_save calls made from wait_until_finished.
        self._session: Session | None = None
        # Distributed: the runner's per-step agreement decides the saves (_agreement).
        self._agreed = False

    @property
    def mirror_dir(self) -> str | None:
        """Where committed checkpoints are mirrored, or None."""
        return None if self._mirror is None else self._mirror.mirror_dir

    @property
    def save_path(self) -> str:
        """The prefix of this hook's checkpoints: ``os.path.join(checkpoint_dir, basename)``."""
        return self._save_path

    @property
    def skipped_saves(self) -> int:
        """How many triggers ``if_busy="skip"`` skipped because a save was still being written."""
        return self._busy.skipped

    # -- the hook protocol -------------------------------------------------------------------

    def begin(self) -> None:
        check_writable_dir(self._checkpoint_dir)
        failures = Failures()
        for listener in self._listeners:
            try:
                listener.begin()
            except Exception as err:
                failures.listener_failed(
                    err, listener, "begin()", "the other listeners' begin() still ran"
                )
        failures.raise_first()

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        failures = Failures()
        self._poll(session, failures)
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
        if self._agreed:
            # Every rank saves, or none: the chief's view of the directory decides.
            just_restored = bool(session.checkpoint_group.broadcast(just_restored))
        if just_restored:
            self._committed_step = global_step
        else:
            self._save(session, global_step, may_stop=False, failures=failures)
            if self._agreed:
                self._wait_for_in_flight(failures)  # so every rank reports it at once
        self._timer.update_last_triggered_step(global_step)
        self._poll(session, failures)
        failures.raise_first()

    def before_run(self, run_context: SessionRunContext) -> None:
        if self._agreed:
            return None  # saves are looked at in after_agreement, at the same step everywhere
        failures = Failures()
        self._poll(run_context.session, failures)
        failures.raise_first()
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if self._agreed:
            # The save waits for the agreement; a listener's stop is this step's proposal.
            if self._stop_pending:
                self._stop_pending = False
                run_context.request_stop()
            return
        session = run_context.session
        failures = Failures()
        # An earlier save's failure or a listener's error must not cost this step its save.
        self._poll(session, failures)
        global_step = session.global_step
        triggered = self._timer.should_trigger_for_step(global_step)
        save_now = self._busy.should_save(triggered, self._writer_busy, global_step)
        if triggered or save_now:
            # A skipped trigger restarts the timer too: the next is timed from it, then from
            # the deferred save, so a long write never turns every later step into a trigger.
            self._timer.update_last_triggered_step(global_step)
        if save_now:
            self._save(session, global_step, may_stop=True, failures=failures)
            self._poll(session, failures)
        # A stop asked alongside an error is kept for the next after_run: the runner drops the
        # run context of a call that raised.
        if self._stop_pending and not failures:
            self._stop_pending = False
            run_context.request_stop()
        failures.raise_first()

    def end(self, session: Session) -> None:
        failures = Failures()
        # Settle the save in flight first: if it failed, its step is saved again below.
        settled = self._wait_for_in_flight(failures)
        self._poll(session, failures)
        last_step = session.global_step
        unsaved = last_step != self._timer.last_triggered_step() or (
            last_step != self._committed_step
        )
        if settled:
            if unsaved:
                self._save(session, last_step, may_stop=False, failures=failures)
            self._wait_until_finished(failures)
        elif unsaved:
            # Another save, or another wait, would only time out again behind the hung write.
            logger.error(
                "Not saving the last step %d: the previous save is still being written after "
                "drain_timeout_secs.",
                last_step,
            )
        if self._mirror is not None:
            self._mirror.close()  # drained by _wait_until_finished: stops its thread
        if failures and self._committed_step == last_step:
            failures.note_first(
                f"CheckpointSaverHook.end() still committed the last step: "
                f"{self._checkpoint_path(last_step)} is durable."
            )
        for listener in self._listeners:
            try:
                listener.end(session, last_step)
            except Exception as err:
                failures.listener_failed(
                    err,
                    listener,
                    f"end(session, {last_step})",
                    "the other listeners' end() still ran",
                )
        failures.raise_first()

    # -- the distributed agreement (_agreement.AgreedSaves) ------------------------------------

    def join_agreement(self) -> None:
        """Save only when the runner's per-step agreement says so (a distributed runner)."""
        self._agreed = True

    def proposal(self, run_context: SessionRunContext) -> tuple[int, int]:
        """``(save, busy)``: 2 the chief's timer fires now, 1 the chief owes a skipped save (0
        on other ranks); whether a save of this rank is in flight."""
        session = run_context.session
        save = 0
        if session.checkpoint_group.is_chief:
            if self._timer.should_trigger_for_step(session.global_step):
                save = 2
            elif self._busy.pending:
                save = 1
        return save, int(any(not pending.handle.done() for pending in self._pending))

    def after_agreement(self, run_context: SessionRunContext, save: int, settled: bool) -> None:
        """Save when every rank agreed to; report finished saves once every rank's is.

        With ``if_busy="skip"`` a save that finds any rank's writer busy is skipped on every
        rank (the agreement's ``settled`` is the same everywhere) and owed by the chief.
        """
        session = run_context.session
        failures = Failures()
        if settled:
            self._poll(session, failures)
        step = session.global_step
        if save == 2:
            self._timer.update_last_triggered_step(step)
        if save and self._busy.mode == "skip" and not settled:
            # The same on every rank: the chief owes the save, the others follow its proposal.
            self._busy.defer(step, triggered=save == 2)
        elif save:
            self._busy.settle()
            self._timer.update_last_triggered_step(step)
            self._save(session, step, may_stop=True, failures=failures)
            if not self._async_save or any(not ls.run_after_commit for ls in self._listeners):
                self._poll(session, failures)  # that save was waited for, on every rank
        failures.raise_first()

    # -- saving ------------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Block until every save is durable, then run the listeners' pending ``after_save``.

        A failed save raises ``CheckpointSaveError`` (once), after the ``after_save`` calls of
        the saves around it; a listener's error is raised the same way. Waiting is bounded by
        the saver's ``drain_timeout_secs``.
        """
        failures = Failures()
        self._wait_until_finished(failures)
        failures.raise_first()

    def _wait_until_finished(self, failures: Failures) -> None:
        if not self._wait_for_in_flight(failures):
            return  # the saver would time out again on the same write
        if self._session is not None:
            self._poll(self._session, failures)
        try:
            self._get_saver().wait_until_finished()
        except Exception as err:
            failures.add(err)
        if self._mirror is not None:
            self._mirror.drain()  # every checkpoint committed so far on the mirror, or failed

    def _wait_for_in_flight(self, failures: Failures, next_step: int | None = None) -> bool:
        """Wait for the save still being written; False when it still is after the timeout.

        The saver owns the wait; with ``next_step`` (a save about to start) it warns that the
        save interval is shorter than a save takes.
        """
        name = None if next_step is None else self._checkpoint_path(next_step)
        try:
            self._get_saver().wait_for_previous_save(name)
        except Exception as err:
            failures.add(err)
            return False
        return True

    def save_after_error(self, session: Session) -> str | None:
        """Commit the session's step for a runner whose ``run()`` raised (``checkpoint_on_error``).

        Waits for the save in flight first; saves nothing when the step is durable already (that
        save committed it, or it was just restored). The save blocks, runs no listener (training
        is failing: their code is not run on the way out) and makes retention delete nothing.

        Returns:
            The checkpoint written, or None when the step was saved already.

        Raises:
            CheckpointSaveError: the save failed, or the previous one is still being written
                after ``drain_timeout_secs``.
        """
        saver = self._get_saver()
        saver.wait_for_previous_save()
        step = session.global_step
        durable = step == self._committed_step or any(
            pending.step == step and pending.handle.done() and not pending.handle.failed()
            for pending in self._pending
        )
        if durable:
            return None
        handle = self._start_save(session, step, apply_retention=False)
        path = handle.result(saver.drain_timeout_secs)
        self._committed_step = step
        if self._mirror is not None and session.checkpoint_group.is_chief:
            self._mirror.submit(handle)
        return path

    def _writer_busy(self) -> bool:
        return self._get_saver().save_in_flight()

    def _get_saver(self) -> Saver:
        if self._saver is not None:
            return self._saver
        if self._scaffold is not None:
            return self._scaffold.get_saver()
        self._saver = Saver()
        return self._saver

    def _checkpoint_path(self, step: int) -> str:
        return checkpoint_name(self._save_path, step)

    def _save(self, session: Session, step: int, *, may_stop: bool, failures: Failures) -> None:
        """Save ``step`` between the listeners' calls; errors go to ``failures``, never raised."""
        if not self._finish_previous_save(session, step, failures):
            return
        tf_logger.info("Calling checkpoint listeners before saving checkpoint %d...", step)
        ready: list[CheckpointSaverListener] = []
        for listener in self._listeners:
            try:
                listener.before_save(session, step)
            except Exception as err:
                # The save goes ahead: losing a checkpoint to a listener's bug is worse than a
                # checkpoint the listener did not prepare for. Like a context manager whose
                # __enter__ raised, it gets no after_save for this step.
                failures.listener_failed(
                    err,
                    listener,
                    f"before_save(session, {step})",
                    f"the save of step {step} went ahead, the other listeners were called, and "
                    f"this one gets no after_save({step})",
                )
            else:
                ready.append(listener)
        logger.info("Saving checkpoints for %d into %s.", step, self._save_path)
        try:
            handle = self._start_save(session, step)
        except Exception as err:
            failures.add(err)
            return
        self._pending.append(_PendingSave(handle, step, may_stop, ready))
        if self._mirror is not None and session.checkpoint_group.is_chief:
            # Copied once it commits, on the mirror's thread; by the chief alone, which wrote it.
            self._mirror.submit(handle)
        if not self._async_save:
            handle.wait()  # the _poll after this save reports it, failed or not
        elif any(not listener.run_after_commit for listener in ready):
            # A TensorFlow-style listener runs at the save step: wait for the commit (bounded by
            # the saver's drain_timeout_secs) so the _poll after this save calls its after_save
            # with the step's own state. The _poll reports the save, failed or not.
            self._wait_for_in_flight(failures)

    def _start_save(
        self, session: Session, step: int, *, apply_retention: bool = True
    ) -> SaveHandle:
        if not is_url(self._checkpoint_dir) and not os.path.isdir(self._checkpoint_dir):
            # Deleted under the running hook: a failed save like any other, which the loop can
            # catch and train on (saves resume once the directory is back).
            missing = FileNotFoundError(
                errno.ENOENT, os.strerror(errno.ENOENT), self._checkpoint_dir
            )
            raise CheckpointSaveError(
                f"Saving {self._checkpoint_path(step)} failed: checkpoint_dir "
                f"{self._checkpoint_dir!r} no longer exists"
            ) from missing
        return self._get_saver().save(
            session,
            self._save_path,
            global_step=step,
            blocking=False,
            apply_retention=apply_retention,
        )

    def _finish_previous_save(self, session: Session, step: int, failures: Failures) -> bool:
        """Wait for a save still being written, and run its ``after_save``, before the next one.

        The saver would wait anyway (one save in flight); waiting here, before ``before_save``,
        keeps every listener's calls paired as in TensorFlow: ``after_save(N)`` comes before
        ``before_save(N+1)``, and while checkpoint N still exists (N+1's retention may delete it).
        Returns False, the save not to be made, when the previous one is still being written
        after ``drain_timeout_secs``.
        """
        settled = self._wait_for_in_flight(failures, next_step=step)
        self._poll(session, failures)
        return settled

    def _poll(self, session: Session, failures: Failures) -> None:
        """Run ``after_save`` for every save that is durable; collect a failed one."""
        self._session = session
        while self._pending and self._pending[0].handle.done():
            pending = self._pending.pop(0)
            # Saver.wait_until_finished() may have raised this failure to the user already.
            reported = pending.handle.reported
            try:
                pending.handle.result()
            except Exception as err:
                if not reported:
                    failures.add(err)
                continue
            self._committed_step = pending.step
            tf_logger.info(
                "Calling checkpoint listeners after saving checkpoint %d...", pending.step
            )
            for listener in pending.listeners:
                try:
                    stop = listener.after_save(session, pending.step)
                except Exception as err:
                    failures.listener_failed(
                        err,
                        listener,
                        f"after_save(session, {pending.step})",
                        f"checkpoint {pending.handle.path} is committed and the other "
                        f"listeners' after_save({pending.step}) still ran",
                    )
                    continue
                if stop:
                    logger.info(
                        "A CheckpointSaverListener requested that training be stopped. "
                        "listener: %s",
                        listener,
                    )
                    if pending.may_stop:
                        self._stop_pending = True
