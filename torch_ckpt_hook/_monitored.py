"""The runners: ``MonitoredSession`` and ``SingularMonitoredSession`` call hooks around steps.

With ``checkpoint_on_error``, an ``Exception`` that leaves ``run()`` (not a recovered one,
not ``StopIteration``) first gets the state of the last completed step committed by the
first ``CheckpointSaverHook`` in ``hooks``, unless:

- an optimizer step was interrupted: ``optimizer.step()`` was entered during the failing
  ``run()`` call (the error came from inside it, or after it in the same call: the rest of
  the step function, or a hook's ``after_run``). The parameters, the optimizer state and
  what the loop updates beside them (a scheduler, the step count) may disagree. A session
  with no optimizer counts the step function itself as the update: an error from inside it
  or after it saves nothing;
- the error is ``NanLossDuringTrainingError`` (the state is the diverged one);
- that step is durable already (saved by the hook, or just restored).

Such a save runs no listener and makes retention delete nothing. ``KeyboardInterrupt`` and
``SystemExit`` are not ``Exception``: they propagate at once (a second Ctrl-C means "now").
A save that fails is logged and noted on the error, which propagates either way.
"""

from __future__ import annotations

import enum
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import torch

from ._agreement import StepAgreement
from ._best_hook import BestCheckpointSaverHook
from ._checkpoint_hook import CheckpointSaverHook
from ._coordinator import Coordinator
from ._distributed import open_checkpoint_group
from ._errors import NanLossDuringTrainingError
from ._faults import _add_note
from ._fetches import check_fetches, merge_feeds, resolve_fetches
from ._fsutil import path_key
from ._hooks import (
    SavesInBackground,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from ._mirror import same_location
from ._paths import dirname, normalize
from ._scaffold import Scaffold
from ._session import OptimizerArg, Session
from ._session_manager import prepare_session
from ._signals import SignalStopper, check_signals
from ._validation import check_bool, check_int

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def _check_hooks(hooks: Iterable[SessionRunHook] | None, name: str) -> list[SessionRunHook]:
    if hooks is None:
        return []
    if isinstance(hooks, SessionRunHook) or not isinstance(hooks, Iterable):
        raise TypeError(f"{name} must be a list of SessionRunHook, got {type(hooks).__qualname__}")
    hooks = list(hooks)
    for index, hook in enumerate(hooks):
        if not isinstance(hook, SessionRunHook):
            raise TypeError(
                f"{name}[{index}] must be a SessionRunHook, got {type(hook).__qualname__}"
            )
    return hooks


def _check_distinct_savers(hooks: list[SessionRunHook]) -> None:
    """Refuse two checkpoint hooks that would write one series: they would prune each other."""
    seen: dict[str, int] = {}
    for index, hook in enumerate(hooks):
        if not isinstance(hook, (CheckpointSaverHook, BestCheckpointSaverHook)):
            continue
        key = path_key(hook.save_path)
        if key in seen:
            raise ValueError(
                f"hooks holds two checkpoint hooks that write {hook.save_path}-<step> "
                f"(hooks[{seen[key]}] and hooks[{index}], counting the runner's default hooks "
                "first): they would overwrite and prune each other's checkpoints. Keep one, or "
                "give the other its own checkpoint_basename or checkpoint_dir."
            )
        seen[key] = index


def _check_path(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, got {type(value).__qualname__}")
    return normalize(os.fspath(value))  # file:// URLs become paths; other URLs stay


def _check_error_types(value: object) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"recoverable_errors must be a tuple of exception types, got {value!r}")
    types = tuple(value)
    for err in types:
        if not (isinstance(err, type) and issubclass(err, BaseException)):
            raise TypeError(
                f"recoverable_errors must be a tuple of exception types, got {err!r} in it"
            )
    return types


def _optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    """The session's optimizers: none, one, or (SPEC 5.3) a list of them."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if isinstance(optimizer, (list, tuple)):
        return [opt for opt in optimizer if isinstance(opt, torch.optim.Optimizer)]
    return []


def _first_checkpoint_hook(hooks: list[SessionRunHook]) -> CheckpointSaverHook | None:
    return next((hook for hook in hooks if isinstance(hook, CheckpointSaverHook)), None)


def _mirror_of(hooks: list[SessionRunHook], checkpoint_dir: str | None) -> str | None:
    """The mirror tier of the checkpoint hook writing ``checkpoint_dir``: restore reads both."""
    for hook in hooks:
        if (
            isinstance(hook, CheckpointSaverHook)
            and hook.mirror_dir is not None
            and checkpoint_dir is not None
            and same_location(dirname(hook.save_path), checkpoint_dir)
        ):
            return hook.mirror_dir
    return None


class _MonitoredSession:
    """The shared runner: creates the session, runs steps with hooks, closes on every path."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerArg,
        *,
        hooks: Iterable[SessionRunHook] | None,
        scaffold: Scaffold | None,
        checkpoint_dir: str | None,
        checkpoint_filename_with_path: str | None,
        extra_state: Mapping[str, Any] | None,
        recoverable_errors: tuple[type[BaseException], ...],
        max_recoveries: int,
        stop_on_signals: Iterable[int],
        checkpoint_on_error: bool,
        rank_state: Mapping[str, Any] | None = None,
    ) -> None:
        self._state = _State.NEW
        self._hooks = _check_hooks(hooks, "hooks")
        _check_distinct_savers(self._hooks)
        self._checkpoint_on_error = check_bool("checkpoint_on_error", checkpoint_on_error)
        self._error_saver = _first_checkpoint_hook(self._hooks)
        if self._checkpoint_on_error and self._error_saver is None:
            raise ValueError(
                "checkpoint_on_error=True needs a CheckpointSaverHook in hooks to save with "
                "(its directory, basename and saver); add one, or leave checkpoint_on_error "
                "False."
            )
        if scaffold is not None and not isinstance(scaffold, Scaffold):
            raise TypeError(
                f"scaffold must be a Scaffold or None, got {type(scaffold).__qualname__}"
            )
        self._scaffold = scaffold or Scaffold()
        checkpoint_dir = _check_path(checkpoint_dir, "checkpoint_dir")
        checkpoint_filename_with_path = _check_path(
            checkpoint_filename_with_path, "checkpoint_filename_with_path"
        )
        if checkpoint_dir is not None and checkpoint_filename_with_path is not None:
            raise ValueError(
                "Can not provide both checkpoint_dir and checkpoint_filename_with_path."
            )
        self._checkpoint_dir = checkpoint_dir
        self._checkpoint_filename_with_path = checkpoint_filename_with_path
        self._recoverable_errors = recoverable_errors
        self._max_recoveries = check_int("max_recoveries", max_recoveries, minimum=0)
        self._coord = Coordinator()
        self._signals = SignalStopper(check_signals(stop_on_signals), self._coord.request_stop)
        self._stop_requested = False
        self._session = Session(model, optimizer, extra_state=extra_state, rank_state=rank_state)
        # The per-step agreement over the package's own process group (several ranks; the
        # session holds the group).
        self._agreement: StepAgreement | None = None
        self._restored_from: str | None = None
        # Whether the current run() call entered an optimizer step (or, with no optimizer, the
        # step function): checkpoint_on_error saves nothing then. Set by a step pre-hook.
        self._update_started = False
        self._step_hooks: list[Any] = []
        try:
            self._open_group()
            self._watch_optimizer_steps()
            for hook in self._hooks:
                hook.begin()
            self._create_session()
            self._restored_from = self._session.restored_from
            self._signals.install()
        except BaseException:
            self._state = _State.CLOSED
            try:
                # A save staged before the failure (the creation save) still commits.
                self._drain(raise_errors=False)
            finally:
                self._release()
            raise
        self._state = _State.OPEN

    # -- creation and recovery ------------------------------------------------------------------

    def _open_group(self) -> None:
        """With ``torch.distributed`` running several ranks: our group, and the agreement."""
        group = open_checkpoint_group()
        self._session.set_checkpoint_group(group)
        if group.distributed:
            self._agreement = StepAgreement(group, self._hooks)

    def _watch_optimizer_steps(self) -> None:
        if not self._checkpoint_on_error:
            return
        # A weak reference: the optimizer must not keep a dropped runner alive.
        ref = weakref.ref(self)

        def step_started(_opt: object, _args: object, _kwargs: object) -> None:
            runner = ref()
            if runner is not None:
                runner._update_started = True

        for optimizer in _optimizers(self._session.optimizer):
            self._step_hooks.append(optimizer.register_step_pre_hook(step_started))

    @property
    def restored_from(self) -> str | None:
        """The absolute path of the checkpoint restored when the session was created, or None.

        None when the session started from ``scaffold.init_fn`` (or its initial state); a
        recovery's restore does not change it.
        """
        return self._restored_from

    def _create_session(self) -> None:
        prepare_session(
            self._session,
            self._scaffold,
            self._checkpoint_dir,
            self._checkpoint_filename_with_path,
            _mirror_of(self._hooks, self._checkpoint_dir),
        )
        for hook in self._hooks:
            hook.after_create_session(self._session, self._coord)

    def _recover(self, err: BaseException) -> None:
        logger.warning(
            "A recoverable error was raised; waiting for saves in flight, restoring the newest "
            "checkpoint and retrying the step. Error: %r",
            err,
        )
        self._wait_for_saves()
        self._create_session()

    def _wait_for_saves(self) -> None:
        """Wait until the saves of every hook that has them are durable."""
        for hook in self._hooks:
            if isinstance(hook, SavesInBackground):
                hook.wait_until_finished()
        if self._scaffold.saver is not None:
            self._scaffold.saver.wait_until_finished()

    # -- running ----------------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """The raw session's global step (read-only)."""
        return self._session.global_step

    def should_stop(self) -> bool:
        """Whether the loop should end: closed, a hook asked to stop, or the coordinator did."""
        if self._state is _State.CLOSED or self._stop_requested:
            return True
        # Distributed, a stop through the coordinator (a signal) waits for the next agreement,
        # so that every rank stops after the same step.
        return self._agreement is None and self._coord.should_stop()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` as one step, with every hook called around it.

        Raises ``RuntimeError`` once a hook has requested a stop (TensorFlow's rule). A stop
        through the coordinator (a preemption signal, ``coord.request_stop()``) only turns
        ``should_stop()`` true: a signal that lands between the loop's ``should_stop()`` check
        and this call must not turn a clean stop into an error that skips the final save.
        """
        self._check_open("run()")
        if self._stop_requested:
            raise RuntimeError(
                "Run called even after should_stop requested. Check should_stop() before "
                "each run(), or leave the loop when it is true."
            )
        if not callable(fn):
            raise TypeError(f"fn must be a callable step function, got {type(fn).__qualname__}")
        recoveries = 0
        while True:
            self._update_started = False
            try:
                return self._run_once(fn, args, kwargs)
            except StopIteration:
                raise  # the end of the input, never an error to recover from
            except self._recoverable_errors as err:
                if recoveries >= self._max_recoveries:
                    self._checkpoint_after_error(err)
                    raise
                recoveries += 1
                self._recover(err)
            except Exception as err:
                self._checkpoint_after_error(err)
                raise

    def _run_once(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        context = SessionRunContext(SessionRunArgs(fn, dict(kwargs)), self._session)
        requests: list[tuple[SessionRunHook, SessionRunArgs | None]] = []
        for hook in self._hooks:
            request = hook.before_run(context)
            if request is not None:
                if not isinstance(request, SessionRunArgs):
                    raise TypeError(
                        f"{type(hook).__name__}.before_run() must return SessionRunArgs "
                        f"or None, got {type(request).__qualname__}"
                    )
                check_fetches(request.fetches, f"{type(hook).__name__} fetches")
            requests.append((hook, request))
        feeds = merge_feeds(requests, kwargs)
        if not _optimizers(self._session.optimizer):
            self._update_started = True  # the step function is the update
        value = self._session.run(fn, *args, **feeds)
        values = [
            SessionRunValues(
                results=None if request is None else resolve_fetches(request.fetches, value),
                options=None if request is None else request.options,
            )
            for _hook, request in requests
        ]
        for (hook, _request), run_values in zip(requests, values, strict=True):
            hook.after_run(context, run_values)
        if self._agreement is not None:
            asked = context.stop_requested or self._coord.should_stop()
            if self._agreement.after_step(context, asked):
                context.request_stop()
        self._stop_requested = self._stop_requested or context.stop_requested
        return value

    def _checkpoint_after_error(self, err: BaseException) -> None:
        """``checkpoint_on_error``: commit the last completed step before ``err`` propagates."""
        hook = self._error_saver
        if not self._checkpoint_on_error or hook is None or not isinstance(err, Exception):
            return
        group = self._session.checkpoint_group
        if group.distributed:
            # A save takes every rank; the others do not know this one failed.
            logger.warning(
                "checkpoint_on_error: not saving after %s: with %d ranks a save needs every "
                "rank, and only this one failed.",
                type(err).__name__,
                group.world_size,
            )
            return
        step = self._session.global_step
        if isinstance(err, NanLossDuringTrainingError):
            reason = "the loss is NaN"
        elif self._update_started:
            reason = "an optimizer step was interrupted, so the state may be half-updated"
        else:
            reason = None
        if reason is not None:
            logger.warning(
                "checkpoint_on_error: not saving step %d after %s: %s.",
                step,
                type(err).__name__,
                reason,
            )
            return
        try:
            path = hook.save_after_error(self._session)
        except Exception as save_err:
            logger.error(
                "checkpoint_on_error: saving step %d after %s failed.",
                step,
                type(err).__name__,
                exc_info=save_err,
            )
            note = f"checkpoint_on_error: saving step {step} failed: {save_err}"
        else:
            if path is None:
                logger.info(
                    "checkpoint_on_error: step %d is saved already; not saving it again.", step
                )
                return
            logger.warning(
                "checkpoint_on_error: saved %s (step %d) before %s propagates.",
                path,
                step,
                type(err).__name__,
            )
            note = f"checkpoint_on_error: the state of step {step} was saved to {path}."
        try:
            _add_note(err, note)
        except Exception:  # a __notes__ that is not a list: the error still propagates
            logger.debug("Could not add a note to %r", err, exc_info=True)

    # -- closing ----------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._state is _State.CLOSED:
            raise RuntimeError(
                f"{what} on a closed {type(self).__name__}: it was closed already (by close() or "
                "by leaving its with block). Create a new one to train again."
            )

    def close(self) -> None:
        """Close cleanly: every hook's ``end()``, then wait for saves, then release."""
        self._close(clean=True)

    def _close(self, clean: bool) -> None:
        self._check_open("close()")
        self._state = _State.CLOSED
        ended = False
        try:
            if clean:
                self._end_hooks()
            ended = True
        finally:
            try:
                # After an error (or a failing end()), a save failure is logged: raising it
                # would hide the exception already on its way out.
                self._drain(raise_errors=clean and ended)
            finally:
                self._release()

    def _end_hooks(self) -> None:
        """Every hook's ``end()``, in order, even after one raised; then the first error.

        A hook's ``end()`` that fails must not cost a later hook its own (the checkpoint hook's
        final save, a summary writer's flush); the others' errors are logged.
        """
        first: Exception | None = None
        for hook in self._hooks:
            try:
                hook.end(self._session)
            except Exception as err:
                if first is None:
                    first = err
                else:
                    logger.error("%r.end() failed as well", hook, exc_info=err)
        if first is not None:
            raise first

    def _drain(self, raise_errors: bool) -> None:
        """Commit the saves already staged, whatever the exit path."""
        try:
            self._wait_for_saves()
        except Exception:
            if raise_errors:
                raise
            logger.exception("A checkpoint save failed while closing after an error.")

    def _release(self) -> None:
        try:
            self._signals.restore()
        finally:
            for handle in self._step_hooks:
                handle.remove()
            self._step_hooks = []
            self._session.close()
            self._session.checkpoint_group.close()

    def __enter__(self: _SelfT) -> _SelfT:
        self._check_open("entering a with block")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        end_of_input = exc_type is not None and issubclass(exc_type, StopIteration)
        self._close(clean=exc_type is None or end_of_input)
        return end_of_input


_SelfT = TypeVar("_SelfT", bound=_MonitoredSession)


class MonitoredSession(_MonitoredSession):
    """Runs training steps with hooks, restores on creation, and recovers from chosen errors.

    When a hook or the step function raises one of ``recoverable_errors``, the session waits for
    saves in flight, restores the newest intact checkpoint (or runs ``scaffold.init_fn``), calls
    every hook's ``after_create_session`` again, and retries the same call, at most
    ``max_recoveries`` times per call. ``checkpoint_on_error`` saves the last completed step
    before an error that is not recovered propagates (the module docstring gives the rules).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerArg = None,
        *,
        hooks: Iterable[SessionRunHook] | None = None,
        scaffold: Scaffold | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_filename_with_path: str | None = None,
        extra_state: Mapping[str, Any] | None = None,
        recoverable_errors: Iterable[type[BaseException]] = (),
        max_recoveries: int = 3,
        stop_on_signals: Iterable[int] = (),
        checkpoint_on_error: bool = False,
        rank_state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            hooks=hooks,
            scaffold=scaffold,
            checkpoint_dir=checkpoint_dir,
            checkpoint_filename_with_path=checkpoint_filename_with_path,
            extra_state=extra_state,
            recoverable_errors=_check_error_types(recoverable_errors),
            max_recoveries=max_recoveries,
            stop_on_signals=stop_on_signals,
            checkpoint_on_error=checkpoint_on_error,
            rank_state=rank_state,
        )


class SingularMonitoredSession(_MonitoredSession):
    """A ``MonitoredSession`` that never recovers and hands out its raw ``Session``."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerArg = None,
        *,
        hooks: Iterable[SessionRunHook] | None = None,
        scaffold: Scaffold | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_filename_with_path: str | None = None,
        extra_state: Mapping[str, Any] | None = None,
        stop_on_signals: Iterable[int] = (),
        checkpoint_on_error: bool = False,
        rank_state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            hooks=hooks,
            scaffold=scaffold,
            checkpoint_dir=checkpoint_dir,
            checkpoint_filename_with_path=checkpoint_filename_with_path,
            extra_state=extra_state,
            recoverable_errors=(),
            max_recoveries=0,
            stop_on_signals=stop_on_signals,
            checkpoint_on_error=checkpoint_on_error,
            rank_state=rank_state,
        )

    def raw_session(self) -> Session:
        """The ``Session`` underneath: running it calls no hook."""
        return self._session
