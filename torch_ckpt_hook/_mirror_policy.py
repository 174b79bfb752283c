"""The mirror tier's decisions, apart from its I/O: retries, what the mirror keeps, what restores.

Pure functions of names and counts, so each is tested alone; ``_mirror`` does the copying.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from ._checkpoint_dir import step_of


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a failed copy to the mirror is retried: ``attempts`` in all, backing off.

    The wait after the n-th failure is ``first_delay * factor ** (n - 1)``, at most
    ``max_delay``. Defaults: 4 attempts over about 7 seconds (1, 2, 4 s between them).
    """

    attempts: int = 4
    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.first_delay < 0 or self.factor < 1 or self.max_delay < 0:
            raise ValueError(
                "first_delay and max_delay must be >= 0 and factor >= 1, got "
                f"{self.first_delay}, {self.max_delay} and {self.factor}"
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1 for the first)."""
        return min(self.max_delay, self.first_delay * self.factor ** max(0, failures - 1))


def mirror_retention(
    listed: Sequence[str], keep: int | None, protected: Collection[str]
) -> tuple[list[str], list[str]]:
    """Split the mirror's checkpoints (oldest first) into ``(kept, deleted)``, both oldest first.

    ``keep`` of None or 0 keeps every one. Over the limit, the oldest go first, but never one in
    ``protected`` (the one just copied, and the one the local tier lists as its newest): the
    mirror then keeps more than ``keep`` until they are no longer protected.
    """
    if not keep or len(listed) <= keep:
        return list(listed), []
    excess = len(listed) - keep
    deleted: list[str] = []
    for path in listed:
        if excess == 0:
            break
        if path in protected:
            continue
        deleted.append(path)
        excess -= 1
    gone = set(deleted)
    return [p for p in listed if p not in gone], deleted


def merge_newest_first(local: Sequence[str], mirror: Sequence[str]) -> list[str]:
    """Both tiers' restore candidates (each newest first) as one list, newest step first.

    At an equal step the local copy comes first (it is read faster); the mirror's copy of the
    same name stays behind it as the fallback when the local one is damaged. A name without a
    step keeps its tier's order, counted as older than any numbered one.
    """
    merged: list[str] = []
    i = j = 0
    while i < len(local) and j < len(mirror):
        local_step, mirror_step = step_of(local[i]), step_of(mirror[j])
        if (mirror_step if mirror_step is not None else -1) > (
            local_step if local_step is not None else -1
        ):
            merged.append(mirror[j])
            j += 1
        else:
            merged.append(local[i])
            i += 1
    return [*merged, *local[i:], *mirror[j:]]
