"""The basic hooks: stop at a step, count steps per second, log values, catch a NaN loss.

Ports of TensorFlow's ``tf.train`` hooks of the same names. TensorFlow fetched a "stale" global
step in ``before_run`` and re-read the real one in ``after_run``; here both are reads of
``run_context.session.global_step``, the first in ``before_run`` and the second in ``after_run``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import NanLossDuringTrainingError
from ._fetches import check_fetches
from ._hooks import SessionRunArgs, SessionRunContext, SessionRunHook, SessionRunValues
from ._timer import NeverTriggerTimer, SecondOrStepTimer
from ._validation import (
    check_bool,
    check_callable,
    check_int,
    check_number,
    check_type,
    is_int,
    repr_with_type,
)

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session

logger = logging.getLogger(__name__)

_MAX_STEP_WARNINGS = 5
_STEPS_PER_SEC_TAG = "global_step/sec"


def _is_leaf(value: object) -> bool:
    return isinstance(value, str) or callable(value)


def _leaf_tag(leaf: Any) -> str:
    if isinstance(leaf, str):
        return leaf
    return str(getattr(leaf, "__name__", repr(leaf)))


def _loggable(value: Any) -> Any:
    """A 0-d tensor as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def _contains_nan(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isnan(value).any())
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, int):
        return False
    if isinstance(value, Mapping):
        return any(_contains_nan(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_nan(item) for item in value)
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            "NanTensorHook expects the loss to be a tensor or a number (or a list/tuple/dict of "
            f"them), got {repr_with_type(value)}"
        ) from err
    return bool(torch.isnan(tensor).any())


class StopAtStepHook(SessionRunHook):
    """Requests a stop once the global step reaches ``last_step`` (or ``num_steps`` from now).

    A session created (or recovered) at or past the last step has ``should_stop()`` true before
    its first ``run()``: ``num_steps=0`` or a finished run restored runs no step.
    """

    def __init__(self, num_steps: int | None = None, last_step: int | None = None) -> None:
        if num_steps is None and last_step is None:
            raise ValueError("One of num_steps or last_step must be specified.")
        if num_steps is not None and last_step is not None:
            raise ValueError("Only one of num_steps or last_step can be specified.")
        # Exactly one is given (checked above), so a message saying "or None" would mislead.
        self._num_steps = (
            None if num_steps is None else check_int("num_steps", num_steps, minimum=0)
        )
        self._last_step = (
            None if last_step is None else check_int("last_step", last_step, minimum=0)
        )
        self._stale_step: int | None = None

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        # Only the first time: after a recovery the target stays where it was.
        if self._last_step is None:
            assert self._num_steps is not None
            self._last_step = session.global_step + self._num_steps
        if session.global_step >= self._last_step:
            # A finished run stays finished: rerunning the job must not train one more step
            # each time (TensorFlow's hook only looked after a run).
            logger.info(
                "StopAtStepHook: the global step %d is at or past the last step %d; no step "
                "to run.",
                session.global_step,
                self._last_step,
            )
            coord.request_stop()

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self._stale_step = run_context.session.global_step
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if self._last_step is None:
            raise RuntimeError(
                f"StopAtStepHook(num_steps={self._num_steps}) computes its last step in "
                "after_create_session(); call that before after_run()"
            )
        # TensorFlow's two-stage check: the step read before the run, plus the one step this run
        # may have taken, then the step as it is now.
        if self._stale_step is not None and self._stale_step + 1 < self._last_step:
            return
        if run_context.session.global_step >= self._last_step:
            run_context.request_stop()


class StepCounterHook(SessionRunHook):
    """Logs the global steps per second every N steps or seconds (and to TensorBoard if asked)."""

    def __init__(
        self,
        every_n_steps: int | None = 100,
        every_n_secs: float | None = None,
        output_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if (every_n_steps is None) == (every_n_secs is None):
            raise ValueError("exactly one of every_n_steps and every_n_secs should be provided.")
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=0)
        if every_n_secs is not None:
            check_number("every_n_secs", every_n_secs, minimum=0)
        check_type(
            "output_dir",
            output_dir,
            (str, os.PathLike),
            "a path (str or os.PathLike)",
            allow_none=True,
        )
        self._timer = SecondOrStepTimer(every_secs=every_n_secs, every_steps=every_n_steps)
        self._output_dir = output_dir
        self._summary_writer: Any = None
        self._last_global_step: int | None = None
        self._stale_step: int | None = None
        self._warnings_logged = 0

    def begin(self) -> None:
        # A hook reused by a second runner measures that runner's steps only.
        self._timer.reset()
        self._last_global_step = None
        self._stale_step = None
        if self._output_dir is not None and self._summary_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info(
                    "StepCounterHook: tensorboard is not installed, so %s is logged but not "
                    "written to output_dir=%s (pip install tensorboard to record it)",
                    _STEPS_PER_SEC_TAG,
                    os.fspath(self._output_dir),
                )
            else:
                self._summary_writer = SummaryWriter(log_dir=os.fspath(self._output_dir))

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self._stale_step = run_context.session.global_step
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        stale_step = self._stale_step
        if stale_step is None:
            stale_step = run_context.session.global_step
        if self._timer.should_trigger_for_step(stale_step + 1):
            global_step = run_context.session.global_step
            if self._timer.should_trigger_for_step(global_step):
                elapsed_secs, elapsed_steps = self._timer.update_last_triggered_step(global_step)
                if elapsed_secs is not None and elapsed_steps is not None:
                    self._log_and_record(elapsed_steps, elapsed_secs, global_step)

        # Like TensorFlow, compare the steps read before each run: the timer may have recorded
        # a different step, which would make the comparison unreliable.
        if stale_step == self._last_global_step and self._warnings_logged < _MAX_STEP_WARNINGS:
            self._warnings_logged += 1
            logger.warning(
                "It seems that global step has not been increased. Current value (could be "
                "stable): %s vs previous value: %s. You could increase the global step by "
                "calling optimizer.step() inside the step function.",
                stale_step,
                self._last_global_step,
            )
        self._last_global_step = stale_step

    def end(self, session: Session) -> None:
        if self._summary_writer is not None:
            self._summary_writer.flush()
            self._summary_writer.close()
            self._summary_writer = None

    def _log_and_record(self, elapsed_steps: int, elapsed_secs: float, global_step: int) -> None:
        if elapsed_secs <= 0:
            # A clock that did not move gives no rate; the next trigger measures from here.
            return
        steps_per_sec = elapsed_steps / elapsed_secs
        if self._summary_writer is not None:
            self._summary_writer.add_scalar(_STEPS_PER_SEC_TAG, steps_per_sec, global_step)
        logger.info("%s: %g", _STEPS_PER_SEC_TAG, steps_per_sec)


class LoggingTensorHook(SessionRunHook):
    """Logs fetched values every N local iterations or seconds, and/or at the end."""

    def __init__(
        self,
        tensors: Any,
        every_n_iter: int | None = None,
        every_n_secs: float | None = None,
        at_end: bool = False,
        formatter: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        check_bool("at_end", at_end)
        only_log_at_end = at_end and every_n_iter is None and every_n_secs is None
        if not only_log_at_end and (every_n_iter is None) == (every_n_secs is None):
            raise ValueError(
                "either at_end and/or exactly one of every_n_iter and every_n_secs "
                "must be provided."
            )
        if is_int(every_n_iter) and every_n_iter <= 0:
            # TensorFlow's message; a wrong type is this package's check below.
            raise ValueError(f"invalid every_n_iter={every_n_iter}. It must be a positive int.")
        if every_n_iter is not None:
            check_int("every_n_iter", every_n_iter, minimum=1)
        if every_n_secs is not None:
            check_number("every_n_secs", every_n_secs, minimum=0)
        check_callable("formatter", formatter, allow_none=True)
        self._fetches = self._tag_fetches(tensors)
        self._tag_order = (
            sorted(self._fetches) if isinstance(tensors, Mapping) else list(self._fetches)
        )
        self._formatter = formatter
        self._log_at_end = at_end
        self._timer: SecondOrStepTimer | NeverTriggerTimer = (
            NeverTriggerTimer()
            if only_log_at_end
            else SecondOrStepTimer(every_secs=every_n_secs, every_steps=every_n_iter)
        )
        self._iter_count = 0
        self._should_trigger = False
        self._last_values: dict[str, Any] | None = None

    @staticmethod
    def _tag_fetches(tensors: Any) -> dict[str, Any]:
        if isinstance(tensors, Mapping):
            for key in tensors:
                if not isinstance(key, str):
                    raise TypeError(
                        "tensors keys are the logged tags and must be str, "
                        f"got {repr_with_type(key)}"
                    )
            leaves = list(tensors.items())
        elif _is_leaf(tensors):
            leaves = [(_leaf_tag(tensors), tensors)]
        elif isinstance(tensors, (list, tuple)):
            leaves = [(_leaf_tag(leaf), leaf) for leaf in tensors]
        else:
            raise TypeError(
                "tensors must be a dict of tag -> fetch, a list/tuple of fetches, or one fetch "
                f"(a str or a callable), got {repr_with_type(tensors)}"
            )
        if not leaves:
            raise ValueError(f"tensors must name at least one value to log, got {tensors!r}")
        for tag, leaf in leaves:
            if not _is_leaf(leaf):
                raise TypeError(
                    f"tensors[{tag!r}] must be a str (a key into the step function's returned "
                    "mapping) or a callable (called with that return value), "
                    f"got {repr_with_type(leaf)}"
                )
        fetches = dict(leaves)
        if len(fetches) != len(leaves):
            tags = [tag for tag, _ in leaves]
            duplicates = sorted({tag for tag in tags if tags.count(tag) > 1})
            raise ValueError(
                f"tensors has more than one fetch tagged {duplicates}; "
                "pass a dict of tag -> fetch to name them apart"
            )
        return fetches

    def begin(self) -> None:
        self._timer.reset()
        self._iter_count = 0
        self._should_trigger = False
        self._last_values = None

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self._should_trigger = self._timer.should_trigger_for_step(self._iter_count)
        # With at_end, every step's values are kept: end() has no way to run the fetches again.
        if self._should_trigger or self._log_at_end:
            return SessionRunArgs(self._fetches)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if run_values.results is not None:
            if self._log_at_end:
                # Detached: a kept loss must not keep its autograd graph alive.
                self._last_values = {
                    tag: value.detach() if isinstance(value, torch.Tensor) else value
                    for tag, value in run_values.results.items()
                }
            if self._should_trigger:
                self._log_tensors(run_values.results)
        self._iter_count += 1

    def end(self, session: Session) -> None:
        if self._log_at_end and self._last_values is not None:
            self._log_tensors(self._last_values)

    def _log_tensors(self, tensor_values: Mapping[str, Any]) -> None:
        elapsed_secs, _ = self._timer.update_last_triggered_step(self._iter_count)
        values = {tag: _loggable(tensor_values[tag]) for tag in self._tag_order}
        if self._formatter is not None:
            logger.info("%s", self._formatter(values))
            return
        stats = ", ".join(f"{tag} = {value!s}" for tag, value in values.items())
        if elapsed_secs is not None:
            logger.info("%s (%.3f sec)", stats, elapsed_secs)
        else:
            logger.info("%s", stats)


class NanTensorHook(SessionRunHook):
    """Checks the loss after every step; on NaN, raises or requests a stop."""

    def __init__(self, loss_tensor: Any, fail_on_nan_loss: bool = True) -> None:
        if loss_tensor is None:
            raise TypeError(
                "loss_tensor must be a str (a key into the step function's returned mapping), "
                "a callable (called with that return value), or a list/tuple/dict of them, got None"
            )
        check_fetches(loss_tensor, "loss_tensor")
        self._loss_tensor = loss_tensor
        self._fail_on_nan_loss = check_bool("fail_on_nan_loss", fail_on_nan_loss)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        return SessionRunArgs(self._loss_tensor)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if not _contains_nan(run_values.results):
            return
        failure_message = "Model diverged with loss = NaN."
        if self._fail_on_nan_loss:
            logger.error(failure_message)
            raise NanLossDuringTrainingError
        logger.warning(failure_message)
        run_context.request_stop()
