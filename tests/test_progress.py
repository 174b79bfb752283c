"""ProgressBarHook: a tqdm bar over global steps, or log lines when tqdm is missing."""

from __future__ import annotations

import io
import logging
import sys
import types
from typing import Any, ClassVar

import pytest
import torch
from conftest import FakeClock, make_train_step

import torch_ckpt_hook as tch
from torch_ckpt_hook import _progress

ModelAndOptimizer = tuple[torch.nn.Module, torch.optim.Optimizer]


class FakeTqdm:
    """Records what the hook asks of tqdm."""

    instances: ClassVar[list[FakeTqdm]] = []

    def __init__(self, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
        self.total = total
        self.initial = initial
        self.n = initial
        self.kwargs = kwargs
        self.updates: list[int] = []
        self.closed = False
        FakeTqdm.instances.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch: pytest.MonkeyPatch) -> type[FakeTqdm]:
    module = types.ModuleType("tqdm.auto")
    module.tqdm = FakeTqdm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm.auto", module)
    # As in Jupyter, where a bar is drawn whatever stderr is (pytest's is no terminal).
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    FakeTqdm.instances = []
    return FakeTqdm


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stderr(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    """Replace stderr and leave Jupyter; in the test body, as pytest's capture resets stderr
    between a fixture's setup and the test."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture
def no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise ImportError, as if tqdm were absent.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


def _train(
    model_and_optimizer: ModelAndOptimizer,
    hook: tch.ProgressBarHook,
    last_step: int,
    checkpoint_dir: str | None = None,
    clock: FakeClock | None = None,
    seconds_per_step: float = 0.0,
) -> None:
    model, optimizer = model_and_optimizer
    train_step = make_train_step(model, optimizer)

    def step() -> dict[str, torch.Tensor]:
        if clock is not None:
            clock.advance(seconds_per_step)
        return train_step()

    hooks = [tch.StopAtStepHook(last_step=last_step), hook]
    with tch.MonitoredSession(model, optimizer, hooks=hooks, checkpoint_dir=checkpoint_dir) as sess:
        while not sess.should_stop():
            sess.run(step)


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _progress.__name__]


@pytest.mark.parametrize(
    ("total", "error", "message"),
    [
        (-1, ValueError, "total must be a non-negative int (the last global step) or None, got -1"),
        ("10", TypeError, "total must be a non-negative int .* got '10' (a str)"),
        (True, TypeError, "total must be a non-negative int .* got True (a bool)"),
        (2.5, TypeError, "total must be a non-negative int .* got 2.5 (a float)"),
    ],
)
def test_total_must_be_a_non_negative_int_or_none(total: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        tch.ProgressBarHook(total)


def test_bar_counts_global_steps_to_total_and_closes(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer
) -> None:
    _train(model_and_optimizer, tch.ProgressBarHook(total=5), last_step=5)

    [bar] = fake_tqdm.instances
    assert (5, 0, 5) == (bar.total, bar.initial, bar.n)
    assert [1, 1, 1, 1, 1] == bar.updates
    assert "step" == bar.kwargs["unit"]
    assert bar.closed


def test_resumed_bar_starts_at_the_restored_step(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer, tmp_path: Any
) -> None:
    model, optimizer = model_and_optimizer
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=3,
        log_step_count_steps=0,
        hooks=[tch.StopAtStepHook(last_step=3)],
    ) as sess:
        step = make_train_step(model, optimizer)
        while not sess.should_stop():
            sess.run(step)

    _train(model_and_optimizer, tch.ProgressBarHook(total=5), 5, checkpoint_dir=str(tmp_path))

    [bar] = fake_tqdm.instances
    assert (5, 3, 5) == (bar.total, bar.initial, bar.n)
    assert bar.closed


def test_bar_without_total_has_no_end_and_closes_in_end(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer
) -> None:
    _train(model_and_optimizer, tch.ProgressBarHook(), last_step=4)

    [bar] = fake_tqdm.instances
    assert (None, 4) == (bar.total, bar.n)
    assert bar.closed


def test_bar_opens_at_the_first_step_so_a_session_with_nothing_to_do_shows_none(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer
) -> None:
    model, optimizer = model_and_optimizer
    with tch.MonitoredSession(model, optimizer, hooks=[tch.ProgressBarHook(total=5)]):
        pass

    assert [] == fake_tqdm.instances


def test_a_bar_left_open_by_an_exception_closes_when_the_hook_is_reused(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer
) -> None:
    model, optimizer = model_and_optimizer
    hook = tch.ProgressBarHook(total=10)
    step = make_train_step(model, optimizer)
    sess = tch.MonitoredSession(model, optimizer, hooks=[hook])

    def fail_after_a_step() -> None:
        with sess:
            sess.run(step)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_after_a_step()

    [bar] = fake_tqdm.instances
    assert not bar.closed  # end() is skipped on an exception (TensorFlow's rule)

    with tch.MonitoredSession(model, optimizer, hooks=[hook]):
        assert bar.closed


def test_close_is_safe_at_any_time(fake_tqdm: type[FakeTqdm]) -> None:
    hook = tch.ProgressBarHook(total=3)
    hook.close()
    hook.close()
    assert [] == fake_tqdm.instances


def test_bar_follows_the_step_back_after_a_recovery(
    fake_tqdm: type[FakeTqdm], model_and_optimizer: ModelAndOptimizer, tmp_path: Any
) -> None:
    model, optimizer = model_and_optimizer
    step = make_train_step(model, optimizer)
    failures = iter([True])

    def flaky_step() -> dict[str, torch.Tensor]:
        result = step()
        if next(failures, False):
            raise ConnectionError("transient")
        return result

    saver_hook = tch.CheckpointSaverHook(str(tmp_path), save_steps=100, async_save=False)
    hooks = [saver_hook, tch.ProgressBarHook(total=10)]
    with tch.MonitoredSession(
        model,
        optimizer,
        hooks=hooks,
        checkpoint_dir=str(tmp_path),
        recoverable_errors=(ConnectionError,),
    ) as sess:
        sess.run(step)
        sess.run(step)
        assert 2 == fake_tqdm.instances[0].n
        sess.run(flaky_step)  # steps to 3, fails, restores step 0, retries: step 1

    [bar] = fake_tqdm.instances
    assert 1 == bar.n


def test_bar_is_drawn_when_stderr_is_a_terminal(
    fake_tqdm: type[FakeTqdm],
    model_and_optimizer: ModelAndOptimizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _stderr(monkeypatch, TerminalStream())
    caplog.set_level(logging.INFO, logger=_progress.__name__)

    _train(model_and_optimizer, tch.ProgressBarHook(total=3), last_step=3)

    [bar] = fake_tqdm.instances
    assert 3 == bar.n
    assert [] == _progress_lines(caplog)


def test_log_lines_rather_than_a_bar_when_stderr_is_not_a_terminal(
    fake_tqdm: type[FakeTqdm],
    model_and_optimizer: ModelAndOptimizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stderr = _stderr(monkeypatch, io.StringIO())  # a CI log: redirected, no terminal
    caplog.set_level(logging.INFO, logger=_progress.__name__)

    _train(model_and_optimizer, tch.ProgressBarHook(total=3), last_step=3)

    assert [] == fake_tqdm.instances
    assert [f"step {n}/3" for n in range(4)] == [
        line.removeprefix("Progress: ").split(" (")[0] for line in _progress_lines(caplog)
    ]
    assert "" == stderr.getvalue()


def test_real_tqdm_bar_is_drawn_on_a_terminal_stderr(
    model_and_optimizer: ModelAndOptimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tqdm")
    stderr = _stderr(monkeypatch, TerminalStream())

    _train(model_and_optimizer, tch.ProgressBarHook(total=6), last_step=6)

    assert "6/6" in stderr.getvalue()


def test_without_tqdm_logs_every_tenth_of_the_way_and_at_the_end(
    no_tqdm: None,
    model_and_optimizer: ModelAndOptimizer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=_progress.__name__)

    _train(model_and_optimizer, tch.ProgressBarHook(total=25), 25, clock=clock, seconds_per_step=1)

    lines = _progress_lines(caplog)
    assert "Progress: step 0/25 (0%), 0:00:00 elapsed" == lines[0]
    assert "Progress: step 2/25 (8%), 1 steps/s, 0:00:02 elapsed, 0:00:23 left" == lines[1]
    assert [f"step {n}/25" for n in range(0, 25, 2)] + ["step 25/25"] == [
        line.split(" (")[0].removeprefix("Progress: ") for line in lines
    ]
    assert "Progress: step 25/25 (100%), 1 steps/s, 0:00:25 elapsed" == lines[-1]


def test_without_tqdm_and_without_total_logs_every_30_seconds(
    no_tqdm: None,
    model_and_optimizer: ModelAndOptimizer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=_progress.__name__)

    _train(
        model_and_optimizer, tch.ProgressBarHook(), last_step=8, clock=clock, seconds_per_step=10
    )

    assert [
        "Progress: step 0, 0:00:00 elapsed",
        "Progress: step 3, 0.1 steps/s, 0:00:30 elapsed",
        "Progress: step 6, 0.1 steps/s, 0:01:00 elapsed",
        "Progress: step 8, 0.1 steps/s, 0:01:20 elapsed",
    ] == _progress_lines(caplog)
