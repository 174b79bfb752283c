"""Preemption: SIGTERM or Ctrl-C to a training process ends it cleanly with a final checkpoint.

SPEC.md §3, Preemption: with ``MonitoredTrainingSession``'s default ``stop_on_signals``, the first
SIGTERM lets the current step finish, stops the loop, and ``end()`` commits the final checkpoint;
the program goes on after the ``with`` block and exits 0; the previous handler is restored on
close. A second SIGTERM during the final save is absorbed and corrupts nothing. SIGINT is in
the default ``stop_on_signals`` too (§5.3): the first Ctrl-C stops like SIGTERM, a second one
raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_train_step

import torch_ckpt_hook as tch

pytestmark = pytest.mark.slow

CHILD = pathlib.Path(__file__).resolve().parent / "children" / "preempt_child.py"
SIGNAL_STEP = 3  # preempt_child.SIGNAL_STEP


def _train_and_preempt(directory: pathlib.Path, mode: str) -> tuple[int, list[str], str]:
    """Run the child, SIGTERM it in the middle of step ``SIGNAL_STEP``; exit code and output."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        before: list[str] = []
        for line in proc.stdout:
            before.append(line.rstrip("\n"))
            if before[-1] == f"begin {SIGNAL_STEP}":
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, [*before, *out.splitlines()], err


def _check_clean_preemption(directory: pathlib.Path, code: int, lines: list[str], err: str) -> None:
    output = "\n".join(lines) + "\n" + err
    assert 0 == code, output
    received = [i for i, line in enumerate(lines) if "Received SIGTERM:" in line]
    assert 1 == len(received), output
    # The step in progress when the signal came finished; no other step began.
    after_signal = lines[received[0] :]
    assert [f"end {SIGNAL_STEP + 1}"] == [
        line for line in after_signal if line.startswith(("begin ", "end "))
    ], output
    final_step = SIGNAL_STEP + 1
    assert f"after {final_step}" in lines, "the code after the with block ran"
    assert "installed during training: True" in lines, output
    assert "restored after close: True" in lines, output
    assert "previous handler called" not in lines, "the session's handler took the signal"

    latest = tch.latest_checkpoint(str(directory))
    assert str(directory / f"model.ckpt-{final_step}") == latest
    assert tch.verify_checkpoint(latest) is None
    assert final_step == tch.load_checkpoint(latest)["global_step"]
    state = tch.get_checkpoint_state(str(directory))
    assert state is not None
    assert [str(directory / f"model.ckpt-{s}") for s in (0, final_step)] == list(
        state.all_model_checkpoint_paths
    )


def test_sigterm_finishes_the_step_saves_and_exits_zero_after_the_with_block(
    tmp_path: pathlib.Path,
) -> None:
    code, lines, err = _train_and_preempt(tmp_path, "once")

    _check_clean_preemption(tmp_path, code, lines, err)


def test_sigterm_again_during_the_final_save_is_absorbed_and_corrupts_nothing(
    tmp_path: pathlib.Path,
) -> None:
    code, lines, err = _train_and_preempt(tmp_path, "twice")

    _check_clean_preemption(tmp_path, code, lines, err)
    output = "\n".join(lines)
    # Both extra signals reached the session's handler, which ignored them.
    assert 2 == sum("Received SIGTERM again" in line for line in lines), output
    assert lines.index("final save starts") < lines.index("final save staged"), output


# -- Ctrl-C (SPEC 5.3), in this process: pytest runs the tests in the main thread ------------------


def _ctrl_c_run(directory: pathlib.Path, presses_at: dict[int, int]) -> tuple[list[int], int]:
    """Train to step 10 with the defaults, pressing Ctrl-C ``presses_at[step]`` times in a step.

    Returns the steps whose step function finished, and the global step at the end.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = make_train_step(model, optimizer)
    finished: list[int] = []

    def step(number: int) -> None:
        train()
        for _ in range(presses_at.get(number, 0)):
            os.kill(os.getpid(), signal.SIGINT)
        finished.append(number)

    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=str(directory),
        hooks=[tch.StopAtStepHook(last_step=10)],
    ) as sess:
        while not sess.should_stop():
            sess.run(step, sess.global_step + 1)
    return finished, sess.global_step


def test_the_first_ctrl_c_finishes_the_step_saves_and_returns_normally(
    tmp_path: pathlib.Path,
) -> None:
    previous = signal.getsignal(signal.SIGINT)
    finished, last = _ctrl_c_run(tmp_path, {3: 1})
    assert [1, 2, 3] == finished, "step 3 finished; no step began after the Ctrl-C"
    assert 3 == last
    latest = tch.latest_checkpoint(str(tmp_path))
    assert str(tmp_path / "model.ckpt-3") == latest
    assert 3 == tch.load_checkpoint(latest)["global_step"]
    assert previous is signal.getsignal(signal.SIGINT), "the previous handler is back"


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once(tmp_path: pathlib.Path) -> None:
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _ctrl_c_run(tmp_path, {3: 2})
    assert previous is signal.getsignal(signal.SIGINT), "the previous handler is back"
    assert str(tmp_path / "model.ckpt-0") == tch.latest_checkpoint(str(tmp_path)), (
        "the second press skipped the final save"
    )


def test_ctrl_c_after_sigterm_raises_keyboard_interrupt_at_once(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    with (  # noqa: PT012
        pytest.raises(KeyboardInterrupt),
        tch.MonitoredTrainingSession(model, checkpoint_dir=str(tmp_path)) as sess,
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        assert sess.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # absorbed
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the Ctrl-C did not raise")
