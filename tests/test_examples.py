"""Every example runs as a script (``__main__``) and resumes from its checkpoints.

The examples run in this process through ``runpy``, as ``python examples/<name>.py`` would run
them, without an interpreter start (and a torch import) per run; the global state a script may
change (RNG states, thread count, root logging) is put back after each.
"""

from __future__ import annotations

import logging
import os
import pathlib
import random
import runpy
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

RunExample = Callable[..., str]


@pytest.fixture
def run_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[RunExample]:
    """``run_example(name, *args)``: run ``examples/<name>.py args`` as ``__main__``; its stdout."""
    root = logging.getLogger()
    saved = (
        torch.get_rng_state(),
        random.getstate(),
        torch.get_num_threads(),
        list(root.handlers),
        root.level,
    )

    def run(name: str, *args: str) -> str:
        path = EXAMPLES / f"{name}.py"
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(path), run_name="__main__")
        out, err = capsys.readouterr()
        assert 0 == exited.value.code, err
        return out

    yield run
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    torch.set_num_threads(saved[2])
    root.handlers[:] = saved[3]
    root.setLevel(saved[4])


def _load(name: str) -> dict[str, Any]:
    """The example's module globals, without running its ``main``."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")


def test_train_loop_trains_checkpoints_and_resumes(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    out = run_example("train_loop", "--dir", str(tmp_path), "--steps", "60")
    assert out.startswith("global step 60, ")
    assert str(tmp_path / "model.ckpt-60") == tch.latest_checkpoint(str(tmp_path))

    out = run_example("train_loop", "--dir", str(tmp_path), "--steps", "110")
    assert out.startswith("global step 110, ")
    assert 110 == tch.load_checkpoint(str(tmp_path / "model.ckpt-110"))["global_step"]


def test_nanogpt_port_trains_resumes_and_restores_its_metadata_in_place(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    args = ["--dir", str(tmp_path), "--eval-interval", "10", "--batch-size", "4"]
    first = run_example("nanogpt_port", *args, "--max-iters", "20")
    assert "resumed from" not in first
    assert first.splitlines()[-1].startswith("done at step 20; best val loss ")

    second = run_example("nanogpt_port", *args, "--max-iters", "30")
    assert second.startswith(f"resumed from {tmp_path / 'model.ckpt-20'} at step 20\n")
    assert second.splitlines()[-1].startswith("done at step 30; ")
    payload = tch.load_checkpoint(str(tmp_path / "model.ckpt-30"))
    meta = payload["extra_state"]["meta"]
    assert {"best_val_loss", "model_args", "config"} == set(meta)
    assert 16 == meta["model_args"]["block_size"]
    assert 30 == payload["extra_state"]["scheduler"]["last_epoch"]

    # A finished run stays finished: rerunning it trains nothing.
    third = run_example("nanogpt_port", *args, "--max-iters", "30")
    assert third.splitlines()[-1].startswith("done at step 30; ")
    assert 30 == tch.load_checkpoint(tch.latest_checkpoint(str(tmp_path)))["global_step"]


def test_singular_session_example_trains_and_resumes(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    args = ["--dir", str(tmp_path), "--save-every", "10"]

    assert run_example("singular_session", *args, "--steps", "20").startswith(
        "global step 20, held-out accuracy "
    )
    assert run_example("singular_session", *args, "--steps", "30").startswith("global step 30, ")
    assert 30 == tch.load_checkpoint(str(tmp_path / "model.ckpt-30"))["global_step"]


def test_grad_accumulation_example_resumes_its_schedule_and_scaler(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    args = ["--dir", str(tmp_path), "--accumulate", "3", "--scaler"]
    out = run_example("grad_accumulation_amp", *args, "--steps", "10")
    assert out.startswith("global step 10, lr 0.010000, ")

    # Resumed: the schedule goes on from update 10 (StepLR halves the LR every 40 updates), and
    # the enabled scaler's growth tracker from 10.
    out = run_example("grad_accumulation_amp", *args, "--steps", "45")
    assert out.startswith("global step 45, lr 0.005000, ")
    payload = tch.load_checkpoint(str(tmp_path / "model.ckpt-45"))
    extra = payload["extra_state"]
    assert {"scheduler", "scaler"} == set(extra)
    assert payload["global_step"] == extra["scheduler"]["last_epoch"] == 45
    assert 45 == extra["scaler"]["_growth_tracker"]


def test_grad_accumulation_schedule_follows_the_global_step_when_the_scaler_skips(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    # A loss scale near float32's largest value overflows the gradients: GradScaler skips the
    # optimizer step and halves the scale, as float16 training on CUDA does in its first steps.
    init_scale = 3e38
    args = ["--dir", str(tmp_path), "--accumulate", "2", "--scaler"]

    run_example("grad_accumulation_amp", *args, "--init-scale", str(init_scale), "--steps", "10")

    payload = tch.load_checkpoint(str(tmp_path / "model.ckpt-10"))
    scaler = payload["extra_state"]["scaler"]
    assert scaler["scale"] < init_scale, "expected at least one skipped step"
    assert 10 == payload["global_step"] == payload["extra_state"]["scheduler"]["last_epoch"]


def test_mirror_example_copies_every_committed_checkpoint(
    tmp_path: pathlib.Path, run_example: RunExample
) -> None:
    main, mirror = tmp_path / "main", tmp_path / "mirror"
    mirror.mkdir()
    stray = mirror / ".mirror-tmp-model.ckpt-25.abc123"
    stray.write_bytes(b"a copy cut short by a crash")

    out = run_example(
        "mirror_checkpoints", "--dir", str(main), "--mirror", str(mirror), "--steps", "60"
    )

    names = ["model.ckpt-0", "model.ckpt-25", "model.ckpt-50", "model.ckpt-60"]
    assert f"global step 60; mirrored to {mirror}: {', '.join(names)}\n" == out
    for name in names:
        assert None is tch.verify_checkpoint(str(mirror / name))
        assert (main / name).read_bytes() == (mirror / name).read_bytes()
        assert stat.S_IMODE(os.stat(main / name).st_mode) == stat.S_IMODE(
            os.stat(mirror / name).st_mode
        )
    assert sorted(names) == sorted(p.name for p in mirror.iterdir())


def test_mirror_listener_follows_the_hooks_basename(tmp_path: pathlib.Path) -> None:
    listener_type = _load("mirror_checkpoints")["MirrorListener"]
    main, mirror = tmp_path / "main", tmp_path / "mirror"
    listener = listener_type(str(main), str(mirror))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = [
        tch.CheckpointSaverHook(
            str(main), save_steps=2, checkpoint_basename="weights.pt", listeners=[listener]
        ),
        tch.StopAtStepHook(last_step=3),
    ]

    def step() -> None:
        model(torch.ones(1, 2)).sum().backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    with tch.MonitoredSession(model, optimizer, hooks=hooks) as sess:
        while not sess.should_stop():
            sess.run(step)

    assert ["weights.pt-0", "weights.pt-2", "weights.pt-3"] == listener.copied
    assert sorted(listener.copied) == sorted(p.name for p in mirror.iterdir())


def test_mirror_listener_opts_in_to_after_save_after_the_commit() -> None:
    listener_type = _load("mirror_checkpoints")["MirrorListener"]
    # It only copies the file: the save stays asynchronous (SPEC 5.3).
    assert listener_type.run_after_commit is True
    assert tch.CheckpointSaverListener.run_after_commit is False
