"""Retention: which checkpoints a saver keeps listed, keeps on disk, and deletes.

A pure policy: it sees the list of one directory's checkpoints (path and save time, oldest
first) and the clock readings the saver hands it, and answers what to drop. It never touches a
disk; the ``Saver`` lists, writes the state file and deletes (through its storage).

The rules are TensorFlow's ``max_to_keep`` and ``keep_checkpoint_every_n_hours``, with SPEC.md's
changes: ``None`` or ``0`` keeps and lists everything; every checkpoint over the limit is dropped
at once (TensorFlow dropped one per save); a dropped checkpoint saved after the keep-every-N-hours
threshold stays on disk, unlisted, and moves the threshold N hours on; a dropped checkpoint whose
step is a positive multiple of ``keep_every_steps`` (a milestone, SPEC.md section 5.3) stays on
disk, unlisted, too. Clock rules
(docs/decisions.md): a clock set back moves the threshold and the listed save times back with it;
after a jump forwards one checkpoint is kept, not every one until the threshold catches up.

``BestKPolicy`` is the other policy a saver can apply: the ``keep`` best by a score (a metric's
value), not the newest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal, Protocol


@dataclasses.dataclass
class Entry:
    """One checkpoint on a saver's list."""

    path: str
    saved_at: float
    # The name's prefix once the entry is known to be the saver's to delete: set for a save it
    # committed itself, and for an adopted one once it passed the ownership test.
    prefix: str | None = None
    vetted: bool = False
    # The step its name ends with (``model.ckpt-300``: 300), None for an unnumbered name.
    step: int | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What retention decided for one directory after a save."""

    listed: list[Entry]
    """The entries that stay listed, oldest first."""
    deleted: list[Entry]
    """Dropped from the list, to be deleted."""
    preserved: list[Entry]
    """Dropped from the list, kept on disk (keep-every-N-hours)."""


class Retention(Protocol):
    """What a ``Saver`` asks of a retention policy; both run under the saver's lock."""

    def observe_clock(self, now: float, entries: Sequence[Entry]) -> None:
        """Note a save's time (the saver's list of every directory is ``entries``)."""

    def apply(self, entries: Sequence[Entry]) -> Verdict:
        """Decide for one directory's ``entries`` (oldest first, the new one last).

        ``listed`` is in the order the state file lists them: the one it names (the newest,
        or the best) last.
        """


class RetentionPolicy:
    """``max_to_keep`` and keeping every N hours or N steps, for one saver."""

    def __init__(
        self,
        max_to_keep: int | None,
        keep_every_secs: float,
        now: float,
        keep_every_steps: int | None = None,
    ) -> None:
        self._max_to_keep = max_to_keep
        self._keep_every_secs = keep_every_secs
        self._keep_every_steps = keep_every_steps
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
            elif self.is_milestone(old):
                preserved.append(old)
            else:
                deleted.append(old)
        return Verdict(listed, deleted, preserved)

    def is_milestone(self, entry: Entry) -> bool:
        """Whether ``entry``'s step is a positive multiple of ``keep_every_steps``.

        Step 0 (the state before any training) is no milestone.
        """
        n = self._keep_every_steps
        if not n or entry.step is None or entry.step <= 0:
            return False
        return entry.step % n == 0


class BestKPolicy:
    """The ``keep`` best checkpoints by a score, for ``BestCheckpointSaverHook``'s saver.

    ``score_of(path)`` is the checkpoint's metric value, or None when it is unknown (a file whose
    payload could not be read): such entries rank below every scored one. Ties, and entries
    without a score, rank newer first. ``listed`` is worst first, the best last, so the state
    file names the best. Nothing is preserved; time plays no part.
    """

    def __init__(
        self, keep: int, mode: Literal["min", "max"], score_of: Callable[[str], float | None]
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self._keep = keep
        self._mode = mode
        self._score_of = score_of

    def observe_clock(self, now: float, entries: Sequence[Entry]) -> None:
        """Time plays no part in the ranking."""

    def apply(self, entries: Sequence[Entry]) -> Verdict:
        """Keep the ``keep`` best of ``entries`` (oldest first), list them best last."""

        def rank(item: tuple[int, Entry]) -> tuple[bool, float, int]:
            age, entry = item
            score = self._score_of(entry.path)
            if score is None:
                return (False, 0.0, age)
            return (True, score if self._mode == "max" else -score, age)

        # Worst first: unscored (oldest first), then by score, ties older first.
        ordered = [entry for _, entry in sorted(enumerate(entries), key=rank)]
        cut = max(len(ordered) - self._keep, 0)
        return Verdict(ordered[cut:], ordered[:cut], [])
