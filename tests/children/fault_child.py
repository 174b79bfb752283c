"""Child of tests/test_save_faults.py: saves while a real fault stops the writes, then recovers.

Run as ``python fault_child.py MODE HOOK_DIR SAVER_DIR``; it prints one JSON line with what it saw.

MODE ``fsize``: a real "file too large": ``RLIMIT_FSIZE`` is set low, with ``SIGXFSZ`` ignored so
that a write past it fails with ``EFBIG``; small checkpoints fit, a big one (an ``extra_state``
blob grown for a while) does not.

MODE ``readonly``: the checkpoint directory is made read-only (``chmod 0o555``) for a while. Root
ignores permissions, so as root the child first drops to the ``nobody`` user (after importing
everything and warming up a save: it can no longer read the Python installation under /root).

Two scenarios run, each in its own directory:
- ``hook``: ``MonitoredSession`` with an asynchronous ``CheckpointSaverHook`` (``save_steps=1``):
  two steps, the fault for three steps, the fault gone for three more, then a clean close. Every
  ``CheckpointSaveError`` raised by ``run()`` is caught, as a user would, and training goes on.
- ``saver``: a bare ``Saver``: two saves, one under the fault, one after it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import torch_ckpt_hook as tch

SMALL, BIG = 16, 1 << 20  # blob elements: 64 bytes fit under the limit, 4 MiB do not
FSIZE_LIMIT = 256 * 1024
NOBODY = 65534


class Blob:
    """An ``extra_state`` entry whose checkpointed size the child controls."""

    def __init__(self) -> None:
        self.size = SMALL

    def state_dict(self) -> dict[str, Any]:
        return {"blob": torch.ones(self.size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.size = len(state_dict["blob"])


def describe(err: tch.CheckpointSaveError) -> dict[str, Any]:
    cause = err.__cause__
    return {
        "message": str(err),
        "cause": type(cause).__name__,
        "errno": getattr(cause, "errno", None),
    }


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def hook_scenario(
    directory: str, blob: Blob, start: Callable[[], None], stop: Callable[[], None]
) -> dict[str, Any]:
    model, optimizer = build()

    def step() -> None:
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()

    errors: list[dict[str, Any]] = []

    def catching(call: Callable[[], object]) -> None:
        try:
            call()
        except tch.CheckpointSaveError as err:
            errors.append(describe(err))

    hook = tch.CheckpointSaverHook(directory, save_steps=1, saver=tch.Saver(max_to_keep=None))
    with tch.MonitoredSession(model, optimizer, hooks=[hook], extra_state={"blob": blob}) as sess:
        for _ in range(2):
            sess.run(step)  # saves 0 (at creation), 1 and 2
        hook.wait_until_finished()  # the fault must not catch the save of step 2 in flight
        start()
        for _ in range(3):
            catching(lambda: sess.run(step))
        catching(hook.wait_until_finished)  # nor the saves made under it run after it
        stop()
        for _ in range(3):
            catching(lambda: sess.run(step))
        final_step = sess.global_step
    return {"errors": errors, "final_step": final_step}


def saver_scenario(
    directory: str, blob: Blob, start: Callable[[], None], stop: Callable[[], None]
) -> dict[str, Any]:
    model, optimizer = build()
    session = tch.Session(model, optimizer, extra_state={"blob": blob})
    saver = tch.Saver(max_to_keep=None)
    prefix = os.path.join(directory, "model.ckpt")

    def save(step: int) -> None:
        session.global_step = step  # the payload holds the session's step, the name this one
        saver.save(session, prefix, global_step=step)

    save(1)
    save(2)
    start()
    error = None
    try:
        save(3)
    except tch.CheckpointSaveError as err:
        error = describe(err)
    with open(os.path.join(directory, "checkpoint")) as f:
        state_after_failure = f.read()
    stop()
    save(4)
    return {
        "error": error,
        "state_after_failure": state_after_failure,
        "last_checkpoints": saver.last_checkpoints,
    }


def warm_up() -> None:
    """Run every code path once, so nothing is imported lazily after privileges are dropped."""
    with tempfile.TemporaryDirectory() as scratch:
        blob = Blob()
        hook_scenario(os.path.join(scratch, "hook"), blob, lambda: None, lambda: None)
        os.mkdir(os.path.join(scratch, "saver"))
        saver_scenario(os.path.join(scratch, "saver"), blob, lambda: None, lambda: None)
        try:
            open(os.path.join(scratch, "x"), "xb").close()
            os.chmod(scratch, 0o555)
            open(os.path.join(scratch, "y"), "xb").close()
        except OSError:
            pass
        finally:
            os.chmod(scratch, 0o755)


def main() -> int:
    mode, hook_dir, saver_dir = sys.argv[1:4]
    torch.set_num_threads(1)
    blob = Blob()
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))

        def start() -> None:
            blob.size = BIG

        def stop() -> None:
            blob.size = SMALL

        fault = {"fault": f"RLIMIT_FSIZE={FSIZE_LIMIT}"}
        results = {
            "hook": hook_scenario(hook_dir, blob, start, stop),
            "saver": saver_scenario(saver_dir, blob, start, stop),
        }
    else:
        warm_up()
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        fault = {"fault": f"chmod 0o555 as uid {os.geteuid()}"}
        results = {}
        for name, scenario, directory in (
            ("hook", hook_scenario, hook_dir),
            ("saver", saver_scenario, saver_dir),
        ):

            def start(directory: str = directory) -> None:
                os.chmod(directory, 0o555)

            def stop(directory: str = directory) -> None:
                os.chmod(directory, 0o755)

            results[name] = scenario(directory, blob, start, stop)
    print(json.dumps({**fault, **results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
