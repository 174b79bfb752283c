"""What a save trigger does while the previous save is still being written (SPEC 5.5).

``"wait"`` (the default, SPEC section 3): the trigger waits for the write in flight, then saves.
``"skip"``: the trigger is skipped (logged at debug, counted) and left pending; the save happens
after the first later step that finds the writer free. With ``save_steps=1`` that is continuous
checkpointing: the newest checkpoint is at most one write old and the loop never waits for the
disk. A decision only, no I/O: the hook asks the saver whether it is busy and acts on the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

logger = logging.getLogger(__name__)

IfBusy = Literal["wait", "skip"]
IF_BUSY_CHOICES: tuple[IfBusy, ...] = ("wait", "skip")


def check_if_busy(value: object) -> IfBusy:
    """``value`` when it is one of ``IF_BUSY_CHOICES``.

    Raises:
        ValueError: it is anything else (the message lists the choices).
    """
    for choice in IF_BUSY_CHOICES:
        if isinstance(value, str) and value == choice:
            return choice
    shown = repr(value) if isinstance(value, str) else f"{value!r} (a {type(value).__qualname__})"
    raise ValueError(
        f"if_busy must be 'wait' (a trigger waits for the save in flight) or 'skip' (it is "
        f"skipped and the save made once the writer is free), got {shown}"
    )


class BusyPolicy:
    """Decides, after each step, whether the hook saves now; keeps the pending trigger and count.

    Owned by the training thread (the hook's calls).
    """

    def __init__(self, if_busy: IfBusy) -> None:
        self.mode: IfBusy = if_busy
        self.skipped = 0
        # A trigger was skipped and its save not made yet: the next free step saves.
        self._pending = False

    @property
    def pending(self) -> bool:
        """Whether a skipped trigger still waits for its save."""
        return self._pending

    def should_save(self, triggered: bool, busy: Callable[[], bool], step: int) -> bool:
        """Whether to save ``step`` now; ``triggered``: the timer fired for it.

        ``busy`` (the saver's non-blocking query) is asked only in ``"skip"`` mode, and only
        when there is a trigger to act on.
        """
        if not (triggered or self._pending):
            return False
        if self.mode == "skip" and busy():
            self.defer(step, triggered=triggered)
            return False
        self._pending = False
        return True

    def defer(self, step: int, *, triggered: bool) -> None:
        """Skip the save of ``step`` (the writer is busy) and owe it; count it if it was due."""
        if triggered:
            self.skipped += 1
            logger.debug(
                "Skipping the save of step %d (if_busy='skip'): the previous save is still "
                "being written; the next step that finds the writer free saves (%d skipped).",
                step,
                self.skipped,
            )
        self._pending = True

    def settle(self) -> None:
        """A save is being made: nothing is owed any more."""
        self._pending = False
