"""The background writer: one thread per save in flight, and the handle the caller holds.

A ``Saver`` has at most one save in flight, so it has at most one writer thread. The thread is
started for a save and ends when that save is durable (or failed): there is no pool to shut down,
and no writer thread outlives the save it was started for. It is not a daemon, so an interpreter
that exits with a save in flight finishes (or cleanly abandons) it first.

Where the platform allows it (Linux, where the nice value is per thread), the writer thread runs
at a lower CPU priority than training: when the two compete for cores, the step loop wins and
the write takes longer, never the other way around.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future

from ._errors import CheckpointSaveError
from ._messages import error_line


class SaveHandle:
    """A save in progress: ``done()`` says whether it finished, ``result()`` waits for its path."""

    def __init__(
        self, path: str, future: Future[str], thread: threading.Thread | None = None
    ) -> None:
        self.path = path
        self._future = future
        self._thread = thread
        # Whether a failure has been raised to someone; Saver.wait_until_finished raises a
        # failure only once, so the hook that surfaced it is not handed it again at close.
        self.reported = False

    def done(self) -> bool:
        return self._future.done()

    def failed(self) -> bool:
        return self._future.done() and self._future.exception() is not None

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the save has finished, well or not.

        Raises:
            CheckpointSaveError: it is still being written after ``timeout`` seconds.
        """
        if not futures.wait([self._future], timeout).done:
            raise CheckpointSaveError(
                f"Saving {self.path} did not finish within {timeout:g} s; it is still being "
                "written in the background, and the previous checkpoint stays the latest until "
                "it commits"
            )
        if self._thread is not None:
            # Setting the outcome is the thread's last act: once waited for, it is gone.
            self._thread.join()

    def result(self, timeout: float | None = None) -> str:
        """The checkpoint's path once durable.

        Raises:
            CheckpointSaveError: the save failed (the original exception is the ``__cause__``),
                or it is still being written after ``timeout`` seconds.
        """
        self.wait(timeout)
        error = self._future.exception()
        if error is None:
            return self._future.result()
        self.reported = True
        if isinstance(error, CheckpointSaveError):
            raise error
        raise CheckpointSaveError(f"Saving {self.path} failed: {error_line(error)}") from error


# How much nicer than training the writer thread runs (0 to 19; 10 is `nice`'s default).
WRITER_NICENESS = 10


def _lower_this_threads_priority() -> None:
    if not sys.platform.startswith("linux"):
        return  # elsewhere the nice value is the whole process's
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # best effort: a sandbox may refuse
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + WRITER_NICENESS))


def start_write(path: str, write: Callable[[], None]) -> SaveHandle:
    """Run ``write()`` on a new writer thread; the handle reports its outcome for ``path``."""
    future: Future[str] = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            _lower_this_threads_priority()
            write()
        except BaseException as err:
            # BaseException: whatever ends the write must reach the training thread.
            future.set_exception(err)
        else:
            future.set_result(path)

    thread = threading.Thread(target=run, name=f"torch_ckpt_hook-writer:{path}", daemon=False)
    thread.start()
    return SaveHandle(path, future, thread)
