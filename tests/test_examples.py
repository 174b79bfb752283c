"""Every example runs, as `python examples/<name>.py`, and resumes from its checkpoints."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
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


def _run_example(name: str, *args: str) -> str:
    """Run ``python examples/<name>.py args`` on this checkout's package; return its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert 0 == completed.returncode, completed.stderr
    return completed.stdout


def test_singular_session_example_trains_and_resumes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dir", str(tmp_path), "--save-every", "10"]
    out = _run_example("singular_session", *args, "--steps", "20")
    assert out.startswith("global step 20, held-out accuracy ")

    # The resumed run in-process: one interpreter start per example keeps the suite fast.
    assert 0 == _load("singular_session").main([*args, "--steps", "30"])
    assert capsys.readouterr().out.startswith("global step 30, ")
    assert 30 == tch.load_checkpoint(str(tmp_path / "model.ckpt-30"))["global_step"]


def test_grad_accumulation_example_resumes_its_schedule_and_scaler(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dir", str(tmp_path), "--accumulate", "3", "--scaler"]
    out = _run_example("grad_accumulation_amp", *args, "--steps", "10")
    assert out.startswith("global step 10, lr 0.010000, ")

    # Resumed: the schedule goes on from update 10 (StepLR halves the LR every 40 updates), and
    # the enabled scaler's growth tracker from 10.
    assert 0 == _load("grad_accumulation_amp").main([*args, "--steps", "45"])
    assert capsys.readouterr().out.startswith("global step 45, lr 0.005000, ")
    extra = tch.load_checkpoint(str(tmp_path / "model.ckpt-45"))["extra_state"]
    assert {"scheduler", "scaler"} == set(extra)
    assert 45 == extra["scheduler"]["last_epoch"]
    assert 45 == extra["scaler"]["_growth_tracker"]


def test_mirror_example_copies_every_committed_checkpoint(tmp_path: pathlib.Path) -> None:
    main, mirror = tmp_path / "main", tmp_path / "mirror"

    out = _run_example(
        "mirror_checkpoints", "--dir", str(main), "--mirror", str(mirror), "--steps", "60"
    )

    names = ["model.ckpt-0", "model.ckpt-25", "model.ckpt-50", "model.ckpt-60"]
    assert f"global step 60; mirrored to {mirror}: {', '.join(names)}\n" == out
    for name in names:
        assert None is tch.verify_checkpoint(str(mirror / name))
        assert (main / name).read_bytes() == (mirror / name).read_bytes()
    assert sorted(names) == sorted(p.name for p in mirror.iterdir())
