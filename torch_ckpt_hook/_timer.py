"""When to fire: ``SecondOrStepTimer``, TensorFlow's steps-or-seconds trigger."""

from __future__ import annotations

import time

from ._validation import check_number


class SecondOrStepTimer:
    """Fires every ``every_secs`` seconds or every ``every_steps`` steps, never both.

    The rules are TensorFlow's: the first check always fires, a step never fires twice in a row,
    and both intervals are inclusive. The clock is ``time.time()``, looked up at call time, so a
    test can replace it.

    Intervals count the time the clock ran forwards. A wall clock that steps backwards (an NTP
    correction, a VM resumed from a snapshot, someone setting the date) is seen at the next
    reading, and the reference moves back by as much: the seconds rule still fires
    ``every_secs`` after the last trigger, not after the clock catches up again, and
    ``elapsed_secs`` is never negative. A clock that jumps forwards fires once, and the next
    interval counts from that trigger.
    """

    def __init__(self, every_secs: float | None = None, every_steps: int | None = None) -> None:
        self.reset()
        if every_secs is None and every_steps is None:
            raise ValueError("Either every_secs or every_steps should be provided.")
        if every_secs is not None and every_steps is not None:
            raise ValueError("Can not provide both every_secs and every_steps.")
        # 0 is accepted, as in TensorFlow; a negative interval, which TensorFlow took, is not.
        if every_secs is not None:
            check_number("every_secs", every_secs, minimum=0)
        if every_steps is not None:
            check_number("every_steps", every_steps, minimum=0)
        self._every_secs = every_secs
        self._every_steps = every_steps

    def reset(self) -> None:
        """Forget the last trigger: the next check fires."""
        self._last_triggered_step: int | None = None
        self._last_triggered_time: float | None = None
        # The latest clock reading, to see the clock go backwards; never below the reference.
        self._last_seen_time: float | None = None

    def _now(self) -> float:
        """``time.time()``, moving the reference back by any backwards step since the last read."""
        now = time.time()
        last_seen = self._last_seen_time
        if last_seen is not None and now < last_seen and self._last_triggered_time is not None:
            # The time that passed before the step still counts; the step itself does not.
            self._last_triggered_time -= last_seen - now
        self._last_seen_time = now
        return now

    def should_trigger_for_step(self, step: int) -> bool:
        """Whether ``step`` should fire, given the last trigger."""
        if self._last_triggered_step is None:
            return True
        if self._last_triggered_step == step:
            return False
        # Read for a steps-only timer too, so a backwards step between triggers is seen and
        # elapsed_secs stays right for StepCounterHook's rate.
        now = self._now()
        if self._every_secs is not None:
            assert self._last_triggered_time is not None
            if now >= self._last_triggered_time + self._every_secs:
                return True
        if self._every_steps is not None:
            return step >= self._last_triggered_step + self._every_steps
        return False

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        """Record a trigger at ``step``; return the seconds and steps since the previous one.

        Both are ``None`` on the first trigger. It does not check ``should_trigger_for_step``.
        ``elapsed_secs`` leaves out a backwards step of the clock, so it is never negative; the
        steps are not clamped (TensorFlow's rule).
        """
        current_time = self._now()
        if self._last_triggered_time is None or self._last_triggered_step is None:
            elapsed_secs: float | None = None
            elapsed_steps: int | None = None
        else:
            # max(): rounding in the rebase must not make a float -1e-12.
            elapsed_secs = max(0.0, current_time - self._last_triggered_time)
            elapsed_steps = step - self._last_triggered_step
        self._last_triggered_time = current_time
        self._last_triggered_step = step
        return elapsed_secs, elapsed_steps

    def last_triggered_step(self) -> int | None:
        return self._last_triggered_step


class NeverTriggerTimer:
    """A timer that never fires (``LoggingTensorHook(at_end=True)`` with no interval)."""

    def reset(self) -> None:
        pass

    def should_trigger_for_step(self, step: int) -> bool:
        return False

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        return None, None

    def last_triggered_step(self) -> int | None:
        return None
