"""SecondOrStepTimer: TensorFlow's SecondOrStepTimerTest, translated, plus validation."""

from __future__ import annotations

import pytest
from conftest import FakeClock

from torch_ckpt_hook import SecondOrStepTimer
from torch_ckpt_hook._timer import NeverTriggerTimer


def test_raises_when_both_secs_and_steps_are_given() -> None:
    with pytest.raises(ValueError, match=r"^Can not provide both every_secs and every_steps\.$"):
        SecondOrStepTimer(every_secs=2.0, every_steps=10)


def test_raises_when_neither_secs_nor_steps_is_given() -> None:
    with pytest.raises(
        ValueError, match=r"^Either every_secs or every_steps should be provided\.$"
    ):
        SecondOrStepTimer()


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"every_secs": -1.0}, "every_secs"), ({"every_steps": -3}, "every_steps")]
)
def test_negative_interval_is_rejected(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a non-negative number, got -\d"):
        SecondOrStepTimer(**kwargs)


def test_nan_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^every_secs must be a non-negative number, got nan$"):
        SecondOrStepTimer(every_secs=float("nan"))


@pytest.mark.parametrize(
    ("value", "given"),
    [("10", r"'10' \(a str\)"), (True, r"True \(a bool\)"), ([1], r"\[1\] \(a list\)")],
)
def test_non_numeric_interval_is_rejected(value: object, given: str) -> None:
    with pytest.raises(
        TypeError, match=rf"^every_steps must be a non-negative number, got {given}$"
    ):
        SecondOrStepTimer(every_steps=value)  # type: ignore[arg-type]


def test_every_secs(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_secs=1.0)
    assert timer.should_trigger_for_step(1)

    timer.update_last_triggered_step(1)
    assert not timer.should_trigger_for_step(1)
    assert not timer.should_trigger_for_step(2)

    clock.advance(1.0)
    assert not timer.should_trigger_for_step(1), "the same step never fires twice"
    assert timer.should_trigger_for_step(2), "the seconds rule is inclusive"


def test_every_steps() -> None:
    timer = SecondOrStepTimer(every_steps=3)
    assert timer.should_trigger_for_step(1)

    timer.update_last_triggered_step(1)
    assert not timer.should_trigger_for_step(1)
    assert not timer.should_trigger_for_step(2)
    assert not timer.should_trigger_for_step(3)
    assert timer.should_trigger_for_step(4), "the steps rule is inclusive"


def test_update_last_triggered_step_returns_secs_then_steps(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_steps=1)

    assert timer.update_last_triggered_step(1) == (None, None)

    clock.advance(5.0)
    assert timer.update_last_triggered_step(5) == (5.0, 4)

    clock.advance(2.5)
    assert timer.update_last_triggered_step(2) == (2.5, -3), "elapsed steps are not clamped"
    assert timer.last_triggered_step() == 2


def test_zero_interval_fires_whenever_the_step_changes(clock: FakeClock) -> None:
    for timer in (SecondOrStepTimer(every_steps=0), SecondOrStepTimer(every_secs=0)):
        timer.update_last_triggered_step(3)
        assert not timer.should_trigger_for_step(3)
        assert timer.should_trigger_for_step(4)


def test_step_going_backwards_never_fires_the_steps_rule() -> None:
    timer = SecondOrStepTimer(every_steps=2)
    timer.update_last_triggered_step(10)
    assert not timer.should_trigger_for_step(5)


def test_reset_makes_the_next_check_fire() -> None:
    timer = SecondOrStepTimer(every_steps=100)
    timer.update_last_triggered_step(1)
    timer.reset()
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(1)


def test_the_clock_is_looked_up_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    timer = SecondOrStepTimer(every_secs=10.0)
    monkeypatch.setattr(time, "time", lambda: 100.0)
    timer.update_last_triggered_step(0)
    monkeypatch.setattr(time, "time", lambda: 110.0)
    assert timer.should_trigger_for_step(1)


# -- clocks (SPEC 5.1): a wall clock that jumps ---------------------------------------------------

HOUR = 3600.0


def test_a_clock_jumping_backwards_does_not_stall_the_seconds_rule(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_secs=10.0)
    timer.update_last_triggered_step(0)
    clock.advance(4.0)
    assert not timer.should_trigger_for_step(1)
    clock.advance(-HOUR)  # an NTP correction, a VM resumed from a snapshot
    assert not timer.should_trigger_for_step(2), "4 s have passed, not 10"
    clock.advance(5.0)
    assert not timer.should_trigger_for_step(3), "9 s have passed"
    clock.advance(1.0)
    assert timer.should_trigger_for_step(4), "10 s have passed: not an hour later"


def test_the_seconds_rule_counts_from_the_trigger_after_a_backwards_jump(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_secs=10.0)
    timer.update_last_triggered_step(0)
    clock.advance(-HOUR)
    assert not timer.should_trigger_for_step(1)
    clock.advance(10.0)
    assert timer.should_trigger_for_step(2)
    timer.update_last_triggered_step(2)
    clock.advance(9.0)
    assert not timer.should_trigger_for_step(3)
    clock.advance(1.0)
    assert timer.should_trigger_for_step(4)


def test_elapsed_secs_leaves_out_a_backwards_jump_seen_between_triggers(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_steps=5)  # StepCounterHook's kind: the rate needs the secs
    timer.update_last_triggered_step(0)
    clock.advance(2.0)
    assert not timer.should_trigger_for_step(1)
    clock.advance(-HOUR)
    assert not timer.should_trigger_for_step(2)
    clock.advance(3.0)
    assert timer.should_trigger_for_step(5)
    assert (5.0, 5) == timer.update_last_triggered_step(5)


def test_elapsed_secs_is_never_negative_when_the_clock_went_back_unseen(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_steps=5)
    timer.update_last_triggered_step(0)
    clock.advance(-HOUR)  # no reading between the trigger and the jump
    assert (0.0, 5) == timer.update_last_triggered_step(5)
    clock.advance(2.0)
    assert (2.0, 5) == timer.update_last_triggered_step(10)


def test_a_clock_jumping_forwards_fires_once_then_counts_from_that_trigger(
    clock: FakeClock,
) -> None:
    timer = SecondOrStepTimer(every_secs=10.0)
    timer.update_last_triggered_step(0)
    clock.advance(24 * HOUR)
    fired = []
    for step in range(1, 20):
        clock.advance(1.0)
        if timer.should_trigger_for_step(step):
            timer.update_last_triggered_step(step)
            fired.append(step)
    assert [1, 11] == fired


def test_tensorflows_rules_hold_after_a_backwards_jump(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_secs=0)
    clock.advance(-HOUR)
    assert timer.should_trigger_for_step(7), "the first check fires"
    timer.update_last_triggered_step(7)
    clock.advance(-HOUR)
    assert not timer.should_trigger_for_step(7), "the same step never fires twice"
    assert timer.should_trigger_for_step(8), "an interval of 0 fires whenever the step changes"
    assert 7 == timer.last_triggered_step()


def test_reset_forgets_the_clock_readings(clock: FakeClock) -> None:
    timer = SecondOrStepTimer(every_secs=10.0)
    timer.update_last_triggered_step(0)
    clock.advance(5.0)
    assert not timer.should_trigger_for_step(1)
    timer.reset()
    clock.advance(-HOUR)
    assert (None, None) == timer.update_last_triggered_step(1)
    clock.advance(3.0)
    assert (3.0, 1) == timer.update_last_triggered_step(2)


def test_never_trigger_timer_never_fires() -> None:
    timer = NeverTriggerTimer()
    assert not timer.should_trigger_for_step(0)
    assert timer.update_last_triggered_step(5) == (None, None)
    assert timer.last_triggered_step() is None
