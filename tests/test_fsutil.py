"""Tests of the durable-write helpers in ``torch_ckpt_hook._fsutil``."""

from __future__ import annotations

import errno
import logging
import os
import uuid
from typing import BinaryIO

import pytest

from torch_ckpt_hook._fsutil import (
    TEMP_INFIX,
    atomic_write,
    fsync_dir,
    is_temp_file,
    remove_stray_temp_files,
)


def _temp_name(base: str) -> str:
    return f"{base}{TEMP_INFIX}{uuid.uuid4().hex}"


def test_atomic_write_creates_file_with_written_bytes(tmp_path):
    target = tmp_path / "data.bin"

    atomic_write(target, lambda f: f.write(b"hello"))

    assert b"hello" == target.read_bytes()
    assert ["data.bin"] == os.listdir(tmp_path)


def test_atomic_write_replaces_existing_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents")

    atomic_write(str(target), lambda f: f.write(b"new"))

    assert b"new" == target.read_bytes()
    assert ["data.bin"] == os.listdir(tmp_path)


def test_atomic_write_writes_to_temp_file_in_same_directory(tmp_path):
    target = tmp_path / "data.bin"
    seen: list[str] = []

    def write(f: BinaryIO) -> None:
        seen.append(f.name)
        f.write(b"x")

    atomic_write(target, write)

    (temp_path,) = seen
    assert str(tmp_path) == os.path.dirname(temp_path)
    assert os.path.basename(temp_path).startswith("data.bin" + TEMP_INFIX)
    assert is_temp_file(temp_path)
    assert not os.path.exists(temp_path)


def test_atomic_write_keeps_old_file_and_no_temp_file_when_writer_fails_partway(tmp_path):
    target = tmp_path / "checkpoint"
    target.write_bytes(b"old state")
    disk_full = OSError(errno.ENOSPC, "No space left on device")

    def write(f: BinaryIO) -> None:
        f.write(b"half of the new sta")
        raise disk_full

    with pytest.raises(OSError, match="No space left on device") as excinfo:
        atomic_write(target, write)

    assert excinfo.value is disk_full
    assert b"old state" == target.read_bytes()
    assert ["checkpoint"] == os.listdir(tmp_path)


def test_atomic_write_leaves_nothing_when_writer_fails_on_new_file(tmp_path):
    def write(f: BinaryIO) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(tmp_path / "model.ckpt-1", write)

    assert [] == os.listdir(tmp_path)


def test_atomic_write_cleans_up_on_keyboard_interrupt(tmp_path):
    def write(f: BinaryIO) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "model.ckpt-1", write)

    assert [] == os.listdir(tmp_path)


def test_atomic_write_into_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        atomic_write(tmp_path / "missing" / "data.bin", lambda f: f.write(b"x"))


def test_atomic_write_with_bare_file_name_uses_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    atomic_write("data.bin", lambda f: f.write(b"x"))

    assert b"x" == (tmp_path / "data.bin").read_bytes()


def test_fsync_dir_accepts_existing_directory(tmp_path):
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_fsync_dir_tolerates_directory_that_cannot_be_read(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o300)  # writable and searchable, not readable
    try:
        fsync_dir(locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.name == "nt", reason="Windows skips directory fsync altogether")
def test_fsync_dir_of_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        fsync_dir(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (_temp_name("model.ckpt-100"), True),
        (_temp_name("checkpoint"), True),
        (os.path.join("some", "dir", _temp_name("checkpoint")), True),
        ("model.ckpt-100", False),
        ("checkpoint", False),
        ("notes.tmp-backup", False),
        ("model.ckpt-100.tmp-" + "a" * 31, False),
        ("model.ckpt-100.tmp-" + "a" * 33, False),
        ("model.ckpt-100.tmp-" + "A" * 32, False),
        (TEMP_INFIX + "a" * 32, False),
        ("model.ckpt-100.tmp" + "a" * 32, False),
    ],
)
def test_is_temp_file_matches_only_atomic_write_temp_names(name, expected):
    assert expected == is_temp_file(name)


def test_remove_stray_temp_files_removes_only_temp_files(tmp_path, caplog):
    stray = [tmp_path / _temp_name("model.ckpt-5"), tmp_path / _temp_name("checkpoint")]
    for path in stray:
        path.write_bytes(b"partial")
    kept = ["model.ckpt-5", "checkpoint", "notes.tmp-backup", "model.ckpt-6.tmp-" + "a" * 31]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep me")
    temp_named_dir = tmp_path / _temp_name("subdir")
    temp_named_dir.mkdir()

    with caplog.at_level(logging.INFO, logger="torch_ckpt_hook._fsutil"):
        removed = remove_stray_temp_files(tmp_path)

    assert sorted(str(p) for p in stray) == removed
    assert sorted([*kept, temp_named_dir.name]) == sorted(os.listdir(tmp_path))
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for path in stray:
        assert any(str(path) in message for message in logged), logged


def test_remove_stray_temp_files_in_missing_directory_returns_empty_list(tmp_path):
    assert [] == remove_stray_temp_files(tmp_path / "missing")
