"""Child of tests/test_preemption.py: trains under MonitoredTrainingSession until SIGTERM stops it.

Run as ``python preempt_child.py DIR MODE``. It installs a handler of its own for SIGTERM (the one
that must be restored), then trains with ``MonitoredTrainingSession``'s default
``stop_on_signals``. Each step prints ``begin <step>`` and ``end <step>`` (the global step before
and after it); the step that starts at ``SIGNAL_STEP`` waits, inside the step, until the session
says it should stop, so the parent's SIGTERM (sent when it reads ``begin SIGNAL_STEP``) always
lands in the middle of a step. Log records go to stdout, between those lines.

MODE ``twice``: the saver sends SIGTERM to this process again as the final save starts and while
it is being written.

After the ``with`` block it prints ``after <global step>`` and whether the handlers were as
expected, then exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import torch_ckpt_hook as tch

SIGNAL_STEP = 3


def previous_handler(signum: int, frame: object) -> None:
    print("previous handler called", flush=True)


class SignalsDuringFinalSave(tch.Saver):
    """Sends SIGTERM to its own process as the final save starts and while it is written."""

    def save(self, session: tch.Session, *args: Any, **kwargs: Any) -> Any:
        final = session.global_step > 0  # the creation save is at step 0
        if final:
            print("final save starts", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        result = super().save(session, *args, **kwargs)
        if final:
            os.kill(os.getpid(), signal.SIGTERM)
            print("final save staged", flush=True)
        return result


def main() -> int:
    directory, mode = sys.argv[1], sys.argv[2]
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s"
    )
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, previous_handler)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = SignalsDuringFinalSave() if mode == "twice" else tch.Saver()

    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=directory,
        save_checkpoint_steps=10**6,  # only the creation save and the final one
        log_step_count_steps=0,
        scaffold=tch.Scaffold(saver=saver),
    ) as sess:
        installed = signal.getsignal(signal.SIGTERM)

        def step() -> None:
            begin = sess.global_step
            print(f"begin {begin}", flush=True)
            if begin == SIGNAL_STEP:
                deadline = time.monotonic() + 60
                while not sess.should_stop() and time.monotonic() < deadline:
                    time.sleep(0.01)
            optimizer.zero_grad()
            model(torch.ones(2, 4)).square().sum().backward()
            optimizer.step()
            print(f"end {sess.global_step}", flush=True)

        while not sess.should_stop():
            sess.run(step)

    print(f"after {sess.global_step}", flush=True)
    print(f"installed during training: {installed is not previous_handler}", flush=True)
    print(
        f"restored after close: {signal.getsignal(signal.SIGTERM) is previous_handler}", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
