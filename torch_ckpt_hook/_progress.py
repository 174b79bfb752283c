"""``ProgressBarHook``: training progress as a tqdm bar, or as log lines.

A bar is drawn only where someone watches it redraw: tqdm installed, and stderr a terminal or
a Jupyter kernel running. Elsewhere (CI logs, ``nohup``, a redirected stderr) a redrawn bar
turns into thousands of carriage-return fragments, so progress goes to this module's logger at
INFO instead, which shows once the script configures logging at INFO.

tqdm is optional (the package depends on torch only): it is imported when the first bar opens,
through ``tqdm.auto`` so a notebook gets its widget.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from ._hooks import SessionRunArgs, SessionRunContext, SessionRunHook, SessionRunValues
from ._timer import SecondOrStepTimer
from ._validation import check_int

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session

logger = logging.getLogger(__name__)

# Without tqdm: a line every tenth of the way to `total`, or every LOG_EVERY_SECS, whichever comes
# first, so neither a fast run nor a days-long one floods the log or goes quiet.
LOG_EVERY_SECS = 30.0
_LOG_LINES_PER_RUN = 10


def _import_tqdm() -> Any | None:
    try:
        return importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return None


def _watched() -> bool:
    """Whether a bar would be seen redrawing: stderr is a terminal, or this is a notebook."""
    if "ipykernel" in sys.modules:  # Jupyter: tqdm.auto draws a widget, not on stderr
        return True
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Display(Protocol):
    def update(self, step: int) -> None: ...

    def close(self) -> None: ...


class _TqdmBar:
    """A tqdm bar over global steps; a resumed run's bar starts at the restored step."""

    def __init__(self, tqdm: Any, start: int, total: int | None) -> None:
        self._bar = tqdm(
            total=total, initial=start, unit="step", desc="global step", dynamic_ncols=True
        )

    def update(self, step: int) -> None:
        delta = step - self._bar.n
        if delta >= 0:
            self._bar.update(delta)
        else:
            # A recovery restored an older checkpoint: the bar goes back with the step.
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class _LogLines:
    """Progress as log lines: periodic ones, and a last one when the display closes."""

    def __init__(self, start: int, total: int | None) -> None:
        self._start_step = start
        self._start_time = time.time()
        self._total = total
        self._step = start
        self._timers = [SecondOrStepTimer(every_secs=LOG_EVERY_SECS)]
        if total is not None and total > start:
            every = max(1, (total - start) // _LOG_LINES_PER_RUN)
            self._timers.append(SecondOrStepTimer(every_steps=every))
        for timer in self._timers:
            timer.update_last_triggered_step(start)
        self._log()

    def update(self, step: int) -> None:
        self._step = step
        if any(timer.should_trigger_for_step(step) for timer in self._timers):
            for timer in self._timers:
                timer.update_last_triggered_step(step)
            self._log()

    def close(self) -> None:
        if self._timers[0].last_triggered_step() != self._step:
            self._log()

    def _log(self) -> None:
        step, total = self._step, self._total
        parts = [f"step {step}" if total is None else f"step {step}/{total}"]
        if total:
            parts[0] += f" ({100 * step // total}%)"
        elapsed = time.time() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} steps/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if rate > 0 and total is not None and total > step:
            parts.append(f"{_duration((total - step) / rate)} left")
        logger.info("Progress: %s", ", ".join(parts))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressBarHook(SessionRunHook):
    """Shows the global step's progress towards ``total``: a tqdm bar, or log lines.

    ``total`` is the global step at which training ends, as ``StopAtStepHook(last_step=...)``
    counts it, so a resumed run's bar starts part-full; None gives a bar with a count and a rate
    but no end. The bar opens as the first step starts (its rate leaves out the restore) and
    closes when the step reaches ``total`` or in ``end()``.

    The bar is a tqdm bar when tqdm is installed and stderr is a terminal (or in Jupyter).
    Otherwise (no tqdm, CI logs, a redirected stderr) a line goes to this module's logger at
    INFO every tenth of the way or every 30 seconds, whichever comes first, and at the end;
    configure logging at INFO to see them.

    On an exception that leaves the ``with`` block, the runner skips ``end()`` (TensorFlow's
    rule): the bar stays open (log lines: the last one is not written) until ``close()`` is
    called or the hook is reused in another session, whose ``begin()`` closes it.
    """

    def __init__(self, total: int | None = None) -> None:
        self._total = check_int(
            "total", total, minimum=0, allow_none=True, hint="the last global step"
        )
        self._display: _Display | None = None
        self._finished = False

    def begin(self) -> None:
        # A bar left open by a run that ended in an exception (end() skipped) closes here.
        self.close()
        self._finished = False

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        if self._display is not None:
            self._display.update(session.global_step)  # recovery: follow the restored step
        self._finished = self._total is not None and session.global_step >= self._total

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        if self._display is None and not self._finished:
            self._display = self._open(run_context.session.global_step)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if self._display is None:
            return
        step = run_context.session.global_step
        self._display.update(step)
        if self._total is not None and step >= self._total:
            self._finished = True
            self.close()

    def end(self, session: Session) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (or log the last line) if one is open; safe to call at any time."""
        display, self._display = self._display, None
        if display is not None:
            display.close()

    def _open(self, start: int) -> _Display:
        tqdm = _import_tqdm() if _watched() else None
        if tqdm is None:
            return _LogLines(start, self._total)
        return _TqdmBar(tqdm, start, self._total)
