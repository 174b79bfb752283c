"""The errors met during one hook call, raised once the call's work is done.

A ``CheckpointSaverHook`` call that meets an error part-way (a listener that raises, a background
save that failed) must not stop there: that would leave a save half-done, listeners that got
``before_save`` and no ``after_save``, pending saves popped and never reported, the next trigger
skipped. It collects the errors in a ``Failures``, finishes its work, and raises the first, the
same object, with a note naming what raised it; the others are logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._listeners import CheckpointSaverListener

# The hook's own logger: these are its errors, logged where its other lines are.
logger = logging.getLogger(f"{__package__}._checkpoint_hook")


def _add_note(err: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        err.add_note(note)
    else:  # the attribute 3.11's add_note() sets; pytest and exceptiongroup show it on 3.10
        err.__dict__.setdefault("__notes__", []).append(note)


class Failures:
    """The errors met during one hook call; the first is raised once the call's work is done.

    Raising at once would leave a save half-done: listeners that got ``before_save`` and no
    ``after_save``, pending saves popped and never reported, the next trigger skipped. Each
    error is raised, or logged when another was raised in its place, exactly once.
    """

    def __init__(self) -> None:
        self._errors: list[Exception] = []

    def __bool__(self) -> bool:
        return bool(self._errors)

    def add(self, err: Exception) -> None:
        if not any(err is seen for seen in self._errors):
            self._errors.append(err)

    def listener_failed(
        self, err: Exception, listener: CheckpointSaverListener, call: str, outcome: str
    ) -> None:
        """Record ``err``, raised by ``listener.call``, with a note naming both and ``outcome``."""
        try:
            _add_note(err, f"Raised by {listener!r}.{call} in CheckpointSaverHook; {outcome}.")
        except Exception:  # a __notes__ that is not a list: the error still propagates
            logger.debug("Could not add a note to %r", err, exc_info=True)
        self.add(err)

    def note_first(self, note: str) -> None:
        if self._errors:
            try:
                _add_note(self._errors[0], note)
            except Exception:
                logger.debug("Could not add a note to %r", self._errors[0], exc_info=True)

    def raise_first(self) -> None:
        """Raise the first error, after logging the others; do nothing when there is none."""
        if not self._errors:
            return
        first, *others = self._errors
        self._errors = []
        for other in others:
            logger.error(
                "CheckpointSaverHook: %s: %s (logged, not raised: %s was raised first)",
                type(other).__name__,
                other,
                type(first).__name__,
                exc_info=other,
            )
        raise first
