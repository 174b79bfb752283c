"""Tests of the storage seam: ``LocalStorage``'s contract, and a ``Saver`` driving a swapped one.

A recording storage checks the call sequence the interface's docstring states: prepare once per
directory, then for each save write, write_state, and only then the deletes retention decided.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_ckpt_hook import CheckpointSaveError, Saver, Session, load_checkpoint
from torch_ckpt_hook._storage import CheckpointStorage, LocalStorage


class RecordingStorage(LocalStorage):
    """Local files, and a log of the calls a saver makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prepare(self, directory: str) -> None:
        self.calls.append(f"prepare {os.path.basename(directory)}")
        super().prepare(directory)

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        self.calls.append(f"write {os.path.basename(path)}")
        super().write(path, payload)

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        names = " ".join(os.path.basename(p) for p in paths)
        self.calls.append(f"state {os.path.basename(latest)} [{names}]")
        super().write_state(directory, latest, paths)

    def delete(self, path: str) -> None:
        self.calls.append(f"delete {os.path.basename(path)}")
        super().delete(path)


def _session(step: int) -> Session:
    torch.manual_seed(0)
    return Session(torch.nn.Linear(2, 1), global_step=step)


def test_a_saver_calls_its_storage_in_the_documented_order(tmp_path: Path) -> None:
    storage = RecordingStorage()
    saver = Saver(max_to_keep=2, storage=storage)
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2, 3):
        saver.save(_session(step), str(run / "model.ckpt"), global_step=step)

    assert [
        "prepare run",
        "write model.ckpt-1",
        "state model.ckpt-1 [model.ckpt-1]",
        "write model.ckpt-2",
        "state model.ckpt-2 [model.ckpt-1 model.ckpt-2]",
        "write model.ckpt-3",
        "state model.ckpt-3 [model.ckpt-2 model.ckpt-3]",
        "delete model.ckpt-1",
    ] == storage.calls
    assert storage is saver.storage


def test_a_write_that_fails_commits_nothing_and_deletes_nothing(tmp_path: Path) -> None:
    class FullDisk(RecordingStorage):
        def write(self, path: str, payload: Mapping[str, Any]) -> None:
            if path.endswith("-3"):
                self.calls.append(f"write {os.path.basename(path)} failed")
                raise OSError(28, "No space left on device")
            super().write(path, payload)

    storage = FullDisk()
    saver = Saver(max_to_keep=2, storage=storage)
    for step in (1, 2):
        saver.save(_session(step), str(tmp_path / "model.ckpt"), global_step=step)

    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-3 failed: OSError"):
        saver.save(_session(3), str(tmp_path / "model.ckpt"), global_step=3)

    assert "write model.ckpt-3 failed" == storage.calls[-1]
    assert {"checkpoint", "model.ckpt-1", "model.ckpt-2"} == set(os.listdir(tmp_path))


def test_restore_reads_through_the_storage(tmp_path: Path) -> None:
    class CountingReads(LocalStorage):
        reads = 0

        def read(self, path: str, map_location: Any = "cpu") -> dict[str, Any]:
            type(self).reads += 1
            return super().read(path, map_location)

    path = Saver().save(_session(4), str(tmp_path / "model.ckpt"), global_step=4)
    session = _session(0)
    Saver(storage=CountingReads()).restore(session, path)

    assert 1 == CountingReads.reads
    assert 4 == session.global_step
    assert os.path.abspath(path) == session.restored_from


def test_local_storage_round_trips_a_checkpoint_and_its_state_file(tmp_path: Path) -> None:
    storage = LocalStorage()
    path = str(tmp_path / "model.ckpt-7")
    payload = _session(7).state_dict()

    storage.prepare(str(tmp_path))
    storage.write(path, payload)
    storage.write_state(str(tmp_path), path, [path])

    assert storage.check(path) is None
    assert 7 == storage.read(path)["global_step"] == load_checkpoint(path)["global_step"]
    state = storage.read_state(str(tmp_path))
    assert state is not None
    assert path == state.model_checkpoint_path
    assert [(7, path)] == storage.find(str(tmp_path))
    assert storage.why_not_deletable(path, str(tmp_path), "model.ckpt") is None
    assert "outside" in str(storage.why_not_deletable(path, str(tmp_path / "x"), "model.ckpt"))
    storage.delete(path)
    assert not storage.exists(path)


def test_a_saver_refuses_a_storage_that_is_not_one() -> None:
    with pytest.raises(
        TypeError, match=r"^storage must be a CheckpointStorage or None, got '/tmp' \(a str\)$"
    ):
        Saver(storage="/tmp")  # type: ignore[arg-type]
    assert issubclass(LocalStorage, CheckpointStorage)
