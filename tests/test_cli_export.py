"""``torch-ckpt export``: a full checkpoint, the model alone, a dtype, safetensors; DST rules."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._cli import main

Capsys = pytest.CaptureFixture[str]


def _run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


class _Net(torch.nn.Module):
    """Floating parameters, an integer buffer (BatchNorm's counter) and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def _save(directory: pathlib.Path, steps: tuple[int, ...] = (10,)) -> list[str]:
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.tensor([0, 1, 2])).sum().backward()
    optimizer.step()
    session = tch.Session(model, optimizer)
    saver = tch.Saver()
    paths = []
    for step in steps:
        session.global_step = step
        paths.append(saver.save(session, str(directory / "model.ckpt"), global_step=step))
    saver.wait_until_finished()
    return paths


def _assert_same_tensors(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert tensor.dtype == actual[name].dtype, name
        assert torch.equal(tensor, actual[name]), name


@pytest.fixture
def src(tmp_path: pathlib.Path) -> str:
    """A checkpoint of step 10, in its own directory (``tmp_path / "run"``)."""
    run = tmp_path / "run"
    run.mkdir()
    return _save(run)[0]


# -- what is written --------------------------------------------------------------------------


def test_export_writes_a_verified_checkpoint_that_loads_as_the_source(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = str(tmp_path / "exported.ckpt")

    status, out, err = _run(capsys, "export", src, dst)

    assert (0, "") == (status, err)
    assert out.startswith(f"Exported {src} (step 10) to {dst}: a checkpoint file, "), out
    assert None is tch.verify_checkpoint(dst)
    expected, actual = tch.load_checkpoint(src), tch.load_checkpoint(dst)
    assert expected.keys() == actual.keys()
    _assert_same_tensors(expected["model"], actual["model"])
    assert 10 == actual["global_step"]
    assert expected["optimizer"]["param_groups"] == actual["optimizer"]["param_groups"]


def test_an_exported_checkpoint_restores_a_session(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = str(tmp_path / "exported.ckpt")
    assert 0 == _run(capsys, "export", src, dst)[0]
    model = _Net()
    session = tch.Session(model, torch.optim.Adam(model.parameters(), lr=0.01))

    tch.Saver().restore(session, dst)

    assert 10 == session.global_step
    _assert_same_tensors(tch.load_checkpoint(src)["model"], model.state_dict())


def test_model_only_writes_the_state_dict_alone_with_a_checksum(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = str(tmp_path / "model.pt")

    status, out, err = _run(capsys, "export", src, dst, "--model-only")

    assert (0, "") == (status, err)
    assert "the model's tensors, 7 tensors" in out
    assert "torch.load(DST, weights_only=True) loads it" in out
    assert None is tch.verify_checkpoint(dst)
    state = torch.load(dst, weights_only=True)
    _assert_same_tensors(tch.load_checkpoint(src)["model"], state)
    _Net().load_state_dict(state)  # what it is for
    with pytest.raises(tch.CheckpointUnloadableError, match="holds no torch_ckpt_hook payload"):
        tch.load_checkpoint(dst)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_casts_the_floating_tensors_and_keeps_the_integer_ones(
    capsys: Capsys, tmp_path: pathlib.Path, src: str, dtype: str
) -> None:
    dst = str(tmp_path / "model.pt")

    status, out, _err = _run(capsys, "export", src, dst, "--model-only", "--dtype", dtype)

    assert 0 == status
    assert f"6 cast to {dtype}" in out
    state = torch.load(dst, weights_only=True)
    assert getattr(torch, dtype) == state["embed.weight"].dtype
    assert getattr(torch, dtype) == state["norm.running_mean"].dtype
    assert torch.int64 == state["norm.num_batches_tracked"].dtype
    source = tch.load_checkpoint(src)["model"]
    assert torch.equal(source["embed.weight"].to(getattr(torch, dtype)), state["embed.weight"])


def test_dtype_of_a_full_checkpoint_casts_the_model_and_keeps_the_optimizer_state(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = str(tmp_path / "half.ckpt")

    status, out, _err = _run(capsys, "export", src, dst, "--dtype", "bfloat16")

    assert 0 == status
    assert "6 model tensors cast to bfloat16" in out
    payload = tch.load_checkpoint(dst)
    assert torch.bfloat16 == payload["model"]["embed.weight"].dtype
    assert torch.float32 == payload["optimizer"]["state"][0]["exp_avg"].dtype
    assert torch.uint8 == payload["rng"]["torch"].dtype


def test_safetensors_writes_the_model_tensors(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    dst = str(tmp_path / "model.safetensors")

    status, out, err = _run(capsys, "export", src, dst, "--safetensors")

    assert (0, "") == (status, err)
    assert "the model's tensors as safetensors, 7 tensors" in out
    loaded = safetensors_torch.load_file(dst)
    _assert_same_tensors(tch.load_checkpoint(src)["model"], loaded)
    with safetensors_torch.safe_open(dst, framework="pt") as f:
        assert {"format": "pt", "global_step": "10"} == f.metadata()


def test_safetensors_in_a_dtype(capsys: Capsys, tmp_path: pathlib.Path, src: str) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    dst = str(tmp_path / "model.safetensors")

    status, _out, _err = _run(capsys, "export", src, dst, "--safetensors", "--dtype", "float16")

    assert 0 == status
    loaded = safetensors_torch.load_file(dst)
    assert torch.float16 == loaded["head.weight"].dtype
    assert torch.int64 == loaded["norm.num_batches_tracked"].dtype


def test_safetensors_leaves_out_model_entries_that_are_not_tensors(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = tmp_path / "odd-1"
    model = {"weight": torch.ones(2), "layer._extra_state": {"mode": "fast"}}
    tch_payload = {"format_version": 1, "global_step": 1, "model": model, "rng": {}}
    from torch_ckpt_hook._checkpoint_file import write_checkpoint

    write_checkpoint(src, tch_payload)
    dst = str(tmp_path / "model.safetensors")

    status, _out, err = _run(capsys, "export", str(src), dst, "--safetensors")

    assert 0 == status
    assert (
        "torch-ckpt export: warning: not tensors, so left out of the safetensors file: "
        "layer._extra_state\n"
    ) == err
    assert ["weight"] == list(safetensors_torch.load_file(dst))


def test_safetensors_without_the_package_is_one_line_with_the_pip_command(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, src: str
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors: ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    dst = tmp_path / "model.safetensors"

    status, out, err = _run(capsys, "export", src, str(dst), "--safetensors")

    assert (1, "") == (status, out)
    assert (
        "torch-ckpt export: error: --safetensors needs the safetensors package, which is not "
        "installed; install it with: pip install 'torch-ckpt-hook[safetensors]'\n"
    ) == err
    assert not dst.exists()


def test_safetensors_refuses_a_sparse_model_tensor_and_writes_nothing(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    pytest.importorskip("safetensors.torch")
    from torch_ckpt_hook._checkpoint_file import write_checkpoint

    src = tmp_path / "sparse-1"
    sparse = torch.eye(3).to_sparse()
    write_checkpoint(src, {"format_version": 1, "model": {"embedding": sparse}})
    dst = tmp_path / "model.safetensors"

    status, _out, err = _run(capsys, "export", str(src), str(dst), "--safetensors")

    assert 1 == status
    assert (
        "torch-ckpt export: error: model tensor 'embedding' is sparse_coo; safetensors holds "
        "dense tensors only\n"
    ) == err
    assert ["sparse-1"] == sorted(p.name for p in tmp_path.iterdir())


def test_a_failed_write_leaves_no_destination(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, src: str
) -> None:
    real_save = torch.save

    def save_half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    dst = tmp_path / "exported.ckpt"

    status, _out, err = _run(capsys, "export", src, str(dst))

    monkeypatch.setattr(torch, "save", real_save)
    assert 1 == status
    assert 1 == len(err.splitlines()), err
    assert "No space left on device" in err
    assert not dst.exists()
    assert ["run"] == sorted(p.name for p in tmp_path.iterdir()), "no temporary file is left"


# -- SRC --------------------------------------------------------------------------------------


def test_a_directory_exports_the_checkpoint_a_session_restores(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    paths = _save(run, steps=(10, 20))
    with open(paths[-1], "r+b") as f:  # the latest is damaged: a session restores step 10
        f.seek(os.path.getsize(paths[-1]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst = str(tmp_path / "exported.ckpt")

    status, out, err = _run(capsys, "export", str(run), dst)

    assert 0 == status
    assert err.startswith(
        "torch-ckpt export: warning: exporting model.ckpt-10, the checkpoint a new session "
        "restores; newer ones are corrupted (model.ckpt-20: checksum mismatch"
    ), err
    assert f"Exported {paths[0]} (step 10)" in out
    assert 10 == tch.load_checkpoint(dst)["global_step"]


def test_a_corrupted_source_fails_in_one_line_and_writes_nothing(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    with open(src, "r+b") as f:
        f.truncate(os.path.getsize(src) - 100)
    dst = tmp_path / "exported.ckpt"

    status, out, err = _run(capsys, "export", src, str(dst))

    assert (1, "") == (status, out)
    assert err.startswith(f"torch-ckpt export: error: Checkpoint {src} is corrupted: "), err
    assert 1 == len(err.splitlines())
    assert not dst.exists()


def test_no_verify_exports_a_plain_torch_save_file_as_a_verified_one(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    payload = torch.load(src, weights_only=True)
    os.remove(src)
    torch.save(payload, src)  # a legacy file: no checksum
    dst = str(tmp_path / "exported.ckpt")

    status, _out, err = _run(capsys, "export", src, dst)
    assert 1 == status
    assert "cannot be loaded: no checksum" in err
    assert not os.path.exists(dst)

    status, _out, err = _run(capsys, "export", src, dst, "--no-verify")
    assert (0, "") == (status, err)
    assert None is tch.verify_checkpoint(dst)
    _assert_same_tensors(payload["model"], tch.load_checkpoint(dst)["model"])


# -- DST --------------------------------------------------------------------------------------


def test_an_existing_destination_is_refused_unless_force(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = tmp_path / "exported.ckpt"
    dst.write_bytes(b"keep me")

    status, out, err = _run(capsys, "export", src, str(dst))

    assert (2, "") == (status, out)
    assert (
        f"torch-ckpt export: error: argument DST: expected a path where nothing exists, got "
        f"'{dst}', which exists; pass --force to replace it\n"
    ) == err
    assert b"keep me" == dst.read_bytes()

    status, _out, _err = _run(capsys, "export", src, str(dst), "--force")
    assert 0 == status
    assert None is tch.verify_checkpoint(dst)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_the_source_itself_is_refused_as_destination(
    capsys: Capsys, src: str, force: list[str]
) -> None:
    before = pathlib.Path(src).read_bytes()

    status, _out, err = _run(capsys, "export", src, src, "--model-only", *force)

    assert 2 == status
    message = "which is SRC itself" if force else "which exists; pass --force"
    assert message in err, err
    assert before == pathlib.Path(src).read_bytes()


def test_the_checkpoint_a_directory_stands_for_is_refused_as_destination(
    capsys: Capsys, tmp_path: pathlib.Path
) -> None:
    paths = _save(tmp_path, steps=(10,))

    status, _out, err = _run(capsys, "export", str(tmp_path), paths[0], "--force")

    assert 2 == status
    assert (
        f"torch-ckpt export: error: argument DST: expected a path other than SRC's, got "
        f"'{paths[0]}', which is the checkpoint SRC stands for ({paths[0]})\n"
    ) == err


@pytest.mark.parametrize(
    ("dst", "message"),
    [
        ("{tmp}", "argument DST: expected a file path, got '{tmp}', which is a directory"),
        (
            "{tmp}/missing/model.pt",
            "argument DST: expected a path in an existing directory, got "
            "'{tmp}/missing/model.pt', whose directory '{tmp}/missing' does not exist",
        ),
        ("{tmp}/fifo", "argument DST: expected a file path, got '{tmp}/fifo', which is a FIFO"),
    ],
)
def test_a_destination_that_cannot_be_a_file_is_refused(
    capsys: Capsys, tmp_path: pathlib.Path, src: str, dst: str, message: str
) -> None:
    os.mkfifo(tmp_path / "fifo")

    status, out, err = _run(capsys, "export", src, dst.format(tmp=tmp_path), "--force")

    assert (2, "") == (status, out)
    assert f"torch-ckpt export: error: {message.format(tmp=tmp_path)}\n" == err


def test_an_unknown_dtype_is_an_argument_error(capsys: Capsys, src: str) -> None:
    status, _out, err = _run(capsys, "export", src, "x.pt", "--dtype", "int8")

    assert 2 == status
    assert err.startswith("torch-ckpt export: error: argument --dtype: invalid choice: 'int8'")


def test_an_exported_file_inspects_and_lists_like_the_source(
    capsys: Capsys, tmp_path: pathlib.Path, src: str
) -> None:
    dst = str(tmp_path / "exported.ckpt")
    assert 0 == _run(capsys, "export", src, dst)[0]

    _status, out, _err = _run(capsys, "inspect", dst, "--json")

    expected = json.loads(_run(capsys, "inspect", src, "--json")[1])
    actual = json.loads(out)
    assert expected["tensors"] == actual["tensors"]
    assert expected["optimizer"] == actual["optimizer"]
