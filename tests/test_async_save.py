"""Asynchronous saves: staged snapshots, one background writer, failures, draining, memory.

A gated storage holds the writer thread at the file write where a test needs it, so the tests
see "the save is staged but not yet written" deterministically, without timing assumptions;
failing storages stand in for a full or broken disk.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import make_train_step
from storages import DiskFullStorage, FailingStorage, GatedStorage

from torch_ckpt_hook import (
    CheckpointSaveError,
    CheckpointSaverHook,
    CheckpointSaverListener,
    MonitoredTrainingSession,
    Saver,
    Scaffold,
    Session,
    get_checkpoint_state,
    load_checkpoint,
    verify_checkpoint,
)
from torch_ckpt_hook._fsutil import is_temp_file
from torch_ckpt_hook._storage import LocalStorage


@pytest.fixture
def gate() -> Iterator[GatedStorage]:
    """A disk that holds every write (``gate.holds`` says which) until ``gate.open()``."""
    with GatedStorage() as storage:  # its exit opens it: never leave a writer thread parked
        yield storage


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("torch_ckpt_hook-writer")]


def _bn_model_and_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    make_train_step(model, optimizer)()
    return model, optimizer


def _clone_state(session: Session) -> dict[str, Any]:
    def clone(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone()
        if isinstance(obj, dict):
            return {k: clone(v) for k, v in obj.items()}
        return obj

    return {
        "model": clone(session.model.state_dict()),
        "optimizer": clone(session.optimizer.state_dict()),
    }  # type: ignore[union-attr]


def _assert_same_tensors(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), where
        for key in expected:
            _assert_same_tensors(expected[key], actual[key], f"{where}/{key}")


# -- snapshot consistency -----------------------------------------------------------------------


def test_the_file_holds_the_state_at_the_call_whatever_training_does_next(tmp_path, gate) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = _bn_model_and_adamw()
    session = Session(model, optimizer)
    before = _clone_state(session)

    handle = Saver(storage=gate).save(session, str(tmp_path / "model.ckpt"), 1, blocking=False)
    # Everything a training loop can touch, changed in place while the write is held back.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(1) if tensor.is_floating_point() else tensor.fill_(99)
        for state in optimizer.state.values():
            for tensor in state.values():
                tensor.mul_(-3).add_(5)
    make_train_step(model, optimizer)()
    gate.open()

    payload = load_checkpoint(handle.result(30))
    _assert_same_tensors(before["model"], payload["model"], "model")
    _assert_same_tensors(before["optimizer"]["state"], payload["optimizer"]["state"], "optimizer")


# -- the writer -----------------------------------------------------------------------------------


def test_a_save_returns_once_staged_and_the_handle_reports_when_durable(tmp_path, gate) -> None:  # type: ignore[no-untyped-def]
    session = Session(torch.nn.Linear(2, 2))
    handle = Saver(storage=gate).save(session, str(tmp_path / "model.ckpt"), 3, blocking=False)
    assert gate.waiting.wait(30)
    assert not handle.done()
    assert get_checkpoint_state(str(tmp_path)) is None

    gate.open()
    path = handle.result(30)

    assert handle.done()
    assert str(tmp_path / "model.ckpt-3") == path
    assert verify_checkpoint(path) is None
    assert path == get_checkpoint_state(str(tmp_path)).model_checkpoint_path  # type: ignore[union-attr]


class OpenGateOnWarning(logging.Handler):
    """Opens the gate when the package warns that a save waits: the training thread is then
    about to block on the first save, and only this release lets it go on."""

    def __init__(self, gate: GatedStorage) -> None:
        super().__init__(logging.WARNING)
        self.gate = gate
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.gate.open()


@pytest.fixture
def opener(gate: GatedStorage) -> Iterator[OpenGateOnWarning]:
    handler = OpenGateOnWarning(gate)
    logging.getLogger("torch_ckpt_hook").addHandler(handler)
    yield handler
    logging.getLogger("torch_ckpt_hook").removeHandler(handler)


def test_a_slow_writer_lets_training_go_on_and_the_next_trigger_waits_with_a_warning(
    tmp_path: pathlib.Path, gate: GatedStorage, opener: OpenGateOnWarning
) -> None:
    model, optimizer = _bn_model_and_adamw()
    step = make_train_step(model, optimizer)
    with MonitoredTrainingSession(
        model,
        optimizer,
        scaffold=Scaffold(saver=Saver(storage=gate)),
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=2,
    ) as sess:
        assert gate.waiting.wait(30)  # the save made at creation is held by the gate
        sess.run(step)
        assert 1 == sess.global_step, "training went on while the save was being written"
        assert get_checkpoint_state(str(tmp_path)) is None, "and nothing is committed yet"
        sess.run(step)  # step 2 triggers: it must wait for the save of step 0

    assert 1 == len(opener.messages)
    assert "save interval is shorter than a save takes" in opener.messages[0]
    assert [str(tmp_path / f"model.ckpt-{n}") for n in (0, 2)] == gate.writes
    assert 1 == gate.max_running, "at most one save in flight"
    assert [] == _writer_threads()


def test_an_enospc_partway_surfaces_at_the_next_hook_call_and_loses_nothing(
    tmp_path: pathlib.Path,
) -> None:
    model, optimizer = _bn_model_and_adamw()
    step = make_train_step(model, optimizer)
    # Armed, the next write runs out of space 200 bytes in; the ones after it find space again.
    disk = DiskFullStorage(room=200, once=True, armed=False)
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=Saver(storage=disk))
    with MonitoredTrainingSession(model, optimizer, hooks=[hook]) as sess:
        sess.run(step)
        hook.wait_until_finished()
        disk.arm()
        # The save of step 2 fails on the writer thread: the error surfaces in this run's
        # after_run when the writer is quick, else at the next hook call.
        with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-2 failed: OSError") as info:  # noqa: PT012
            sess.run(step)
            sess.run(step)
        assert isinstance(info.value.__cause__, OSError)
        assert errno.ENOSPC == info.value.__cause__.errno
        sess.run(step)  # the user caught it: training and saving go on

    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    names = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
    assert "model.ckpt-2" not in names
    assert {"model.ckpt-0", "model.ckpt-1"} <= set(names)
    for path in state.all_model_checkpoint_paths:
        assert verify_checkpoint(path) is None, path
    assert [str(tmp_path / "model.ckpt-2")] == disk.failed, "the write failed partway"
    assert [200] == disk.bytes_written_before_failure
    assert not (tmp_path / "model.ckpt-2").exists()
    assert [] == [p for p in os.listdir(tmp_path) if is_temp_file(p)]


def test_a_failure_is_raised_once_by_wait_until_finished_and_always_by_its_handle(
    tmp_path: pathlib.Path,
) -> None:
    saver = Saver(storage=FailingStorage(OSError(errno.EIO, "I/O error")))
    handle = saver.save(Session(torch.nn.Linear(1, 1)), str(tmp_path / "m"), 1, blocking=False)
    with pytest.raises(CheckpointSaveError, match=r"Saving .*m-1 failed: OSError") as info:
        saver.wait_until_finished()
    assert isinstance(info.value.__cause__, OSError)
    saver.wait_until_finished()  # reported once
    with pytest.raises(CheckpointSaveError):
        handle.result()
    with pytest.raises(CheckpointSaveError, match="m-2 failed"):
        saver.save(Session(torch.nn.Linear(1, 1)), str(tmp_path / "m"), 2)  # blocking


def test_an_exception_exit_still_commits_the_staged_save_and_leaves_no_thread(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    model, optimizer = _bn_model_and_adamw()
    step = make_train_step(model, optimizer)
    gate.holds = lambda path: path.endswith("-1")
    with (  # noqa: PT012
        pytest.raises(KeyError, match="boom"),
        MonitoredTrainingSession(
            model,
            optimizer,
            scaffold=Scaffold(saver=Saver(storage=gate)),
            checkpoint_dir=str(tmp_path),
            save_checkpoint_steps=1,
        ) as sess,
    ):
        sess.run(step)
        assert gate.waiting.wait(30)
        # Released only after the exit began: without the drain, the checks below would run first.
        threading.Timer(0.2, gate.open).start()
        raise KeyError("boom")

    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert str(tmp_path / "model.ckpt-1") == state.model_checkpoint_path
    assert 1 == load_checkpoint(state.model_checkpoint_path)["global_step"]
    assert [] == _writer_threads()


def test_close_gives_up_after_the_drain_timeout_with_a_clear_error(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    model = torch.nn.Linear(1, 1)
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=100, saver=Saver(drain_timeout_secs=0.05, storage=gate)
    )
    with (
        pytest.raises(CheckpointSaveError, match=r"did not finish within 0\.05 s"),
        MonitoredTrainingSession(model, hooks=[hook]),
    ):
        pass
    assert get_checkpoint_state(str(tmp_path)) is None, "nothing half-committed"
    gate.open()
    for thread in _writer_threads():
        thread.join(30)
    assert str(tmp_path / "model.ckpt-0") == latest_or_none(tmp_path)


def latest_or_none(directory: pathlib.Path) -> str | None:
    state = get_checkpoint_state(str(directory))
    return None if state is None else state.model_checkpoint_path


# -- listeners ------------------------------------------------------------------------------------


class TimingListener(CheckpointSaverListener):
    # The save stays asynchronous: after_save at the first hook call after the commit.
    run_after_commit = True

    def __init__(self, model: torch.nn.Module, log: list[tuple[str, int, bool]]) -> None:
        self.model = model
        self.log = log
        self.stop_after: int | None = None

    def before_save(self, session: Any, global_step_value: int) -> None:
        on_main = threading.current_thread() is threading.main_thread()
        self.log.append(("before_save", global_step_value, on_main))
        # Staging comes after before_save: this change must be in the checkpoint.
        with torch.no_grad():
            self.model.weight.fill_(float(global_step_value))

    def after_save(self, session: Any, global_step_value: int) -> bool:
        on_main = threading.current_thread() is threading.main_thread()
        self.log.append(("after_save", global_step_value, on_main))
        return global_step_value == self.stop_after


def test_listeners_run_on_the_training_thread_before_staging_and_after_durable(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = make_train_step(model, optimizer)
    log: list[tuple[str, int, bool]] = []
    listener = TimingListener(model, log)
    listener.stop_after = 1
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, saver=Saver(storage=gate), listeners=[listener]
    )
    with MonitoredTrainingSession(model, optimizer, hooks=[hook]) as sess:
        assert [("before_save", 0, True)] == log, "after_save waits for the file"
        gate.open()
        hook.wait_until_finished()
        assert ("after_save", 0, True) == log[-1]
        sess.run(step)  # saves step 1; after_save(1) asks to stop
        while not sess.should_stop():
            sess.run(step)

    assert ("after_save", 1, True) in log
    assert all(on_main for _, _, on_main in log)
    assert 0.0 == load_checkpoint(str(tmp_path / "model.ckpt-0"))["model"]["weight"].unique().item()
    assert 1.0 == load_checkpoint(str(tmp_path / "model.ckpt-1"))["model"]["weight"].unique().item()


# -- memory ---------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_fifty_saves_keep_resident_memory_flat(tmp_path: pathlib.Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 512),
        *(torch.nn.Linear(512, 512) for _ in range(3)),
        torch.nn.Linear(512, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters())  # ~3 MB of parameters, 10 MB of payload
    step = make_train_step(model, optimizer)
    payload_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    saver = Saver(max_to_keep=2)
    session = Session(model, optimizer)
    samples = []
    for n in range(50):
        step()
        saver.save(session, str(tmp_path / "model.ckpt"), n, blocking=False)
        if n in (9, 49):
            saver.wait_until_finished()
            samples.append(_rss_bytes())
    saver.wait_until_finished()

    growth = samples[1] - samples[0]
    # One payload of growth would mean a leaked copy every ~40 saves; a leak per save, 40.
    assert growth < payload_bytes / 2, f"RSS grew {growth / 2**20:.1f} MiB over 40 saves"
    assert saver._staging.nbytes <= payload_bytes + 65536  # + step counters and RNG states


def test_a_failure_seen_by_the_hook_is_not_raised_again_at_close(tmp_path: pathlib.Path) -> None:
    model = torch.nn.Linear(3, 1)
    # The save made at creation (step 0) is written; the one of step 1 fails.
    disk = FailingStorage(OSError(errno.EIO, "I/O error"), steps={1})
    hook = CheckpointSaverHook(str(tmp_path), save_steps=100, saver=Saver(storage=disk))
    sess = MonitoredTrainingSession(model, hooks=[hook])
    hook.wait_until_finished()  # the save made at creation is durable
    sess.run(lambda: None)
    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-1 failed"):
        sess.close()  # end() saves step 1, which fails: raised by end(), not again by the drain
    # The failure was raised once; closing again is the usual "closed twice" error, not it.
    with pytest.raises(RuntimeError, match="closed"):
        sess.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_file_holds_the_state_at_the_call_while_training_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 1)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    inputs = torch.randn(64, 256, device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()  # in place: parameters, BatchNorm buffers (in forward), AdamW state

    step()
    session = Session(model, optimizer)
    torch.cuda.synchronize()
    before = _clone_state(session)
    handle = Saver().save(session, str(tmp_path / "model.ckpt"), 1, blocking=False)
    for _ in range(5):
        session.run(step)  # enqueued right away: the guard orders it after the copies
    payload = load_checkpoint(handle.result(60))
    _assert_same_tensors(before["model"], payload["model"], "model")
    _assert_same_tensors(before["optimizer"]["state"], payload["optimizer"]["state"], "optimizer")
    after = _clone_state(session)
    assert not torch.equal(after["model"]["0.weight"], before["model"]["0.weight"])


def test_a_checkpoints_age_counts_from_the_save_call_not_from_its_commit(
    tmp_path: pathlib.Path, gate: GatedStorage, clock: Any
) -> None:
    # Keeps one older than 1 h.
    saver = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1, storage=gate)
    session = Session(torch.nn.Linear(1, 1))
    clock.advance(1800)
    first = saver.save(session, str(tmp_path / "model.ckpt"), 1, blocking=False)
    clock.advance(5400)  # the write is slow: it commits 2 h after the saver was made
    gate.open()
    first.result(30)
    saver.save(session, str(tmp_path / "model.ckpt"), 2)

    # Saved 30 min in, younger than the 1 h mark: deleted, not kept as an hourly checkpoint.
    assert not (tmp_path / "model.ckpt-1").exists()


class PriorityRecordingStorage(LocalStorage):
    """Records the CPU priority (nice value) of the thread each write runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.priorities: list[int] = []

    def write(self, path: str, payload: Any) -> None:
        self.priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        super().write(path, payload)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_runs_at_a_lower_cpu_priority_than_training(
    tmp_path: pathlib.Path,
) -> None:
    disk = PriorityRecordingStorage()
    Saver(storage=disk).save(Session(torch.nn.Linear(1, 1)), str(tmp_path / "m"), 1)
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert [min(19, training + 10)] == disk.priorities


class OrderListener(CheckpointSaverListener):
    # The save stays asynchronous: after_save at the first hook call after the commit.
    run_after_commit = True

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.calls: list[str] = []

    def before_save(self, session: Any, global_step_value: int) -> None:
        self.calls.append(f"before {global_step_value}")

    def after_save(self, session: Any, global_step_value: int) -> None:
        self.calls.append(f"after {global_step_value}")
        # The checkpoint after_save announces must still be there (max_to_keep=1).
        assert (self.directory / f"model.ckpt-{global_step_value}").exists()


def test_with_a_slow_writer_listener_calls_stay_paired_and_see_their_checkpoint(
    tmp_path: pathlib.Path, gate: GatedStorage, opener: OpenGateOnWarning
) -> None:
    model, optimizer = _bn_model_and_adamw()
    step = make_train_step(model, optimizer)
    listener = OrderListener(tmp_path)
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, saver=Saver(max_to_keep=1, storage=gate), listeners=[listener]
    )
    with MonitoredTrainingSession(model, optimizer, hooks=[hook]) as sess:
        sess.run(step)  # triggers while the save of step 0 is held: waits, then pairs
        sess.run(step)

    assert [
        "before 0", "after 0", "before 1", "after 1", "before 2", "after 2"
    ] == listener.calls  # fmt: skip
