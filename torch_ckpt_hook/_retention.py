"""Retention: which checkpoints a saver keeps listed, keeps on disk, and deletes.

A pure policy: it sees the list of one directory's checkpoints (path and save time, oldest
first) and the clock readings the saver hands it, and answers what to drop. It never touches a
disk; the ``Saver`` lists, writes the state file and deletes (through its storage).

The rules are TensorFlow's ``max_to_keep`` and ``keep_checkpoint_every_n_hours``, with SPEC.md's
changes: ``None`` or ``0`` keeps and lists everything; every checkpoint over the limit is dropped
at once (TensorFlow dropped one per save); a dropped checkpoint saved after the keep-every-N-hours
threshold stays on disk, unlisted, and moves the threshold N hours on. Clock rules
(docs/decisions.md): a clock set back moves the threshold and the listed save times back with it;
after a jump forwards one checkpoint is kept, not every one until the threshold catches up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass
class Entry:
    """One checkpoint on a saver's list."""

    path: str
    saved_at: float
    # The name's prefix once the entry is known to be the saver's to delete: set for a save it
    # committed itself, and for an adopted one once it passed the ownership test.
    prefix: str | None = None
    vetted: bool = False


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What retention decided for one directory after a save."""

    listed: list[Entry]
    """The entries that stay listed, oldest first."""
    deleted: list[Entry]
    """Dropped from the list, to be deleted."""
    preserved: list[Entry]
    """Dropped from the list, kept on disk (keep-every-N-hours)."""


class RetentionPolicy:
    """``max_to_keep`` and ``keep_checkpoint_every_n_hours`` for one saver."""

    def __init__(self, max_to_keep: int | None, keep_every_secs: float, now: float) -> None:
        self._max_to_keep = max_to_keep
        self._keep_every_secs = keep_every_secs
        self._next_keep_time = now + keep_every_secs
        # The latest save time seen, to notice a wall clock that jumped backwards.
        self._last_clock: float | None = None

    @property
    def next_keep_time(self) -> float:
        """The save time after which a dropped checkpoint is kept on disk."""
        return self._next_keep_time

    def observe_clock(self, now: float, entries: Sequence[Entry]) -> None:
        """Note a save's time; a clock set back moves the threshold and ``entries`` back with it.

        As if no time had passed since the previous save (the most a wall clock can tell), so
        milestones do not stop for the length of the jump.
        """
        if self._last_clock is not None and now < self._last_clock:
            jump = self._last_clock - now
            self._next_keep_time -= jump
            for entry in entries:
                entry.saved_at -= jump
        self._last_clock = now

    def apply(self, entries: Sequence[Entry]) -> Verdict:
        """Decide for one directory's ``entries`` (oldest first, the new one last)."""
        listed = list(entries)
        deleted: list[Entry] = []
        preserved: list[Entry] = []
        while self._max_to_keep and len(listed) > self._max_to_keep:
            old = listed.pop(0)
            if old.saved_at > self._next_keep_time:
                self._next_keep_time += self._keep_every_secs
                if self._next_keep_time <= old.saved_at:
                    # Behind by more than an interval (a clock that jumped forwards, or saves
                    # further apart than N hours): one kept per N hours from here, not every
                    # checkpoint until the threshold catches up.
                    self._next_keep_time = old.saved_at + self._keep_every_secs
                preserved.append(old)
            else:
                deleted.append(old)
        return Verdict(listed, deleted, preserved)
