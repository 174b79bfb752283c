"""The save in flight: one owner for waiting on it, warning about it, and reporting its failure.

A saver has at most one save being written: its staging buffers belong to that write until it
finishes. ``InFlight`` holds that save and the failed ones nobody was told of yet, and is the
one place that:

- waits for the previous save before the next one starts, logging that the save interval is
  shorter than a save takes;
- drains: waits until every save is durable, bounded by ``drain_timeout_secs``;
- reports each failure once: a failure raised by its handle's ``result()`` (the hook calls it
  at its next call) is not raised again by a drain.

Owned by the training thread; the writer threads only complete the handles.
"""

from __future__ import annotations

import logging

from ._writer import SaveHandle

logger = logging.getLogger(__name__)


class InFlight:
    """A saver's save in flight and its unreported failures."""

    def __init__(self, drain_timeout_secs: float | None) -> None:
        self._timeout = drain_timeout_secs
        # Saves not yet known to be fine: the one in flight, and failures nobody was told of.
        self._handles: list[SaveHandle] = []

    @property
    def timeout(self) -> float | None:
        """How long a wait may block before it is an error (``None``: as long as it takes)."""
        return self._timeout

    def being_written(self) -> SaveHandle | None:
        """The save still being written, if any."""
        return next((h for h in self._handles if not h.done()), None)

    def busy(self) -> bool:
        """Whether a save is still being written; never blocks."""
        return self.being_written() is not None

    def wait_for_previous(self, next_name: str | None = None) -> None:
        """Wait for the save still being written; before the save of ``next_name``, with a warning.

        Without ``next_name`` (a drain, the end of training) there is nothing to warn about.

        Raises:
            CheckpointSaveError: it is still being written after ``drain_timeout_secs``.
        """
        previous = self.being_written()
        if previous is None:
            return
        if next_name is not None:
            logger.warning(
                "Saving %s waits for the previous save (%s), which is still being written: the "
                "save interval is shorter than a save takes.",
                next_name,
                previous.path,
            )
        previous.wait(self._timeout)

    def add(self, handle: SaveHandle) -> None:
        """Track a save that was just started."""
        self._handles = [h for h in self._handles if h.failed() and not h.reported]
        self._handles.append(handle)

    def drain(self, timeout: float | None = None) -> None:
        """Block until every save is durable; raise the first failure nobody was told of.

        Raises:
            CheckpointSaveError: a save failed and no one has been told (each failure is
                raised once), or a save is still being written after the timeout.
        """
        timeout = self._timeout if timeout is None else timeout
        for handle in list(self._handles):
            if not (handle.failed() and handle.reported):
                handle.result(timeout)
        self._handles = [h for h in self._handles if not h.done()]
