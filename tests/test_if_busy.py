"""CheckpointSaverHook(if_busy=...): what a trigger does while the previous save is being written.

Writes are held by a ``GatedStorage`` until the test lets them through, and the test waits for
a released save through ``Saver.wait_for_previous_save`` before the next step: every outcome is
decided by the order of calls, never by timing.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterator

import pytest
import torch
from conftest import make_train_step
from storages import GatedStorage, GateOpeningSaver, WaitRecordingSaver, at_steps

from torch_ckpt_hook import (
    CheckpointSaverHook,
    CheckpointSaverListener,
    Saver,
    Session,
    SessionRunArgs,
    SessionRunContext,
    SessionRunValues,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
)
from torch_ckpt_hook._coordinator import Coordinator

IF_BUSY_LOGGER = "torch_ckpt_hook._if_busy"


class Loop:
    """A model, an optimizer and one hook, driven call by call as a runner would."""

    def __init__(self, hook: CheckpointSaverHook) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.session = Session(model, optimizer)
        self.hook = hook
        self._step = make_train_step(model, optimizer)
        hook.begin()
        hook.after_create_session(self.session, Coordinator())

    def run(self) -> None:
        context = SessionRunContext(SessionRunArgs(None), self.session)
        self.hook.before_run(context)
        self.session.run(self._step)
        self.hook.after_run(context, SessionRunValues(results=None))

    def end(self) -> None:
        self.hook.end(self.session)


def steps_written(gate: GatedStorage) -> list[int]:
    return [int(path.rsplit("-", 1)[1]) for path in gate.writes]


@pytest.fixture
def gate() -> Iterator[GatedStorage]:
    with GatedStorage() as storage:  # its exit opens it: never leave a writer thread parked
        yield storage


def test_if_busy_defaults_to_wait_and_every_trigger_saves_its_step(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    saver = GateOpeningSaver(gate, max_to_keep=None)
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver))
    for _ in range(3):
        loop.run()
    # The creation save and each trigger waited for the save before it (letting it through).
    assert ["wait_for_previous_save"] * 4 == [what for what, _error in saver.waits]
    loop.end()
    assert [0, 1, 2, 3] == steps_written(gate)
    assert 0 == loop.hook.skipped_saves


def test_skip_never_waits_for_the_write_in_flight_and_counts_the_skipped_triggers(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    saver = WaitRecordingSaver(max_to_keep=None, storage=gate)
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver, if_busy="skip"))
    waits_at_creation = list(saver.waits)  # the creation save's, with nothing in flight
    for _ in range(3):
        loop.run()  # steps 1-3: the creation save (step 0) is still held
    assert waits_at_creation == saver.waits, "a skipped trigger must not wait for the save"
    assert 3 == loop.hook.skipped_saves
    assert [str(tmp_path / "model.ckpt-0")] == gate.held
    assert [] == gate.writes
    gate.open()
    saver.wait_for_previous_save()  # step 0 is durable: the writer is free
    loop.run()  # step 4 finds the writer free and saves
    saver.wait_until_finished()
    assert [0, 4] == steps_written(gate)
    assert 3 == loop.hook.skipped_saves
    assert str(tmp_path / "model.ckpt-4") == latest_checkpoint(str(tmp_path))
    assert 4 == load_checkpoint(str(tmp_path / "model.ckpt-4"))["global_step"]


def test_skip_saves_a_skipped_trigger_at_the_next_step_that_finds_the_writer_free(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    # Only step 0's write is held; save_steps=3 fires at step 3 while it is.
    gate.holds = at_steps(0)
    saver = Saver(max_to_keep=None, storage=gate)
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=3, saver=saver, if_busy="skip"))
    for _ in range(3):
        loop.run()
    assert 1 == loop.hook.skipped_saves
    gate.open()
    saver.wait_for_previous_save()
    loop.run()  # step 4: not a trigger of its own, but the pending one saves now
    saver.wait_until_finished()
    assert [0, 4] == steps_written(gate)
    # The timer restarts at the save that was made: the next trigger is step 7.
    for _ in range(3):
        loop.run()
    saver.wait_until_finished()
    assert [0, 4, 7] == steps_written(gate)
    assert 1 == loop.hook.skipped_saves


def test_skip_logs_each_skipped_trigger_at_debug(
    tmp_path: pathlib.Path, gate: GatedStorage, caplog: pytest.LogCaptureFixture
) -> None:
    saver = Saver(max_to_keep=None, storage=gate)
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver, if_busy="skip"))
    with caplog.at_level(logging.DEBUG, logger=IF_BUSY_LOGGER):
        loop.run()
        loop.run()
    skipped = [r for r in caplog.records if r.name == IF_BUSY_LOGGER]
    assert [logging.DEBUG, logging.DEBUG] == [r.levelno for r in skipped]
    assert "Skipping the save of step 2 (if_busy='skip')" in skipped[1].getMessage()
    assert "(2 skipped)" in skipped[1].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], (
        "skipping is the point of 'skip': no 'save interval is shorter' warning"
    )


def test_skip_end_waits_for_the_write_in_flight_and_always_saves_the_last_step(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    saver = GateOpeningSaver(gate, max_to_keep=None)  # a wait lets the held write through
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver, if_busy="skip"))
    loop.run()
    loop.run()
    assert 2 == loop.hook.skipped_saves
    loop.end()
    assert [0, 2] == steps_written(gate)
    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert str(tmp_path / "model.ckpt-2") == state.model_checkpoint_path


class TFStyleListener(CheckpointSaverListener):
    """A default (``run_after_commit = False``) listener: the save step waits for its commit."""

    def __init__(self) -> None:
        self.after_save_steps: list[int] = []

    def after_save(self, session: Session, global_step_value: int) -> None:
        self.after_save_steps.append(global_step_value)


def test_skip_with_a_tf_style_listener_still_waits_at_each_save_step_and_skips_nothing(
    tmp_path: pathlib.Path, gate: GatedStorage
) -> None:
    listener = TFStyleListener()
    saver = GateOpeningSaver(gate, max_to_keep=None)
    hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, saver=saver, listeners=[listener], if_busy="skip"
    )
    loop = Loop(hook)
    for _ in range(3):
        loop.run()
    # Each save step waited for its own commit, so the next trigger found the writer free.
    assert [0, 1, 2, 3] == steps_written(gate)
    assert [0, 1, 2, 3] == listener.after_save_steps
    assert 0 == hook.skipped_saves
    loop.end()


def test_skip_keeps_one_write_at_a_time(tmp_path: pathlib.Path, gate: GatedStorage) -> None:
    saver = Saver(max_to_keep=None, storage=gate)
    loop = Loop(CheckpointSaverHook(str(tmp_path), save_steps=1, saver=saver, if_busy="skip"))
    loop.run()  # step 1: step 0 is held, skipped
    with gate.opened():
        saver.wait_for_previous_save()
    loop.run()  # step 2: the writer is free, saved (held)
    loop.run()  # step 3: skipped
    with gate.opened():
        saver.wait_for_previous_save()
    gate.open()
    loop.end()  # step 3 is unsaved: the final save
    assert [0, 2, 3] == steps_written(gate)
    assert 2 == loop.hook.skipped_saves
    assert 1 == gate.max_running


@pytest.mark.parametrize("value", ["never", "Skip", "", None, 1, True])
def test_if_busy_must_be_wait_or_skip(tmp_path: pathlib.Path, value: object) -> None:
    shown = repr(value) if isinstance(value, str) else f"{value!r} (a {type(value).__qualname__})"
    with pytest.raises(ValueError, match=r"^if_busy must be 'wait' .* or 'skip' .*, got ") as info:
        CheckpointSaverHook(str(tmp_path), save_steps=1, if_busy=value)  # type: ignore[arg-type]
    assert str(info.value).endswith(f"got {shown}")
