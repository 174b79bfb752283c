"""Tests of ``Saver``: naming, retention, the commit order, restore and failed writes.

``test_max_to_keep_*`` and ``test_keep_checkpoint_every_n_hours_*`` translate TensorFlow's
``saver_test.py`` ``MaxToKeepTest.testNonSharded`` and ``KeepCheckpointEveryNHoursTest.testNonSharded``
(TF-SEMANTICS.md §4.3, §4.4). Where SPEC.md differs from TensorFlow (``max_to_keep`` of None or 0
lists everything, every checkpoint over the limit goes at once, a new saver adopts the directory's
list), the test says so.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FakeClock, make_train_step
from storages import DiskFullStorage, RecordingStorage

from torch_ckpt_hook import (
    CheckpointCorruptedError,
    CheckpointSaveError,
    CheckpointSaverHook,
    MonitoredSession,
    Saver,
    Scaffold,
    Session,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
)

HEX32 = "0123456789abcdef" * 2


def _session(global_step: int = 0, **kwargs: Any) -> Session:
    return Session(torch.nn.Linear(2, 1), global_step=global_step, **kwargs)


def _state_text(directory: Path) -> str:
    return (directory / "checkpoint").read_text()


def _state(model: str, *paths: str) -> str:
    """The state file TensorFlow's text_format writes for these (relative) paths."""
    lines = [f'model_checkpoint_path: "{model}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in paths]
    return "\n".join(lines) + "\n"


def _listed(directory: Path) -> list[str]:
    """The names the state file lists, read from its text (no parsing by the package)."""
    return re.findall(r'^all_model_checkpoint_paths: "(.*)"$', _state_text(directory), re.M)


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _save_steps(directory: Path, steps: range, max_to_keep: int | None = None) -> list[str]:
    saver = Saver(max_to_keep=max_to_keep)
    prefix = str(directory / "model.ckpt")
    return [saver.save(_session(step), prefix, global_step=step) for step in steps]


# ---------------------------------------------------------------------------------------------
# max_to_keep


def test_max_to_keep_follows_tensorflows_max_to_keep_test(tmp_path: Path) -> None:
    """TF ``MaxToKeepTest.testNonSharded``: the table of TF-SEMANTICS.md §4.3, row by row."""
    session = _session()
    save = Saver(max_to_keep=2)
    s1, s2, s3 = (str(tmp_path / name) for name in ("s1", "s2", "s3"))
    assert [] == save.last_checkpoints

    assert s1 == save.save(session, s1)
    assert [s1] == save.last_checkpoints
    assert os.path.exists(s1)
    assert _state("s1", "s1") == _state_text(tmp_path)

    assert s2 == save.save(session, s2)
    assert [s1, s2] == save.last_checkpoints
    assert os.path.exists(s1)
    assert os.path.exists(s2)
    assert _state("s2", "s1", "s2") == _state_text(tmp_path)

    assert s3 == save.save(session, s3)
    assert [s2, s3] == save.last_checkpoints
    assert not os.path.exists(s1), "the oldest checkpoint over max_to_keep is deleted"
    assert os.path.exists(s2)
    assert os.path.exists(s3)
    assert _state("s3", "s2", "s3") == _state_text(tmp_path)

    # A second saver with the same settings, on its own copy of the list (TF: set_last_checkpoints).
    save2 = Saver(max_to_keep=2)
    save2.recover_last_checkpoints(save.last_checkpoints)
    assert [s2, s3] == save2.last_checkpoints

    # Re-saving an existing name moves it to the end; nothing is over the limit.
    assert s2 == save.save(session, s2)
    assert [s3, s2] == save.last_checkpoints
    assert os.path.exists(s3)
    assert os.path.exists(s2)
    assert _state("s2", "s3", "s2") == _state_text(tmp_path)

    # s1 comes back; s3 is now the oldest and goes.
    assert s1 == save.save(session, s1)
    assert [s2, s1] == save.last_checkpoints
    assert not os.path.exists(s3)
    assert os.path.exists(s2)
    assert _state("s1", "s2", "s1") == _state_text(tmp_path)

    # The second saver works on its own list: re-saving s2 moves it, deletes nothing.
    assert s2 == save2.save(session, s2)
    assert [s3, s2] == save2.last_checkpoints
    assert os.path.exists(s1), "created by the first saver, not in the second's list"
    assert not os.path.exists(s3), "deleted by the first saver"


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_max_to_keep_none_or_zero_keeps_and_lists_every_checkpoint(
    tmp_path: Path, max_to_keep: int | None
) -> None:
    """TF kept the files but listed only the newest (#13381); SPEC.md lists them all."""
    saver = Saver(max_to_keep=max_to_keep)
    prefix = str(tmp_path / "model.ckpt")
    paths = [saver.save(_session(step), prefix, global_step=step) for step in range(1, 8)]

    assert paths == saver.last_checkpoints
    assert all(os.path.exists(p) for p in paths)
    names = [f"model.ckpt-{step}" for step in range(1, 8)]
    assert _state("model.ckpt-7", *names) == _state_text(tmp_path)
    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert tuple(paths) == state.all_model_checkpoint_paths


def test_a_new_saver_deletes_every_checkpoint_over_the_limit_on_its_first_save(
    tmp_path: Path,
) -> None:
    """TF deleted one per save, so a longer recovered list never shrank (PR #18249)."""
    _save_steps(tmp_path, range(1, 6))
    assert [f"model.ckpt-{s}" for s in range(1, 6)] == _listed(tmp_path)

    saver = Saver(max_to_keep=2)
    saver.save(_session(6), str(tmp_path / "model.ckpt"), global_step=6)

    # Five listed plus the new one, two kept: four deleted at once.
    assert {"checkpoint", "model.ckpt-5", "model.ckpt-6"} == _files(tmp_path)
    assert [str(tmp_path / "model.ckpt-5"), str(tmp_path / "model.ckpt-6")] == (
        saver.last_checkpoints
    )
    assert _state("model.ckpt-6", "model.ckpt-5", "model.ckpt-6") == _state_text(tmp_path)


def test_resaving_a_listed_name_in_a_resumed_directory_deletes_the_rest_over_the_limit(
    tmp_path: Path,
) -> None:
    """Five listed, re-save the newest name with max_to_keep=2: the three oldest go at once."""
    paths = _save_steps(tmp_path, range(1, 6))
    saver = Saver(max_to_keep=2)

    saver.save(_session(5), str(tmp_path / "model.ckpt"), global_step=5)

    assert {"checkpoint", "model.ckpt-4", "model.ckpt-5"} == _files(tmp_path)
    assert paths[3:] == saver.last_checkpoints
    assert _state("model.ckpt-5", "model.ckpt-4", "model.ckpt-5") == _state_text(tmp_path)


def test_recover_last_checkpoints_from_adopts_the_state_files_list(tmp_path: Path) -> None:
    """TF #16025: after a restart the list used to start empty and checkpoints piled up."""
    paths = _save_steps(tmp_path, range(1, 4))
    saver = Saver(max_to_keep=3)

    saver.recover_last_checkpoints_from(str(tmp_path))

    assert paths == saver.last_checkpoints
    saver.save(_session(4), str(tmp_path / "model.ckpt"), global_step=4)
    assert [*paths[1:], str(tmp_path / "model.ckpt-4")] == saver.last_checkpoints
    assert not os.path.exists(paths[0])
    assert ["model.ckpt-2", "model.ckpt-3", "model.ckpt-4"] == _listed(tmp_path)


def test_recover_last_checkpoints_from_drops_checkpoints_that_are_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _save_steps(tmp_path, range(1, 4))
    os.remove(paths[1])
    saver = Saver(max_to_keep=3)

    with caplog.at_level(logging.WARNING):
        saver.recover_last_checkpoints_from(str(tmp_path))

    assert [paths[0], paths[2]] == saver.last_checkpoints
    assert any(paths[1] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_new_saver_adopts_the_directorys_list_on_its_first_save(tmp_path: Path) -> None:
    """No explicit recovery: the first save into a directory with a state file adopts its list."""
    paths = _save_steps(tmp_path, range(1, 4))
    saver = Saver(max_to_keep=3)

    saver.save(_session(4), str(tmp_path / "model.ckpt"), global_step=4)

    assert [*paths[1:], str(tmp_path / "model.ckpt-4")] == saver.last_checkpoints
    assert {"checkpoint", "model.ckpt-2", "model.ckpt-3", "model.ckpt-4"} == _files(tmp_path)
    assert _state("model.ckpt-4", "model.ckpt-2", "model.ckpt-3", "model.ckpt-4") == _state_text(
        tmp_path
    )


def test_resaving_by_a_relative_path_after_recovery_counts_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovered list holds joined paths; a relative spelling of one is the same file.

    TF-style ``save(sess, "train/model.ckpt", ...)`` from the working directory must not list
    ``model.ckpt-2`` twice and later delete it while the state file still names it.
    """
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    first = Saver(max_to_keep=2)
    for step in (1, 2):
        first.save(_session(step), "train/model.ckpt", global_step=step)

    saver = Saver(max_to_keep=2)
    saver.save(_session(2), "train/model.ckpt", global_step=2)
    saver.save(_session(3), "train/model.ckpt", global_step=3)

    assert ["model.ckpt-2", "model.ckpt-3"] == _listed(tmp_path / "train")
    assert {"checkpoint", "model.ckpt-2", "model.ckpt-3"} == _files(tmp_path / "train"), (
        "model.ckpt-2 is listed, so it must still exist"
    )
    assert 2 == len(saver.last_checkpoints), saver.last_checkpoints


# ---------------------------------------------------------------------------------------------
# keep_checkpoint_every_n_hours


def test_keep_checkpoint_every_n_hours_follows_tensorflows_test(
    tmp_path: Path, clock: FakeClock
) -> None:
    """TF ``KeepCheckpointEveryNHoursTest.testNonSharded`` with the clock mocked (§4.4)."""
    session = _session()
    save = Saver(max_to_keep=2, keep_checkpoint_every_n_hours=0.7 / 3600)  # threshold T+0.7
    assert [] == save.last_checkpoints
    clock.advance(1.0)
    s1 = save.save(session, str(tmp_path / "s1"))
    assert [s1] == save.last_checkpoints
    s2 = save.save(session, str(tmp_path / "s2"))
    assert [s1, s2] == save.last_checkpoints

    # s1 (T+1.0 > T+0.7) is popped and kept; the threshold moves to T+1.4.
    s3 = save.save(session, str(tmp_path / "s3"))
    assert [s2, s3] == save.last_checkpoints
    # s2 (T+1.0, not > T+1.4) is popped and deleted.
    s4 = save.save(session, str(tmp_path / "s4"))
    assert [s3, s4] == save.last_checkpoints

    assert os.path.exists(s1), "kept by keep_checkpoint_every_n_hours"
    assert not os.path.exists(s2)
    assert os.path.exists(s3)
    assert os.path.exists(s4)
    assert _state("s4", "s3", "s4") == _state_text(tmp_path), "a kept checkpoint is unlisted"


# ---------------------------------------------------------------------------------------------
# Naming and arguments


def test_save_with_a_global_step_writes_and_returns_path_dash_step(tmp_path: Path) -> None:
    path = Saver().save(_session(), str(tmp_path / "model.ckpt"), global_step=7)

    assert str(tmp_path / "model.ckpt-7") == path
    assert {"checkpoint", "model.ckpt-7"} == _files(tmp_path)


def test_save_without_a_global_step_writes_the_path_itself(tmp_path: Path) -> None:
    path = Saver().save(_session(), str(tmp_path / "model.ckpt"))

    assert str(tmp_path / "model.ckpt") == path
    assert {"checkpoint", "model.ckpt"} == _files(tmp_path)


def test_a_save_path_named_checkpoint_collides_with_the_state_file(tmp_path: Path) -> None:
    """TF ``checkpoint_management_test`` ``testNameCollision``."""
    with pytest.raises(ValueError, match=r"'latest_filename' collides with 'save_path'"):
        Saver().save(_session(), str(tmp_path / "checkpoint"))
    assert set() == _files(tmp_path)


def test_global_step_names_the_file_and_the_payload_holds_the_sessions_step(
    tmp_path: Path,
) -> None:
    path = Saver().save(_session(11), str(tmp_path / "model.ckpt"), global_step=7)

    assert str(tmp_path / "model.ckpt-7") == path
    assert 11 == load_checkpoint(path)["global_step"]


def test_a_missing_parent_directory_is_a_value_error_naming_it(tmp_path: Path) -> None:
    save_path = str(tmp_path / "missing" / "model.ckpt")

    with pytest.raises(
        ValueError,
        match=rf"^Parent directory of {re.escape(save_path)}-3 doesn't exist, can't save\.$",
    ):
        Saver().save(_session(), save_path, global_step=3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"max_to_keep": -1},
            ValueError,
            r"max_to_keep must be a non-negative int or None, got -1",
        ),
        (
            {"max_to_keep": "5"},
            TypeError,
            r"max_to_keep must be a non-negative int or None, got '5' \(a str\)",
        ),
        (
            {"keep_checkpoint_every_n_hours": 0},
            ValueError,
            r"keep_checkpoint_every_n_hours must be a positive number, got 0",
        ),
        (
            {"keep_checkpoint_every_n_hours": -1},
            ValueError,
            r"keep_checkpoint_every_n_hours must be a positive number, got -1",
        ),
        (
            {"drain_timeout_secs": 0},
            ValueError,
            r"drain_timeout_secs must be a positive number or None, got 0",
        ),
        (
            {"keep_checkpoint_every_n_steps": 0},
            ValueError,
            r"keep_checkpoint_every_n_steps must be a positive int or None, got 0",
        ),
        (
            {"keep_checkpoint_every_n_steps": 2.5},
            TypeError,
            r"keep_checkpoint_every_n_steps must be a positive int or None, got 2.5 \(a float\)",
        ),
        (
            {"keep_checkpoint_every_n_steps": True},
            TypeError,
            r"keep_checkpoint_every_n_steps must be a positive int or None, got True \(a bool\)",
        ),
    ],
)
def test_bad_constructor_arguments_are_errors_naming_argument_and_value(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"^{message}$"):
        Saver(**kwargs)


def test_non_blocking_save_returns_a_handle_whose_result_is_the_path(tmp_path: Path) -> None:
    saver = Saver()
    handle = saver.save(_session(3), str(tmp_path / "model.ckpt"), global_step=3, blocking=False)

    path = handle.result()
    saver.wait_until_finished()

    assert handle.done()
    assert str(tmp_path / "model.ckpt-3") == path
    assert 3 == load_checkpoint(path)["global_step"]
    assert [path] == saver.last_checkpoints
    assert path == latest_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Commit order and stray temporary files


def test_the_state_file_is_replaced_before_old_checkpoints_are_deleted(tmp_path: Path) -> None:
    """Checkpoint durable, then the state file replaced, then deletions (SPEC §3)."""
    disk = RecordingStorage()
    saver = Saver(max_to_keep=2, storage=disk)
    prefix = str(tmp_path / "model.ckpt")
    for step in (1, 2):
        saver.save(_session(step), prefix, global_step=step)

    listed_at_removal: dict[str, list[str]] = {}

    def look(method: str, path: str) -> None:
        # On the writer thread: a failed assert fails the save, with the AssertionError as cause.
        if method == "delete":
            listed_at_removal[os.path.basename(path)] = _listed(tmp_path)
            return
        missing = [n for n in _listed(tmp_path) if not (tmp_path / n).exists()]
        assert [] == missing, f"the state file names missing files after {method}({path})"

    disk.calls.clear()
    disk.on_call = look
    saver.save(_session(3), prefix, global_step=3)

    assert [
        ("write", "model.ckpt-3"),
        ("write_state", "model.ckpt-3"),
        ("delete", "model.ckpt-1"),
    ] == [(method, os.path.basename(path)) for method, path in disk.calls]
    assert {"model.ckpt-1": ["model.ckpt-2", "model.ckpt-3"]} == listed_at_removal


def test_the_state_file_never_names_a_missing_checkpoint_between_saves(tmp_path: Path) -> None:
    saver = Saver(max_to_keep=3)
    for step in range(1, 10):
        saver.save(_session(step), str(tmp_path / "model.ckpt"), global_step=step)
        listed = _listed(tmp_path)
        assert [f"model.ckpt-{s}" for s in range(max(1, step - 2), step + 1)] == listed
        assert all((tmp_path / name).exists() for name in listed)


def test_the_first_save_removes_stray_temp_files_and_keeps_other_files(tmp_path: Path) -> None:
    _save_steps(tmp_path, range(1, 3))
    strays = {f"model.ckpt-3.tmp-{HEX32}", f"checkpoint.tmp-{HEX32}"}
    others = {"notes.txt", "model.ckpt-3.tmp-notours", f"model.ckpt-3.tmp-{HEX32}0"}
    for name in strays | others:
        (tmp_path / name).write_bytes(b"partial")

    Saver().save(_session(3), str(tmp_path / "model.ckpt"), global_step=3)

    expected = {"checkpoint", "model.ckpt-1", "model.ckpt-2", "model.ckpt-3"} | others
    assert expected == _files(tmp_path)


def test_the_first_save_after_recovering_a_directory_removes_stray_temp_files(
    tmp_path: Path,
) -> None:
    """The runner recovers the list before any save: the cleanup must still happen."""
    _save_steps(tmp_path, range(1, 3))
    stray = f"model.ckpt-3.tmp-{HEX32}"
    (tmp_path / stray).write_bytes(b"partial")
    saver = Saver()
    saver.recover_last_checkpoints_from(str(tmp_path))

    saver.save(_session(3), str(tmp_path / "model.ckpt"), global_step=3)

    assert stray not in _files(tmp_path), "a stray temporary file survived the first save"
    assert {"checkpoint", "model.ckpt-1", "model.ckpt-2", "model.ckpt-3"} == _files(tmp_path)


# ---------------------------------------------------------------------------------------------
# Restore


class Counter:
    """A small stateful object for ``extra_state``."""

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.count = state_dict["count"]


def _adamw_session(seed: int) -> tuple[Session, torch.optim.lr_scheduler.LRScheduler, Counter]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counter = Counter()
    session = Session(model, optimizer, extra_state={"scheduler": scheduler, "counter": counter})
    return session, scheduler, counter


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_restore_loads_model_optimizer_step_extra_state_and_rng(tmp_path: Path) -> None:
    session, scheduler, counter = _adamw_session(seed=0)
    step = make_train_step(session.model, session.optimizer)  # type: ignore[arg-type]
    for _ in range(3):
        step()
        scheduler.step()
    counter.count = 42
    path = Saver().save(session, str(tmp_path / "model.ckpt"), global_step=session.global_step)
    after_save = _draws()
    saved_model = {k: v.clone() for k, v in session.model.state_dict().items()}
    saved_optimizer = session.optimizer.state_dict()  # type: ignore[union-attr]

    restored, restored_scheduler, restored_counter = _adamw_session(seed=1)
    random.seed(7)
    np.random.seed(7)
    Saver().restore(restored, path)
    after_restore = _draws()

    assert 3 == restored.global_step
    assert saved_model.keys() == restored.model.state_dict().keys()
    for name, value in restored.model.state_dict().items():
        assert torch.equal(saved_model[name], value), f"model parameter {name}"
    optimizer_state = restored.optimizer.state_dict()  # type: ignore[union-attr]
    assert saved_optimizer["param_groups"] == optimizer_state["param_groups"]
    for index, state in saved_optimizer["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], optimizer_state["state"][index][key]), (index, key)
    assert scheduler.state_dict() == restored_scheduler.state_dict()
    assert 0.1 * 0.5**3 == pytest.approx(restored_scheduler.get_last_lr()[0])
    assert 42 == restored_counter.count
    assert after_save[:2] == after_restore[:2], "Python and NumPy draws after restore"
    assert torch.equal(after_save[2], after_restore[2]), "torch draw after restore"


def test_restore_of_a_missing_path_is_a_value_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "model.ckpt-3")

    with pytest.raises(ValueError, match=rf"not a valid checkpoint: {re.escape(missing)}"):
        Saver().restore(_session(), missing)


def test_restore_of_none_is_tensorflows_value_error() -> None:
    with pytest.raises(ValueError, match=r"^Can't load save_path when it is None\.$"):
        Saver().restore(_session(), None)  # type: ignore[arg-type]


def test_restore_of_a_truncated_checkpoint_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = Saver().save(_session(5), str(tmp_path / "model.ckpt"), global_step=5)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    session = _session(1)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}

    with pytest.raises(CheckpointCorruptedError, match=re.escape(path)):
        Saver().restore(session, path)

    assert 1 == session.global_step
    for name, value in session.model.state_dict().items():
        assert torch.equal(before[name], value), name


def test_a_moved_directory_still_resolves_and_restores_the_newest(tmp_path: Path) -> None:
    """TF wrote absolute paths, so a moved directory broke (#571, #9146); these are relative."""
    old = tmp_path / "old"
    old.mkdir()
    saver = Saver()
    for step in (1, 2, 3):
        saver.save(_session(step), str(old / "model.ckpt"), global_step=step)
    new = tmp_path / "new"

    shutil.move(str(old), str(new))

    assert str(new / "model.ckpt-3") == latest_checkpoint(str(new))
    state = get_checkpoint_state(str(new))
    assert state is not None
    assert str(new / "model.ckpt-3") == state.model_checkpoint_path
    assert tuple(str(new / f"model.ckpt-{s}") for s in (1, 2, 3)) == (
        state.all_model_checkpoint_paths
    )
    session = _session()
    Saver().restore(session, state.model_checkpoint_path)
    assert 3 == session.global_step


# ---------------------------------------------------------------------------------------------
# Through the runner


def test_a_restarted_runners_saver_carries_on_retention(tmp_path: Path) -> None:
    """MonitoredSession restores the newest, then its saver prunes the old run's checkpoints."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)
    first = Saver(max_to_keep=None)
    session = Session(model, optimizer)
    for _ in range(4):
        step()
        first.save(session, str(tmp_path / "model.ckpt"), global_step=session.global_step)
    saved_weight = model.weight.detach().clone()
    session.close()

    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaffold = Scaffold(saver=Saver(max_to_keep=2))
    hook = CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=scaffold)
    with MonitoredSession(
        model, optimizer, checkpoint_dir=str(tmp_path), scaffold=scaffold, hooks=[hook]
    ) as sess:
        assert 4 == sess.global_step
        assert torch.equal(saved_weight, model.weight.detach())
        assert {f"model.ckpt-{s}" for s in range(1, 5)} <= _files(tmp_path), (
            "restoring saves nothing and deletes nothing"
        )
        train_step = make_train_step(model, optimizer)
        sess.run(train_step)
        sess.run(train_step)

    assert {"checkpoint", "model.ckpt-5", "model.ckpt-6"} == _files(tmp_path)
    assert ["model.ckpt-5", "model.ckpt-6"] == _listed(tmp_path)
    assert scaffold.saver is not None
    assert [str(tmp_path / "model.ckpt-5"), str(tmp_path / "model.ckpt-6")] == (
        scaffold.saver.last_checkpoints
    )


# ---------------------------------------------------------------------------------------------
# Write failures


def _block_the_name(path: str) -> None:
    """Make the commit of ``path`` fail after its bytes are written: a directory holds the name."""
    os.mkdir(path)
    Path(path, "keep").write_text("the rename onto a non-empty directory fails")


def test_a_failed_write_raises_checkpoint_save_error_and_keeps_earlier_checkpoints(
    tmp_path: Path,
) -> None:
    saver = Saver(max_to_keep=2)
    prefix = str(tmp_path / "model.ckpt")
    paths = [saver.save(_session(step), prefix, global_step=step) for step in (1, 2)]
    state_before = _state_text(tmp_path)

    _block_the_name(f"{prefix}-3")
    with pytest.raises(CheckpointSaveError, match=re.escape(f"{prefix}-3")) as excinfo:
        saver.save(_session(3), prefix, global_step=3)

    assert excinfo.value.__cause__ is not None
    assert not isinstance(excinfo.value.__cause__, CheckpointSaveError)
    assert {"checkpoint", "model.ckpt-1", "model.ckpt-2", "model.ckpt-3"} == _files(tmp_path), (
        "no temp file"
    )
    assert paths == saver.last_checkpoints
    assert state_before == _state_text(tmp_path)
    assert 2 == load_checkpoint(paths[1])["global_step"]


def test_a_write_error_is_the_cause_of_the_checkpoint_save_error(tmp_path: Path) -> None:
    disk = DiskFullStorage(room=10, armed=False)  # armed: 10 bytes in, the write fails
    saver = Saver(max_to_keep=2, storage=disk)
    prefix = str(tmp_path / "model.ckpt")
    first = saver.save(_session(1), prefix, global_step=1)

    disk.arm()
    with pytest.raises(CheckpointSaveError, match=r"No space left on device") as excinfo:
        saver.save(_session(2), prefix, global_step=2)

    assert [excinfo.value.__cause__] == disk.raised, "the disk's own error, not a wrapper"
    assert errno.ENOSPC == disk.raised[0].errno
    assert {"checkpoint", "model.ckpt-1"} == _files(tmp_path)
    assert [first] == saver.last_checkpoints
    assert first == latest_checkpoint(str(tmp_path))


def test_a_failed_non_blocking_save_raises_from_result(tmp_path: Path) -> None:
    saver = Saver()
    _block_the_name(str(tmp_path / "model.ckpt-3"))

    handle = saver.save(_session(3), str(tmp_path / "model.ckpt"), global_step=3, blocking=False)

    with pytest.raises(CheckpointSaveError) as excinfo:
        handle.result()
    assert excinfo.value.__cause__ is not None
    assert {"model.ckpt-3"} == _files(tmp_path)
    assert [] == saver.last_checkpoints


def test_a_checkpoint_deleted_behind_the_savers_back_is_never_named_in_the_state_file(
    tmp_path: Path,
) -> None:
    save = Saver(max_to_keep=None)
    session = _session()
    s1, s2, s3 = (str(tmp_path / name) for name in ("s1", "s2", "s3"))
    save.save(session, s1)
    save.save(session, s2)
    os.remove(s1)

    save.save(session, s3)

    assert _state("s3", "s2", "s3") == _state_text(tmp_path)
    assert [s1, s2, s3] == save.last_checkpoints, "the saver's own list is TensorFlow's"


# ---------------------------------------------------------------------------------------------
# keep_checkpoint_every_n_steps (milestones)


def test_milestones_stay_on_disk_unlisted_when_max_to_keep_drops_them(tmp_path: Path) -> None:
    saver = Saver(max_to_keep=2, keep_checkpoint_every_n_steps=10)
    prefix = str(tmp_path / "model.ckpt")
    for step in range(0, 35, 5):
        saver.save(_session(step), prefix, global_step=step)

    assert ["model.ckpt-25", "model.ckpt-30"] == _listed(tmp_path)
    on_disk = {"model.ckpt-10", "model.ckpt-20", "model.ckpt-25", "model.ckpt-30", "checkpoint"}
    assert on_disk == _files(tmp_path), "0 is no milestone; 5 and 15 are not multiples of 10"


def test_milestones_are_kept_by_a_saver_that_adopted_the_directory(tmp_path: Path) -> None:
    prefix = str(tmp_path / "model.ckpt")
    first = Saver(max_to_keep=3)
    for step in (3, 4, 6):
        first.save(_session(step), prefix, global_step=step)

    resumed = Saver(max_to_keep=1, keep_checkpoint_every_n_steps=2)
    resumed.save(_session(7), prefix, global_step=7)

    assert ["model.ckpt-7"] == _listed(tmp_path)
    assert {"model.ckpt-4", "model.ckpt-6", "model.ckpt-7", "checkpoint"} == _files(tmp_path)


def test_without_keep_checkpoint_every_n_steps_every_dropped_checkpoint_is_deleted(
    tmp_path: Path,
) -> None:
    _save_steps(tmp_path, range(0, 40, 10), max_to_keep=1)

    assert {"model.ckpt-30", "checkpoint"} == _files(tmp_path)


# ---------------------------------------------------------------------------------------------
# extra_payload


def test_extra_payload_adds_its_keys_to_this_checkpoint_only(tmp_path: Path) -> None:
    saver = Saver()
    prefix = str(tmp_path / "model.ckpt")
    with_metrics = saver.save(
        _session(1), prefix, global_step=1, extra_payload={"metrics": {"loss": 0.5}}
    )
    plain = saver.save(_session(2), prefix, global_step=2)

    assert {"loss": 0.5} == load_checkpoint(with_metrics)["metrics"]
    assert "metrics" not in load_checkpoint(plain)
    _session().load_state_dict(load_checkpoint(with_metrics))  # restore ignores the key


@pytest.mark.parametrize("key", ["model", "global_step", "rng", "rank_rng"])
def test_extra_payload_cannot_replace_a_payload_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^extra_payload must not set '{key}', a key of the"):
        Saver().save(_session(), str(tmp_path / "model.ckpt"), 1, extra_payload={key: 1})
    assert [] == list(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([("metrics", 1)], r"^extra_payload must be a dict of str -> value or None, got \["),
        ({1: "x"}, r"^extra_payload keys must be str, got 1 \(an int\)$"),
        ({"metrics": np.float32(1.0)}, r"^cannot save: metrics is a numpy.float32"),
    ],
)
def test_a_bad_extra_payload_is_a_type_error_before_anything_is_written(
    tmp_path: Path, extra: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Saver().save(_session(), str(tmp_path / "model.ckpt"), 1, extra_payload=extra)
    assert [] == list(tmp_path.iterdir())
