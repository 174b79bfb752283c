"""Child of tests/test_crash_torture.py: forks trainers that checkpoint every step until killed.

Importing torch takes seconds; forking a process that has already imported it takes
milliseconds. So this process imports once, prints ``zygote ready``, then serves one trial per
line read from stdin (``<dir> <mode> <max_to_keep>``): it forks a trainer, waits for it to die (the
parent SIGKILLs it at a random instant) and prints ``exit <code>`` (``exit -9`` for SIGKILL),
preceded by a newline so that a line the trainer had half written stays apart.

The trainer prints ``ready <pid>`` before the session is created (it restores from ``<dir>``
when there is a checkpoint there), ``start <step>`` once it is, and ``committed <step>`` each time
a checkpoint is durable: from a listener's ``after_save`` in ``hook`` mode (``MonitoredSession``
with an asynchronous ``CheckpointSaverHook``, ``save_steps=1``), from ``SaveHandle.result()`` in
``saver`` mode (a bare ``Saver`` writing in the background while the next step trains). It never
stops on its own.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import torch_ckpt_hook as tch

WIDTH = 256  # two 256x256 layers and Adam's moments: checkpoints of about 1.6 MB


class ReportCommits(tch.CheckpointSaverListener):
    def after_save(self, session: tch.Session, global_step_value: int) -> None:
        print(f"committed {global_step_value}", flush=True)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train(directory: str, mode: str, max_to_keep: int) -> None:
    model, optimizer = build()

    def step() -> None:
        optimizer.zero_grad()
        model(torch.rand(8, WIDTH)).square().mean().backward()
        optimizer.step()

    saver = tch.Saver(max_to_keep=max_to_keep)
    print(f"ready {os.getpid()}", flush=True)
    if mode == "hook":
        hook = tch.CheckpointSaverHook(
            directory, save_steps=1, saver=saver, listeners=[ReportCommits()]
        )
        with tch.MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=directory) as sess:
            print(f"start {sess.global_step}", flush=True)
            while True:
                sess.run(step)
    session = tch.Session(model, optimizer)
    latest = tch.latest_checkpoint(directory)
    if latest is not None:
        saver.restore(session, latest)
    print(f"start {session.global_step}", flush=True)
    # The write of step k goes on in the background while step k + 1 trains.
    pending: tuple[int, Any] | None = None
    while True:
        step()
        if pending is not None:
            pending[1].result()
            print(f"committed {pending[0]}", flush=True)
        handle = saver.save(
            session, os.path.join(directory, "model.ckpt"), session.global_step, blocking=False
        )
        pending = (session.global_step, handle)


def serve() -> int:
    print("zygote ready", flush=True)
    for line in sys.stdin:
        directory, mode, max_to_keep = line.split()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                train(directory, mode, int(max_to_keep))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"\nexit {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    build()  # the first optimizer imports torch._dynamo, which takes seconds: once, not per fork
    sys.exit(serve())
