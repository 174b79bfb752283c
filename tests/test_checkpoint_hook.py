"""CheckpointSaverHook and CheckpointSaverListener.

The first part translates TensorFlow's own ``CheckpointSaverHookTest`` and
``CheckpointSaverHookMultiStepTest`` (tensorflow/python/training/basic_session_run_hooks_test.py);
``HookedSession`` stands in for TensorFlow's ``_HookedSession`` (hooks around runs, no creation
phase) and ``load_step`` for ``checkpoint_utils.load_variable(model_dir, global_step)``. The rest
covers the port's own rules (SPEC.md section 3).
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import FakeClock, make_train_step
from storages import (
    GatedStorage,
    GateOpeningSaver,
    HeldRenameFailingStorage,
    HungStorage,
    RenameFailingStorage,
    SlowStorage,
    WaitRecordingSaver,
    at_steps,
)

from torch_ckpt_hook import (
    CheckpointSaveError,
    CheckpointSaverHook,
    CheckpointSaverListener,
    MonitoredSession,
    MonitoredTrainingSession,
    Saver,
    Scaffold,
    Session,
    SessionRunArgs,
    SessionRunContext,
    SessionRunValues,
    SingularMonitoredSession,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
)
from torch_ckpt_hook._coordinator import Coordinator
from torch_ckpt_hook._validation import repr_with_type

HOOK_LOGGER = "torch_ckpt_hook._checkpoint_hook"
# TensorFlow's own lines ("Calling checkpoint listeners ...") have a child logger of their own.
TF_LOGGER = f"{HOOK_LOGGER}.tensorflow"
LISTENER_LOGGER = "tests.listener"
CHECKPOINT_NAME = re.compile(r"model\.ckpt-(\d+)")


class MockListener(CheckpointSaverListener):
    """TensorFlow's ``MockCheckpointSaverListener``, also recording steps and call order.

    Every call is logged on ``LISTENER_LOGGER`` too, so ``caplog`` shows it between the hook's
    own log lines.
    """

    def __init__(self, name: str = "listener", events: list[str] | None = None) -> None:
        self.name = name
        self.events = [] if events is None else events
        self.ask_for_stop = False
        self.begin_count = 0
        self.before_save_steps: list[int] = []
        self.after_save_steps: list[int] = []
        self.end_steps: list[int] = []

    def __repr__(self) -> str:
        return f"MockListener({self.name!r})"

    def _record(self, event: str) -> None:
        self.events.append(f"{self.name}.{event}")
        logging.getLogger(LISTENER_LOGGER).info("%s.%s", self.name, event)

    def begin(self) -> None:
        self.begin_count += 1
        self._record("begin")

    def before_save(self, session: Session, global_step_value: int) -> None:
        self.before_save_steps.append(global_step_value)
        self._record(f"before_save {global_step_value}")

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        self.after_save_steps.append(global_step_value)
        self._record(f"after_save {global_step_value}")
        return True if self.ask_for_stop else None

    def end(self, session: Session, global_step_value: int) -> None:
        self.end_steps.append(global_step_value)
        self._record(f"end {global_step_value}")

    def get_counts(self) -> dict[str, int]:
        return {
            "begin": self.begin_count,
            "before_save": len(self.before_save_steps),
            "after_save": len(self.after_save_steps),
            "end": len(self.end_steps),
        }


class HookedSession:
    """TensorFlow's ``_HookedSession`` for one hook: ``run`` calls it around a step, nothing else.

    ``train_op`` does ``steps_per_run`` SGD updates (each adds 1 to the global step); ``no_op``
    does none.
    """

    def __init__(self, hook: CheckpointSaverHook, steps_per_run: int = 1) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.session = Session(model, optimizer)
        self.hook = hook
        self.steps_per_run = steps_per_run
        self._step = make_train_step(model, optimizer)

    def train_op(self) -> None:
        for _ in range(self.steps_per_run):
            self._step()

    def no_op(self) -> None:
        pass

    def create(self) -> None:
        self.hook.after_create_session(self.session, Coordinator())

    def run(self, fn: Callable[[], None] | None = None) -> SessionRunContext:
        fn = self.train_op if fn is None else fn
        context = SessionRunContext(SessionRunArgs(fn), self.session)
        self.hook.before_run(context)
        self.session.run(fn)
        self.hook.after_run(context, SessionRunValues(results=None))
        return context

    def end(self) -> None:
        self.hook.end(self.session)

    def latest_step(self, directory: pathlib.Path) -> int:
        """``load_step`` once the hook's saves are durable (TensorFlow saved synchronously)."""
        self.hook.wait_until_finished()
        return load_step(directory)

    def saved_steps(self, directory: pathlib.Path) -> list[int]:
        """``saved_steps`` once the hook's saves are durable."""
        self.hook.wait_until_finished()
        return saved_steps(directory)


@pytest.fixture
def deferred_saver() -> Iterator[GateOpeningSaver]:
    """A slow disk as the hook sees it: each save stays in flight until the training thread
    waits for it (a trigger, ``end()``, ``wait_until_finished()``), or the test ends."""
    with GatedStorage() as gate:
        yield GateOpeningSaver(gate, max_to_keep=None)


def writer_threads(directory: pathlib.Path) -> list[threading.Thread]:
    """The writer threads still running for saves into ``directory``."""
    prefix = f"torch_ckpt_hook-writer:{directory}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


class AfterCommitListener(MockListener):
    """A ``MockListener`` that opts in to ``after_save`` at the first hook call after the commit."""

    run_after_commit = True

    def __repr__(self) -> str:
        return f"AfterCommitListener({self.name!r})"


class ListenerBug(Exception):
    """The user's own error type: an ``except ListenerBug`` around ``run()`` must still catch it."""


class RaisingListener(MockListener):
    """A ``MockListener`` whose ``method`` raises ``ListenerBug`` after recording the call.

    It raises at the steps in ``steps``, or at every call when ``steps`` is None.
    """

    def __init__(
        self,
        name: str,
        events: list[str] | None = None,
        *,
        method: str,
        steps: set[int] | None = None,
    ) -> None:
        super().__init__(name, events)
        self.method = method
        self.steps = steps
        self.raised: list[ListenerBug] = []

    def __repr__(self) -> str:
        return f"RaisingListener({self.name!r})"

    def _maybe_raise(self, method: str, step: int | None = None) -> None:
        if method == self.method and (self.steps is None or step in self.steps):
            err = ListenerBug(f"{self.name}.{method} failed")
            self.raised.append(err)
            raise err

    def begin(self) -> None:
        super().begin()
        self._maybe_raise("begin")

    def before_save(self, session: Session, global_step_value: int) -> None:
        super().before_save(session, global_step_value)
        self._maybe_raise("before_save", global_step_value)

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        stop = super().after_save(session, global_step_value)
        self._maybe_raise("after_save", global_step_value)
        return stop

    def end(self, session: Session, global_step_value: int) -> None:
        super().end(session, global_step_value)
        self._maybe_raise("end", global_step_value)


def flaky_saver(fail_steps: set[int]) -> Saver:
    """The write of each step in ``fail_steps`` fails once, on the writer thread.

    While that write runs, a directory stands where the checkpoint goes, so its final rename
    fails as a full disk would fail it, and nothing is committed.
    """
    return Saver(max_to_keep=None, storage=RenameFailingStorage(steps=fail_steps, once=True))


@pytest.fixture
def held_flaky_saver() -> Iterator[GateOpeningSaver]:
    """A ``flaky_saver({2})`` whose failing write waits until the training thread waits for it.

    The failed save reports itself only then: the loop moved on before the disk gave up.
    """
    with HeldRenameFailingStorage(steps={2}, once=True) as disk:
        yield GateOpeningSaver(disk, max_to_keep=None)


def notes(err: BaseException) -> list[str]:
    return list(getattr(err, "__notes__", []))


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def load_step(directory: pathlib.Path) -> int:
    """The global step held by the newest checkpoint, checked against the step in its name."""
    path = latest_checkpoint(str(directory))
    assert path is not None, f"no checkpoint in {directory}"
    step = load_checkpoint(path)["global_step"]
    assert path.endswith(f"-{step}"), f"{path} holds global_step {step}"
    return int(step)


def saved_steps(directory: pathlib.Path) -> list[int]:
    """The steps of the checkpoint files on disk; each must load and hold the step in its name."""
    steps = []
    for name in os.listdir(directory):
        match = CHECKPOINT_NAME.fullmatch(name)
        if match is None:
            continue
        step = int(match[1])
        assert step == load_checkpoint(str(directory / name))["global_step"], name
        steps.append(step)
    return sorted(steps)


def hook_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name in (HOOK_LOGGER, TF_LOGGER)]


# -- TensorFlow's CheckpointSaverHookTest -------------------------------------------------------


def test_saves_when_saver_and_scaffold_both_missing(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1)
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    assert 1 == sess.latest_step(tmp_path)


def test_raise_when_saver_and_scaffold_both_present(tmp_path: pathlib.Path) -> None:
    scaffold = Scaffold(saver=Saver())
    with pytest.raises(ValueError, match=r"^You cannot provide both saver and scaffold\.$"):
        CheckpointSaverHook(str(tmp_path), saver=scaffold.saver, scaffold=scaffold)


def test_raise_in_both_secs_and_steps(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"^Can not provide both every_secs and every_steps\.$"):
        CheckpointSaverHook(str(tmp_path), save_secs=10, save_steps=20)


def test_raise_in_none_secs_and_steps(tmp_path: pathlib.Path) -> None:
    with pytest.raises(
        ValueError, match=r"^Either every_secs or every_steps should be provided\.$"
    ):
        CheckpointSaverHook(str(tmp_path))


@pytest.mark.parametrize("interval", [{"save_secs": 2}, {"save_steps": 2}])
def test_saves_in_first_step(
    tmp_path: pathlib.Path, clock: FakeClock, interval: dict[str, int]
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), scaffold=Scaffold(), **interval)
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    assert 1 == sess.latest_step(tmp_path)


def test_save_secs_calls_listeners_at_begin_and_end(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_secs=2, scaffold=Scaffold(), listeners=[listener]
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.run()  # hook runs here
    sess.run()  # hook won't run here, so it does at end
    sess.end()  # hook runs here
    assert {"begin": 1, "before_save": 2, "after_save": 2, "end": 1} == listener.get_counts()


def test_listener_with_monitored_session(tmp_path: pathlib.Path) -> None:
    model, optimizer = _model_and_optimizer()
    scaffold = Scaffold()
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=scaffold, listeners=[listener])
    with SingularMonitoredSession(
        model, optimizer, hooks=[hook], scaffold=scaffold, checkpoint_dir=str(tmp_path)
    ) as sess:
        train_op = make_train_step(model, optimizer)
        sess.run(train_op)
        sess.run(train_op)
        global_step_val = sess.raw_session().global_step
    assert 2 == global_step_val
    assert {"begin": 1, "before_save": 3, "after_save": 3, "end": 1} == listener.get_counts()


def test_listener_stops_training_in_after_save(tmp_path: pathlib.Path) -> None:
    # TensorFlow saved synchronously; the asynchronous case has its own test below.
    model, optimizer = _model_and_optimizer()
    scaffold = Scaffold()
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, scaffold=scaffold, listeners=[listener], async_save=False
    )
    with SingularMonitoredSession(
        model, optimizer, hooks=[hook], scaffold=scaffold, checkpoint_dir=str(tmp_path)
    ) as sess:
        train_op = make_train_step(model, optimizer)
        sess.run(train_op)
        assert not sess.should_stop()
        sess.run(train_op)
        assert not sess.should_stop()
        listener.ask_for_stop = True
        sess.run(train_op)
        assert sess.should_stop()


@pytest.mark.parametrize("listener_count", [1, 2])
def test_listeners_with_default_saver(tmp_path: pathlib.Path, listener_count: int) -> None:
    model, optimizer = _model_and_optimizer()
    listeners = [MockListener(f"l{i}") for i in range(listener_count)]
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=listeners)
    with SingularMonitoredSession(
        model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)
    ) as sess:
        train_op = make_train_step(model, optimizer)
        sess.run(train_op)
        sess.run(train_op)
        global_step_val = sess.raw_session().global_step
    assert 2 == global_step_val
    for listener in listeners:
        assert {"begin": 1, "before_save": 3, "after_save": 3, "end": 1} == listener.get_counts()

    model2, optimizer2 = _model_and_optimizer()
    with SingularMonitoredSession(model2, optimizer2, checkpoint_dir=str(tmp_path)) as sess2:
        global_step_saved_val = sess2.global_step
    assert 2 == global_step_saved_val


def test_save_secs_saves_periodically(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    start = clock.now
    hook = CheckpointSaverHook(str(tmp_path), save_secs=2, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook)

    clock.now = start
    sess.run()  # Saved.
    clock.now = start + 0.5
    sess.run()  # Not saved.
    assert 1 == sess.latest_step(tmp_path)

    # Simulate 2.5 seconds of sleep.
    clock.now = start + 2.5
    sess.run()  # Saved.
    clock.now = start + 2.6
    sess.run()  # Not saved.
    clock.now = start + 2.7
    sess.run()  # Not saved.
    assert 3 == sess.latest_step(tmp_path)

    # Simulate 7.5 more seconds of sleep (10 seconds from start).
    clock.now = start + 10
    sess.run()  # Saved.
    assert 6 == sess.latest_step(tmp_path)
    assert [1, 3, 6] == sess.saved_steps(tmp_path)


def test_save_secs_calls_listeners_periodically(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    start = clock.now
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_secs=2, scaffold=Scaffold(), listeners=[listener]
    )
    hook.begin()
    sess = HookedSession(hook)

    clock.now = start + 0.5
    sess.run()  # hook runs here
    clock.now = start + 0.5
    sess.run()
    clock.now = start + 3.0
    sess.run()  # hook runs here
    clock.now = start + 3.5
    sess.run()
    clock.now = start + 4.0
    sess.run()
    clock.now = start + 6.5
    sess.run()  # hook runs here
    clock.now = start + 7.0
    sess.run()  # hook won't run here, so it does at end
    clock.now = start + 7.5
    sess.end()  # hook runs here
    assert {"begin": 1, "before_save": 4, "after_save": 4, "end": 1} == listener.get_counts()
    assert [1, 3, 6, 7] == listener.after_save_steps


def test_save_steps_saves_periodically(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    sess.run()
    # Not saved
    assert 1 == sess.latest_step(tmp_path)
    sess.run()
    # saved
    assert 3 == sess.latest_step(tmp_path)
    sess.run()
    # Not saved
    assert 3 == sess.latest_step(tmp_path)
    sess.run()
    # saved
    assert 5 == sess.latest_step(tmp_path)
    assert [1, 3, 5] == sess.saved_steps(tmp_path)


def test_save_saves_at_end(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_secs=2, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    sess.run()
    sess.end()
    assert 2 == sess.latest_step(tmp_path)
    assert [1, 2] == sess.saved_steps(tmp_path)


def test_save_checkpoint_before_first_train_step(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    # Verifies that checkpoint is saved at step 0.
    assert 0 == sess.latest_step(tmp_path)
    # Verifies that no checkpoint is saved after one training step.
    sess.run()
    assert 0 == sess.latest_step(tmp_path)
    # Verifies that checkpoint is saved after save_steps.
    sess.run()
    assert 2 == sess.latest_step(tmp_path)


# -- TensorFlow's CheckpointSaverHookMultiStepTest ----------------------------------------------
# TensorFlow needed _set_steps_per_run(5) for its stale-step pre-check; the port checks the new
# global step itself, so increments of 5 with save_steps=10 save at 5, 15, 25 without it.

STEPS_PER_RUN = 5


def test_multi_step_save_steps_saves_in_first_step(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2 * STEPS_PER_RUN, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook, steps_per_run=STEPS_PER_RUN)
    sess.run()
    assert 5 == sess.latest_step(tmp_path)


def test_multi_step_save_steps_saves_periodically(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2 * STEPS_PER_RUN, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook, steps_per_run=STEPS_PER_RUN)
    sess.run()
    # Saved (step=5)
    assert 5 == sess.latest_step(tmp_path)
    sess.run()
    # Not saved (step=10)
    assert 5 == sess.latest_step(tmp_path)
    sess.run()
    # Saved (step=15)
    assert 15 == sess.latest_step(tmp_path)
    sess.run()
    # Not saved (step=20)
    assert 15 == sess.latest_step(tmp_path)
    sess.run()
    # Saved (step=25)
    assert 25 == sess.latest_step(tmp_path)
    assert [5, 15, 25] == sess.saved_steps(tmp_path)


def test_multi_step_save_steps_saves_at_end(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2 * STEPS_PER_RUN, scaffold=Scaffold())
    hook.begin()
    sess = HookedSession(hook, steps_per_run=STEPS_PER_RUN)
    sess.run()
    sess.run()
    sess.end()
    assert 10 == sess.latest_step(tmp_path)
    assert [5, 10] == sess.saved_steps(tmp_path)


# -- construction ---------------------------------------------------------------------------------


def test_construction_logs_create_checkpoint_saver_hook_even_when_it_then_fails(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=HOOK_LOGGER)
    CheckpointSaverHook(str(tmp_path), save_steps=1)
    with pytest.raises(ValueError, match="You cannot provide both saver and scaffold"):
        CheckpointSaverHook(str(tmp_path), save_steps=1, saver=Saver(), scaffold=Scaffold())
    assert ["Create CheckpointSaverHook.", "Create CheckpointSaverHook."] == hook_messages(caplog)


def test_constructor_keeps_tensorflows_parameter_order(tmp_path: pathlib.Path) -> None:
    listener = MockListener()
    saver = Saver(max_to_keep=None)
    hook = CheckpointSaverHook(str(tmp_path), None, 1, saver, "weights.pt", None, [listener])
    hook.begin()
    HookedSession(hook).run()
    hook.wait_until_finished()
    assert os.path.isfile(tmp_path / "weights.pt-1")
    assert [str(tmp_path / "weights.pt-1")] == saver.last_checkpoints
    assert [1] == listener.after_save_steps


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        (3, r"^listeners must be a list of CheckpointSaverListener, got int$"),
        (
            MockListener(),
            r"^listeners must be a list of CheckpointSaverListener, got MockListener$",
        ),
        ([object()], r"^listeners\[0\] must be a CheckpointSaverListener, got object$"),
        (
            [MockListener(), "listener"],
            r"^listeners\[1\] must be a CheckpointSaverListener, got str$",
        ),
    ],
)
def test_listeners_must_be_a_list_of_checkpoint_saver_listeners(
    tmp_path: pathlib.Path, listeners: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=listeners)


def test_listeners_may_be_any_iterable(tmp_path: pathlib.Path) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=(x for x in [listener]))
    hook.begin()
    assert 1 == listener.begin_count


@pytest.mark.parametrize(
    ("basename", "message"),
    [
        ("", r"^checkpoint_basename must be a non-empty file name, got ''$"),
        (
            "sub/model.ckpt",
            r"^checkpoint_basename must be a file name without directories, got 'sub/model.ckpt'$",
        ),
    ],
)
def test_checkpoint_basename_must_be_a_plain_file_name(
    tmp_path: pathlib.Path, basename: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointSaverHook(str(tmp_path), save_steps=1, checkpoint_basename=basename)


@pytest.mark.parametrize("async_save", ["yes", 1, None])
def test_async_save_must_be_a_bool(tmp_path: pathlib.Path, async_save: Any) -> None:
    given = re.escape(repr_with_type(async_save))
    with pytest.raises(TypeError, match=rf"^async_save must be a bool, got {given}$"):
        CheckpointSaverHook(str(tmp_path), save_steps=1, async_save=async_save)


def test_saver_and_scaffold_must_have_their_types(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match=r"^saver must be a Saver or None, got 'saver' \(a str\)$"):
        CheckpointSaverHook(str(tmp_path), save_steps=1, saver="saver")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"^scaffold must be a Scaffold or None, got <torch_ckpt_hook.*Saver object at .*> \(a Saver\)$",
    ):
        CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=Saver())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("interval", "error", "message"),
    [
        ({"save_steps": -3}, ValueError, r"^save_steps must be a non-negative int, got -3$"),
        (
            {"save_steps": 2.5},
            TypeError,
            r"^save_steps must be a non-negative int, got 2\.5 \(a float\)$",
        ),
        ({"save_secs": -0.5}, ValueError, r"^save_secs must be a non-negative number, got -0\.5$"),
        (
            {"save_secs": "10"},
            TypeError,
            r"^save_secs must be a non-negative number, got '10' \(a str\)$",
        ),
    ],
)
def test_a_bad_interval_error_names_the_hooks_argument(
    tmp_path: pathlib.Path, interval: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CheckpointSaverHook(str(tmp_path), **interval)


def test_construction_does_not_touch_the_filesystem(tmp_path: pathlib.Path) -> None:
    CheckpointSaverHook(str(tmp_path / "later"), save_steps=1)
    assert not os.path.exists(tmp_path / "later")


# -- savers ---------------------------------------------------------------------------------------


def test_a_given_saver_is_used_and_applies_its_retention(tmp_path: pathlib.Path) -> None:
    saver = Saver(max_to_keep=2)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    for _ in range(4):
        sess.run()
    assert [3, 4] == sess.saved_steps(tmp_path)
    assert [str(tmp_path / "model.ckpt-3"), str(tmp_path / "model.ckpt-4")] == (
        saver.last_checkpoints
    )


def test_a_scaffold_without_a_saver_gets_the_default_saver_once_used(
    tmp_path: pathlib.Path,
) -> None:
    scaffold = Scaffold()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=scaffold)
    hook.begin()
    assert scaffold.saver is None
    sess = HookedSession(hook)
    sess.create()
    assert isinstance(scaffold.saver, Saver)
    saver = scaffold.saver
    sess.run()
    hook.wait_until_finished()
    assert saver is scaffold.saver
    assert [
        str(tmp_path / "model.ckpt-0"),
        str(tmp_path / "model.ckpt-1"),
    ] == saver.last_checkpoints


def test_a_scaffolds_own_saver_is_used(tmp_path: pathlib.Path) -> None:
    saver = Saver()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=Scaffold(saver=saver))
    hook.begin()
    HookedSession(hook).create()
    hook.wait_until_finished()
    assert [str(tmp_path / "model.ckpt-0")] == saver.last_checkpoints


def test_a_custom_basename_names_the_files_and_the_log_line(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=HOOK_LOGGER)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, checkpoint_basename="weights.pt")
    hook.begin()
    HookedSession(hook).create()
    hook.wait_until_finished()
    assert str(tmp_path / "weights.pt-0") == latest_checkpoint(str(tmp_path))
    assert f"Saving checkpoints for 0 into {tmp_path / 'weights.pt'}." in hook_messages(caplog)


def test_a_pathlib_checkpoint_dir_is_accepted(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(tmp_path / "ckpt", save_steps=1)  # type: ignore[arg-type]
    hook.begin()
    HookedSession(hook).create()
    hook.wait_until_finished()
    assert [0] == saved_steps(tmp_path / "ckpt")


# -- begin() --------------------------------------------------------------------------------------


def test_begin_creates_a_missing_checkpoint_dir(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "a" / "b"
    hook = CheckpointSaverHook(str(directory), save_steps=1)
    hook.begin()
    assert os.path.isdir(directory)
    HookedSession(hook).create()
    hook.wait_until_finished()
    assert [0] == saved_steps(directory)


def test_begin_fails_naming_a_checkpoint_dir_that_is_a_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    listener = MockListener()
    hook = CheckpointSaverHook(str(path), save_steps=1, listeners=[listener])
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} is a file")):
        hook.begin()
    assert 0 == listener.begin_count


def test_begin_fails_when_the_checkpoint_dir_cannot_be_created_under_a_file(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "file").write_text("x")
    directory = tmp_path / "file" / "ckpt"
    hook = CheckpointSaverHook(str(directory), save_steps=1)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_dir {str(directory)!r}")):
        hook.begin()


def test_begin_fails_on_a_read_only_checkpoint_dir(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root writes through chmod, so a read-only directory is simulated where the probe writes.
    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1)
    with pytest.raises(ValueError, match=r"must be a writable directory: Permission denied"):
        hook.begin()


def test_a_checkpoint_dir_that_is_a_file_fails_monitored_session_creation(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    hook = CheckpointSaverHook(str(path), save_steps=1)
    with pytest.raises(ValueError, match="is a file"):
        MonitoredSession(torch.nn.Linear(3, 1), hooks=[hook])


# -- after_create_session -------------------------------------------------------------------------


def test_after_create_session_saves_the_current_step(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100)
    hook.begin()
    sess = HookedSession(hook)
    sess.session.global_step = 7
    sess.create()
    assert [7] == sess.saved_steps(tmp_path)


def test_after_create_session_saves_when_the_newest_checkpoint_holds_another_step(
    tmp_path: pathlib.Path,
) -> None:
    Saver().save(Session(torch.nn.Linear(3, 1), global_step=3), str(tmp_path / "model.ckpt"), 3)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100)
    hook.begin()
    sess = HookedSession(hook)
    sess.session.global_step = 7
    sess.create()
    assert [3, 7] == sess.saved_steps(tmp_path)
    assert 7 == sess.latest_step(tmp_path)


def test_restore_then_recreate_does_not_save_the_restored_step_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer = _model_and_optimizer()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2)
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
    assert [0, 2, 3] == saved_steps(tmp_path)
    mtime = os.stat(tmp_path / "model.ckpt-3").st_mtime_ns

    caplog.set_level(logging.INFO, logger=HOOK_LOGGER)
    model, optimizer = _model_and_optimizer()
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, listeners=[listener])
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        assert 3 == sess.global_step
        assert [] == listener.before_save_steps
        train_op = make_train_step(model, optimizer)
        sess.run(train_op)  # step 4: the timer counts from the restored step 3
        assert [] == listener.before_save_steps
        sess.run(train_op)  # step 5
        assert [5] == listener.before_save_steps
    assert [5] == listener.after_save_steps
    assert [5] == listener.end_steps
    assert mtime == os.stat(tmp_path / "model.ckpt-3").st_mtime_ns
    assert not any("Saving checkpoints for 3 " in m for m in hook_messages(caplog))
    assert [0, 2, 3, 5] == saved_steps(tmp_path)


def test_recovery_restores_without_saving_the_restored_step_again(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[listener])
    failures = [OSError("transient")]
    train_op = make_train_step(model, optimizer)

    def flaky() -> Any:
        if failures:
            raise failures.pop()
        return train_op()

    with MonitoredSession(
        model,
        optimizer,
        hooks=[hook],
        checkpoint_dir=str(tmp_path),
        recoverable_errors=(OSError,),
    ) as sess:
        for _ in range(3):
            sess.run(train_op)
        sess.run(flaky)  # restores step 0, then retries
        assert 1 == sess.global_step
        assert [0] == listener.before_save_steps
    assert [0, 1] == listener.before_save_steps
    assert [0, 1] == saved_steps(tmp_path)


# -- after_run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [{"save_secs": 1}, {"save_steps": 1}])
def test_a_run_that_does_not_advance_the_step_never_saves_twice(
    tmp_path: pathlib.Path, clock: FakeClock, interval: dict[str, int]
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), listeners=[listener], **interval)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    clock.advance(5)
    sess.run(sess.no_op)  # still step 0: saved at creation already
    assert [0] == listener.before_save_steps
    sess.run()
    assert [0, 1] == listener.before_save_steps
    clock.advance(5)
    sess.run(sess.no_op)
    sess.run(sess.no_op)
    assert [0, 1] == listener.before_save_steps
    sess.end()
    assert [0, 1] == listener.before_save_steps
    assert [0, 1] == sess.saved_steps(tmp_path)


def test_save_steps_counts_from_the_last_save_not_from_zero(tmp_path: pathlib.Path) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=3, saver=Saver(max_to_keep=None))
    hook.begin()
    sess = HookedSession(hook)
    sess.session.global_step = 1
    sess.create()
    for _ in range(7):
        sess.run()
    assert [1, 4, 7] == sess.saved_steps(tmp_path)


# -- end() ----------------------------------------------------------------------------------------


def test_end_does_not_save_a_step_already_saved_but_calls_listeners_end(
    tmp_path: pathlib.Path,
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    sess.run()
    sess.end()
    assert [1, 2] == listener.before_save_steps
    assert [1, 2] == listener.after_save_steps
    assert [2] == listener.end_steps


def test_end_saves_the_last_step_then_calls_listeners_end(tmp_path: pathlib.Path) -> None:
    events: list[str] = []
    listener = MockListener("l", events)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[listener], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.run()
    sess.end()
    assert [
        "l.begin",
        "l.before_save 0",
        "l.after_save 0",
        "l.before_save 2",
        "l.after_save 2",
        "l.end 2",
    ] == events
    assert [0, 2] == sess.saved_steps(tmp_path)


def test_end_alone_saves_and_calls_every_listener_method_once(tmp_path: pathlib.Path) -> None:
    # TensorFlow's end() saves an unsaved last step and calls after_save for it, even when no
    # other hook method ran before it.
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.session.global_step = 4
    sess.end()
    assert {"begin": 1, "before_save": 1, "after_save": 1, "end": 1} == listener.get_counts()
    assert [4] == saved_steps(tmp_path)


# -- listeners: order, log lines, stop requests ---------------------------------------------------


def test_listeners_and_log_lines_follow_tensorflows_order(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=HOOK_LOGGER)
    caplog.set_level(logging.INFO, logger=LISTENER_LOGGER)
    events: list[str] = []
    listeners = [MockListener("a", events), MockListener("b", events)]
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=listeners, async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.end()
    save_path = tmp_path / "model.ckpt"
    assert [
        "Create CheckpointSaverHook.",
        "a.begin",
        "b.begin",
        "Calling checkpoint listeners before saving checkpoint 0...",
        "a.before_save 0",
        "b.before_save 0",
        f"Saving checkpoints for 0 into {save_path}.",
        "Calling checkpoint listeners after saving checkpoint 0...",
        "a.after_save 0",
        "b.after_save 0",
        "Calling checkpoint listeners before saving checkpoint 1...",
        "a.before_save 1",
        "b.before_save 1",
        f"Saving checkpoints for 1 into {save_path}.",
        "Calling checkpoint listeners after saving checkpoint 1...",
        "a.after_save 1",
        "b.after_save 1",
        "a.end 1",
        "b.end 1",
    ] == [
        r.getMessage()
        for r in caplog.records
        if r.name in (HOOK_LOGGER, TF_LOGGER, LISTENER_LOGGER)
    ]


@pytest.mark.parametrize("runs", [1, 3])
@pytest.mark.parametrize("async_save", [True, False])
def test_save_steps_one_over_n_runs_calls_before_and_after_save_n_plus_one_times(
    tmp_path: pathlib.Path, runs: int, async_save: bool
) -> None:
    model, optimizer = _model_and_optimizer()
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path),
        save_steps=1,
        saver=Saver(max_to_keep=None),
        listeners=[listener],
        async_save=async_save,
    )
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        train_op = make_train_step(model, optimizer)
        for _ in range(runs):
            sess.run(train_op)
    expected = {"begin": 1, "before_save": runs + 1, "after_save": runs + 1, "end": 1}
    assert expected == listener.get_counts()
    assert list(range(runs + 1)) == listener.before_save_steps
    assert list(range(runs + 1)) == listener.after_save_steps
    assert list(range(runs + 1)) == saved_steps(tmp_path)


def test_a_truthy_after_save_requests_the_stop_at_that_after_run(tmp_path: pathlib.Path) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, listeners=[listener], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    listener.ask_for_stop = True
    assert not sess.run().stop_requested  # step 1: no save
    assert sess.run().stop_requested  # step 2: saved, listener asks to stop


def test_every_listeners_after_save_runs_when_one_asks_to_stop(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=HOOK_LOGGER)
    events: list[str] = []
    stopper, other = MockListener("stopper", events), MockListener("other", events)
    stopper.ask_for_stop = True
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, listeners=[stopper, other], async_save=False
    )
    hook.begin()
    sess = HookedSession(hook)
    context = sess.run()
    assert context.stop_requested
    assert ["stopper.after_save 1", "other.after_save 1"] == [
        e for e in events if "after_save" in e
    ]
    assert [
        "A CheckpointSaverListener requested that training be stopped. "
        "listener: MockListener('stopper')"
    ] == [m for m in hook_messages(caplog) if "requested" in m]


def test_a_stop_asked_by_the_creation_save_is_ignored(tmp_path: pathlib.Path) -> None:
    listener = MockListener()
    listener.ask_for_stop = True
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[listener], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    assert not sess.run().stop_requested
    assert not sess.run().stop_requested
    assert [0] == listener.after_save_steps


def test_a_stop_asked_by_the_creation_save_does_not_stop_a_monitored_session(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    listener = MockListener()
    listener.ask_for_stop = True
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[listener], async_save=False)
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        assert not sess.should_stop()
        sess.run(make_train_step(model, optimizer))
        assert not sess.should_stop()
        assert [0] == listener.after_save_steps


def test_a_stop_asked_by_the_end_save_is_ignored(tmp_path: pathlib.Path) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    listener.ask_for_stop = True
    sess.end()
    assert [0, 1] == listener.after_save_steps
    assert [1] == listener.end_steps
    # Nothing is left over to stop a later run.
    assert not sess.run().stop_requested


# -- async_save -----------------------------------------------------------------------------------


def test_a_run_after_commit_listener_gets_after_save_at_the_first_hook_call_after_the_commit(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    saver = deferred_saver
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    assert [0] == listener.before_save_steps
    assert [] == listener.after_save_steps
    sess.run()  # step 1: no trigger, and step 0 is still in flight
    assert [] == listener.after_save_steps
    saver.wait_until_finished()  # the disk finishes step 0; no hook call has seen it yet
    sess.run()  # before_run sees step 0 durable; step 2 is staged
    assert [0] == listener.after_save_steps
    assert [0, 2] == listener.before_save_steps


def test_a_trigger_while_a_save_is_in_flight_finishes_it_first_so_calls_stay_paired(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    saver = deferred_saver
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()  # step 1 triggers while step 0 is in flight: 0 completes, then 1 is staged
    assert [0] == listener.after_save_steps
    assert [0, 1] == listener.before_save_steps


def test_wait_until_finished_runs_pending_after_save_calls(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    saver = deferred_saver
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    assert [] == listener.after_save_steps
    hook.wait_until_finished()
    assert [0] == listener.after_save_steps
    hook.wait_until_finished()
    assert [0] == listener.after_save_steps


def test_an_async_stop_request_outside_after_run_takes_effect_at_the_next_after_run(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    saver = deferred_saver
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    hook.wait_until_finished()
    listener.ask_for_stop = True
    assert not sess.run().stop_requested  # step 1: no save
    assert not sess.run().stop_requested  # step 2: saved, after_save still pending
    hook.wait_until_finished()  # after_save(2) asks to stop here, outside any after_run
    assert [0, 2] == listener.after_save_steps
    assert sess.run().stop_requested  # step 3: no save, but the stop is requested


def test_async_end_waits_for_every_save_before_listeners_end(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    events: list[str] = []
    saver = deferred_saver
    listener = MockListener("l", events)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.run()
    sess.run()
    sess.end()
    assert [
        "l.begin",
        "l.before_save 0",
        "l.after_save 0",
        "l.before_save 2",
        "l.after_save 2",
        "l.before_save 3",
        "l.after_save 3",
        "l.end 3",
    ] == events
    assert [str(tmp_path / f"model.ckpt-{n}") for n in (0, 2, 3)] == saver.gate.writes
    assert [] == writer_threads(tmp_path), "every save finished"


def test_a_synchronous_save_calls_after_save_before_the_hook_call_returns(
    tmp_path: pathlib.Path,
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[listener], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    assert [0] == listener.after_save_steps
    sess.run()
    assert [0, 1] == listener.after_save_steps


def test_a_synchronous_save_waits_for_the_saver(tmp_path: pathlib.Path) -> None:
    # The hook waits on the save's handle itself: a gate opened by the saver's waits would
    # never open, so the disk is slow instead.
    disk = SlowStorage(delay=0.2)
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path),
        save_steps=1,
        saver=Saver(max_to_keep=None, storage=disk),
        listeners=[listener],
        async_save=False,
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.run()
    assert [str(tmp_path / "model.ckpt-1")] == disk.writes, "the write finished within run()"
    assert [] == writer_threads(tmp_path), "and its save with it"
    assert [1] == listener.after_save_steps


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_raises_checkpoint_save_error_and_skips_after_save(
    tmp_path: pathlib.Path, async_save: bool
) -> None:
    # A directory where the checkpoint file should go makes its final rename fail.
    (tmp_path / "model.ckpt-1").mkdir()
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, listeners=[listener], async_save=async_save
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()

    def run_and_wait() -> None:
        sess.run()
        hook.wait_until_finished()

    with pytest.raises(CheckpointSaveError, match=re.escape(str(tmp_path / "model.ckpt-1"))):
        run_and_wait()
    assert [0, 1] == listener.before_save_steps
    assert [0] == listener.after_save_steps
    assert str(tmp_path / "model.ckpt-0") == latest_checkpoint(str(tmp_path))


# -- through the runners --------------------------------------------------------------------------


def test_an_exception_leaving_the_with_block_skips_the_final_save_but_keeps_earlier_ones(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    listener = MockListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, listeners=[listener])
    with (  # noqa: PT012
        pytest.raises(ValueError, match="bad batch"),
        MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess,
    ):
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
        raise ValueError("bad batch")
    assert [0, 2] == listener.after_save_steps
    assert [] == listener.end_steps
    assert [0, 2] == saved_steps(tmp_path)
    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert ["model.ckpt-0", "model.ckpt-2"] == [
        os.path.basename(p) for p in state.all_model_checkpoint_paths
    ]
    assert 2 == load_step(tmp_path)


def test_stop_iteration_leaving_the_with_block_still_saves_the_last_step(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10)
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
        raise StopIteration
    assert [0, 3] == saved_steps(tmp_path)


def test_monitored_training_session_default_hook_writes_into_checkpoint_dir(
    tmp_path: pathlib.Path,
) -> None:
    directory = tmp_path / "run"
    model, optimizer = _model_and_optimizer()
    with MonitoredTrainingSession(
        model, optimizer, checkpoint_dir=str(directory), save_checkpoint_steps=2
    ) as sess:
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
    assert [0, 2, 3] == saved_steps(directory)
    assert 3 == load_step(directory)

    model, optimizer = _model_and_optimizer()
    with MonitoredTrainingSession(
        model, optimizer, checkpoint_dir=str(directory), save_checkpoint_steps=2
    ) as sess:
        assert 3 == sess.global_step
        sess.run(make_train_step(model, optimizer))
    assert [0, 2, 3, 4] == saved_steps(directory)


def test_monitored_training_session_saves_every_600_seconds_by_default(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    model, optimizer = _model_and_optimizer()
    with MonitoredTrainingSession(
        model, optimizer, checkpoint_dir=str(tmp_path), async_save=False
    ) as sess:
        train_op = make_train_step(model, optimizer)
        clock.advance(599)
        sess.run(train_op)  # step 1: not yet
        assert [0] == saved_steps(tmp_path)
        clock.advance(1)
        sess.run(train_op)  # step 2: 600 s since the creation save
        assert [0, 2] == saved_steps(tmp_path)
    assert [0, 2] == saved_steps(tmp_path)


@pytest.mark.parametrize("async_save", [True, False])
def test_monitored_training_session_checkpoints_are_durable_either_way(
    tmp_path: pathlib.Path, async_save: bool
) -> None:
    model, optimizer = _model_and_optimizer()
    with MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=1,
        async_save=async_save,
    ) as sess:
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
    assert [0, 1, 2, 3] == saved_steps(tmp_path)
    payload = load_checkpoint(str(tmp_path / "model.ckpt-3"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, payload["model"][name]), name


def test_the_creation_save_is_made_when_the_newest_checkpoint_was_not_restored(
    tmp_path: pathlib.Path,
) -> None:
    # The hook's directory names a damaged model.ckpt-2 as its newest, and the session is at
    # step 2, restored from an intact file elsewhere: the save at creation must replace the
    # damaged file, not trust its name.
    directory, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    directory.mkdir()
    elsewhere.mkdir()
    restored = Saver().save(
        Session(torch.nn.Linear(1, 1), global_step=2), str(elsewhere / "model.ckpt"), 2
    )
    (directory / "model.ckpt-2").write_bytes(b"garbage")
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-2"\nall_model_checkpoint_paths: "model.ckpt-2"\n'
    )
    hook = CheckpointSaverHook(str(directory), save_steps=10)
    with MonitoredSession(
        torch.nn.Linear(1, 1), hooks=[hook], checkpoint_filename_with_path=restored
    ) as sess:
        assert 2 == sess.global_step
    assert 2 == load_step(directory)


# -- listener faults (SPEC 5.1: faults in the user's code stay contained) -------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_a_before_save_that_raises_still_commits_and_keeps_the_other_listeners_paired(
    tmp_path: pathlib.Path, async_save: bool
) -> None:
    events: list[str] = []
    first, last = MockListener("first", events), MockListener("last", events)
    bad = RaisingListener("bad", events, method="before_save", steps={2})
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=2, listeners=[first, bad, last], async_save=async_save
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    with pytest.raises(ListenerBug, match=r"^bad\.before_save failed\n") as info:
        sess.run()  # step 2
    assert bad.raised == [info.value], "the listener's own exception, raised once"
    assert 2 == sess.latest_step(tmp_path)
    assert ["first.before_save 2", "bad.before_save 2", "last.before_save 2"] == [
        e for e in events if e.endswith("save 2") and "before" in e
    ]
    assert [0, 2] == first.after_save_steps
    assert [0, 2] == last.after_save_steps
    assert [0] == bad.after_save_steps, "its before_save(2) raised: no after_save(2)"

    sess.run()
    sess.run()  # step 4: the next trigger saves as usual, for every listener
    sess.end()
    assert [0, 2, 4] == saved_steps(tmp_path)
    for listener in (first, bad, last):
        assert [0, 2, 4] == listener.before_save_steps, listener
        assert [4] == listener.end_steps, listener
    assert [0, 2, 4] == first.after_save_steps
    assert [0, 4] == bad.after_save_steps
    assert 1 == len(bad.raised)


@pytest.mark.parametrize("async_save", [True, False])
def test_an_after_save_that_raises_still_calls_the_later_listeners_and_is_raised_once(
    tmp_path: pathlib.Path, async_save: bool
) -> None:
    bad = RaisingListener("bad", method="after_save", steps={1})
    other = MockListener("other")
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, listeners=[bad, other], async_save=async_save
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    hook.wait_until_finished()

    def run_and_wait() -> None:
        sess.run()
        hook.wait_until_finished()

    with pytest.raises(ListenerBug, match=r"^bad\.after_save failed\n"):
        run_and_wait()  # step 1
    assert [0, 1] == other.after_save_steps
    run_and_wait()  # step 2: saved as usual, and the error is not raised again
    sess.end()
    assert [0, 1, 2] == saved_steps(tmp_path)
    assert [0, 1, 2] == other.before_save_steps
    assert [0, 1, 2] == other.after_save_steps
    assert [0, 1, 2] == bad.after_save_steps
    assert 1 == len(bad.raised)


def test_a_listener_error_keeps_its_type_and_a_note_names_the_listener_and_the_method(
    tmp_path: pathlib.Path,
) -> None:
    bad = RaisingListener("bad", method="after_save", steps={1})
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[bad], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    try:
        sess.run()
    except ListenerBug as err:  # the user's except clause, unchanged
        caught = err
    else:
        pytest.fail("the listener's error did not propagate")
    assert bad.raised == [caught]
    assert [
        "Raised by RaisingListener('bad').after_save(session, 1) in CheckpointSaverHook; "
        f"checkpoint {tmp_path / 'model.ckpt-1'} is committed and the other listeners' "
        "after_save(1) still ran."
    ] == notes(caught)


def test_a_before_save_error_is_noted_as_a_save_that_went_ahead(tmp_path: pathlib.Path) -> None:
    bad = RaisingListener("bad", method="before_save")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[bad], async_save=False)
    hook.begin()
    with pytest.raises(ListenerBug) as info:
        HookedSession(hook).create()
    assert [
        "Raised by RaisingListener('bad').before_save(session, 0) in CheckpointSaverHook; the "
        "save of step 0 went ahead, the other listeners were called, and this one gets no "
        "after_save(0)."
    ] == notes(info.value)
    hook.wait_until_finished()
    assert [0] == saved_steps(tmp_path)


def test_when_several_listeners_raise_the_first_propagates_and_the_others_are_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=HOOK_LOGGER)
    a = RaisingListener("a", method="after_save", steps={1})
    b = RaisingListener("b", method="after_save", steps={1})
    c = MockListener("c")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[a, b, c], async_save=False)
    hook.begin()
    sess = HookedSession(hook)
    with pytest.raises(ListenerBug, match=r"^a\.after_save failed\n"):
        sess.run()
    assert [1] == c.after_save_steps
    logged = [r for r in caplog.records if r.name == HOOK_LOGGER and r.levelno >= logging.ERROR]
    assert [
        "CheckpointSaverHook: ListenerBug: b.after_save failed "
        "(logged, not raised: ListenerBug was raised first)"
    ] == [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None
    assert b.raised == [logged[0].exc_info[1]], "logged with its traceback and its note"
    assert "RaisingListener('b').after_save(session, 1)" in notes(b.raised[0])[0]


def test_a_stop_asked_next_to_a_listener_error_takes_effect_at_the_next_after_run(
    tmp_path: pathlib.Path,
) -> None:
    bad = RaisingListener("bad", method="after_save", steps={1})
    stopper = MockListener("stopper")
    stopper.ask_for_stop = True
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=10, listeners=[bad, stopper], async_save=False
    )
    hook.begin()
    sess = HookedSession(hook)
    with pytest.raises(ListenerBug):
        sess.run()  # step 1 is saved: bad raises, stopper asks to stop
    assert [1] == stopper.after_save_steps
    assert sess.run().stop_requested


def test_a_listener_begin_that_raises_still_begins_the_others(tmp_path: pathlib.Path) -> None:
    bad, other = RaisingListener("bad", method="begin"), MockListener("other")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[bad, other])
    with pytest.raises(ListenerBug, match=r"^bad\.begin failed\n") as info:
        hook.begin()
    assert 1 == other.begin_count
    assert [
        "Raised by RaisingListener('bad').begin() in CheckpointSaverHook; the other listeners' "
        "begin() still ran."
    ] == notes(info.value)


def test_a_listener_end_that_raises_comes_after_the_last_save_is_durable_and_every_end(
    tmp_path: pathlib.Path,
) -> None:
    events: list[str] = []
    bad = RaisingListener("bad", events, method="end")
    other = MockListener("other", events)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[bad, other])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.run()
    with pytest.raises(ListenerBug, match=r"^bad\.end failed\n") as info:
        sess.end()
    assert [0, 2] == saved_steps(tmp_path), "durable before end() raised"
    assert [
        "bad.after_save 2",
        "other.after_save 2",
        "bad.end 2",
        "other.end 2",
    ] == events[-4:]
    assert "RaisingListener('bad').end(session, 2)" in notes(info.value)[0]


def test_a_before_save_that_raises_in_end_still_commits_the_last_step(
    tmp_path: pathlib.Path,
) -> None:
    bad = RaisingListener("bad", method="before_save", steps={3})
    other = MockListener("other")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=10, listeners=[bad, other])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    for _ in range(3):
        sess.run()
    with pytest.raises(ListenerBug, match=r"^bad\.before_save failed\n"):
        sess.end()
    assert 3 == load_step(tmp_path)
    assert [0, 3] == other.after_save_steps
    assert [0] == bad.after_save_steps
    assert [3] == other.end_steps
    assert [3] == bad.end_steps


def test_a_loop_that_catches_a_listener_error_trains_on_with_every_call_paired(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    flaky = RaisingListener("flaky", method="after_save", steps={2})
    other = MockListener("other")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, listeners=[flaky, other])
    caught: list[ListenerBug] = []
    with MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess:
        train_op = make_train_step(model, optimizer)
        while sess.global_step < 5:
            try:
                sess.run(train_op)
            except ListenerBug as err:
                caught.append(err)
    assert flaky.raised == caught
    assert [0, 2, 4, 5] == saved_steps(tmp_path)
    assert [0, 2, 4, 5] == other.before_save_steps
    assert [0, 2, 4, 5] == other.after_save_steps
    assert [0, 2, 4, 5] == flaky.after_save_steps
    assert [5] == other.end_steps


# -- a failed save never prevents the final save in end() (SPEC 5.1) -----------------------------


@pytest.mark.parametrize("last_step_failed", [False, True])
def test_end_saves_the_last_step_after_an_unreported_failure_then_raises_it_once(
    tmp_path: pathlib.Path, last_step_failed: bool, held_flaky_saver: GateOpeningSaver
) -> None:
    saver = held_flaky_saver
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.run()  # step 2: its save fails on the writer thread; no hook call has seen it yet
    if not last_step_failed:
        sess.run()  # step 3
    last = sess.session.global_step
    failed = re.escape(str(tmp_path / "model.ckpt-2"))
    with pytest.raises(CheckpointSaveError, match=rf"^Saving {failed} failed: ") as info:
        sess.end()
    assert last == load_step(tmp_path)
    assert [0, last] == saved_steps(tmp_path)
    assert [
        f"CheckpointSaverHook.end() still committed the last step: "
        f"{tmp_path / f'model.ckpt-{last}'} is durable."
    ] == notes(info.value)
    assert [0, last] == listener.after_save_steps
    assert [last] == listener.end_steps
    hook.wait_until_finished()  # raised once


@pytest.mark.parametrize("async_save", [True, False])
def test_end_saves_a_last_step_whose_failure_the_loop_caught_and_does_not_raise_it_again(
    tmp_path: pathlib.Path, async_save: bool
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path),
        save_steps=2,
        saver=flaky_saver({2}),
        listeners=[listener],
        async_save=async_save,
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-2 failed: "):  # noqa: PT012
        # Step 2: the failure surfaces in this after_run (always when synchronous; when
        # asynchronous, if the writer thread is quick), else at the next hook call.
        sess.run()
        hook.wait_until_finished()
    sess.end()  # saves step 2 again; the failure was reported already
    assert 2 == load_step(tmp_path)
    assert [0, 2] == saved_steps(tmp_path)
    assert [0, 2, 2] == listener.before_save_steps
    assert [0, 2] == listener.after_save_steps
    assert [2] == listener.end_steps


def test_a_failure_caught_by_the_loop_does_not_cost_the_next_trigger_its_save(
    tmp_path: pathlib.Path, held_flaky_saver: GateOpeningSaver
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=held_flaky_saver)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    sess.run()  # step 2: its save fails unseen
    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-2 failed: "):
        sess.run()  # step 3: its save waits for step 2's, which failed; step 3 is still saved
    sess.end()
    assert [0, 1, 3] == saved_steps(tmp_path)


def test_a_monitored_session_whose_background_save_failed_still_commits_the_final_checkpoint(
    tmp_path: pathlib.Path, held_flaky_saver: GateOpeningSaver
) -> None:
    model, optimizer = _model_and_optimizer()
    listener = AfterCommitListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=2, saver=held_flaky_saver, listeners=[listener]
    )
    with (  # noqa: PT012
        pytest.raises(CheckpointSaveError, match=r"model\.ckpt-2 failed: "),
        MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path)) as sess,
    ):
        train_op = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(train_op)
    assert 3 == load_step(tmp_path)
    assert [0, 3] == listener.after_save_steps
    assert [3] == listener.end_steps


def test_end_behind_a_hung_write_waits_for_it_once_and_still_ends_every_listener(
    tmp_path: pathlib.Path,
) -> None:
    listener = AfterCommitListener()
    with HungStorage(at_steps(2)) as hung:  # released on the way out, whatever happens
        saver = WaitRecordingSaver(max_to_keep=None, drain_timeout_secs=0.5, storage=hung)
        hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=saver, listeners=[listener])
        hook.begin()
        sess = HookedSession(hook)
        sess.create()
        saver.wait_until_finished(30)  # step 0 is durable: only the hung write can time out
        sess.run()
        sess.run()  # step 2: its write hangs
        sess.run()  # step 3
        with pytest.raises(
            CheckpointSaveError, match=r"model\.ckpt-2 did not finish within 0\.5 s"
        ) as info:
            sess.end()
        assert [info.value] == saver.errors(), (
            "another save, or another wait, would only time out again"
        )
        assert info.value is saver.waits[-1][1], "nothing waited after the wait that timed out"
        assert [str(tmp_path / "model.ckpt-2")] == hung.held
    assert [0, 2] == listener.before_save_steps
    assert [3] == listener.end_steps


# -- clocks (SPEC 5.1) ----------------------------------------------------------------------------


def test_a_clock_set_back_an_hour_does_not_stall_save_secs(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_secs=60, saver=Saver(max_to_keep=None))
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    for step in range(1, 14):
        clock.advance(10)  # each step takes 10 s
        if step == 3:
            clock.advance(-3600)
        sess.run()
    # The 10 s in which the clock went back are not counted (the hook sees the clock once a
    # step), so the save after it comes one step late: still within 60 s of the jump, not an
    # hour later.
    assert [0, 7, 13] == sess.saved_steps(tmp_path)


def test_a_clock_jumping_forwards_a_day_saves_once_not_at_every_step(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_secs=60, saver=Saver(max_to_keep=None))
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    for step in range(1, 11):
        clock.advance(10)
        if step == 3:
            clock.advance(24 * 3600)
        sess.run()
    assert [0, 3, 9] == sess.saved_steps(tmp_path)


# -- listener timing: run_after_commit (SPEC 5.3) -------------------------------------------------


class StateSeeingListener(MockListener):
    """Records, in ``after_save``, what a TF listener sampling the model would see."""

    def __init__(self, directory: pathlib.Path, name: str = "listener") -> None:
        super().__init__(name)
        self.directory = directory
        self.seen: list[tuple[int, int, bool, bool]] = []

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        path = self.directory / f"model.ckpt-{global_step_value}"
        on_disk = load_checkpoint(str(path))["model"]["weight"]
        self.seen.append(
            (
                global_step_value,
                session.global_step,
                latest_checkpoint(str(self.directory)) == str(path),
                torch.equal(on_disk, session.model.state_dict()["weight"]),
            )
        )
        return super().after_save(session, global_step_value)


def test_a_default_listener_gets_after_save_at_the_save_step_with_its_file_and_state(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    assert CheckpointSaverListener.run_after_commit is False
    listener = StateSeeingListener(tmp_path)
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=2, saver=deferred_saver, listeners=[listener]
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    assert [0] == listener.after_save_steps, "the creation save is waited for"
    sess.run()
    assert [0] == listener.after_save_steps
    sess.run()  # step 2: saved, waited for, after_save(2) before after_run returns
    assert [0, 2] == listener.after_save_steps
    # (told step, session step, the file is the latest, the model is the file's)
    assert [(0, 0, True, True), (2, 2, True, True)] == listener.seen


def test_a_default_listener_asking_to_stop_stops_at_the_save_step(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=2, saver=deferred_saver, listeners=[listener]
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    listener.ask_for_stop = True
    assert not sess.run().stop_requested
    assert sess.run().stop_requested  # step 2, as in TensorFlow
    assert 2 == sess.session.global_step


@pytest.mark.parametrize("listeners", ["none", "run_after_commit"])
def test_a_hook_without_default_listeners_never_waits_for_the_disk(
    tmp_path: pathlib.Path, listeners: str
) -> None:
    committed = AfterCommitListener()
    with GatedStorage() as gate:  # holds every write until the test opens it
        saver = WaitRecordingSaver(max_to_keep=None, storage=gate)
        hook = CheckpointSaverHook(
            str(tmp_path),
            save_steps=100,
            saver=saver,
            listeners=[committed] if listeners == "run_after_commit" else [],
        )
        hook.begin()
        sess = HookedSession(hook)
        sess.create()
        for _ in range(3):
            sess.run()
        assert [str(tmp_path / "model.ckpt-0")] == gate.held
        assert [] == gate.writes, "the creation save is still held: nothing waited for it"
        assert [] == committed.after_save_steps
        gate.open()
        hook.wait_until_finished()
    assert ([0] if listeners == "run_after_commit" else []) == committed.after_save_steps


def test_with_a_default_and_a_run_after_commit_listener_both_get_after_save_at_the_save_step(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    events: list[str] = []
    tf_style = MockListener("tf", events)
    committed = AfterCommitListener("committed", events)
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, saver=deferred_saver, listeners=[tf_style, committed]
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    assert [
        "tf.begin",
        "committed.begin",
        "tf.before_save 0",
        "committed.before_save 0",
        "tf.after_save 0",
        "committed.after_save 0",
        "tf.before_save 1",
        "committed.before_save 1",
        "tf.after_save 1",
        "committed.after_save 1",
    ] == events


def test_a_default_listener_whose_before_save_raised_does_not_make_the_save_step_wait(
    tmp_path: pathlib.Path,
) -> None:
    flaky = RaisingListener("flaky", method="before_save", steps={0})
    with GatedStorage() as gate:
        saver = WaitRecordingSaver(max_to_keep=None, storage=gate)
        hook = CheckpointSaverHook(str(tmp_path), save_steps=100, saver=saver, listeners=[flaky])
        hook.begin()
        sess = HookedSession(hook)
        with pytest.raises(ListenerBug):
            sess.create()
        assert [] == gate.writes, "no listener is owed an after_save(0): nothing waited"
        gate.open()
        hook.wait_until_finished()
    assert [] == flaky.after_save_steps


def test_a_default_listeners_after_save_error_is_raised_at_the_save_step(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    flaky = RaisingListener("flaky", method="after_save")
    hook = CheckpointSaverHook(str(tmp_path), save_steps=2, saver=deferred_saver, listeners=[flaky])
    hook.begin()
    sess = HookedSession(hook)
    with pytest.raises(ListenerBug):
        sess.create()
    sess.run()
    with pytest.raises(ListenerBug) as info:
        sess.run()  # step 2
    assert any("after_save(session, 2)" in note for note in notes(info.value))
    assert [0, 2] == flaky.after_save_steps


def test_run_after_commit_must_be_a_bool(tmp_path: pathlib.Path) -> None:
    class Vague(CheckpointSaverListener):
        run_after_commit = "yes"  # type: ignore[assignment]

    with pytest.raises(
        TypeError, match=r"^listeners\[0\]\.run_after_commit must be a bool, got 'yes' \(a str\)$"
    ):
        CheckpointSaverHook(str(tmp_path), save_steps=1, listeners=[Vague()])


# -- save_after_error (checkpoint_on_error) -------------------------------------------------------


def test_save_after_error_commits_the_step_without_listeners_or_retention(
    tmp_path: pathlib.Path,
) -> None:
    listener = MockListener()
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, saver=Saver(max_to_keep=2), listeners=[listener]
    )
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()
    hook.wait_until_finished()
    assert [0, 1] == saved_steps(tmp_path)
    sess.session.run(sess.train_op)  # step 2, trained outside the hook: unsaved
    path = hook.save_after_error(sess.session)
    assert str(tmp_path / "model.ckpt-2") == path
    assert [0, 1, 2] == saved_steps(tmp_path), "max_to_keep=2 deleted nothing for this save"
    assert path == latest_checkpoint(str(tmp_path))
    assert [0, 1] == listener.after_save_steps, "listeners are not called on the way out"
    assert None is hook.save_after_error(sess.session), "step 2 is saved already"


def test_save_after_error_saves_nothing_for_a_step_already_durable(
    tmp_path: pathlib.Path, deferred_saver: GateOpeningSaver
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=deferred_saver)
    hook.begin()
    sess = HookedSession(hook)
    sess.create()
    sess.run()  # step 1's save is still held
    assert None is hook.save_after_error(sess.session)
    assert [0, 1] == saved_steps(tmp_path)
