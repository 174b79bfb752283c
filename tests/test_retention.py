"""Tests of ``RetentionPolicy``: max_to_keep and keep-every-N-hours, with no disk at all.

The saver-level versions (TensorFlow's ``MaxToKeepTest`` and ``KeepCheckpointEveryNHoursTest``,
with files) are in test_saver.py; these pin the policy alone, clock jumps included.
"""

from __future__ import annotations

from typing import Literal

import pytest

from torch_ckpt_hook._retention import BestKPolicy, Entry, RetentionPolicy

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


def _stepped(*steps: int) -> list[Entry]:
    return [Entry(f"model.ckpt-{step}", 0.0, step=step) for step in steps]


def test_a_dropped_milestone_is_preserved_and_the_others_deleted() -> None:
    policy = RetentionPolicy(1, 10000 * HOUR, now=0.0, keep_every_steps=100)
    entries = _stepped(0, 50, 100, 150, 200, 250)

    verdict = policy.apply(entries)

    assert ["model.ckpt-250"] == _names(verdict.listed)
    assert ["model.ckpt-100", "model.ckpt-200"] == _names(verdict.preserved)
    assert ["model.ckpt-0", "model.ckpt-50", "model.ckpt-150"] == _names(verdict.deleted)


def test_a_listed_milestone_stays_listed_until_max_to_keep_drops_it() -> None:
    policy = RetentionPolicy(3, 10000 * HOUR, now=0.0, keep_every_steps=2)

    verdict = policy.apply(_stepped(1, 2, 3))

    assert ["model.ckpt-1", "model.ckpt-2", "model.ckpt-3"] == _names(verdict.listed)
    assert ([], []) == (verdict.deleted, verdict.preserved)


def test_an_unnumbered_checkpoint_is_no_milestone() -> None:
    policy = RetentionPolicy(1, 10000 * HOUR, now=0.0, keep_every_steps=1)
    unnumbered = Entry("model.ckpt", 0.0)

    verdict = policy.apply([unnumbered, *_stepped(4)])

    assert [unnumbered] == verdict.deleted


def test_milestones_and_keep_every_n_hours_apply_side_by_side() -> None:
    policy = RetentionPolicy(1, HOUR, now=0.0, keep_every_steps=10)
    late = Entry("model.ckpt-3", 2 * HOUR, step=3)  # saved after the hours threshold
    milestone = Entry("model.ckpt-10", 2 * HOUR, step=10)
    plain = Entry("model.ckpt-11", 2 * HOUR, step=11)

    verdict = policy.apply([late, milestone, plain, *_stepped(12)])

    assert [late, milestone] == verdict.preserved, "the hour's one, then the milestone"
    assert [plain] == verdict.deleted


def _scored(**scores: float | None) -> tuple[list[Entry], dict[str, float | None]]:
    return [Entry(name, 0.0) for name in scores], dict(scores)


@pytest.mark.parametrize(
    ("mode", "listed", "deleted"),
    [("min", ["b", "d"], ["a", "c"]), ("max", ["b", "c"], ["a", "d"])],
)
def test_best_k_keeps_the_k_best_listed_best_last(
    mode: Literal["min", "max"], listed: list[str], deleted: list[str]
) -> None:
    entries, scores = _scored(a=None, b=2.0, c=3.0, d=1.0)
    policy = BestKPolicy(2, mode, scores.get)

    verdict = policy.apply(entries)

    assert listed == _names(verdict.listed)
    assert deleted == _names(verdict.deleted), "worst first: the unscored one first"
    assert [] == verdict.preserved


def test_best_k_breaks_ties_for_the_newer_and_ignores_the_clock() -> None:
    entries, scores = _scored(old=1.0, new=1.0)
    policy = BestKPolicy(1, "min", scores.get)
    policy.observe_clock(-1e9, entries)

    verdict = policy.apply(entries)

    assert (["new"], ["old"]) == (_names(verdict.listed), _names(verdict.deleted))
    assert [0.0, 0.0] == [e.saved_at for e in entries]


def test_best_k_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"^mode must be 'min' or 'max', got 'avg'$"):
        BestKPolicy(1, "avg", lambda path: None)  # type: ignore[arg-type]
