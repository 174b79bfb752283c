"""Preemption: SIGTERM to a training process ends it cleanly with a final checkpoint.

SPEC.md §3, Preemption: with ``MonitoredTrainingSession``'s default ``stop_on_signals``, the first
SIGTERM lets the current step finish, stops the loop, and ``end()`` commits the final checkpoint;
the program goes on after the ``with`` block and exits 0; the previous handler is restored on
close. A second SIGTERM during the final save is absorbed and corrupts nothing.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import pytest

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
