"""Bad paths never hang (SPEC.md §5.1): what is not a regular file is refused at once.

A FIFO, a socket, a character or block device, or a directory where a checkpoint should be (or a
symbolic link to one of them) is refused with a clear error by ``load_checkpoint`` and
``verify_checkpoint``, and reported by every ``torch-ckpt`` command, without being read: reading
a FIFO waits for a writer forever, and ``/dev/zero`` never ends. Every call runs on a worker
thread under a deadline, so a regression fails its test instead of hanging the run.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import socket
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import call_within

import torch_ckpt_hook as tch
from torch_ckpt_hook._checkpoint_file import check_checkpoint, write_checkpoint
from torch_ckpt_hook._cli import main
from torch_ckpt_hook._state_file import update_checkpoint_state

Capsys = pytest.CaptureFixture[str]

# Far longer than any of these calls takes (milliseconds), far shorter than a hang.
DEADLINE_SECS = 10.0


def _block_device() -> str | None:
    for name in sorted(os.listdir("/dev")) if os.path.isdir("/dev") else []:
        path = os.path.join("/dev", name)
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


class _Releaser:
    """Opens the FIFOs a test made for writing at teardown, so a reader stuck on one returns."""

    def __init__(self) -> None:
        self.fifos: list[str] = []

    def release(self) -> None:
        for fifo in self.fifos:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno in (errno.ENXIO, errno.ENOENT):
                    continue  # no reader waiting: nothing to release
                raise
            os.close(fd)


@pytest.fixture
def releaser() -> Iterator[_Releaser]:
    fifos = _Releaser()
    yield fifos
    fifos.release()


def within_deadline(call: Callable[[], Any], releaser: _Releaser) -> Any:
    """``call()``'s result (or its exception), failing the test if it is still running after the
    deadline: it blocked on a file that is not a regular one."""
    return call_within(DEADLINE_SECS, call, releaser.release)


KINDS = {
    "fifo": "a FIFO",
    "socket": "a socket",
    "dev_zero": "a character device",
    "dev_null": "a character device",
    "block_device": "a block device",
    "directory": "a directory",
    "link_to_fifo": "a FIFO",
}


@pytest.fixture(params=sorted(KINDS))
def special(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    releaser: _Releaser,
) -> Iterator[tuple[str, str]]:
    """``(path, what)``: ``tmp_path/model.ckpt-30``, which is not a regular file."""
    kind: str = request.param
    path = tmp_path / "model.ckpt-30"
    server: socket.socket | None = None
    if kind == "fifo":
        os.mkfifo(path)
        releaser.fifos.append(str(path))
    elif kind == "link_to_fifo":
        os.mkfifo(tmp_path / "fifo")
        releaser.fifos.append(str(tmp_path / "fifo"))
        os.symlink(tmp_path / "fifo", path)
    elif kind == "socket":
        # Bound by a relative name: a socket's path is limited to about 100 bytes.
        monkeypatch.chdir(tmp_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path.name)
        server.listen()
    elif kind in ("dev_zero", "dev_null"):
        os.symlink(f"/dev/{kind.removeprefix('dev_')}", path)
    elif kind == "block_device":
        device = _block_device()
        if device is None:
            pytest.skip("no block device on this machine")
        os.symlink(device, path)  # never opened: refused on what it is
    else:
        path.mkdir()
    yield str(path), KINDS[kind]
    if server is not None:
        server.close()


def _checkpoints(directory: pathlib.Path, steps: tuple[int, ...] = (10, 20)) -> list[str]:
    torch.manual_seed(0)
    session = tch.Session(torch.nn.Linear(3, 2))
    paths = []
    for step in steps:
        session.global_step = step
        path = str(directory / f"model.ckpt-{step}")
        write_checkpoint(path, session.state_dict())
        paths.append(path)
    return paths


def _name_as_latest(directory: pathlib.Path, paths: list[str], latest: str) -> None:
    update_checkpoint_state(str(directory), latest, [*paths, latest])


def _run(capsys: Capsys, releaser: _Releaser, *argv: str) -> tuple[int, str, str]:
    status = within_deadline(lambda: main(list(argv)), releaser)
    out, err = capsys.readouterr()
    return status, out, err


# -- the library ------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_load_checkpoint_refuses_it_at_once_with_a_value_error(
    special: tuple[str, str], releaser: _Releaser, verify: bool
) -> None:
    path, what = special

    with pytest.raises(
        ValueError,
        match=(
            f"^The passed save_path is not a valid checkpoint: {re.escape(path)} is {what}, "
            "not a regular file$"
        ),
    ):
        within_deadline(lambda: tch.load_checkpoint(path, verify=verify), releaser)


def test_verify_checkpoint_reports_it_at_once(
    special: tuple[str, str], releaser: _Releaser
) -> None:
    path, what = special

    problem = within_deadline(lambda: check_checkpoint(path), releaser)

    assert ("not_a_file", f"not a regular file: it is {what}") == (problem.kind, problem.message)
    assert f"not a regular file: it is {what}" == within_deadline(
        lambda: tch.verify_checkpoint(path), releaser
    )


def test_saver_restore_refuses_it_at_once(special: tuple[str, str], releaser: _Releaser) -> None:
    path, _what = special

    with pytest.raises(ValueError, match=f"not a valid checkpoint: {re.escape(path)}"):
        within_deadline(
            lambda: tch.Saver().restore(tch.Session(torch.nn.Linear(3, 2)), path), releaser
        )


def test_a_symbolic_link_to_a_good_checkpoint_loads(tmp_path: pathlib.Path) -> None:
    [target] = _checkpoints(tmp_path, steps=(5,))
    link = tmp_path / "model.ckpt-6"
    os.symlink(target, link)

    assert check_checkpoint(link) is None
    assert 5 == tch.load_checkpoint(link)["global_step"]


def test_a_dangling_symbolic_link_does_not_exist_and_is_unreadable(tmp_path: pathlib.Path) -> None:
    link = tmp_path / "model.ckpt-6"
    os.symlink(tmp_path / "gone", link)

    with pytest.raises(
        ValueError, match=f"not a valid checkpoint: {re.escape(str(link))} does not"
    ):
        tch.load_checkpoint(link)
    problem = check_checkpoint(link)
    assert problem is not None
    assert ("unreadable", "unreadable: No such file or directory") == (
        problem.kind,
        problem.message,
    )


# -- torch-ckpt -------------------------------------------------------------------------------


def test_ls_lists_it_as_not_a_file_and_restores_the_one_before(
    capsys: Capsys, tmp_path: pathlib.Path, special: tuple[str, str], releaser: _Releaser
) -> None:
    path, what = special
    _name_as_latest(tmp_path, _checkpoints(tmp_path), path)

    status, out, err = _run(capsys, releaser, "ls", str(tmp_path))

    assert 0 == status, err
    lines = out.splitlines()
    assert ["model.ckpt-30", "30", "-"] == lines[3].split()[:3], "no size for it"
    assert lines[3].endswith(f"latest           not-a-file: it is {what}"), lines[3]
    assert ["restore", "ok"] == lines[2].split()[-2:]
    assert lines[4].endswith(", 1 not a regular file"), lines[4]
    assert "A new session skips the latest, model.ckpt-30, and restores model.ckpt-20." == lines[5]

    _status, out, _err = _run(capsys, releaser, "ls", str(tmp_path), "--json")
    listed = json.loads(out)["checkpoints"][-1]
    assert {
        "name": "model.ckpt-30",
        "size_bytes": None,
        "intact": False,
        "kind": "not_a_file",
        "problem": f"not a regular file: it is {what}",
    }.items() <= listed.items()


def test_ls_lists_it_when_only_its_name_makes_it_a_checkpoint(
    capsys: Capsys, tmp_path: pathlib.Path, special: tuple[str, str], releaser: _Releaser
) -> None:
    _name_as_latest(tmp_path, [], _checkpoints(tmp_path)[-1])  # the state file omits it

    status, out, _err = _run(capsys, releaser, "ls", str(tmp_path), "--json")

    assert 0 == status
    document = json.loads(out)
    assert ["model.ckpt-10", "model.ckpt-20", "model.ckpt-30"] == [
        c["name"] for c in document["checkpoints"]
    ]
    assert "not_a_file" == document["checkpoints"][-1]["kind"]
    assert str(tmp_path / "model.ckpt-20") == document["restore"]


def test_verify_labels_it_not_a_file_and_exits_1(
    capsys: Capsys, tmp_path: pathlib.Path, special: tuple[str, str], releaser: _Releaser
) -> None:
    path, what = special
    _name_as_latest(tmp_path, _checkpoints(tmp_path), path)

    status, out, err = _run(capsys, releaser, "verify", str(tmp_path))

    assert 1 == status
    assert [
        "ok          model.ckpt-10",
        "ok          model.ckpt-20",
        f"not-a-file  model.ckpt-30: it is {what}",
    ] == out.splitlines()
    assert "torch-ckpt verify: error: 1 of 3 checkpoints not a regular file: model.ckpt-30\n" == err


def test_inspect_of_the_directory_shows_the_one_before_and_warns(
    capsys: Capsys, tmp_path: pathlib.Path, special: tuple[str, str], releaser: _Releaser
) -> None:
    path, what = special
    paths = _checkpoints(tmp_path)
    _name_as_latest(tmp_path, paths, path)

    status, out, err = _run(capsys, releaser, "inspect", str(tmp_path), "--json")

    assert 0 == status, err
    assert paths[-1] == json.loads(out)["path"]
    assert (
        "torch-ckpt inspect: warning: showing model.ckpt-20, the checkpoint a new session "
        "restores; newer ones are not regular files (model.ckpt-30: not a regular file: it is "
        f"{what})\n"
    ) == err


def test_inspect_of_a_directory_holding_only_it_fails_in_one_line(
    capsys: Capsys, tmp_path: pathlib.Path, special: tuple[str, str], releaser: _Releaser
) -> None:
    path, what = special
    _name_as_latest(tmp_path, [], path)

    status, out, err = _run(capsys, releaser, "inspect", str(tmp_path))

    assert (1, "") == (status, out)
    assert (
        f"torch-ckpt inspect: error: The passed save_path is not a valid checkpoint: {path} is "
        f"{what}, not a regular file\n"
    ) == err.splitlines(keepends=True)[-1]


# A directory is a valid argument (the checkpoints in it), so it is left out here.
@pytest.mark.parametrize("special", sorted(set(KINDS) - {"directory"}), indirect=True)
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_naming_it_on_the_command_line_is_an_argument_error(
    capsys: Capsys, special: tuple[str, str], releaser: _Releaser, command: str
) -> None:
    path, what = special

    status, out, err = _run(capsys, releaser, command, path)

    assert (2, "") == (status, out)
    assert f"expected a checkpoint file or a directory, got '{path}', which is {what}" in err


def test_a_state_file_naming_dev_zero_by_its_absolute_path_is_reported(
    capsys: Capsys, tmp_path: pathlib.Path, releaser: _Releaser
) -> None:
    _name_as_latest(tmp_path, _checkpoints(tmp_path), "/dev/zero")

    status, out, _err = _run(capsys, releaser, "verify", str(tmp_path))

    assert 1 == status
    [line] = [line for line in out.splitlines() if not line.startswith("ok ")]
    assert line.startswith("not-a-file  "), line
    assert line.endswith("/dev/zero: it is a character device"), line
    with pytest.raises(ValueError, match="/dev/zero is a character device, not a regular file"):
        within_deadline(lambda: tch.load_checkpoint("/dev/zero"), releaser)


@pytest.mark.parametrize("command", ["ls", "verify", "inspect"])
def test_a_state_file_that_is_a_fifo_does_not_hang_the_commands(
    capsys: Capsys, tmp_path: pathlib.Path, releaser: _Releaser, command: str
) -> None:
    paths = _checkpoints(tmp_path)
    os.mkfifo(tmp_path / "checkpoint")
    releaser.fifos.append(str(tmp_path / "checkpoint"))

    status, out, err = _run(capsys, releaser, command, str(tmp_path))

    assert 0 == status, err
    assert (paths[-1] if command == "inspect" else "model.ckpt-20") in out


def test_verify_labels_each_kind_of_problem_apart(
    capsys: Capsys, tmp_path: pathlib.Path, releaser: _Releaser, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _checkpoints(tmp_path, steps=(1, 2))
    payload = torch.load(paths[1], weights_only=True)
    os.remove(paths[1])
    torch.save(payload, paths[1])  # plain torch.save: no checksum
    os.mkfifo(tmp_path / "model.ckpt-3")
    releaser.fifos.append(str(tmp_path / "model.ckpt-3"))
    _name_as_latest(tmp_path, paths, str(tmp_path / "model.ckpt-3"))
    real_open = open

    def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == paths[0]:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)

    status, out, err = _run(capsys, releaser, "verify", str(tmp_path))

    assert 1 == status
    assert [
        "unreadable  model.ckpt-1: Permission denied",
        "unloadable  model.ckpt-2: no checksum: a plain torch.save archive, not written by "
        "torch_ckpt_hook, so damage to it cannot be detected; 'torch-ckpt inspect --no-verify' "
        "loads it if you trust it",
        "not-a-file  model.ckpt-3: it is a FIFO",
    ] == out.splitlines()
    assert (
        "torch-ckpt verify: error: 3 of 3 checkpoints unloadable, unreadable or not regular "
        "files: model.ckpt-1, model.ckpt-2, model.ckpt-3\n"
    ) == err
