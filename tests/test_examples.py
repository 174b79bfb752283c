"""The examples run, and the README's loop resumes from its checkpoints."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest

import torch_ckpt_hook as tch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_loop_trains_checkpoints_and_resumes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load("train_loop")
    assert 0 == example.main(["--dir", str(tmp_path), "--steps", "60"])
    assert "global step 60" in capsys.readouterr().out
    assert str(tmp_path / "model.ckpt-60") == tch.latest_checkpoint(str(tmp_path))

    assert 0 == example.main(["--dir", str(tmp_path), "--steps", "110"])
    assert "global step 110" in capsys.readouterr().out
    payload = tch.load_checkpoint(str(tmp_path / "model.ckpt-110"))
    assert 110 == payload["global_step"]
