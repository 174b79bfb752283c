"""``torch-ckpt ls / inspect / verify / export`` on sharded checkpoint directories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sharded_dirs import flip_byte, save_sharded

from torch_ckpt_hook import Saver, Session, load_checkpoint, verify_checkpoint
from torch_ckpt_hook._checkpoint_file import write_checkpoint
from torch_ckpt_hook._cli import main
from torch_ckpt_hook._sharded_dir import MANIFEST_NAME
from torch_ckpt_hook._state_file import update_checkpoint_state

Capsys = pytest.CaptureFixture[str]


def _run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _session() -> Session:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    session = Session(model, optimizer)
    session.global_step = 7
    return session


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """model.ckpt-3 a file, model.ckpt-7 a sharded directory, the latest."""
    session = _session()
    session.global_step = 3
    write_checkpoint(tmp_path / "model.ckpt-3", session.state_dict())
    session.global_step = 7
    save_sharded(session, tmp_path / "model.ckpt-7")
    update_checkpoint_state(
        str(tmp_path),
        str(tmp_path / "model.ckpt-7"),
        [str(tmp_path / "model.ckpt-3"), str(tmp_path / "model.ckpt-7")],
    )
    return tmp_path


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def test_ls_lists_a_directory_with_the_size_of_its_files(capsys: Capsys, run_dir: Path) -> None:
    status, out, _err = _run(capsys, "ls", "--json", str(run_dir))

    document = json.loads(out)
    entries = {item["name"]: item for item in document["checkpoints"]}
    assert 0 == status
    assert ["model.ckpt-3", "model.ckpt-7"] == sorted(entries)
    sharded = entries["model.ckpt-7"]
    assert (True, True, True) == (sharded["intact"], sharded["latest"], sharded["restore"])
    assert _dir_bytes(run_dir / "model.ckpt-7") == sharded["size_bytes"]


def test_ls_shows_a_damaged_directory_and_the_fallback(capsys: Capsys, run_dir: Path) -> None:
    flip_byte(run_dir / "model.ckpt-7" / "__0_0.distcp")

    status, out, _err = _run(capsys, "ls", str(run_dir))

    assert 0 == status
    line = next(line for line in out.splitlines() if line.startswith("model.ckpt-7"))
    assert "CORRUPTED: checksum mismatch: __0_0.distcp" in line
    assert "skips the latest, model.ckpt-7, and restores model.ckpt-3" in out


def test_ls_reports_a_directory_that_never_committed_as_incomplete(
    capsys: Capsys, run_dir: Path
) -> None:
    save_sharded(_session(), run_dir / "model.ckpt-9", manifest=False)

    _status, out, _err = _run(capsys, "ls", "--json", str(run_dir))

    # Named like a checkpoint, so listed to be reported; never the latest or the restore.
    item = {item["name"]: item for item in json.loads(out)["checkpoints"]}["model.ckpt-9"]
    assert ("corrupted", False, False) == (item["kind"], item["latest"], item["restore"])
    assert item["problem"].startswith("incomplete: no torch_ckpt_manifest.json")


def test_verify_checks_a_directory_against_its_manifest(capsys: Capsys, run_dir: Path) -> None:
    target = run_dir / "model.ckpt-7"
    status, out, _err = _run(capsys, "verify", str(target))
    assert (0, True) == (status, "1 checkpoint intact" in out)

    os.remove(target / MANIFEST_NAME)
    status, out, err = _run(capsys, "verify", str(target))
    assert 1 == status
    assert "incomplete: no torch_ckpt_manifest.json" in out
    assert "1 of 1 checkpoint" in err


def test_verify_of_the_run_directory_covers_files_and_directories(
    capsys: Capsys, run_dir: Path
) -> None:
    status, out, _err = _run(capsys, "verify", str(run_dir))

    assert 0 == status
    assert "2 checkpoints intact" in out


def test_inspect_shows_the_assembled_payload(capsys: Capsys, run_dir: Path) -> None:
    status, out, _err = _run(capsys, "inspect", "--json", str(run_dir / "model.ckpt-7"))

    document: dict[str, Any] = json.loads(out)
    tensors = {t["name"]: t for t in document["tensors"]}
    assert 0 == status
    assert 7 == document["global_step"]
    assert [3, 4] == tensors["model.0.weight"]["shape"]
    assert "optimizer.state.0.weight.exp_avg" in tensors
    assert "sharded_keys" not in document["payload_keys"]
    assert 1 == document["optimizer"]["param_groups"]
    assert _dir_bytes(run_dir / "model.ckpt-7") == document["size_bytes"]


def test_inspect_of_the_run_directory_shows_the_sharded_latest(
    capsys: Capsys, run_dir: Path
) -> None:
    status, out, _err = _run(capsys, "inspect", "--json", str(run_dir))

    assert 0 == status
    assert str(run_dir / "model.ckpt-7") == json.loads(out)["path"]


@pytest.mark.parametrize("options", [[], ["--model-only"], ["--dtype", "bfloat16"]])
def test_export_writes_one_verified_file_from_a_directory(
    capsys: Capsys, run_dir: Path, tmp_path: Path, options: list[str]
) -> None:
    src = run_dir / "model.ckpt-7"
    dst = tmp_path / "out.pt"

    status, out, _err = _run(capsys, "export", str(src), str(dst), *options)

    assert 0 == status, out
    assert None is verify_checkpoint(dst)
    expected = load_checkpoint(src)["model"]
    if options == ["--model-only"]:
        exported = torch.load(dst, weights_only=True)
    else:
        exported = load_checkpoint(dst)["model"]
    assert sorted(expected) == sorted(exported)
    dtype = torch.bfloat16 if options[:1] == ["--dtype"] else torch.float32
    assert {dtype} == {t.dtype for t in exported.values()}


def test_an_exported_directory_restores_into_a_plain_session(
    capsys: Capsys, run_dir: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "full.pt"
    _run(capsys, "export", str(run_dir / "model.ckpt-7"), str(dst))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fresh = Session(model, torch.optim.AdamW(model.parameters(), lr=0.1))

    Saver().restore(fresh, str(dst))

    original = _session()
    expected_state = original.optimizer.state_dict()  # type: ignore[union-attr]
    restored_state = fresh.optimizer.state_dict()  # type: ignore[union-attr]
    assert expected_state["state"].keys() == restored_state["state"].keys()
    for index, value in expected_state["state"].items():
        assert torch.equal(value["exp_avg"], restored_state["state"][index]["exp_avg"])
    assert 0.003 == restored_state["param_groups"][0]["lr"]
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key]), key
    assert 7 == fresh.global_step


def test_export_safetensors_from_a_directory(capsys: Capsys, run_dir: Path, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    dst = tmp_path / "model.safetensors"

    status, _out, _err = _run(
        capsys, "export", str(run_dir / "model.ckpt-7"), str(dst), "--safetensors"
    )

    assert 0 == status
    assert sorted(load_checkpoint(run_dir / "model.ckpt-7")["model"]) == sorted(
        safetensors.load_file(str(dst))
    )
