"""Trying to make the package lose a run: hostile state files, two writers, copied directories,
unrestorable checkpoints, clocks that jump, and files that are not files (SPEC.md §5.1).

Every test here names the way a run could be lost and checks that it is not: no file we did not
write is deleted, a committed checkpoint stays restorable, and when a directory holds checkpoints
that cannot be restored, session creation stops with an error instead of training from step 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FakeClock, call_within, make_train_step

from torch_ckpt_hook import (
    BestCheckpointSaverHook,
    CheckpointCorruptedError,
    CheckpointSaverHook,
    CheckpointUnloadableError,
    MonitoredSession,
    MonitoredTrainingSession,
    Saver,
    Scaffold,
    Session,
    SessionRunHook,
    SingularMonitoredSession,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    restorable_checkpoint,
)
from torch_ckpt_hook._fsutil import atomic_write, is_temp_file, remove_stray_temp_files

ROOT = Path(__file__).resolve().parent.parent


def _session(global_step: int = 0, **kwargs: Any) -> Session:
    model, optimizer = _model_and_optimizer()
    return Session(model, optimizer, global_step=global_step, **kwargs)


def _save_steps(directory: Path, steps: range, max_to_keep: int | None = None) -> list[str]:
    saver = Saver(max_to_keep=max_to_keep)
    prefix = str(directory / "model.ckpt")
    return [saver.save(_session(step), prefix, global_step=step) for step in steps]


def _write_state(directory: Path, *paths: str) -> None:
    lines = [f'model_checkpoint_path: "{paths[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in paths]
    (directory / "checkpoint").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Retention deletes only its own files


def test_a_hostile_state_file_never_makes_retention_delete_what_it_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("a file outside the run directory")
    elsewhere = tmp_path / "elsewhere" / "model.ckpt-1"
    elsewhere.parent.mkdir()
    _save_steps(elsewhere.parent, range(1, 2))  # a real checkpoint, in another directory
    (run / "train.py").write_text("print('the user's training script')")
    (run / "data.bin").write_bytes(b"\0" * 100)
    (run / "model.ckpt-2").write_text("not a checkpoint, though named like one")
    torch.save({"weights": torch.ones(2)}, run / "model.ckpt-3")  # plain torch.save: no trailer
    (run / "model.ckpt-4").mkdir()
    os.symlink(elsewhere, run / "model.ckpt-5")
    (run / "best.ckpt-6").write_bytes((run / "data.bin").read_bytes())
    names = [
        "../victim",
        str(elsewhere),
        "train.py",
        "data.bin",
        "checkpoint",
        "model.ckpt-2",
        "model.ckpt-3",
        "model.ckpt-4",
        "model.ckpt-5",
        "best.ckpt-6",
    ]
    _write_state(run, *names)
    before = {p: p.stat().st_mtime for p in (victim, elsewhere)}

    saver = Saver(max_to_keep=1)
    with caplog.at_level(logging.WARNING):
        for step in range(10, 14):
            saver.save(_session(step), str(run / "model.ckpt"), global_step=step)

    assert victim.exists()
    assert elsewhere.exists()
    assert before == {p: p.stat().st_mtime for p in (victim, elsewhere)}
    for name in ("train.py", "data.bin", "model.ckpt-2", "model.ckpt-3", "best.ckpt-6"):
        assert (run / name).is_file(), f"{name} was deleted"
    assert (run / "model.ckpt-4").is_dir()
    assert (run / "model.ckpt-5").is_symlink()
    assert [str(run / "model.ckpt-13")] == saver.last_checkpoints
    assert not (run / "model.ckpt-10").exists(), "the saver's own checkpoints are still pruned"
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("victim", "train.py", "data.bin", "model.ckpt-2", "model.ckpt-3"):
        assert name in warned, f"no warning names {name}"


def test_a_tampered_checkpoint_replaced_after_it_was_listed_is_not_deleted(tmp_path: Path) -> None:
    """The proof is checked again right before deleting: the file may have changed since."""
    saver = Saver(max_to_keep=1)
    first = saver.save(_session(1), str(tmp_path / "model.ckpt"), global_step=1)
    os.remove(first)
    Path(first).write_text("the user's notes, saved under an unlucky name")

    saver.save(_session(2), str(tmp_path / "model.ckpt"), global_step=2)

    assert "the user's notes, saved under an unlucky name" == Path(first).read_text()


def test_a_copied_run_directory_resumes_from_its_own_files_and_never_prunes_the_original(
    tmp_path: Path,
) -> None:
    """A TensorFlow-style state file holds absolute paths; a copy of the directory keeps them."""
    original = tmp_path / "original"
    original.mkdir()
    paths = _save_steps(original, range(1, 4), max_to_keep=3)
    # TF wrote absolute paths.
    _write_state(original, *paths)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = sorted(os.listdir(original))

    model, optimizer = _model_and_optimizer()
    hooks = [CheckpointSaverHook(str(copy), save_steps=1, saver=Saver(max_to_keep=1))]
    with SingularMonitoredSession(model, optimizer, hooks=hooks, checkpoint_dir=str(copy)) as sess:
        assert str(copy / "model.ckpt-3") == sess.raw_session().restored_from
        step = make_train_step(model, optimizer)
        for _ in range(3):
            sess.run(step)

    assert before == sorted(os.listdir(original))
    assert all(load_checkpoint(p) for p in paths)
    assert str(copy / "model.ckpt-6") == latest_checkpoint(str(copy))


def test_a_copied_state_file_alone_never_prunes_the_directory_it_names(tmp_path: Path) -> None:
    original = tmp_path / "original"
    original.mkdir()
    paths = _save_steps(original, range(1, 4), max_to_keep=3)
    _write_state(original, *paths)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(original / "checkpoint", copy / "checkpoint")

    saver = Saver(max_to_keep=1)
    for step in range(4, 7):
        saver.save(_session(step), str(copy / "model.ckpt"), global_step=step)

    assert all(os.path.exists(p) for p in paths)
    assert [str(copy / "model.ckpt-6")] == saver.last_checkpoints


def test_a_saver_saving_into_two_directories_keeps_each_directorys_newest(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    saver = Saver(max_to_keep=1)

    saver.save(_session(1), str(a / "model.ckpt"), global_step=1)
    saver.save(_session(2), str(b / "model.ckpt"), global_step=2)
    saver.save(_session(3), str(a / "model.ckpt"), global_step=3)

    assert str(a / "model.ckpt-3") == latest_checkpoint(str(a))
    assert str(b / "model.ckpt-2") == latest_checkpoint(str(b))
    assert {"checkpoint", "model.ckpt-3"} == set(os.listdir(a))
    assert {"checkpoint", "model.ckpt-2"} == set(os.listdir(b))


# ---------------------------------------------------------------------------------------------
# Two writers in one directory


def test_the_cleanup_leaves_a_temporary_file_that_is_still_being_written(tmp_path: Path) -> None:
    writing, release = threading.Event(), threading.Event()

    def slow_write(f: Any) -> None:
        f.write(b"first half")
        writing.set()
        assert release.wait(10)
        f.write(b", second half")

    target = tmp_path / "model.ckpt-1"
    writer = threading.Thread(target=atomic_write, args=(target, slow_write))
    writer.start()
    assert writing.wait(10)
    try:
        assert [] == remove_stray_temp_files(tmp_path)
        assert 1 == len([n for n in os.listdir(tmp_path) if is_temp_file(n)])
    finally:
        release.set()
        writer.join(10)
    assert b"first half, second half" == target.read_bytes()


def test_a_second_savers_first_save_never_breaks_a_save_in_flight(tmp_path: Path) -> None:
    """A hand-added hook next to the runner's: its first save cleans the directory."""
    writing, release = threading.Event(), threading.Event()

    def slow_write(f: Any) -> None:
        f.write(b"the first saver's checkpoint")
        writing.set()
        assert release.wait(10)

    first = threading.Thread(target=atomic_write, args=(tmp_path / "model.ckpt-1", slow_write))
    first.start()
    assert writing.wait(10)
    try:
        Saver().save(_session(1), str(tmp_path / "other.ckpt"), global_step=1)
    finally:
        release.set()
        first.join(10)
    assert b"the first saver's checkpoint" == (tmp_path / "model.ckpt-1").read_bytes()
    assert load_checkpoint(tmp_path / "other.ckpt-1")


_HOLD_A_TEMP_FILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from torch_ckpt_hook._fsutil import atomic_write

    def write(f):
        f.write(b"from the other process")
        f.flush()
        print("writing", flush=True)
        sys.stdin.readline()

    atomic_write({target!r}, write)
    print("committed", flush=True)
    """
)


def _hold_temp_file(target: Path) -> subprocess.Popen[str]:
    code = _HOLD_A_TEMP_FILE.format(root=str(ROOT), target=str(target))
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert "writing" == child.stdout.readline().strip()
    return child


@pytest.mark.slow
def test_a_second_process_cleaning_up_never_deletes_a_live_writers_temporary_file(
    tmp_path: Path,
) -> None:
    child = _hold_temp_file(tmp_path / "model.ckpt-1")
    try:
        Saver().save(_session(5), str(tmp_path / "model.ckpt"), global_step=5)
        assert 1 == len([n for n in os.listdir(tmp_path) if is_temp_file(n)])
        out, _ = child.communicate("go\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    assert "committed" == out.strip()
    assert b"from the other process" == (tmp_path / "model.ckpt-1").read_bytes()


@pytest.mark.slow
def test_a_killed_writers_temporary_file_is_cleaned_up_by_the_next_saver(tmp_path: Path) -> None:
    child = _hold_temp_file(tmp_path / "model.ckpt-1")
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert 1 == len([n for n in os.listdir(tmp_path) if is_temp_file(n)])

    Saver().save(_session(5), str(tmp_path / "model.ckpt"), global_step=5)

    assert [] == [n for n in os.listdir(tmp_path) if is_temp_file(n)]


def test_a_runner_refuses_two_checkpoint_hooks_writing_one_prefix_into_one_directory(
    tmp_path: Path,
) -> None:
    model, optimizer = _model_and_optimizer()
    mine = CheckpointSaverHook(str(tmp_path), save_steps=10)
    with pytest.raises(ValueError, match=r"two checkpoint hooks that write .*model\.ckpt-<step>"):
        MonitoredTrainingSession(
            model, optimizer, checkpoint_dir=str(tmp_path), save_checkpoint_steps=5, hooks=[mine]
        )
    assert [] == os.listdir(tmp_path), "refused before anything was written"


def test_two_hooks_with_different_prefixes_in_one_directory_both_work(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    hooks = [
        CheckpointSaverHook(str(tmp_path), save_steps=1, checkpoint_basename="a.ckpt"),
        CheckpointSaverHook(str(tmp_path), save_steps=1, checkpoint_basename="b.ckpt"),
    ]
    with MonitoredSession(model, optimizer, hooks=hooks) as sess:
        step = make_train_step(model, optimizer)
        for _ in range(5):
            sess.run(step)
    for prefix in ("a.ckpt", "b.ckpt"):
        assert load_checkpoint(tmp_path / f"{prefix}-5")["global_step"] == 5
    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert all(os.path.exists(p) for p in state.all_model_checkpoint_paths)


# ---------------------------------------------------------------------------------------------
# Restore never starts over a run it could not read


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_when_every_checkpoint_is_damaged_creation_stops_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    paths = _save_steps(tmp_path, range(1, 4), max_to_keep=None)
    for path in paths:
        _flip_a_byte(path)
    before = {n: os.path.getmtime(tmp_path / n) for n in os.listdir(tmp_path)}
    init_calls: list[int] = []
    scaffold = Scaffold(init_fn=lambda scaffold, session: init_calls.append(1))
    model, optimizer = _model_and_optimizer()

    with pytest.raises(
        CheckpointCorruptedError, match=r"no checkpoint in it can be restored"
    ) as info:
        MonitoredTrainingSession(model, optimizer, checkpoint_dir=str(tmp_path), scaffold=scaffold)

    for path in paths:
        assert os.path.basename(path) in str(info.value)
    assert [] == init_calls
    assert before == {n: os.path.getmtime(tmp_path / n) for n in before}
    assert not [n for n in os.listdir(tmp_path) if n.startswith("model.ckpt") and n not in before]


def test_a_legacy_newest_checkpoint_stops_creation_instead_of_falling_back(tmp_path: Path) -> None:
    paths = _save_steps(tmp_path, range(1, 3))
    model, optimizer = _model_and_optimizer()
    legacy = Session(model, optimizer, global_step=9).state_dict()
    torch.save(legacy, tmp_path / "model.ckpt-9")  # no checksum: written by plain torch.save
    _write_state(tmp_path, "model.ckpt-1", "model.ckpt-2", "model.ckpt-9")
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(CheckpointUnloadableError, match=r"model\.ckpt-9.*no checksum"):
        MonitoredSession(model, optimizer, checkpoint_dir=str(tmp_path))

    assert before == sorted(os.listdir(tmp_path))
    assert all(os.path.exists(p) for p in paths)
    assert 9 == load_checkpoint(tmp_path / "model.ckpt-9", verify=False)["global_step"]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path: Path) -> None:
    paths = _save_steps(tmp_path, range(1, 4))
    _flip_a_byte(paths[-1])
    model = torch.nn.Linear(3, 1)

    with MonitoredSession(model, checkpoint_dir=str(tmp_path)) as sess:
        assert 2 == sess.global_step
    assert os.path.exists(paths[-1]), "a damaged checkpoint is reported, never deleted"


def test_a_state_file_naming_a_directory_is_skipped_for_a_real_checkpoint(tmp_path: Path) -> None:
    paths = _save_steps(tmp_path, range(1, 3))
    (tmp_path / "model.ckpt-7").mkdir()
    _write_state(tmp_path, "model.ckpt-1", "model.ckpt-2", "model.ckpt-7")

    with SingularMonitoredSession(torch.nn.Linear(3, 1), checkpoint_dir=str(tmp_path)) as sess:
        assert paths[-1] == sess.raw_session().restored_from
        assert 2 == sess.global_step


def test_a_state_file_that_is_a_fifo_is_refused_quickly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _save_steps(tmp_path, range(1, 3))
    os.remove(tmp_path / "checkpoint")
    os.mkfifo(tmp_path / "checkpoint")

    with caplog.at_level(logging.WARNING):
        latest = call_within(10, lambda: latest_checkpoint(str(tmp_path)))
        state = call_within(10, lambda: get_checkpoint_state(str(tmp_path)))

    assert paths[-1] == latest
    assert state is None
    assert any("FIFO" in r.getMessage() for r in caplog.records)
    session = call_within(
        30, lambda: MonitoredSession(torch.nn.Linear(3, 1), checkpoint_dir=str(tmp_path))
    )
    assert 2 == session.global_step
    session.close()


@pytest.mark.parametrize("kind", ["device", "huge"])
def test_a_state_file_that_is_a_device_or_huge_is_refused_quickly(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _save_steps(tmp_path, range(1, 3))
    os.remove(tmp_path / "checkpoint")
    if kind == "device":
        os.symlink("/dev/zero", tmp_path / "checkpoint")
    else:
        with open(tmp_path / "checkpoint", "wb") as f:
            f.write(b"model_checkpoint_path: " + b"x" * (70 << 20))

    with caplog.at_level(logging.WARNING):
        assert paths[-1] == call_within(10, lambda: latest_checkpoint(str(tmp_path)))
    assert any("unreadable" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# A restore that fails part-way changes nothing


class _Counter:
    """An extra-state object with a count, and a switch that makes its load raise."""

    def __init__(self, fail: bool = False) -> None:
        self.count = 0
        self.fail = fail

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.fail:
            raise RuntimeError("this object refuses its state")
        self.count = state["count"]


def _snapshot(session: Session) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in session.model.state_dict().items()},
        "optimizer": repr(session.optimizer.state_dict() if session.optimizer else None),
        "step": session.global_step,
        "torch_rng": torch.get_rng_state().clone(),
    }


def _assert_unchanged(before: dict[str, Any], session: Session) -> None:
    after = _snapshot(session)
    assert before["model"].keys() == after["model"].keys()
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key
    assert before["optimizer"] == after["optimizer"]
    assert before["step"] == after["step"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])


def test_a_restore_whose_extra_state_raises_leaves_everything_as_it_was(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    saved = Session(model, optimizer, extra_state={"a": _Counter(), "b": _Counter()})
    make_train_step(model, optimizer)()
    saved.extra_state["a"].count = 5
    path = Saver().save(saved, str(tmp_path / "model.ckpt"), global_step=1)

    torch.manual_seed(1)
    fresh_model = torch.nn.Linear(3, 1)
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1)
    first, second = _Counter(), _Counter(fail=True)
    first.count = 42
    session = Session(fresh_model, fresh_optimizer, extra_state={"a": first, "b": second})
    before = _snapshot(session)

    with pytest.raises(RuntimeError, match=r"this object refuses its state"):
        Saver().restore(session, path)

    _assert_unchanged(before, session)
    assert 42 == first.count, "the extra state loaded before the failure was put back"
    assert session.restored_from is None


def test_a_restore_into_a_model_of_another_shape_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    big_session = Session(big, torch.optim.SGD(big.parameters(), lr=0.1))
    path = Saver().save(big_session, str(tmp_path / "model.ckpt"), global_step=1)
    torch.manual_seed(1)
    small = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(3, 1))
    session = Session(small, torch.optim.SGD(small.parameters(), lr=0.1))
    session.optimizer.state_dict()  # type: ignore[union-attr]
    before = _snapshot(session)

    with pytest.raises(ValueError, match=r"does not fit the model .*shape mismatches"):
        Saver().restore(session, path)

    _assert_unchanged(before, session)


# ---------------------------------------------------------------------------------------------
# Clocks


def test_keep_every_n_hours_follows_a_clock_set_back(tmp_path: Path, clock: FakeClock) -> None:
    """A clock set back an hour must not stop milestones for an extra hour.

    Saves every 10 minutes; half an hour in, the clock is set back an hour. The first milestone
    is due an hour in (step 6 or the next): without following the jump it would come only
    two hours and ten minutes in (step 13).
    """
    saver = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1)
    prefix = str(tmp_path / "model.ckpt")
    for step in range(15):
        saver.save(_session(step), prefix, global_step=step)
        clock.advance(600)
        if step == 3:
            clock.advance(-3600)  # NTP sets the clock back an hour

    kept = sorted(int(n.rsplit("-", 1)[1]) for n in os.listdir(tmp_path) if "ckpt-" in n)
    assert 14 == kept[-1]
    assert kept[0] <= 8, f"the first milestone came too late: {kept}"


def test_keep_every_n_hours_after_a_clock_jumped_forwards_keeps_one(
    tmp_path: Path, clock: FakeClock
) -> None:
    saver = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1)
    prefix = str(tmp_path / "model.ckpt")
    clock.advance(10 * 3600)  # the clock jumps ten hours ahead
    for step in range(6):
        saver.save(_session(step), prefix, global_step=step)
        clock.advance(1)

    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("model.ckpt-"))
    assert ["model.ckpt-0", "model.ckpt-5"] == kept


# ---------------------------------------------------------------------------------------------
# Committed means restorable


class _Stats:
    """A scheduler-like object whose state holds a NumPy scalar: weights_only refuses it."""

    def __init__(self) -> None:
        import numpy as np

        self.best = np.float64(1.2)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


def test_an_unloadable_value_fails_the_save_before_anything_is_written(tmp_path: Path) -> None:
    previous = _save_steps(tmp_path, range(1, 2))
    session = _session(2, extra_state={"stats": _Stats()})

    with pytest.raises(TypeError, match=r"extra_state\['stats'\]\['best'\] is a numpy\.float64"):
        Saver().save(session, str(tmp_path / "model.ckpt"), global_step=2)

    assert {"checkpoint", "model.ckpt-1"} == set(os.listdir(tmp_path))
    assert previous[-1] == latest_checkpoint(str(tmp_path))


def test_an_unloadable_value_stops_a_runner_at_its_creation_save(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(TypeError, match=r"extra_state\['stats'\]\['best'\]"):
        MonitoredTrainingSession(
            model,
            optimizer,
            checkpoint_dir=str(tmp_path),
            save_checkpoint_steps=1,
            extra_state={"stats": _Stats()},
        )
    assert not [n for n in os.listdir(tmp_path) if n.startswith("model.ckpt")]


def test_restorable_checkpoint_is_what_a_new_session_restores(tmp_path: Path) -> None:
    assert restorable_checkpoint(tmp_path / "missing") is None
    assert restorable_checkpoint(tmp_path) is None
    paths = _save_steps(tmp_path, range(1, 4))
    assert paths[-1] == restorable_checkpoint(tmp_path)

    _flip_a_byte(paths[-1])
    assert paths[-2] == restorable_checkpoint(tmp_path), "a damaged newest one is passed over"
    with SingularMonitoredSession(torch.nn.Linear(3, 1), checkpoint_dir=str(tmp_path)) as sess:
        assert paths[-2] == sess.raw_session().restored_from

    model, optimizer = _model_and_optimizer()
    torch.save(Session(model, optimizer, global_step=9).state_dict(), tmp_path / "model.ckpt-9")
    _write_state(tmp_path, *[os.path.basename(p) for p in paths], "model.ckpt-9")
    assert restorable_checkpoint(tmp_path) is None, "a session refuses: the newest is legacy"
    with pytest.raises(CheckpointUnloadableError):
        MonitoredSession(torch.nn.Linear(3, 1), checkpoint_dir=str(tmp_path))


class _FailsAfterCreation(SessionRunHook):
    def after_create_session(self, session: Session, coord: Any) -> None:
        raise RuntimeError("this hook fails at session creation")


def test_a_runner_that_fails_at_creation_still_commits_its_creation_save(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    hooks = [CheckpointSaverHook(str(tmp_path), save_steps=1), _FailsAfterCreation()]

    with pytest.raises(RuntimeError, match=r"fails at session creation"):
        MonitoredSession(model, optimizer, hooks=hooks)

    writers = [t for t in threading.enumerate() if t.name.startswith("torch_ckpt_hook-writer")]
    assert [] == writers, "the creation save was drained before the error propagated"
    assert str(tmp_path / "model.ckpt-0") == latest_checkpoint(str(tmp_path))
    assert 0 == load_checkpoint(tmp_path / "model.ckpt-0")["global_step"]


# -- several series in one directory (best checkpoints, issue 13) ---------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_looking_for_other_series_state_files_never_hangs_on_odd_files(tmp_path: Path) -> None:
    """The fallback reads small non-checkpoint files as state files: none of these may hang it."""
    saver = Saver()
    path = saver.save(Session(torch.nn.Linear(2, 1)), str(tmp_path / "model.ckpt"), 1)
    (tmp_path / "checkpoint").unlink()
    os.mkfifo(tmp_path / "best_checkpoint")
    (tmp_path / "zeros").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * (2 << 20))
    (tmp_path / "binary").write_bytes(bytes(range(256)))

    assert path == call_within(10, lambda: latest_checkpoint(str(tmp_path)))


def test_a_regular_run_never_restores_or_deletes_a_best_checkpoint(tmp_path: Path) -> None:
    """Killed before its first state file, the regular series must not resume from the best."""
    model, optimizer = torch.nn.Linear(3, 1), None
    hooks = [BestCheckpointSaverHook(tmp_path, "loss")]
    with SingularMonitoredSession(model, hooks=hooks) as sess:
        for _ in range(3):
            sess.run(lambda: {"loss": 1.0 / (1 + sess.global_step)})
    best = {p.name for p in tmp_path.glob("best.ckpt-*")}

    with SingularMonitoredSession(
        torch.nn.Linear(3, 1),
        optimizer,
        checkpoint_dir=str(tmp_path),
        hooks=[CheckpointSaverHook(str(tmp_path), save_steps=1, saver=Saver(max_to_keep=1))],
    ) as sess:
        assert sess.raw_session().restored_from is None
        for _ in range(4):
            sess.run(lambda: None)

    assert best == {p.name for p in tmp_path.glob("best.ckpt-*")}
    assert ["model.ckpt-4"] == [p.name for p in tmp_path.glob("model.ckpt-*")]


def test_a_best_hook_and_a_checkpoint_hook_writing_one_prefix_are_refused(tmp_path: Path) -> None:
    from torch_ckpt_hook import BestCheckpointSaverHook

    model, optimizer = _model_and_optimizer()
    hooks = [
        CheckpointSaverHook(str(tmp_path), save_steps=1),
        BestCheckpointSaverHook(str(tmp_path), "loss", checkpoint_basename="model.ckpt"),
    ]
    with pytest.raises(ValueError, match=r"would overwrite and prune each other"):
        MonitoredSession(model, optimizer, hooks=hooks)
