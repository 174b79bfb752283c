"""The torch-ckpt command, run in-process through main(argv): every command and error path."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._cli import main

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


def _run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- arguments and help -----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["ls", "--help"], ["inspect", "--help"]])
def test_help_exits_0_and_describes_the_commands(capsys: Capsys, argv: list[str]) -> None:
    status, out, err = _run(capsys, *argv)

    assert (0, "") == (status, err)
    assert "usage: torch-ckpt" in out
    assert "exit status:" in out


def test_top_level_help_lists_every_command(capsys: Capsys) -> None:
    _status, out, _err = _run(capsys, "--help")

    for command in ("ls", "inspect", "verify", "demo"):
        assert f"    {command} " in out


def test_version(capsys: Capsys) -> None:
    status, out, _err = _run(capsys, "--version")

    assert (0, f"torch-ckpt {tch.__version__}\n") == (status, out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "torch-ckpt: error: expected a command: ls, inspect, verify or demo"),
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
        (["ls", "{dir}", "--bogus"], "torch-ckpt: error: unrecognized arguments: --bogus"),
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
    }
    (tmp_path / "file").write_text("not a checkpoint")
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
    assert ["NAME", "STEP", "SIZE", "SAVED", "LATEST", "INTEGRITY"] == lines[0].split()
    assert ["model.ckpt-10", "model.ckpt-20", "model.ckpt-30"] == [
        line.split()[0] for line in lines[1:4]
    ]
    assert lines[3].split()[-2:] == ["latest", "ok"]
    assert lines[1].split()[-1] == "ok"
    assert "latest" not in lines[1]
    assert lines[4].startswith("3 checkpoints, ")
    # Columns are aligned: every row puts INTEGRITY at the same offset.
    assert 1 == len({line.rindex(line.split()[-1]) for line in lines[:4]})


def test_ls_json_parses_and_holds_every_field(capsys: Capsys, tmp_path: pathlib.Path) -> None:
    paths = _save_checkpoints(tmp_path)

    status, out, _err = _run(capsys, "ls", str(tmp_path), "--json")

    assert 0 == status
    document = json.loads(out)
    assert str(tmp_path) == document["directory"]
    assert paths[-1] == document["latest"]
    assert [10, 20, 30] == [c["step"] for c in document["checkpoints"]]
    newest = document["checkpoints"][-1]
    assert {
        "path": paths[-1],
        "name": "model.ckpt-30",
        "step": 30,
        "size_bytes": os.path.getsize(paths[-1]),
        "intact": True,
        "problem": None,
        "latest": True,
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
    assert {"directory": str(tmp_path), "latest": None, "checkpoints": []} == json.loads(out)


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
        "elements": 6,
        "bytes": 24,
    } in doc["tensors"]
    assert {"tensors": 2, "elements": 8, "bytes": 32} == doc["totals"]["model"]
    assert sum(t["bytes"] for t in doc["tensors"]) == doc["totals"]["all"]["bytes"]
    assert "SGD" == doc["optimizer"]["type"]
    assert {"python", "torch"} <= set(doc["rng_states"])
    assert [] == doc["extra_state"]


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
