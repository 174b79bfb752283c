"""Tests for the basic hooks, driven directly as TensorFlow's tests drove them with _HookedSession."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FakeClock

from torch_ckpt_hook._basic_hooks import (
    LoggingTensorHook,
    NanTensorHook,
    StepCounterHook,
    StopAtStepHook,
)
from torch_ckpt_hook._coordinator import Coordinator
from torch_ckpt_hook._errors import NanLossDuringTrainingError
from torch_ckpt_hook._fetches import resolve_fetches
from torch_ckpt_hook._hooks import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from torch_ckpt_hook._session import Session

LOGGER = "torch_ckpt_hook._basic_hooks"


@pytest.fixture
def session() -> Iterator[Session]:
    model = torch.nn.Linear(2, 1)
    sess = Session(model, torch.optim.SGD(model.parameters(), lr=0.1))
    yield sess
    sess.close()


class HookedSession:
    """Runs hooks around a step function, like TensorFlow's ``_HookedSession``; stop is sticky."""

    def __init__(self, session: Session, hooks: Sequence[SessionRunHook]) -> None:
        self.session = session
        self.hooks = list(hooks)
        self.should_stop = False

    def run(self, step_fn: Callable[[], Any] = dict) -> Any:
        ctx = SessionRunContext(SessionRunArgs(None), self.session)
        requests = [hook.before_run(ctx) for hook in self.hooks]
        value = step_fn()
        for hook, request in zip(self.hooks, requests, strict=True):
            fetches = None if request is None else request.fetches
            hook.after_run(ctx, SessionRunValues(resolve_fetches(fetches, value)))
        self.should_stop = self.should_stop or ctx.stop_requested
        return value


def train_step(session: Session) -> Callable[[], dict[str, torch.Tensor]]:
    """A step function that takes one real optimizer step, so the global step advances by 1."""

    def step() -> dict[str, torch.Tensor]:
        assert session.optimizer is not None
        session.optimizer.zero_grad()
        loss = session.model(torch.ones(1, 2)).pow(2).sum()
        loss.backward()
        session.optimizer.step()
        return {"loss": loss.detach()}

    return step


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- StopAtStepHook ------------------------------------------------------------------------------


def test_stop_at_step_requires_exactly_one_of_num_steps_and_last_step() -> None:
    with pytest.raises(ValueError, match=r"^One of num_steps or last_step must be specified\.$"):
        StopAtStepHook()
    with pytest.raises(
        ValueError, match=r"^Only one of num_steps or last_step can be specified\.$"
    ):
        StopAtStepHook(num_steps=10, last_step=20)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_steps": -3}, ValueError, r"^num_steps must be a non-negative int, got -3$"),
        ({"last_step": -1}, ValueError, r"^last_step must be a non-negative int, got -1$"),
        (
            {"num_steps": 2.5},
            TypeError,
            r"^num_steps must be a non-negative int, got 2\.5 \(a float\)$",
        ),
        (
            {"last_step": True},
            TypeError,
            r"^last_step must be a non-negative int, got True \(a bool\)$",
        ),
    ],
)
def test_stop_at_step_rejects_bad_step_counts(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StopAtStepHook(**kwargs)


def test_stop_at_step_stops_at_last_step(session: Session) -> None:
    hook = StopAtStepHook(last_step=10)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    session.global_step = 5
    hook.after_create_session(session, Coordinator())
    mon_sess.run()
    assert not mon_sess.should_stop
    session.global_step = 9
    mon_sess.run()
    assert not mon_sess.should_stop
    session.global_step = 10
    mon_sess.run()
    assert mon_sess.should_stop
    session.global_step = 11
    mon_sess.should_stop = False
    mon_sess.run()
    assert mon_sess.should_stop


def test_stop_at_step_stops_after_num_steps(session: Session) -> None:
    hook = StopAtStepHook(num_steps=10)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    session.global_step = 5
    hook.after_create_session(session, Coordinator())
    mon_sess.run()
    assert not mon_sess.should_stop
    for step in (13, 14):
        session.global_step = step
        mon_sess.run()
        assert not mon_sess.should_stop, f"stopped at step {step}, before the last step 15"
    session.global_step = 15
    mon_sess.run()
    assert mon_sess.should_stop
    session.global_step = 16
    mon_sess.should_stop = False
    mon_sess.run()
    assert mon_sess.should_stop


def test_stop_at_step_stops_when_the_step_jumps_past_last_step(session: Session) -> None:
    hook = StopAtStepHook(num_steps=10)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    session.global_step = 5
    hook.after_create_session(session, Coordinator())
    mon_sess.run()
    assert not mon_sess.should_stop
    session.global_step = 15
    mon_sess.run()
    assert mon_sess.should_stop


def test_stop_at_step_counts_optimizer_steps(session: Session) -> None:
    hook = StopAtStepHook(num_steps=3)
    hook.begin()
    hook.after_create_session(session, Coordinator())
    mon_sess = HookedSession(session, [hook])
    runs = 0
    while not mon_sess.should_stop:
        mon_sess.run(train_step(session))
        runs += 1
    assert (3, 3) == (runs, session.global_step)


@pytest.mark.parametrize(("restored_step", "last_step"), [(10, 5), (5, 5)])
def test_stop_at_step_created_at_or_past_its_last_step_stops_before_any_run(
    session: Session, restored_step: int, last_step: int
) -> None:
    hook = StopAtStepHook(last_step=last_step)
    hook.begin()
    session.global_step = restored_step
    coord = Coordinator()
    hook.after_create_session(session, coord)
    assert coord.should_stop(), "a finished run must not train one more step (TF did)"


def test_stop_at_step_num_steps_zero_stops_before_any_run(session: Session) -> None:
    hook = StopAtStepHook(num_steps=0)
    hook.begin()
    session.global_step = 7
    coord = Coordinator()
    hook.after_create_session(session, coord)
    assert coord.should_stop()


def test_stop_at_step_created_before_its_last_step_does_not_stop(session: Session) -> None:
    hook = StopAtStepHook(last_step=5)
    hook.begin()
    session.global_step = 4
    coord = Coordinator()
    hook.after_create_session(session, coord)
    assert not coord.should_stop()


def test_stop_at_step_keeps_its_last_step_after_recovery(session: Session) -> None:
    hook = StopAtStepHook(num_steps=10)
    hook.begin()
    session.global_step = 5
    hook.after_create_session(session, Coordinator())
    mon_sess = HookedSession(session, [hook])
    mon_sess.run()
    # A recovery restores an older step and calls after_create_session again: the target stays 15.
    session.global_step = 12
    hook.after_create_session(session, Coordinator())
    session.global_step = 14
    mon_sess.run()
    assert not mon_sess.should_stop
    session.global_step = 15
    mon_sess.run()
    assert mon_sess.should_stop


def test_stop_at_step_num_steps_needs_after_create_session(session: Session) -> None:
    hook = StopAtStepHook(num_steps=10)
    hook.begin()
    with pytest.raises(RuntimeError, match=r"call that before after_run\(\)"):
        HookedSession(session, [hook]).run()


# --- StepCounterHook -----------------------------------------------------------------------------


def run_and_record_log_steps(
    mon_sess: HookedSession,
    caplog: pytest.LogCaptureFixture,
    runs: int,
    clock: FakeClock,
    tick: float,
) -> list[int]:
    """Run ``runs`` training steps, moving the clock by ``tick`` before each; return the global
    steps at which a new steps/sec line was logged."""
    logged_steps = []
    for _ in range(runs):
        clock.now += tick
        before = len(messages(caplog))
        mon_sess.run(train_step(mon_sess.session))
        if len(messages(caplog)) > before:
            logged_steps.append(mon_sess.session.global_step)
    return logged_steps


def test_step_counter_requires_exactly_one_interval() -> None:
    message = r"^exactly one of every_n_steps and every_n_secs should be provided\.$"
    with pytest.raises(ValueError, match=message):
        StepCounterHook(every_n_steps=None, every_n_secs=None)
    with pytest.raises(ValueError, match=message):
        StepCounterHook(every_n_secs=10)  # every_n_steps keeps its default of 100


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_steps": -1}, ValueError, r"^every_n_steps must be a non-negative int, got -1$"),
        (
            {"every_n_steps": 2.5},
            TypeError,
            r"^every_n_steps must be a non-negative int, got 2\.5 \(a float\)$",
        ),
        (
            {"every_n_steps": None, "every_n_secs": -0.5},
            ValueError,
            r"^every_n_secs must be a non-negative number, got -0\.5$",
        ),
        (
            {"every_n_steps": None, "every_n_secs": "10"},
            TypeError,
            r"^every_n_secs must be a non-negative number, got '10' \(a str\)$",
        ),
        (
            {"output_dir": 3},
            TypeError,
            r"^output_dir must be a path \(str or os\.PathLike\) or None, got 3 \(an int\)$",
        ),
    ],
)
def test_step_counter_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StepCounterHook(**kwargs)


def test_step_counter_logs_steps_per_sec_every_n_steps(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = StepCounterHook(every_n_steps=10)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    logged_steps = run_and_record_log_steps(mon_sess, caplog, 30, clock, tick=0.25)
    hook.end(session)
    # Step 1 sets the baseline; 10 steps later, 10 steps took 2.5 s.
    assert [11, 21] == logged_steps
    assert ["global_step/sec: 4", "global_step/sec: 4"] == messages(caplog)
    assert [] == messages(caplog, logging.WARNING)


def test_step_counter_first_trigger_logs_nothing(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = StepCounterHook(every_n_steps=1)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    clock.now += 0.25
    mon_sess.run(train_step(session))
    assert [] == messages(caplog)
    clock.now += 0.5
    mon_sess.run(train_step(session))
    assert ["global_step/sec: 2"] == messages(caplog)


def test_step_counter_every_n_secs(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = StepCounterHook(every_n_steps=None, every_n_secs=0.1)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    logged_steps = run_and_record_log_steps(mon_sess, caplog, 3, clock, tick=0.25)
    hook.end(session)
    assert [2, 3] == logged_steps
    assert ["global_step/sec: 4", "global_step/sec: 4"] == messages(caplog)


def test_step_counter_every_n_secs_waits_for_the_interval(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = StepCounterHook(every_n_steps=None, every_n_secs=1.0)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    logged_steps = run_and_record_log_steps(mon_sess, caplog, 9, clock, tick=0.25)
    # Baseline at step 1 (t=0.25); 1 s later is step 5, then step 9.
    assert [5, 9] == logged_steps


def test_step_counter_skips_the_rate_when_the_clock_did_not_move(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = StepCounterHook(every_n_steps=1)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    logged_steps = run_and_record_log_steps(mon_sess, caplog, 3, clock, tick=0.0)
    assert [] == logged_steps
    clock.now += 0.5
    mon_sess.run(train_step(session))
    assert ["global_step/sec: 2"] == messages(caplog)


def test_step_counter_warns_at_most_5_times_when_global_step_does_not_increase(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    hook = StepCounterHook(every_n_steps=1)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    mon_sess.run()  # records the global step; the step function takes no optimizer step
    assert [] == messages(caplog, logging.WARNING)
    for _ in range(30):
        mon_sess.run()
    warnings = messages(caplog, logging.WARNING)
    assert 5 == len(warnings)
    assert warnings[0] == (
        "It seems that global step has not been increased. Current value (could be stable): 0 "
        "vs previous value: 0. You could increase the global step by calling optimizer.step() "
        "inside the step function."
    )


def test_step_counter_without_tensorboard_logs_and_carries_on(
    session: Session,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A None entry in sys.modules makes the import fail, whether or not tensorboard is installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    caplog.set_level(logging.INFO, logger=LOGGER)
    output_dir = tmp_path / "logs"
    hook = StepCounterHook(every_n_steps=1, output_dir=output_dir)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    for _ in range(3):
        clock.now += 0.25
        mon_sess.run(train_step(session))
    hook.end(session)
    assert [
        "StepCounterHook: tensorboard is not installed, so global_step/sec is logged but not "
        f"written to output_dir={output_dir} (pip install tensorboard to record it)",
        "global_step/sec: 4",
        "global_step/sec: 4",
    ] == messages(caplog)
    assert not output_dir.exists()


def test_step_counter_writes_steps_per_sec_to_tensorboard(
    session: Session, clock: FakeClock, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hook = StepCounterHook(every_n_steps=10, output_dir=tmp_path)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    for _ in range(30):
        clock.now += 0.25
        mon_sess.run(train_step(session))
    hook.end(session)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("global_step/sec")
    assert [(11, 4.0), (21, 4.0)] == [(s.step, s.value) for s in scalars]


# --- LoggingTensorHook ---------------------------------------------------------------------------


def forty_two() -> dict[str, torch.Tensor]:
    return {"foo": torch.tensor(42.0)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"every_n_iter": 0},
            ValueError,
            r"^invalid every_n_iter=0\. It must be a positive int\.$",
        ),
        ({"every_n_iter": -10}, ValueError, r"^invalid every_n_iter=-10\."),
        (
            {"every_n_iter": 5, "every_n_secs": 5},
            ValueError,
            r"^either at_end and/or exactly one of every_n_iter and every_n_secs must be "
            r"provided\.$",
        ),
        ({}, ValueError, r"exactly one of every_n_iter and every_n_secs"),
        (
            {"every_n_iter": 2.0},
            TypeError,
            r"^every_n_iter must be a positive int, got 2\.0 \(a float\)$",
        ),
        (
            {"every_n_secs": -1.0},
            ValueError,
            r"^every_n_secs must be a non-negative number, got -1\.0$",
        ),
        ({"at_end": 1}, TypeError, r"^at_end must be a bool, got 1 \(an int\)$"),
        (
            {"at_end": True, "formatter": "{}"},
            TypeError,
            r"^formatter must be a callable or None, got '\{\}' \(a str\)$",
        ),
    ],
)
def test_logging_tensor_hook_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LoggingTensorHook(tensors=["t"], **kwargs)


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ([], ValueError, r"^tensors must name at least one value to log, got \[\]$"),
        ({1: "loss"}, TypeError, r"^tensors keys are the logged tags and must be str, got 1 "),
        ([3], TypeError, r"^tensors\['3'\] must be a str .* got 3 \(an int\)$"),
        ({"loss": ["a", "b"]}, TypeError, r"^tensors\['loss'\] must be a str "),
        (7, TypeError, r"^tensors must be a dict of tag -> fetch, .* got 7 \(an int\)$"),
        (
            [lambda v: v, lambda v: v],
            ValueError,
            r"^tensors has more than one fetch tagged \['<lambda>'\]; pass a dict",
        ),
    ],
)
def test_logging_tensor_hook_rejects_bad_tensors(
    tensors: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LoggingTensorHook(tensors, every_n_iter=1)


def test_logging_tensor_hook_logs_only_at_end(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors=["foo"], at_end=True)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    for i in range(3):
        mon_sess.run(lambda i=i: {"foo": torch.tensor(i)})
        assert [] == messages(caplog)
    hook.end(session)
    # end() cannot run the step function again: it logs the last values it saw.
    assert ["foo = 2"] == messages(caplog)


def test_logging_tensor_hook_at_end_logs_a_loss_that_requires_grad(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors=["loss"], at_end=True)
    hook.begin()

    def step() -> dict[str, torch.Tensor]:
        return {"loss": session.model(torch.ones(1, 2)).sum() * 0 + 1.5}

    HookedSession(session, [hook]).run(step)
    hook.end(session)
    assert ["loss = 1.5"] == messages(caplog)


def test_logging_tensor_hook_at_end_without_any_run_logs_nothing(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors=["foo"], at_end=True)
    hook.begin()
    hook.end(session)
    assert [] == messages(caplog)


@pytest.mark.parametrize("at_end", [False, True])
def test_logging_tensor_hook_logs_every_n_iter(
    session: Session, caplog: pytest.LogCaptureFixture, at_end: bool
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors=["foo"], every_n_iter=10, at_end=at_end)
    # Twice over, to check that begin() resets the iteration count and the timer.
    for _ in range(2):
        caplog.clear()
        hook.begin()
        mon_sess = HookedSession(session, [hook])
        logged_iterations = []
        for iteration in range(32):
            before = len(messages(caplog))
            mon_sess.run(forty_two)
            if len(messages(caplog)) > before:
                logged_iterations.append(iteration)
        assert [0, 10, 20, 30] == logged_iterations
        before = len(messages(caplog))
        hook.end(session)
        assert (1 if at_end else 0) == len(messages(caplog)) - before
        assert all(message.startswith("foo = 42.0") for message in messages(caplog))


def test_logging_tensor_hook_first_log_has_no_elapsed_time(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors={"foo": "foo"}, every_n_iter=1)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    mon_sess.run(forty_two)
    clock.now += 0.25
    mon_sess.run(forty_two)
    assert ["foo = 42.0", "foo = 42.0 (0.250 sec)"] == messages(caplog)


@pytest.mark.parametrize("at_end", [False, True])
def test_logging_tensor_hook_logs_every_n_secs(
    session: Session, clock: FakeClock, caplog: pytest.LogCaptureFixture, at_end: bool
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(tensors=["foo"], every_n_secs=1.0, at_end=at_end)
    for _ in range(2):
        caplog.clear()
        hook.begin()
        mon_sess = HookedSession(session, [hook])
        mon_sess.run(forty_two)
        assert ["foo = 42.0"] == messages(caplog)
        mon_sess.run(forty_two)
        assert 1 == len(messages(caplog)), "logged again before 1 s passed"
        clock.now += 1.0
        mon_sess.run(forty_two)
        assert ["foo = 42.0", "foo = 42.0 (1.000 sec)"] == messages(caplog)
        hook.end(session)
        assert (3 if at_end else 2) == len(messages(caplog))


def test_logging_tensor_hook_formatter_gets_tag_to_value(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = LoggingTensorHook(
        tensors=["foo"], every_n_iter=10, formatter=lambda items: f"qqq={items['foo']}"
    )
    hook.begin()
    HookedSession(session, [hook]).run(forty_two)
    assert ["qqq=42.0"] == messages(caplog)


def test_logging_tensor_hook_tags_and_values(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    def doubled(value: dict[str, Any]) -> Any:
        return value["loss"] * 2

    result = {"loss": torch.tensor(1.5), "vec": torch.tensor([1.0, 2.0]), "lr": 0.1}
    hooks = [
        LoggingTensorHook({"z": "loss", "a": doubled}, every_n_iter=1),  # dict: sorted tags
        LoggingTensorHook(["vec", doubled, "lr"], every_n_iter=1),  # list: given order
        LoggingTensorHook("loss", every_n_iter=1),  # a single leaf
    ]
    for hook in hooks:
        hook.begin()
    HookedSession(session, hooks).run(lambda: result)
    assert [
        "a = 3.0, z = 1.5",
        "vec = tensor([1., 2.]), doubled = 3.0, lr = 0.1",
        "loss = 1.5",
    ] == messages(caplog)


def test_logging_tensor_hook_requests_nothing_between_logs(session: Session) -> None:
    hook = LoggingTensorHook(["foo"], every_n_iter=2)
    hook.begin()
    ctx = SessionRunContext(SessionRunArgs(None), session)
    assert SessionRunArgs({"foo": "foo"}) == hook.before_run(ctx)
    hook.after_run(ctx, SessionRunValues({"foo": 1.0}))
    assert hook.before_run(ctx) is None
    hook.after_run(ctx, SessionRunValues(None))


# --- NanTensorHook -------------------------------------------------------------------------------


def nan_loss() -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(float("nan"))}


def test_nan_tensor_hook_fails_on_nan(session: Session, caplog: pytest.LogCaptureFixture) -> None:
    hook = NanTensorHook("loss")
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    with pytest.raises(NanLossDuringTrainingError, match=r"^NaN loss during training\.$"):
        mon_sess.run(nan_loss)
    assert ["Model diverged with loss = NaN."] == messages(caplog, logging.ERROR)
    assert not mon_sess.should_stop


def test_nan_tensor_hook_requests_stop_without_failing(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    hook = NanTensorHook("loss", fail_on_nan_loss=False)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    mon_sess.run(nan_loss)
    assert mon_sess.should_stop
    assert ["Model diverged with loss = NaN."] == messages(caplog, logging.WARNING)


@pytest.mark.parametrize(
    "loss",
    [torch.tensor(1.0), 1.0, 3, torch.tensor([1.0, 2.0]), torch.tensor(7), float("inf")],
    ids=["tensor", "float", "int", "vector", "int-tensor", "inf"],
)
def test_nan_tensor_hook_ignores_finite_loss(
    session: Session, caplog: pytest.LogCaptureFixture, loss: Any
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    hook = NanTensorHook("loss")
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    mon_sess.run(lambda: {"loss": loss})
    assert not mon_sess.should_stop
    assert [] == caplog.records


@pytest.mark.parametrize(
    ("loss_tensor", "result"),
    [
        ("loss", {"loss": float("nan")}),
        ("loss", {"loss": torch.tensor([1.0, float("nan")])}),
        (lambda value: value[0], (torch.tensor(float("nan")),)),
        (["a", "b"], {"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}),
    ],
    ids=["python-float", "one-nan-in-vector", "callable", "list-of-losses"],
)
def test_nan_tensor_hook_finds_nan(session: Session, loss_tensor: Any, result: Any) -> None:
    hook = NanTensorHook(loss_tensor, fail_on_nan_loss=False)
    hook.begin()
    mon_sess = HookedSession(session, [hook])
    mon_sess.run(lambda: result)
    assert mon_sess.should_stop


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_tensor": None}, r"^loss_tensor must be a str .* got None$"),
        ({"loss_tensor": 3}, r"^loss_tensor must be a str key, .* got 3 \(an int\)$"),
        (
            {"loss_tensor": "loss", "fail_on_nan_loss": "yes"},
            r"^fail_on_nan_loss must be a bool, got 'yes' \(a str\)$",
        ),
    ],
)
def test_nan_tensor_hook_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        NanTensorHook(**kwargs)


def test_nan_tensor_hook_rejects_a_loss_it_cannot_check(session: Session) -> None:
    hook = NanTensorHook("loss")
    with pytest.raises(TypeError, match=r"got 'abc' \(a str\)$"):
        HookedSession(session, [hook]).run(lambda: {"loss": "abc"})
