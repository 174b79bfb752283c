"""MonitoredSession and SingularMonitoredSession: call order, exits, fetches, feeds, recovery."""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

import pytest
import torch
from conftest import make_train_step
from storages import FailingStorage

from torch_ckpt_hook import (
    CheckpointSaverHook,
    MonitoredSession,
    NanLossDuringTrainingError,
    Saver,
    Scaffold,
    Session,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    SingularMonitoredSession,
    StopAtStepHook,
    latest_checkpoint,
    load_checkpoint,
)


class RecordingHook(SessionRunHook):
    """Appends every call it gets to a shared log, tagged with its name."""

    def __init__(self, name: str, log: list[str], request: SessionRunArgs | None = None) -> None:
        self.name = name
        self.log = log
        self.request = request
        self.results: list[Any] = []
        self.contexts: list[SessionRunContext] = []

    def begin(self) -> None:
        self.log.append(f"{self.name}.begin")

    def after_create_session(self, session: Session, coord: Any) -> None:
        self.log.append(f"{self.name}.after_create_session")

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self.log.append(f"{self.name}.before_run")
        self.contexts.append(run_context)
        return self.request

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.log.append(f"{self.name}.after_run")
        self.results.append(run_values.results)

    def end(self, session: Session) -> None:
        self.log.append(f"{self.name}.end")


class StopHook(RecordingHook):
    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        super().after_run(run_context, run_values)
        run_context.request_stop()


class FailingEndHook(RecordingHook):
    def end(self, session: Session) -> None:
        super().end(session)
        raise OSError(f"{self.name}: end failed")


def _model() -> torch.nn.Module:
    return torch.nn.Linear(3, 1)


def _recorder(log: list[str]):  # type: ignore[no-untyped-def]
    def step() -> dict[str, int]:
        log.append("step")
        return {"loss": 1}

    return step


def test_hooks_are_called_in_tensorflow_order_on_a_clean_exit() -> None:
    log: list[str] = []
    hooks = [RecordingHook("a", log), RecordingHook("b", log)]
    with MonitoredSession(_model(), hooks=hooks) as sess:
        log.append("created")
        sess.run(_recorder(log))
    assert [
        "a.begin",
        "b.begin",
        "a.after_create_session",
        "b.after_create_session",
        "created",
        "a.before_run",
        "b.before_run",
        "step",
        "a.after_run",
        "b.after_run",
        "a.end",
        "b.end",
    ] == log
    assert sess.should_stop()


def test_stop_iteration_leaving_the_body_is_swallowed_and_end_runs() -> None:
    log: list[str] = []

    def end_of_input() -> None:
        raise StopIteration

    with MonitoredSession(_model(), hooks=[RecordingHook("a", log)]) as sess:
        sess.run(end_of_input)
    assert ["a.begin", "a.after_create_session", "a.before_run", "a.end"] == log


def test_any_other_exception_skips_end_and_propagates() -> None:
    log: list[str] = []
    with (  # noqa: PT012
        pytest.raises(ValueError, match="bad batch"),
        MonitoredSession(_model(), hooks=[RecordingHook("a", log)]) as sess,
    ):
        sess.run(_recorder(log))
        raise ValueError("bad batch")
    assert "a.end" not in log
    assert sess.should_stop()
    with pytest.raises(RuntimeError, match="closed"):
        sess.run(_recorder(log))


def test_a_step_function_error_skips_every_after_run() -> None:
    log: list[str] = []
    hooks = [RecordingHook("a", log), RecordingHook("b", log)]
    sess = MonitoredSession(_model(), hooks=hooks)

    def broken() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        sess.run(broken)
    assert ["a.before_run", "b.before_run"] == log[-2:]


def test_an_end_that_raises_still_runs_later_ends_then_raises_and_closes() -> None:
    """TensorFlow skipped the later hooks' end(): a final checkpoint could be lost that way."""
    log: list[str] = []
    hooks = [FailingEndHook("a", log), RecordingHook("b", log), FailingEndHook("c", log)]
    sess = MonitoredSession(_model(), hooks=hooks)
    with pytest.raises(OSError, match="end failed") as info:
        sess.close()
    assert "b.end" in log
    assert "c.end" in log
    assert "a: end failed" == str(info.value), "the first error propagates"
    assert sess.should_stop()
    with pytest.raises(RuntimeError, match="already"):
        sess.close()


def test_a_stop_request_lets_every_after_run_run_then_stops() -> None:
    log: list[str] = []
    hooks = [StopHook("a", log), RecordingHook("b", log)]
    with MonitoredSession(_model(), hooks=hooks) as sess:
        sess.run(_recorder(log))
        assert "b.after_run" == log[-1]
        assert sess.should_stop()
        with pytest.raises(RuntimeError, match=r"^Run called even after should_stop requested\."):
            sess.run(_recorder(log))
    assert ["a.end", "b.end"] == log[-2:]


def test_close_twice_is_a_runtime_error_with_a_clear_message() -> None:
    sess = MonitoredSession(_model())
    sess.close()
    with pytest.raises(
        RuntimeError, match=r"^close\(\) on a closed MonitoredSession: it was closed already"
    ):
        sess.close()
    with pytest.raises(RuntimeError, match=r"^run\(\) on a closed MonitoredSession"):
        sess.run(lambda: None)
    with (
        pytest.raises(RuntimeError, match=r"^entering a with block on a closed MonitoredSession"),
        sess,
    ):
        pass


def test_close_inside_the_with_block_makes_the_exit_raise() -> None:
    with pytest.raises(RuntimeError, match="closed"), MonitoredSession(_model()) as sess:
        sess.close()


def test_hooks_get_their_fetches_resolved_against_the_return_value() -> None:
    log: list[str] = []
    by_key = RecordingHook("a", log, SessionRunArgs("loss"))
    nested = RecordingHook("b", log, SessionRunArgs({"l": ["loss"], "n": lambda v: len(v)}))
    silent = RecordingHook("c", log)
    with MonitoredSession(_model(), hooks=[by_key, nested, silent]) as sess:
        assert {"loss": 1} == sess.run(_recorder(log))
    assert [1] == by_key.results
    assert [{"l": [1], "n": 1}] == nested.results
    assert [None] == silent.results


def test_hook_feeds_arrive_as_keyword_arguments() -> None:
    log: list[str] = []
    hook = RecordingHook("a", log, SessionRunArgs(None, feed_dict={"scale": 3}))
    with MonitoredSession(_model(), hooks=[hook]) as sess:
        assert 6 == sess.run(lambda x, scale: x * scale, 2)
    assert {} == hook.contexts[0].original_args.feed_dict, "hook feeds are not the caller's"


def test_original_args_hold_the_step_function_and_the_callers_keywords() -> None:
    log: list[str] = []
    hook = RecordingHook("a", log)

    def step(x: int, *, y: int) -> int:
        return x + y

    with MonitoredSession(_model(), hooks=[hook]) as sess:
        sess.run(step, 1, y=2)
    assert SessionRunArgs(step, {"y": 2}) == hook.contexts[0].original_args
    assert isinstance(hook.contexts[0].session, Session)


@pytest.mark.parametrize(
    ("feeds", "caller", "message"),
    [
        ([{"x": 1}, {"x": 2}], {}, r"Same argument is fed by two hooks\. Conflict\(s\): \['x'\]"),
        ([{"x": 1}], {"x": 0}, r"Same argument is fed by a SessionRunHook and the caller"),
    ],
)
def test_feed_conflicts_raise_before_the_step_runs(feeds, caller, message) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []
    hooks = [
        RecordingHook(str(i), log, SessionRunArgs(None, feed_dict=f)) for i, f in enumerate(feeds)
    ]
    sess = MonitoredSession(_model(), hooks=hooks)
    with pytest.raises(RuntimeError, match=message):
        sess.run(_recorder(log), **caller)
    assert "step" not in log


def test_before_run_must_return_session_run_args() -> None:
    class BadHook(SessionRunHook):
        def before_run(self, run_context: SessionRunContext) -> Any:
            return ["loss"]

    sess = MonitoredSession(_model(), hooks=[BadHook()])
    with pytest.raises(
        TypeError, match=r"^BadHook\.before_run\(\) must return SessionRunArgs or None, got list$"
    ):
        sess.run(lambda: None)


def test_global_step_mirrors_the_raw_session(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    with SingularMonitoredSession(model, optimizer) as sess:
        sess.run(make_train_step(model, optimizer))
        assert 1 == sess.global_step == sess.raw_session().global_step
        with pytest.raises(AttributeError):
            sess.global_step = 5  # type: ignore[misc]


def test_a_hook_can_stop_through_the_coordinator() -> None:
    class CoordHook(SessionRunHook):
        def after_create_session(self, session: Session, coord: Any) -> None:
            coord.request_stop()

    with MonitoredSession(_model(), hooks=[CoordHook()]) as sess:
        assert sess.should_stop()


# -- restore at creation -----------------------------------------------------------------------


def _save_at(directory: os.PathLike[str], step: int, weight: float) -> str:
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
    return str(
        Saver().save(Session(model, global_step=step), os.path.join(directory, "model.ckpt"), step)
    )


def test_creation_restores_the_newest_checkpoint_of_checkpoint_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _save_at(tmp_path, 5, 0.5)
    _save_at(tmp_path, 9, 0.9)
    init_calls: list[Any] = []
    scaffold = Scaffold(init_fn=lambda scaffold, session: init_calls.append(session))
    with MonitoredSession(_model(), checkpoint_dir=str(tmp_path), scaffold=scaffold) as sess:
        assert 9 == sess.global_step
    assert [] == init_calls, "init_fn does not run when a checkpoint was restored"


def test_creation_skips_a_newest_checkpoint_with_a_flipped_bit_and_names_it(
    tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    _save_at(tmp_path, 5, 0.5)
    newest = _save_at(tmp_path, 9, 0.9)
    with open(newest, "r+b") as f:
        f.seek(os.path.getsize(newest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))
    model = _model()
    with MonitoredSession(model, checkpoint_dir=str(tmp_path)) as sess:
        assert 5 == sess.global_step
    assert torch.all(model.weight == 0.5)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(newest in m and "checksum mismatch" in m for m in warnings), warnings


def test_creation_restores_checkpoint_filename_with_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    older = _save_at(tmp_path, 5, 0.5)
    _save_at(tmp_path, 9, 0.9)
    model = _model()
    with MonitoredSession(model, checkpoint_filename_with_path=older) as sess:
        assert 5 == sess.global_step
    assert torch.all(model.weight == 0.5)


def test_a_missing_checkpoint_filename_with_path_is_a_value_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "model.ckpt-3")
    with pytest.raises(ValueError, match=rf"not a valid checkpoint: {missing}"):
        MonitoredSession(_model(), checkpoint_filename_with_path=missing)


def test_init_fn_runs_when_nothing_was_restored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[Scaffold, Session]] = []
    scaffold = Scaffold(init_fn=lambda scaffold, session: calls.append((scaffold, session)))
    with SingularMonitoredSession(
        _model(), checkpoint_dir=str(tmp_path), scaffold=scaffold
    ) as sess:
        assert [(scaffold, sess.raw_session())] == calls


def test_both_checkpoint_sources_is_tensorflows_value_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        ValueError,
        match=r"^Can not provide both checkpoint_dir and checkpoint_filename_with_path\.$",
    ):
        MonitoredSession(_model(), checkpoint_dir=str(tmp_path), checkpoint_filename_with_path="x")


def test_a_failing_begin_leaves_the_session_closed() -> None:
    class BrokenBegin(SessionRunHook):
        def begin(self) -> None:
            raise OSError("no disk")

    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OSError, match="no disk"):
        MonitoredSession(model, optimizer, hooks=[BrokenBegin()])
    assert not optimizer._optimizer_step_post_hooks, "the step counter hook was removed"


# -- recovery ----------------------------------------------------------------------------------


class Transient(Exception):
    pass


def test_recovery_restores_calls_after_create_session_again_and_retries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _save_at(tmp_path, 4, 0.25)
    log: list[str] = []
    model = _model()
    failures = [Transient("lost a worker")]

    def flaky() -> int:
        log.append("step")
        with torch.no_grad():
            model.weight.fill_(7.0)
        if failures:
            raise failures.pop()
        return 1

    sess = MonitoredSession(
        model,
        hooks=[RecordingHook("a", log)],
        checkpoint_dir=str(tmp_path),
        recoverable_errors=(Transient,),
    )
    sess.global_step  # noqa: B018
    assert 1 == sess.run(flaky)
    assert [
        "a.begin",
        "a.after_create_session",
        "a.before_run",
        "step",
        "a.after_create_session",
        "a.before_run",
        "step",
        "a.after_run",
    ] == log
    assert 5 == sess.global_step, "restored to 4, then one successful run"


def test_recovery_is_bounded_by_max_recoveries() -> None:
    attempts: list[int] = []

    def always_fails() -> None:
        attempts.append(1)
        raise Transient("still down")

    sess = MonitoredSession(_model(), recoverable_errors=(Transient,), max_recoveries=2)
    with pytest.raises(Transient, match="still down"):
        sess.run(always_fails)
    assert 3 == len(attempts), "one try and two retries"


def test_max_recoveries_zero_never_retries() -> None:
    attempts: list[int] = []

    def fails() -> None:
        attempts.append(1)
        raise Transient

    sess = MonitoredSession(_model(), recoverable_errors=(Transient,), max_recoveries=0)
    with pytest.raises(Transient):
        sess.run(fails)
    assert 1 == len(attempts)


def test_recovery_from_a_hook_error_runs_init_fn_without_a_checkpoint() -> None:
    inits: list[int] = []

    class FlakyHook(SessionRunHook):
        def __init__(self) -> None:
            self.failed = False

        def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
            if not self.failed:
                self.failed = True
                raise Transient

    scaffold = Scaffold(init_fn=lambda scaffold, session: inits.append(1))
    sess = MonitoredSession(
        _model(), hooks=[FlakyHook()], scaffold=scaffold, recoverable_errors=(Transient,)
    )
    sess.run(lambda: None)
    assert [1, 1] == inits


def test_errors_outside_recoverable_errors_propagate() -> None:
    sess = MonitoredSession(_model(), recoverable_errors=(Transient,))
    with pytest.raises(KeyError):
        sess.run(lambda: {}["x"])


def test_each_run_call_gets_its_own_recovery_budget() -> None:
    attempts: list[str] = []

    def fails_on_first_try(call: str) -> None:
        attempts.append(call)
        if attempts.count(call) == 1:
            raise Transient

    sess = MonitoredSession(_model(), recoverable_errors=(Transient,), max_recoveries=1)
    sess.run(fails_on_first_try, "first")
    sess.run(fails_on_first_try, "second")
    assert ["first", "first", "second", "second"] == attempts


# -- signals -----------------------------------------------------------------------------------


def test_a_stop_signal_finishes_the_step_then_stops_and_restores_the_handler() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    log: list[str] = []

    def step() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        log.append("step finished")

    with MonitoredSession(
        _model(), hooks=[RecordingHook("a", log)], stop_on_signals=(signal.SIGUSR1,)
    ) as sess:
        assert previous is not signal.getsignal(signal.SIGUSR1)
        sess.run(step)
        assert sess.should_stop()
    assert ["step finished", "a.after_run", "a.end"] == log[-3:]
    assert previous == signal.getsignal(signal.SIGUSR1)


# -- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"hooks": SessionRunHook()},
            TypeError,
            r"^hooks must be a list of SessionRunHook, got SessionRunHook$",
        ),
        ({"hooks": [object()]}, TypeError, r"^hooks\[0\] must be a SessionRunHook, got object$"),
        ({"scaffold": "s"}, TypeError, r"^scaffold must be a Scaffold or None, got str$"),
        ({"checkpoint_dir": 3}, TypeError, r"^checkpoint_dir must be a path or None, got int$"),
        (
            {"recoverable_errors": (ValueError, "x")},
            TypeError,
            r"^recoverable_errors must be a tuple of exception types, got 'x' in it$",
        ),
        (
            {"max_recoveries": -1},
            ValueError,
            r"^max_recoveries must be a non-negative int, got -1$",
        ),
        (
            {"max_recoveries": 1.5},
            TypeError,
            r"^max_recoveries must be a non-negative int, got 1\.5 \(a float\)$",
        ),
        (
            {"stop_on_signals": ("TERM",)},
            ValueError,
            r"^stop_on_signals must hold signal numbers such as signal\.SIGTERM, got 'TERM'$",
        ),
    ],
)
def test_monitored_session_validates_its_arguments(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        MonitoredSession(_model(), **kwargs)


def test_run_needs_a_callable() -> None:
    with pytest.raises(TypeError, match=r"^fn must be a callable step function, got int$"):
        MonitoredSession(_model()).run(3)  # type: ignore[arg-type]


# -- regressions from review -------------------------------------------------------------------


def test_a_signal_between_should_stop_and_run_still_ends_cleanly_with_a_final_checkpoint(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from torch_ckpt_hook import CheckpointSaverHook, latest_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100)
    with MonitoredSession(
        model, optimizer, hooks=[hook], stop_on_signals=(signal.SIGUSR1,)
    ) as sess:
        while not sess.should_stop():
            if sess.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # lands after the loop's check
            sess.run(step)
    assert 4 == sess.global_step, "the step in progress when the signal came still ran"
    assert str(tmp_path / "model.ckpt-4") == latest_checkpoint(str(tmp_path))


def test_end_of_input_is_never_recovered_from_even_when_exception_is_recoverable(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from torch_ckpt_hook import CheckpointSaverHook

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = make_train_step(model, optimizer)
    data = iter(range(5))

    def step() -> dict[str, torch.Tensor]:
        next(data)
        return train()

    hook = CheckpointSaverHook(str(tmp_path), save_steps=2)
    with MonitoredSession(
        model,
        optimizer,
        hooks=[hook],
        checkpoint_dir=str(tmp_path),
        recoverable_errors=(Exception,),
    ) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert 5 == sess.global_step


def test_uncatchable_stop_signals_are_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"^stop_on_signals must hold signals a process can catch, got SIGKILL$"
    ):
        MonitoredSession(_model(), stop_on_signals=(signal.SIGTERM, signal.SIGKILL))


def test_close_from_another_thread_logs_that_handlers_stay_and_still_releases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import threading

    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sess = MonitoredSession(model, optimizer, stop_on_signals=(signal.SIGUSR2,))
    runner_handler = signal.getsignal(signal.SIGUSR2)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            sess.close()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
    assert [] == errors
    assert "Could not restore the previous SIGUSR2 handler" in caplog.text
    assert not optimizer._optimizer_step_post_hooks, "the step counter hook was removed"
    assert runner_handler == signal.getsignal(signal.SIGUSR2), "only the main thread can restore"
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_an_end_error_is_not_hidden_by_a_failing_drain() -> None:
    from torch_ckpt_hook import CheckpointSaveError

    class FailingEnd(SessionRunHook):
        def end(self, session: Session) -> None:
            raise OSError("end failed")

    class FailingDrain(SessionRunHook):
        def wait_until_finished(self) -> None:
            raise CheckpointSaveError("background save failed")

    sess = MonitoredSession(_model(), hooks=[FailingEnd(), FailingDrain()])
    with pytest.raises(OSError, match="end failed"):
        sess.close()


# -- restored_from (SPEC 5.3) --------------------------------------------------------------------


@pytest.mark.parametrize("runner", [MonitoredSession, SingularMonitoredSession])
def test_restored_from_names_the_checkpoint_restored_at_creation(tmp_path, runner) -> None:  # type: ignore[no-untyped-def]
    path = _save_at(tmp_path, 4, 0.25)
    with runner(_model(), checkpoint_dir=str(tmp_path)) as sess:
        assert os.path.abspath(path) == sess.restored_from
    with runner(_model(), checkpoint_filename_with_path=path) as sess:
        assert os.path.abspath(path) == sess.restored_from


def test_restored_from_is_none_when_nothing_was_restored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with MonitoredSession(_model(), checkpoint_dir=str(tmp_path)) as sess:
        assert None is sess.restored_from
    with MonitoredSession(_model()) as sess:
        assert None is sess.restored_from


def test_restored_from_keeps_the_creation_checkpoint_after_a_recovery(tmp_path) -> None:  # type: ignore[no-untyped-def]
    failures = [Transient("lost a worker")]

    def flaky() -> None:
        if failures:
            raise failures.pop()

    with MonitoredSession(
        _model(), checkpoint_dir=str(tmp_path), recoverable_errors=(Transient,)
    ) as sess:
        _save_at(tmp_path, 4, 0.25)
        sess.run(flaky)  # recovers from model.ckpt-4
        assert 5 == sess.global_step
        assert None is sess.restored_from


# -- finished runs stay finished (SPEC 5.3) ------------------------------------------------------


def test_a_run_restored_at_its_last_step_should_stop_before_the_first_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)
    steps_run = []
    for _ in range(3):  # the first run trains to step 3; rerunning the finished job trains none
        hooks = [
            StopAtStepHook(last_step=3),
            CheckpointSaverHook(str(tmp_path), save_steps=100),
        ]
        with MonitoredSession(model, optimizer, hooks=hooks, checkpoint_dir=str(tmp_path)) as sess:
            ran = 0
            while not sess.should_stop():
                sess.run(step)
                ran += 1
        steps_run.append(ran)
        assert 3 == sess.global_step
    assert [3, 0, 0] == steps_run


# -- checkpoint_on_error (SPEC 5.3) --------------------------------------------------------------


class Boom(Exception):
    pass


def _steps_on_disk(directory: os.PathLike[str]) -> list[int]:
    return sorted(
        int(name.rsplit("-", 1)[1])
        for name in os.listdir(directory)
        if name.startswith("model.ckpt-") and name.rsplit("-", 1)[1].isdigit()
    )


def _training(tmp_path, **kwargs):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100, saver=Saver(max_to_keep=1))
    sess = MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path), **kwargs)
    return sess, model, optimizer, make_train_step(model, optimizer)


def test_checkpoint_on_error_saves_the_last_completed_step_before_the_error_propagates(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    sess, model, optimizer, step = _training(tmp_path, checkpoint_on_error=True)
    for _ in range(3):
        sess.run(step)
    weight = model.weight.detach().clone()

    def forward_fails() -> None:
        optimizer.zero_grad()
        raise Boom("CUDA out of memory (in the forward pass)")

    with pytest.raises(Boom) as info, sess:
        sess.run(forward_fails)
    path = str(tmp_path / "model.ckpt-3")
    assert path == latest_checkpoint(str(tmp_path))
    assert [0, 3] == _steps_on_disk(tmp_path), "max_to_keep=1 deleted nothing for that save"
    payload = load_checkpoint(path)
    assert 3 == payload["global_step"]
    assert torch.equal(weight, payload["model"]["weight"])
    assert [f"checkpoint_on_error: the state of step 3 was saved to {path}."] == getattr(
        info.value, "__notes__", []
    )


def test_checkpoint_on_error_is_off_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, _optimizer, step = _training(tmp_path)
    sess.run(step)

    def fails() -> None:
        raise Boom

    with pytest.raises(Boom), sess:
        sess.run(fails)
    assert [0] == _steps_on_disk(tmp_path)


@pytest.mark.parametrize("where", ["inside optimizer.step()", "after optimizer.step()"])
def test_checkpoint_on_error_saves_nothing_when_an_optimizer_step_was_interrupted(
    tmp_path,  # type: ignore[no-untyped-def]
    where: str,
) -> None:
    sess, model, optimizer, step = _training(tmp_path, checkpoint_on_error=True)
    sess.run(step)

    def half_step() -> None:
        loss = model(torch.ones(2, 3)).sum()
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        if where == "inside optimizer.step()":

            def closure() -> torch.Tensor:
                raise Boom(where)

            optimizer.step(closure)  # type: ignore[arg-type]
        else:
            optimizer.step()
            raise Boom(where)

    with pytest.raises(Boom), sess:
        sess.run(half_step)
    assert [0] == _steps_on_disk(tmp_path)


def test_checkpoint_on_error_saves_nothing_for_a_nan_loss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, _optimizer, step = _training(tmp_path, checkpoint_on_error=True)
    sess.run(step)

    def nan_found_before_the_update() -> None:
        raise NanLossDuringTrainingError

    with pytest.raises(NanLossDuringTrainingError), sess:
        sess.run(nan_found_before_the_update)
    assert [0] == _steps_on_disk(tmp_path)


def test_checkpoint_on_error_saves_nothing_for_a_step_already_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, _optimizer, _step = _training(tmp_path, checkpoint_on_error=True)

    def fails() -> None:
        raise Boom

    with pytest.raises(Boom) as info, sess:
        sess.run(fails)  # step 0 was saved at creation
    assert [0] == _steps_on_disk(tmp_path)
    assert [] == getattr(info.value, "__notes__", [])


def test_checkpoint_on_error_saves_after_recoveries_run_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, _optimizer, step = _training(
        tmp_path, checkpoint_on_error=True, recoverable_errors=(Transient,), max_recoveries=1
    )
    sess.run(step)
    sess.run(step)
    failures = [Transient("twice"), Transient("once")]

    def flaky() -> None:
        raise failures.pop()

    with pytest.raises(Transient, match="twice"), sess:
        sess.run(flaky)  # recovered once (restores step 0), then the error propagates
    assert 0 == sess.global_step
    assert [0] == _steps_on_disk(tmp_path), "the restored step 0 is saved already"


def test_checkpoint_on_error_ignores_stop_iteration_and_keyboard_interrupt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, _optimizer, step = _training(tmp_path, checkpoint_on_error=True)
    sess.run(step)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sess.run(interrupted)

    def exhausted() -> None:
        raise StopIteration

    with sess:
        sess.run(exhausted)
    assert [1] == _steps_on_disk(tmp_path), "only end() saved step 1 (max_to_keep=1)"


def test_checkpoint_on_error_with_no_optimizer_counts_the_step_function_as_the_update(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100)

    class FailsBeforeTheStep(SessionRunHook):
        fail = False

        def before_run(self, run_context: SessionRunContext) -> None:
            if self.fail:
                raise Boom("before the step")

    before = FailsBeforeTheStep()
    sess = MonitoredSession(
        _model(), hooks=[hook, before], checkpoint_dir=str(tmp_path), checkpoint_on_error=True
    )
    sess.run(lambda: None)

    def fails() -> None:
        raise Boom("inside the step")

    with pytest.raises(Boom):
        sess.run(fails)
    hook.wait_until_finished()
    assert [0] == _steps_on_disk(tmp_path)
    before.fail = True
    with pytest.raises(Boom, match="before the step"), sess:
        sess.run(lambda: None)
    assert [0, 1] == _steps_on_disk(tmp_path)


def test_checkpoint_on_error_notes_a_failed_save_and_raises_the_original_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = FailingStorage(OSError(errno.EIO, "Input/output error"), steps={1})
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100, saver=Saver(storage=disk))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sess = MonitoredSession(
        model, optimizer, hooks=[hook], checkpoint_dir=str(tmp_path), checkpoint_on_error=True
    )
    sess.run(lambda: optimizer.step())

    def fails() -> None:
        raise Boom("the real error")

    with pytest.raises(Boom, match="the real error") as info, sess:
        sess.run(fails)
    assert [str(tmp_path / "model.ckpt-1")] == disk.failed
    assert [
        f"checkpoint_on_error: saving step 1 failed: Saving {tmp_path / 'model.ckpt-1'} failed: "
        "OSError: [Errno 5] Input/output error"
    ] == getattr(info.value, "__notes__", [])


@pytest.mark.parametrize("runner", [MonitoredSession, SingularMonitoredSession])
def test_checkpoint_on_error_needs_a_checkpoint_hook(tmp_path, runner) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"^checkpoint_on_error=True needs a CheckpointSaverHook"):
        runner(_model(), checkpoint_dir=str(tmp_path), checkpoint_on_error=True)
    with pytest.raises(
        TypeError, match=r"^checkpoint_on_error must be a bool, got 'yes' \(a str\)$"
    ):
        runner(_model(), checkpoint_on_error="yes")


def test_checkpoint_on_error_removes_its_optimizer_hook_on_close(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sess, _unused_model, optimizer, _step = _training(tmp_path, checkpoint_on_error=True)
    assert optimizer._optimizer_step_pre_hooks
    sess.close()
    assert not optimizer._optimizer_step_pre_hooks


def test_checkpoint_on_error_watches_every_optimizer_of_a_list(tmp_path) -> None:  # type: ignore[no-untyped-def]
    generator, critic = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    optimizers = [
        torch.optim.SGD(generator.parameters(), lr=0.1),
        torch.optim.SGD(critic.parameters(), lr=0.1),
    ]
    model = torch.nn.ModuleDict({"generator": generator, "critic": critic})
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100)
    sess = MonitoredSession(
        model, optimizers, hooks=[hook], checkpoint_dir=str(tmp_path), checkpoint_on_error=True
    )
    sess.run(lambda: optimizers[0].step())

    def critic_update_then_fail() -> None:
        optimizers[1].step()  # the second optimizer's step: the state is half-updated
        raise Boom

    with pytest.raises(Boom), sess:
        sess.run(critic_update_then_fail)
    assert [0] == _steps_on_disk(tmp_path)
