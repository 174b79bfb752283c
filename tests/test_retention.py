"""Tests of ``RetentionPolicy``: max_to_keep and keep-every-N-hours, with no disk at all.

The saver-level versions (TensorFlow's ``MaxToKeepTest`` and ``KeepCheckpointEveryNHoursTest``,
with files) are in test_saver.py; these pin the policy alone, clock jumps included.
"""

from __future__ import annotations

import pytest

from torch_ckpt_hook._retention import Entry, RetentionPolicy

HOUR = 3600.0


def _entries(*times: float) -> list[Entry]:
    return [Entry(f"model.ckpt-{i}", t) for i, t in enumerate(times)]


def _names(entries: list[Entry]) -> list[str]:
    return [e.path for e in entries]


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_none_or_zero_keeps_and_lists_everything(max_to_keep: int | None) -> None:
    policy = RetentionPolicy(max_to_keep, HOUR, now=0.0)
    entries = _entries(*range(10))

    verdict = policy.apply(entries)

    assert entries == verdict.listed
    assert ([], []) == (verdict.deleted, verdict.preserved)


def test_every_entry_over_the_limit_is_dropped_at_once_oldest_first() -> None:
    policy = RetentionPolicy(2, 10000 * HOUR, now=0.0)
    entries = _entries(1, 2, 3, 4, 5)

    verdict = policy.apply(entries)

    assert ["model.ckpt-3", "model.ckpt-4"] == _names(verdict.listed)
    assert ["model.ckpt-0", "model.ckpt-1", "model.ckpt-2"] == _names(verdict.deleted)
    assert [] == verdict.preserved


def test_keep_every_n_hours_follows_tensorflows_threshold_rule() -> None:
    """TF ``KeepCheckpointEveryNHoursTest``: threshold T+0.7; s1 at T+1.0 kept, moves to T+1.4."""
    policy = RetentionPolicy(2, 0.7, now=0.0)
    s1, s2, s3, s4 = _entries(1.0, 1.0, 1.0, 1.0)

    first = policy.apply([s1, s2, s3])
    assert [s1] == first.preserved
    assert 1.4 == pytest.approx(policy.next_keep_time)
    second = policy.apply([s2, s3, s4])
    assert [s2] == second.deleted, "saved at T+1.0, not after T+1.4"


def test_after_a_clock_jump_forwards_one_checkpoint_is_kept_not_every_one() -> None:
    policy = RetentionPolicy(1, HOUR, now=0.0)
    times = [10 * HOUR + i for i in range(6)]  # the clock jumped ten hours ahead
    preserved: list[Entry] = []
    listed: list[Entry] = []
    for entry in _entries(*times):
        policy.observe_clock(entry.saved_at, listed)
        verdict = policy.apply([*listed, entry])
        listed = verdict.listed
        preserved += verdict.preserved

    assert ["model.ckpt-0"] == _names(preserved)
    assert 11 * HOUR == policy.next_keep_time


def test_a_clock_set_back_moves_the_threshold_and_the_listed_times_back() -> None:
    policy = RetentionPolicy(3, HOUR, now=0.0)
    listed = _entries(100.0, 200.0)
    policy.observe_clock(200.0, listed)

    policy.observe_clock(200.0 - HOUR, listed)  # set back an hour

    assert 0.0 == policy.next_keep_time
    assert [100.0 - HOUR, 200.0 - HOUR] == [e.saved_at for e in listed]


def test_a_clock_that_only_goes_forwards_changes_nothing() -> None:
    policy = RetentionPolicy(3, HOUR, now=0.0)
    listed = _entries(100.0)
    for now in (100.0, 150.0, 150.0, 4000.0):
        policy.observe_clock(now, listed)

    assert HOUR == policy.next_keep_time
    assert [100.0] == [e.saved_at for e in listed]
