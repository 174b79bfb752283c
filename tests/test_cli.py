"""The torch-ckpt command, run in-process through main(argv): every command and error path."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._cli import COMMANDS, main
from torch_ckpt_hook._cli_commands import demo
from torch_ckpt_hook._cli_demo import batch_for_step
from torch_ckpt_hook._fsutil import atomic_write
from torch_ckpt_hook._integrity import save_with_checksum

REPO = pathlib.Path(__file__).resolve().parent.parent
Capsys = pytest.CaptureFixture[str]


def _save_checkpoints(
    directory: pathlib.Path,
    steps: tuple[int, ...] = (10, 20, 30),
    optimizer_type: type[torch.optim.Optimizer] = torch.optim.SGD,
    extra_state: dict[str, Any] | None = None,
) -> list[str]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = optimizer_type(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    session = tch.Session(model, optimizer, extra_state=extra_state)
    saver = tch.Saver()
    paths = []
    for step in steps:
        session.global_step = step
        paths.append(saver.save(session, str(directory / "model.ckpt"), global_step=step))
    saver.wait_until_finished()
    return paths


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _run(capsys: Capsys, *argv: str, **commands: Any) -> tuple[int, str, str]:
    """``torch-ckpt argv``: its status, stdout and stderr; ``commands`` replace some of
    ``COMMANDS``, ``demo=`` a function of the parsed arguments, say."""
    status = main(list(argv), commands={**COMMANDS, **commands})
    out, err = capsys.readouterr()
    return status, out, err


# -- arguments and help -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["ls"], ["inspect"], ["verify"], ["export"], ["demo"]])
def test_help_exits_0_and_describes_the_commands(capsys: Capsys, command: list[str]) -> None:
    status, out, err = _run(capsys, *command, "--help")

    assert (0, "") == (status, err)
    assert out.startswith(f"usage: {' '.join(['torch-ckpt', *command])} ")
    assert "exit status:" in out


def test_top_level_help_lists_every_command(capsys: Capsys) -> None:
    _status, out, _err = _run(capsys, "--help")

    for command in ("ls", "inspect", "verify", "export", "demo"):
        assert f"    {command} " in out


def test_version(capsys: Capsys) -> None:
    status, out, _err = _run(capsys, "--version")

    assert (0, f"torch-ckpt {tch.__version__}\n") == (status, out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [],
            "torch-ckpt: error: expected a command: ls, inspect, verify, export or demo (see 'torch-ckpt --help')",
        ),
        (["frobnicate"], "torch-ckpt: error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["ls"], "torch-ckpt ls: error: the following arguments are required: DIR"),
        (
            ["ls", "{missing}"],
            "torch-ckpt ls: error: argument DIR: expected an existing directory, got '{missing}', which does not exist",
        ),
        (
            ["ls", "{file}"],
            "torch-ckpt ls: error: argument DIR: expected an existing directory, got '{file}', which is not a directory",
        ),
        (
            ["ls", "{dir}", "--bogus"],
            "torch-ckpt ls: error: unrecognized arguments: --bogus (see 'torch-ckpt ls --help')",
        ),
        (
            ["verify", "{dir}", "extra"],
            "torch-ckpt verify: error: unrecognized arguments: extra (see 'torch-ckpt verify --help')",
        ),
        (
            ["inspect", "{dir}/checkpoint"],
            "torch-ckpt inspect: error: argument PATH: expected a checkpoint file or a directory, got '{dir}/checkpoint', which is the checkpoint state file (it lists a directory's checkpoints); pass its directory, '{dir}'",
        ),
        (
            ["verify", "{dir}/checkpoint"],
            "torch-ckpt verify: error: argument DIR|PATH: expected a checkpoint file or a directory, got '{dir}/checkpoint', which is the checkpoint state file",
        ),
        (
            ["inspect", "{fifo}"],
            "torch-ckpt inspect: error: argument PATH: expected a checkpoint file or a directory, got '{fifo}', which is a FIFO (see 'torch-ckpt inspect --help')",
        ),
        (
            ["verify", "{fifo}"],
            "torch-ckpt verify: error: argument DIR|PATH: expected a checkpoint file or a directory, got '{fifo}', which is a FIFO",
        ),
        (
            ["inspect", "{missing}"],
            "torch-ckpt inspect: error: argument PATH: expected an existing checkpoint file or directory, got '{missing}', which does not exist",
        ),
        (
            ["verify", "{missing}"],
            "torch-ckpt verify: error: argument DIR|PATH: expected an existing checkpoint file or directory, got '{missing}', which does not exist",
        ),
        (
            ["demo", "--steps", "0"],
            "torch-ckpt demo: error: argument --steps: expected a positive integer, got '0'",
        ),
        (
            ["demo", "--steps", "ten"],
            "torch-ckpt demo: error: argument --steps: expected a positive integer, got 'ten'",
        ),
        (
            ["demo", "--save-every", "-5"],
            "torch-ckpt demo: error: argument --save-every: expected a positive integer, got '-5'",
        ),
        (
            ["demo", "--dir", "{file}"],
            "torch-ckpt demo: error: argument --dir: expected a directory (it is created if missing), got '{file}', which is not a directory",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: Capsys, tmp_path: pathlib.Path, argv: list[str], message: str
) -> None:
    names = {
        "missing": str(tmp_path / "missing"),
        "file": str(tmp_path / "file"),
        "dir": str(tmp_path),
        "fifo": str(tmp_path / "fifo"),
    }
    (tmp_path / "file").write_text("not a checkpoint")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever: it must be refused unread
    argv = [arg.format(**names) for arg in argv]

    status, out, err = _run(capsys, *argv)

    assert (2, "") == (status, out)
    assert 1 == len(err.splitlines()), err
    assert err.startswith(message.format(**names)), err
    assert "Traceback" not in err


# -- ls ---------------------------------------------------------------------------------------


def test_ls_lists_every_checkpoint_and_marks_the_latest(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    _save_checkpoints(tmp_path)

    status, out, err = _run(capsys, "ls", str(tmp_path))

    assert (0, "") == (status, err)
    lines = out.splitlines()
    assert ["NAME", "STEP", "SIZE", "SAVED", "LATEST", "RESTORE", "INTEGRITY"] == lines[0].split()
    assert ["model.ckpt-10", "model.ckpt-20", "model.ckpt-30"] == [
        line.split()[0] for line in lines[1:4]
    ]
    assert ["latest", "restore", "ok"] == lines[3].split()[-3:]
    assert lines[1].split()[-1] == "ok"
    assert "latest" not in lines[1]
    assert "restore" not in lines[1]
    assert lines[4].startswith("3 checkpoints, ")
    assert 5 == len(lines)
    # Columns are aligned: every row puts INTEGRITY at the same offset.
    assert 1 == len({line.rindex(line.split()[-1]) for line in lines[:4]})


def test_ls_json_parses_and_holds_every_field(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    paths = _save_checkpoints(tmp_path)

    status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")

    assert 0 == status
    document = json.loads(out)
    assert str(tmp_path) == document["directory"]
    assert paths[-1] == document["latest"] == document["restore"]
    assert [10, 20, 30] == [c["step"] for c in document["checkpoints"]]
    newest = document["checkpoints"][-1]
    assert {
        "path": paths[-1],
        "name": "model.ckpt-30",
        "step": 30,
        "size_bytes": os.path.getsize(paths[-1]),
        "intact": True,
        "problem": None,
        "kind": None,
        "latest": True,
        "restore": True,
    }.items() <= newest.items()
    assert os.path.getmtime(paths[-1]) == newest["mtime"]
    assert newest["saved_at"][:4].isdigit()


def test_ls_marks_corrupted_checkpoints(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    paths = _save_checkpoints(tmp_path)
    _flip_a_byte(paths[0])
    _truncate(paths[1])

    status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    lines = out.splitlines()
    assert "CORRUPTED: checksum mismatch" in lines[1]
    assert "CORRUPTED: truncated" in lines[2]
    assert lines[3].endswith("ok")
    assert lines[4].endswith(", 2 corrupted")

    _status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")
    assert ["corrupted", "corrupted", None] == [c["kind"] for c in json.loads(out)["checkpoints"]]


def _plain_torch_save(path: str) -> None:
    """Replace the checkpoint at ``path`` with the same payload written by plain ``torch.save``."""
    payload = torch.load(path, weights_only=True)
    os.remove(path)
    torch.save(payload, path)


_NO_CHECKSUM = (
    "no checksum: a plain torch.save archive, not written by torch_ckpt_hook, so damage to it "
    "cannot be detected; 'torch-ckpt inspect --no-verify' loads it if you trust it"
)


def test_ls_shows_a_plain_torch_save_file_as_unloadable_not_corrupted(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    _plain_torch_save(paths[0])
    _flip_a_byte(paths[1])

    status, out, err = _run(capsys, "ls", str(tmp_path))

    assert (0, "") == (status, err)
    lines = out.splitlines()
    assert lines[1].endswith(f"  unloadable: {_NO_CHECKSUM}"), lines[1]
    assert "CORRUPTED" not in lines[1]
    assert "CORRUPTED: checksum mismatch" in lines[2]
    assert lines[4].endswith(", 1 corrupted, 1 unloadable"), lines[4]
    assert 5 == len(lines), "the latest restores: no line about the session"

    _status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")
    document = json.loads(out)
    assert ["unloadable", "corrupted", None] == [c["kind"] for c in document["checkpoints"]]
    assert (paths[-1], None) == (document["restore"], document["restore_blocked_by"])


@pytest.fixture
def plain_latest(tmp_path: pathlib.Path) -> list[str]:
    """Checkpoints of steps 10, 20 and 30; the latest, 30, rewritten by plain torch.save."""
    paths = _save_checkpoints(tmp_path)
    _plain_torch_save(paths[-1])
    return paths


def test_ls_says_a_session_refuses_to_start_at_an_unloadable_latest(
    capsys: Capsys, tmp_path: pathlib.Path, plain_latest: list[str]
) -> None:
    status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    lines = out.splitlines()
    assert "restore" not in "".join(line.split("  unloadable")[0] for line in lines[1:4])
    assert (
        f"A new session refuses to start: it stops at model.ckpt-30 (unloadable: {_NO_CHECKSUM}) "
        "rather than restore an older checkpoint or train from step 0."
    ) == lines[-1]

    _status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")
    document = json.loads(out)
    assert (None, plain_latest[-1]) == (document["restore"], document["restore_blocked_by"])
    assert [False, False, False] == [c["restore"] for c in document["checkpoints"]]


def test_a_session_refuses_to_start_where_ls_says_it_does(
    capsys: Capsys, tmp_path: pathlib.Path, plain_latest: list[str]
) -> None:
    document = json.loads(_run(capsys, "ls", str(tmp_path), "--json")[1])
    assert plain_latest[-1] == document["restore_blocked_by"]

    model = torch.nn.Linear(3, 2)
    with pytest.raises(tch.CheckpointError, match=re.escape(plain_latest[-1])) as info:
        tch.SingularMonitoredSession(model, checkpoint_dir=str(tmp_path))
    assert not isinstance(info.value, tch.CheckpointCorruptedError)


def test_ls_says_a_session_refuses_to_start_at_an_unreadable_latest(
    capsys: Capsys, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _save_checkpoints(tmp_path)
    _flip_a_byte(paths[-1])  # skipped: the next older one, unreadable, stops restore
    real_open = builtins.open

    def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == paths[1]:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)

    status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    lines = out.splitlines()
    assert lines[4].endswith(", 1 corrupted, 1 unreadable"), lines[4]
    assert (
        "A new session refuses to start: it stops at model.ckpt-20 (unreadable: Permission "
        "denied) rather than restore an older checkpoint or train from step 0."
    ) == lines[-1]


def test_ls_says_a_session_refuses_to_start_when_every_checkpoint_is_corrupted(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    for path in _save_checkpoints(tmp_path, steps=(1, 2)):
        _flip_a_byte(path)

    _status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert (
        "A new session refuses to start: every checkpoint it would restore is corrupted, and it "
        "does not train from step 0 over them."
    ) == out.splitlines()[-1]


def test_ls_lists_checkpoints_on_disk_but_not_stray_temp_files(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    os.remove(tmp_path / "checkpoint")
    (tmp_path / f"model.ckpt-40.tmp-{'a' * 32}").write_bytes(b"half a save")
    (tmp_path / "notes-2").write_text("a user's file")

    _status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")

    listed = json.loads(out)["checkpoints"]
    assert paths == [c["path"] for c in listed]
    assert [False, False, True] == [c["latest"] for c in listed]


def test_ls_of_a_directory_without_checkpoints_says_so_and_exits_0(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    assert (0, f"No checkpoints in {tmp_path}\n", "") == _run(capsys, "ls", str(tmp_path))

    status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")
    assert 0 == status
    assert {
        "directory": str(tmp_path),
        "latest": None,
        "restore": None,
        "restore_blocked_by": None,
        "checkpoints": [],
        "best_checkpoints": None,
    } == json.loads(out)


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_shows_step_keys_optimizer_rng_and_every_tensor(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)

    status, out, err = _run(capsys, "inspect", paths[-1])

    assert (0, "") == (status, err)
    fields = dict(line.split(None, 1) for line in out.splitlines()[:2])
    assert paths[-1] == fields["Checkpoint"]
    assert "Global step   30" in out
    assert "Payload keys  format_version, global_step, model, optimizer, extra_state, rng" in out
    assert "Optimizer     SGD (inferred from its param groups), 1 param group, lr 0.1" in out
    assert "RNG states    python, " in out
    rows = {line.split()[0]: line.split(None, 1)[1].split() for line in out.splitlines() if line}
    assert ["[2,", "3]", "float32", "24", "B"] == rows["model.weight"]
    assert ["[2]", "float32", "8", "B"] == rows["model.bias"]
    assert ["3", "5,064", "5.0", "KiB"] == rows["total"]


def test_inspect_json_parses_and_totals_the_tensors(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    paths = _save_checkpoints(tmp_path)

    status, out, _err = _run(capsys, "inspect", paths[-1], "--json")

    assert 0 == status
    doc = json.loads(out)
    assert (30, 1) == (doc["global_step"], doc["format_version"])
    assert ["format_version", "global_step", "model", "optimizer", "extra_state", "rng"] == doc[
        "payload_keys"
    ]
    assert {
        "name": "model.weight",
        "shape": [2, 3],
        "dtype": "float32",
        "layout": "strided",
        "elements": 6,
        "bytes": 24,
    } in doc["tensors"]
    assert {"tensors": 2, "elements": 8, "bytes": 32} == doc["totals"]["model"]
    assert sum(t["bytes"] for t in doc["tensors"]) == doc["totals"]["all"]["bytes"]
    assert "SGD" == doc["optimizer"]["type"]
    assert {"python", "torch"} <= set(doc["rng_states"])
    assert [] == doc["extra_state"]
    assert [] == doc["problems"]


def test_inspect_names_extra_state(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    scaler = torch.amp.GradScaler("cpu")
    _save_checkpoints(tmp_path, steps=(5,), extra_state={"scaler": scaler})

    _status, out, _err = _run(capsys, "inspect", str(tmp_path / "model.ckpt-5"), "--json")

    assert ["scaler"] == json.loads(out)["extra_state"]


@pytest.mark.parametrize(
    "optimizer_type",
    [
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
    ],
)
def test_inspect_infers_the_optimizer_type(
    capsys: Capsys, tmp_path: pathlib.Path, optimizer_type: type[torch.optim.Optimizer]
) -> None:
    paths = _save_checkpoints(tmp_path, steps=(1,), optimizer_type=optimizer_type)

    _status, out, _err = _run(capsys, "inspect", paths[0], "--json")

    assert optimizer_type.__name__ == json.loads(out)["optimizer"]["type"]


def test_inspect_of_a_directory_shows_its_latest_checkpoint(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)

    _status, out, _err = _run(capsys, "inspect", str(tmp_path), "--json")

    assert paths[-1] == json.loads(out)["path"]


def test_inspect_of_a_corrupted_checkpoint_exits_1_in_one_line(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    _flip_a_byte(paths[-1])

    status, out, err = _run(capsys, "inspect", paths[-1])

    assert (1, "") == (status, out)
    assert err.startswith(
        f"torch-ckpt inspect: error: Checkpoint {paths[-1]} is corrupted: checksum mismatch"
    )
    assert 1 == len(err.splitlines())


def test_inspect_of_an_empty_directory_exits_1(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    status, out, err = _run(capsys, "inspect", str(tmp_path))

    assert (1, "") == (status, out)
    assert f"torch-ckpt inspect: error: no checkpoint in directory '{tmp_path}'\n" == err


def test_inspect_of_a_plain_torch_save_file_says_no_checksum_and_no_verify_loads_it(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    [path] = _save_checkpoints(tmp_path, steps=(7,))
    _plain_torch_save(path)

    status, out, err = _run(capsys, "inspect", path)
    assert (1, "") == (status, out)
    assert err.startswith(
        f"torch-ckpt inspect: error: Checkpoint {path} cannot be loaded: no checksum: a plain "
        "torch.save archive"
    ), err
    assert "corrupted" not in err

    status, out, err = _run(capsys, "inspect", path, "--no-verify", "--json")
    assert (0, "") == (status, err)
    assert 7 == json.loads(out)["global_step"]


def test_inspect_of_a_directory_that_a_session_refuses_warns_and_shows_it_with_no_verify(
    capsys: Capsys, tmp_path: pathlib.Path, plain_latest: list[str]
) -> None:
    status, out, err = _run(capsys, "inspect", str(tmp_path))

    assert (1, "") == (status, out)
    warning, error = err.splitlines()
    assert warning.startswith(
        "torch-ckpt inspect: warning: a new session refuses to start: it stops at model.ckpt-30 "
        "(unloadable: no checksum"
    ), warning
    assert error.startswith(
        f"torch-ckpt inspect: error: Checkpoint {plain_latest[-1]} cannot be loaded: no checksum"
    ), error

    status, out, err = _run(capsys, "inspect", str(tmp_path), "--no-verify", "--json")
    assert 0 == status
    assert plain_latest[-1] == json.loads(out)["path"]
    assert 1 == len(err.splitlines()), err


# -- verify -----------------------------------------------------------------------------------


def test_verify_of_intact_checkpoints_exits_0(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    _save_checkpoints(tmp_path)

    status, out, err = _run(capsys, "verify", str(tmp_path))

    assert (0, "") == (status, err)
    assert [
        "ok  model.ckpt-10",
        "ok  model.ckpt-20",
        "ok  model.ckpt-30",
        "3 checkpoints intact",
    ] == out.splitlines()


def test_verify_names_each_corrupted_checkpoint_and_exits_1(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    _flip_a_byte(paths[0])
    _truncate(paths[2])

    status, out, err = _run(capsys, "verify", str(tmp_path))

    assert 1 == status
    lines = out.splitlines()
    assert lines[0].startswith("CORRUPTED  model.ckpt-10: checksum mismatch")
    assert "ok         model.ckpt-20" == lines[1]
    assert lines[2].startswith("CORRUPTED  model.ckpt-30: truncated")
    assert (
        "torch-ckpt verify: error: 2 of 3 checkpoints corrupted: model.ckpt-10, model.ckpt-30\n"
        == err
    )


def test_verify_labels_a_plain_torch_save_file_unloadable_not_corrupted(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    _plain_torch_save(paths[1])
    _flip_a_byte(paths[2])

    status, out, err = _run(capsys, "verify", str(tmp_path))

    assert 1 == status
    lines = out.splitlines()
    assert "ok          model.ckpt-10" == lines[0]
    assert f"unloadable  model.ckpt-20: {_NO_CHECKSUM}" == lines[1]
    assert lines[2].startswith("CORRUPTED   model.ckpt-30: checksum mismatch")
    assert (
        "torch-ckpt verify: error: 2 of 3 checkpoints corrupted or unloadable: "
        "model.ckpt-20, model.ckpt-30\n"
    ) == err

    status, out, err = _run(capsys, "verify", paths[1])
    assert 1 == status
    assert out.startswith(f"unloadable  {paths[1]}: no checksum"), out
    assert f"torch-ckpt verify: error: 1 of 1 checkpoint unloadable: {paths[1]}\n" == err


@pytest.mark.parametrize(("damage", "expected_status"), [(None, 0), (_flip_a_byte, 1)])
def test_verify_of_one_file(
    capsys: Capsys, tmp_path: pathlib.Path, damage: Any, expected_status: int
) -> None:
    [path] = _save_checkpoints(tmp_path, steps=(7,))
    if damage is not None:
        damage(path)

    status, out, _err = _run(capsys, "verify", path)

    assert expected_status == status
    assert out.startswith("ok" if expected_status == 0 else "CORRUPTED")


def test_verify_of_an_empty_directory_exits_1(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    status, out, err = _run(capsys, "verify", str(tmp_path))

    assert (1, "") == (status, out)
    assert f"torch-ckpt verify: error: no checkpoints in {tmp_path}: nothing to verify\n" == err


# -- demo and python -m ---------------------------------------------------------------------


def test_demo_trains_and_resumes(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path / "demo")

    status, out, _err = _run(
        capsys, "demo", "--dir", directory, "--steps", "8", "--save-every", "4"
    )
    assert 0 == status
    assert f"No checkpoint in {directory}: training from step 0 to 8." == out.splitlines()[0]

    status, out, _err = _run(capsys, "demo", "--dir", directory, "--steps", "12")
    assert 0 == status
    assert f"Resumed from {directory}/model.ckpt-8 at step 8" == out.splitlines()[0]
    assert f"--dir {directory} --steps 112' resumes" in out


@pytest.mark.slow  # an interpreter start and a torch import: the one subprocess smoke test
def test_python_dash_m_runs_the_command() -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    completed = subprocess.run(
        [sys.executable, "-m", "torch_ckpt_hook", "ls", str(REPO / "no-such-dir")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert 2 == completed.returncode
    assert completed.stderr.startswith("torch-ckpt ls: error: argument DIR: expected an existing")


# -- the checkpoint a session restores --------------------------------------------------------


@pytest.fixture
def corrupted_latest(tmp_path: pathlib.Path) -> list[str]:
    """Checkpoints of steps 10, 20 and 30 in tmp_path; the latest, 30, has a flipped byte."""
    paths = _save_checkpoints(tmp_path)
    _flip_a_byte(paths[-1])
    return paths


def test_ls_marks_the_newest_intact_checkpoint_as_the_one_restored(
    capsys: Capsys, tmp_path: pathlib.Path, corrupted_latest: list[str]
) -> None:
    paths = corrupted_latest

    status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    lines = out.splitlines()
    assert ["restore", "ok"] == lines[2].split()[-2:]
    assert ["latest", "CORRUPTED:", "checksum", "mismatch:"] == lines[3].split()[-9:-5]
    assert "A new session skips the latest, model.ckpt-30, and restores model.ckpt-20." == lines[-1]

    _status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")
    document = json.loads(out)
    assert (paths[-1], paths[1]) == (document["latest"], document["restore"])
    assert [False, True, False] == [c["restore"] for c in document["checkpoints"]]


def test_the_checkpoint_marked_restore_is_the_one_a_session_restores(
    capsys: Capsys, tmp_path: pathlib.Path, corrupted_latest: list[str]
) -> None:
    marked = json.loads(_run(capsys, "ls", str(tmp_path), "--json")[1])["restore"]

    model = torch.nn.Linear(3, 2)
    with tch.SingularMonitoredSession(
        model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path)
    ) as sess:
        restored = sess.raw_session().restored_from

    assert restored == marked == corrupted_latest[1]


def test_inspect_of_a_directory_shows_the_newest_intact_and_warns_of_newer_ones(
    capsys: Capsys, tmp_path: pathlib.Path, corrupted_latest: list[str]
) -> None:
    status, out, err = _run(capsys, "inspect", str(tmp_path), "--json")

    assert 0 == status
    assert corrupted_latest[1] == json.loads(out)["path"]
    assert 1 == len(err.splitlines()), err
    assert err.startswith(
        "torch-ckpt inspect: warning: showing model.ckpt-20, the checkpoint a new session "
        "restores; newer ones are corrupted (model.ckpt-30: checksum mismatch"
    )


def test_inspect_of_a_directory_without_an_intact_checkpoint_reports_the_latest(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    [path] = _save_checkpoints(tmp_path, steps=(3,))
    _flip_a_byte(path)

    status, out, err = _run(capsys, "inspect", str(tmp_path))

    assert (1, "") == (status, out)
    assert err.startswith(f"torch-ckpt inspect: error: Checkpoint {path} is corrupted")


# -- file names that are not UTF-8 ------------------------------------------------------------


def _strict_utf8_streams(monkeypatch: pytest.MonkeyPatch) -> list[io.TextIOWrapper]:
    """stdout and stderr as PYTHONIOENCODING=utf-8:strict makes them.

    Set in the test body, not in a fixture: pytest's capture puts its own streams back
    between setup and call.
    """
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in "12"]
    monkeypatch.setattr(sys, "stdout", streams[0])
    monkeypatch.setattr(sys, "stderr", streams[1])
    return streams


def _read(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")


@pytest.mark.parametrize("argv", [["ls"], ["ls", "--json"], ["verify"], ["inspect", "--json"]])
def test_a_file_name_that_is_not_utf8_is_shown_with_escapes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    (tmp_path / "saved").mkdir()
    [saved] = _save_checkpoints(tmp_path / "saved", steps=(1,))
    name = os.fsdecode(b"mod\xffel.ckpt-1")
    shutil.copy(saved, tmp_path / name)
    _flip_a_byte(str(tmp_path / name))  # and its path lands in a message too

    target = str(tmp_path / name) if argv[0] == "inspect" else str(tmp_path)
    streams = _strict_utf8_streams(monkeypatch)
    status = main([argv[0], target, *argv[1:]])

    out, err = (_read(stream) for stream in streams)
    # JSON writes the escape's backslash as two.
    assert "mod\\xffel.ckpt-1" in (out + err).replace("\\\\", "\\")
    assert "\udcff" not in out + err
    assert ("\ufffd" in out + err) is False
    if argv == ["ls", "--json"]:
        assert 0 == status
        [listed] = json.loads(out)["checkpoints"]
        assert ("mod\\xffel.ckpt-1", str(tmp_path / "mod\\xffel.ckpt-1")) == (
            listed["name"],
            listed["path"],
        )
    else:
        assert (0 if argv == ["ls"] else 1) == status


# -- odd but loadable payloads ----------------------------------------------------------------


def _write_payload(path: pathlib.Path, **overrides: Any) -> str:
    payload: dict[str, Any] = {
        "format_version": 1,
        "global_step": 3,
        "model": {"weight": torch.ones(2, 2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "extra_state": {},
        "rng": {},
    }
    payload.update(overrides)
    atomic_write(path, lambda f: save_with_checksum(payload, f))
    return str(path)


@pytest.mark.parametrize(
    ("optimizer", "problem"),
    [
        (
            {"state": {}, "param_groups": "adam"},
            "optimizer.param_groups is a str, not a list of mappings",
        ),
        (
            {"state": {}, "param_groups": [1, "x"]},
            "optimizer.param_groups holds 2 entries that are not mappings",
        ),
        ({"state": [], "param_groups": []}, "optimizer.state is a list, not a mapping"),
        ("adam", "optimizer is a str, not a mapping or a list of mappings"),
    ],
)
def test_inspect_reports_an_optimizer_state_of_another_shape(
    capsys: Capsys, tmp_path: pathlib.Path, optimizer: Any, problem: str
) -> None:
    path = _write_payload(tmp_path / "odd-1", optimizer=optimizer)

    status, out, err = _run(capsys, "inspect", path)
    assert (0, "") == (status, err)
    assert f"Problem       {problem}" in out

    _status, out, _err = _run(capsys, "inspect", path, "--json")
    assert [problem] == json.loads(out)["problems"]


@pytest.mark.parametrize(
    ("global_step", "expected"),
    [(torch.tensor(7), 7), (b"\x00\xff", "b'\\x00\\xff'"), (float("nan"), None)],
)
def test_inspect_json_holds_only_json_values(
    capsys: Capsys, tmp_path: pathlib.Path, global_step: Any, expected: Any
) -> None:
    optimizer = {"state": {}, "param_groups": [{"lr": float("nan"), "params": [0]}]}
    path = _write_payload(tmp_path / "odd-1", global_step=global_step, optimizer=optimizer)

    status, out, err = _run(capsys, "inspect", path, "--json")

    assert (0, "") == (status, err)
    doc = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert expected == doc["global_step"]
    assert None is doc["optimizer"]["lr"]

    status, out, _err = _run(capsys, "inspect", path)
    assert 0 == status
    assert "lr nan" in out


def test_inspect_counts_the_bytes_a_sparse_tensor_stores(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    with torch.sparse.check_sparse_tensor_invariants(True):
        sparse = torch.sparse_coo_tensor(
            torch.tensor([[0, 999], [5, 0]]), torch.tensor([1.0, 2.0]), (1000, 1000)
        )
    path = _write_payload(tmp_path / "sparse-1", model={"embedding": sparse})

    _status, out, _err = _run(capsys, "inspect", path, "--json")

    [tensor] = json.loads(out)["tensors"]
    # 2 float32 values and a 2x2 int64 index: what the file holds, not 1000 * 1000 floats.
    assert ("model.embedding", "sparse_coo", [1000, 1000], 1_000_000, 2 * 4 + 4 * 8) == tuple(
        tensor[key] for key in ("name", "layout", "shape", "elements", "bytes")
    )
    _status, out, _err = _run(capsys, "inspect", path)
    [row] = [line.split() for line in out.splitlines() if line.startswith("model.embedding")]
    assert ["model.embedding", "[1000,", "1000]", "float32", "(sparse_coo)", "40", "B"] == row


# -- failures: one line, never a traceback ----------------------------------------------------


def test_demo_in_a_directory_of_another_model_fails_in_one_line(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    status, _out, err = _run(capsys, "demo", "--dir", str(tmp_path), "--steps", "5")

    assert 1 == status
    assert "Traceback" not in err
    err = err.splitlines(keepends=True)[-1]  # after the demo's own log lines
    assert err.startswith(
        f"torch-ckpt demo: error: {tmp_path} holds checkpoints of a different model (the "
        "checkpoint's model state does not fit the model (missing keys"
    )
    assert err.endswith("); use an empty --dir\n")
    assert before == {name: (tmp_path / name).read_bytes() for name in before}
    assert [] == [
        p for p in tmp_path.iterdir() if p.name.startswith("model.ckpt") and p.name not in before
    ]
    assert paths[-1] == tch.latest_checkpoint(str(tmp_path))


def test_demo_with_a_nan_loss_fails_in_one_line(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    def nan_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch_for_step(step)
        return inputs, torch.full_like(targets, float("nan"))

    def demo_with_nan_batches(args: Any) -> int:
        return demo(args.dir, args.steps, args.save_every, batches=nan_batch)

    status, _out, err = _run(
        capsys, "demo", "--dir", str(tmp_path), "--steps", "5", demo=demo_with_nan_batches
    )

    assert 1 == status
    assert "Traceback" not in err
    lines = err.splitlines()
    assert "torch-ckpt: error: Model diverged with loss = NaN." in lines
    assert "torch-ckpt demo: error: NaN loss during training." == lines[-1]


def test_demo_that_cannot_create_its_directory_fails_in_one_line(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "file").write_text("in the way")

    status, _out, err = _run(capsys, "demo", "--dir", str(tmp_path / "file" / "sub"))

    assert 1 == status
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("torch-ckpt demo: error: "), err
    assert str(tmp_path / "file" / "sub") in err.splitlines()[-1]


def test_an_unexpected_error_is_one_line_without_a_traceback(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    def broken(args: Any) -> int:
        raise ZeroDivisionError("a bug\non two lines")

    assert (1, "", "torch-ckpt: error: ZeroDivisionError: a bug on two lines\n") == _run(
        capsys, "ls", str(tmp_path), ls=broken
    )


def test_an_unexpected_error_without_a_message_is_its_type(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    def broken(args: Any) -> int:
        raise ZeroDivisionError

    assert (1, "", "torch-ckpt: error: ZeroDivisionError\n") == _run(
        capsys, "ls", str(tmp_path), ls=broken
    )


def test_a_reader_that_leaves_ends_the_command_quietly(
    capsys: Capsys, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_checkpoints(tmp_path)

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())

    status = main(["ls", str(tmp_path)])

    assert (1, "") == (status, capsys.readouterr().err)


def test_ls_of_a_directory_that_cannot_be_listed_fails_in_one_line(
    capsys: Capsys, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root here, where chmod 000 does not stop a read: refuse the listing instead.
    real_scandir = os.scandir

    def refusing_scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)

    assert (1, "", f"torch-ckpt ls: error: {tmp_path}: Permission denied\n") == _run(
        capsys, "ls", str(tmp_path)
    )


@pytest.fixture
def unreadable_middle_checkpoint(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Three checkpoints; opening the second raises PermissionError (chmod is moot as root)."""
    paths = _save_checkpoints(tmp_path)
    real_open = builtins.open

    def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == paths[1]:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    return paths


def test_ls_shows_an_unreadable_checkpoint_as_unreadable(
    capsys: Capsys, tmp_path: pathlib.Path, unreadable_middle_checkpoint: list[str]
) -> None:
    status, out, err = _run(capsys, "ls", str(tmp_path))

    assert (0, "") == (status, err)
    lines = out.splitlines()
    assert lines[2].endswith("  unreadable: Permission denied")
    assert "CORRUPTED" not in out
    assert lines[4].endswith(", 1 unreadable")


def test_verify_says_unreadable_rather_than_corrupted(
    capsys: Capsys, tmp_path: pathlib.Path, unreadable_middle_checkpoint: list[str]
) -> None:
    paths = unreadable_middle_checkpoint
    _flip_a_byte(paths[0])

    status, out, err = _run(capsys, "verify", str(tmp_path))

    assert 1 == status
    assert [
        "CORRUPTED   model.ckpt-10: checksum mismatch",
        "unreadable  model.ckpt-20: Permission denied",
        "ok          model.ckpt-30",
    ] == [line.split(": stored")[0] for line in out.splitlines()]
    assert (
        "torch-ckpt verify: error: 2 of 3 checkpoints corrupted or unreadable: "
        "model.ckpt-10, model.ckpt-20\n"
    ) == err


def test_package_warnings_carry_the_command_prefix_once(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    _save_checkpoints(tmp_path)
    os.remove(tmp_path / "checkpoint")
    os.mkdir(tmp_path / "checkpoint")  # a state file that cannot be read
    package_logger = logging.getLogger("torch_ckpt_hook")
    handlers = list(package_logger.handlers)

    status, out, err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    assert "model.ckpt-30" in out
    lines = err.splitlines()
    assert lines, "expected a warning about the state file"
    assert all(line.startswith("torch-ckpt: warning: ") for line in lines), err
    assert len(set(lines)) == len(lines), err
    assert any(
        f"Checkpoint state file {tmp_path}/checkpoint is unreadable" in line for line in lines
    )
    assert handlers == package_logger.handlers


# -- demo's hint ------------------------------------------------------------------------------


def test_an_interrupted_demo_suggests_the_same_command(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    def interrupted_at_step_3(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the demo finishes the step and saves
        return batch_for_step(step)

    def interrupted_demo(args: Any) -> int:
        return demo(args.dir, args.steps, args.save_every, batches=interrupted_at_step_3)

    directory = str(tmp_path / "demo")

    status, out, _err = _run(
        capsys, "demo", "--dir", directory, "--steps", "10", demo=interrupted_demo
    )

    assert 0 == status
    assert "Stopped at step 4 of 10: run the same command again to resume." in out
    assert (
        f"Next: 'torch-ckpt ls {directory}' lists the checkpoints; "
        f"'torch-ckpt demo --dir {directory} --steps 10' resumes and trains to step 10."
    ) == out.splitlines()[-1]


# -- inspect: values, several optimizers, metrics ---------------------------------------------


def _gan_payload() -> dict[str, Any]:
    """A payload as a GAN's session writes it: two optimizers, a scheduler and plain values."""
    torch.manual_seed(0)
    generator, discriminator = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.1, momentum=0.9)
    discriminator(generator(torch.ones(1, 3))).sum().backward()
    opt_g.step()
    opt_d.step()
    scheduler = torch.optim.lr_scheduler.StepLR(opt_g, step_size=5)
    return {
        "format_version": 1,
        "global_step": 7,
        "model": generator.state_dict(),
        "optimizer": [opt_g.state_dict(), opt_d.state_dict()],
        "extra_state": {
            "scheduler": scheduler.state_dict(),
            "meta": {
                "best_val_loss": 1.25,
                "config": {"n_layer": 2, "name": "gpt"},
                "iter_num": None,
                "vocab": list(range(5000)),
                "notes": "x" * 3000,
            },
        },
        "rng": {"torch": torch.get_rng_state()},
    }


def test_inspect_shows_the_values_that_are_not_tensors(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    path = _write_payload(tmp_path / "gan-7", **_gan_payload())

    status, out, err = _run(capsys, "inspect", path)

    assert (0, "") == (status, err)
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines() if line}
    assert ["float", "1.25"] == rows["extra_state.meta.best_val_loss"]
    assert ["int", "2"] == rows["extra_state.meta.config.n_layer"]
    assert ["str", "'gpt'"] == rows["extra_state.meta.config.name"]
    assert ["None", "None"] == rows["extra_state.meta.iter_num"]
    assert ["int", "0"] == rows["extra_state.scheduler.last_epoch"]
    assert ["list", "[0.0002]"] == rows["extra_state.scheduler.base_lrs"]
    vocab = rows["extra_state.meta.vocab"][1]
    assert vocab.startswith("[0, 1, 2, "), vocab
    assert vocab.endswith("... (5,000 items)"), vocab
    assert rows["extra_state.meta.notes"][1].endswith("... (3,000 chars)")
    assert all(len(line) < 160 for line in out.splitlines()), "a big value fills one line"
    assert "rng.torch" in rows, "tensors are still listed"
    assert "optimizer.0.param_groups.0.lr" not in rows, "the optimizer line summarizes them"
    assert "global_step" not in rows, "it has its own line"


def test_inspect_json_holds_the_values_cut_when_big(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    path = _write_payload(tmp_path / "gan-7", **_gan_payload())

    status, out, _err = _run(capsys, "inspect", path, "--json")

    assert 0 == status
    values = {value["name"]: value for value in json.loads(out)["values"]}
    assert {
        "name": "extra_state.meta.best_val_loss",
        "type": "float",
        "value": 1.25,
        "length": None,
        "truncated": False,
    } == values["extra_state.meta.best_val_loss"]
    assert "gpt" == values["extra_state.meta.config.name"]["value"]
    assert None is values["extra_state.meta.iter_num"]["value"]
    vocab = values["extra_state.meta.vocab"]
    assert (list(range(100)), 5000, True) == (vocab["value"], vocab["length"], vocab["truncated"])
    notes = values["extra_state.meta.notes"]
    assert (1000, 3000, True) == (len(notes["value"]), notes["length"], notes["truncated"])


def test_inspect_describes_each_of_several_optimizers(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    path = _write_payload(tmp_path / "gan-7", **_gan_payload())

    status, out, err = _run(capsys, "inspect", path)

    assert (0, "") == (status, err)
    assert (
        "Optimizer 0   Adam (inferred from its param groups), 1 param group, lr 0.0002, "
        "state for 2 parameters"
    ) in out
    assert "Optimizer 1   SGD (inferred from its param groups), 1 param group, lr 0.1" in out
    assert "Problem" not in out
    assert "optimizer.1.state.0.momentum_buffer" in out

    _status, out, _err = _run(capsys, "inspect", path, "--json")
    doc = json.loads(out)
    assert ["Adam", "SGD"] == [optimizer["type"] for optimizer in doc["optimizer"]]
    assert [] == doc["problems"]
    assert 8 == doc["totals"]["optimizer"]["tensors"]


def test_inspect_names_an_entry_of_an_optimizer_list_that_is_not_a_state_dict(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    sgd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = _write_payload(tmp_path / "odd-1", optimizer=[sgd, 3])

    status, out, _err = _run(capsys, "inspect", path, "--json")

    assert 0 == status
    doc = json.loads(out)
    assert ["optimizer.1 is an int, not a mapping"] == doc["problems"]
    assert None is doc["optimizer"][1]


def test_inspect_shows_a_best_checkpoints_metrics(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    path = _write_payload(tmp_path / "best.ckpt-3", metrics={"val_loss": 0.25, "acc": 0.5})

    status, out, err = _run(capsys, "inspect", path)

    assert (0, "") == (status, err)
    assert "Metrics       val_loss 0.25, acc 0.5" in out
    assert "metrics.val_loss" not in out, "the metrics have their own line"

    _status, out, _err = _run(capsys, "inspect", path, "--json")
    assert {"val_loss": 0.25, "acc": 0.5} == json.loads(out)["metrics"]


def test_inspect_json_has_no_metrics_for_a_regular_checkpoint(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save_checkpoints(tmp_path, steps=(5,))

    _status, out, _err = _run(capsys, "inspect", paths[0], "--json")

    doc = json.loads(out)
    assert (None, []) == (doc["metrics"], doc["values"])


# -- ls: best checkpoints ---------------------------------------------------------------------


def _save_best(directory: pathlib.Path, losses: dict[int, float]) -> list[str]:
    """Best checkpoints as BestCheckpointSaverHook writes them: a payload with ``metrics``, and
    their own state file, ``best_checkpoint``, naming the one with the lowest loss."""
    from torch_ckpt_hook._checkpoint_file import write_checkpoint
    from torch_ckpt_hook._state_file import update_checkpoint_state

    session = tch.Session(torch.nn.Linear(3, 2))
    paths = []
    for step, loss in losses.items():
        session.global_step = step
        path = str(directory / f"best.ckpt-{step}")
        write_checkpoint(path, {**session.state_dict(), "metrics": {"val_loss": loss}})
        paths.append(path)
    best = min(paths, key=lambda p: losses[int(p.rsplit("-", 1)[1])])
    update_checkpoint_state(directory, best, paths, latest_filename="best_checkpoint")
    return paths


def _without_size_and_time(row: str) -> list[str]:
    """An ls row's words, less SIZE (two words) and SAVED (two)."""
    words = row.split()
    return words[:2] + words[6:]


def test_ls_lists_best_checkpoints_apart_and_marks_the_best_with_its_metric(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    _save_checkpoints(tmp_path)
    _save_best(tmp_path, {20: 0.5, 25: 0.25})

    status, out, err = _run(capsys, "ls", str(tmp_path))

    assert (0, "") == (status, err)
    lines = out.splitlines()
    assert ["model.ckpt-10", "model.ckpt-20", "model.ckpt-30"] == [
        line.split()[0] for line in lines[1:4]
    ]
    assert "3 checkpoints, " in lines[4]
    assert "Best checkpoints (best_checkpoint):" == lines[6]
    assert lines[7].split() == ["NAME", "STEP", "SIZE", "SAVED", "BEST", "METRICS", "INTEGRITY"]
    assert ["best.ckpt-20", "20", "val_loss", "0.5", "ok"] == _without_size_and_time(lines[8])
    assert ["best.ckpt-25", "25", "best", "val_loss", "0.25", "ok"] == _without_size_and_time(
        lines[9]
    )
    assert lines[10].startswith("2 best checkpoints, ")
    assert lines[10].endswith("; the best: best.ckpt-25 (val_loss 0.25)"), lines[10]
    assert ["latest", "restore", "ok"] == lines[3].split()[-3:], "the regular series as before"


def test_ls_json_holds_the_best_checkpoints(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    paths = _save_checkpoints(tmp_path)
    best = _save_best(tmp_path, {20: 0.5, 25: 0.25})

    status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")

    assert 0 == status
    doc = json.loads(out)
    assert paths == [c["path"] for c in doc["checkpoints"]]
    assert (paths[-1], paths[-1]) == (doc["latest"], doc["restore"])
    series = doc["best_checkpoints"]
    assert ("best_checkpoint", best[1], {"val_loss": 0.25}) == (
        series["state_file"],
        series["best"],
        series["metrics"],
    )
    assert best == [c["path"] for c in series["checkpoints"]]
    assert [False, True] == [c["best"] for c in series["checkpoints"]]
    assert [{"val_loss": 0.5}, {"val_loss": 0.25}] == [c["metrics"] for c in series["checkpoints"]]
    assert [True, True] == [c["intact"] for c in series["checkpoints"]]


def test_ls_shows_a_corrupted_best_checkpoint_without_metrics(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    best = _save_best(tmp_path, {20: 0.5, 25: 0.25})
    _flip_a_byte(best[0])

    status, out, _err = _run(capsys, "ls", str(tmp_path))

    assert 0 == status
    assert f"No regular checkpoints in {tmp_path}" == out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("best.ckpt-20 "))
    assert ["best.ckpt-20", "20", "-", "CORRUPTED:", "checksum", "mismatch:"] == (
        _without_size_and_time(row)[:6]
    ), row
    assert "2 best checkpoints, " in out
    assert ", 1 corrupted; the best: best.ckpt-25" in out


def test_verify_checks_the_best_checkpoints_too(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    _save_checkpoints(tmp_path, steps=(10,))
    best = _save_best(tmp_path, {20: 0.5})
    _flip_a_byte(best[0])

    status, _out, err = _run(capsys, "verify", str(tmp_path))

    assert 1 == status
    assert "1 of 2 checkpoints corrupted: best.ckpt-20" in err
