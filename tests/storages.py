"""Disks for tests: small ``LocalStorage`` subclasses a test hands to ``Saver(storage=...)``.

A slow disk, a full one, one that fails a rename or stops answering: each is the real local
storage with one method changed, so the ``Saver`` and the hook run their own code, real
``SaveHandle``s and real writer threads included, and nothing of the package is patched.

Every storage that holds a write (``GatedStorage``, ``HungStorage``) is a context manager whose
exit lets the writes through, for a fixture's teardown: a test that fails part-way leaves no
writer thread parked. A held write also gives up after ``timeout`` seconds, failing its save
with an ``AssertionError`` that names it, so a test that forgets to open the gate fails instead
of hanging.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from torch_ckpt_hook import Saver
from torch_ckpt_hook._fsutil import atomic_write
from torch_ckpt_hook._integrity import save_with_checksum
from torch_ckpt_hook._storage import LocalStorage

_STEP = re.compile(r"-([0-9]+)$")


def step_of(path: str | os.PathLike[str]) -> int | None:
    """The global step in a checkpoint's name (``model.ckpt-12``: 12), or None without one."""
    match = _STEP.search(os.path.basename(os.fspath(path)))
    return None if match is None else int(match[1])


def at_steps(*steps: int) -> Callable[[str], bool]:
    """A path predicate: the checkpoints of these steps."""
    return lambda path: step_of(path) in steps


# -- writes held until the test lets them go ------------------------------------------------------


class GatedStorage(LocalStorage):
    """Holds each write for which ``holds(path)`` is true until the gate opens.

    ``open()`` opens it for good; ``with gate.opened():`` only for the block, so the writes
    that come after it are held again. ``waiting`` is set once a write waits at the gate, and
    ``held`` lists the paths of those that did; ``writes`` lists the finished writes (held or
    not) in order; ``running`` and ``max_running`` count the writes under way at once.
    """

    def __init__(
        self, holds: Callable[[str], bool] | None = None, *, timeout: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.holds: Callable[[str], bool] = holds if holds is not None else lambda path: True
        self.timeout = timeout
        self.waiting = threading.Event()
        self.held: list[str] = []
        self.writes: list[str] = []
        self.running = 0
        self.max_running = 0
        self._cond = threading.Condition()
        self._open_for_good = False
        self._open_blocks = 0

    def open(self) -> None:
        """Let every write through, held or still to come."""
        with self._cond:
            self._open_for_good = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Let writes through while the block runs; the writes after it are held again."""
        with self._cond:
            self._open_blocks += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._open_blocks -= 1

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no write is under way; whether none is."""
        with self._cond:
            return self._cond.wait_for(lambda: self.running == 0, timeout)

    def __enter__(self) -> GatedStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.open()  # never leave a writer thread parked
        self.wait_idle()

    def _is_open(self) -> bool:
        return self._open_for_good or self._open_blocks > 0

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        path = os.fspath(path)
        with self._cond:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.holds(path):
                with self._cond:
                    self.held.append(path)
                    self.waiting.set()
                    if not self._cond.wait_for(self._is_open, self.timeout):
                        raise AssertionError(
                            f"the test never let the write of {path} through its "
                            f"{type(self).__name__} (waited {self.timeout:g} s)"
                        )
            super().write(path, payload)
            self.writes.append(path)
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()


class HungStorage(GatedStorage):
    """A disk that stopped answering: each write for which ``hangs(path)`` blocks until released.

    Pair it with a short ``drain_timeout_secs``, and release it in a fixture or a ``finally``
    (``with HungStorage(...) as hung:`` does), so that no writer thread stays parked.
    """

    def __init__(
        self, hangs: Callable[[str], bool] | None = None, *, timeout: float = 60.0
    ) -> None:
        super().__init__(hangs, timeout=timeout)

    def release(self) -> None:
        self.open()

    def __enter__(self) -> HungStorage:
        return self


class WaitRecordingSaver(Saver):
    """A ``Saver`` that records each call of its public waits: ``(method, error or None)``.

    ``method`` is ``"wait_for_previous_save"`` or ``"wait_until_finished"``; the error is the
    one the wait raised (a timeout, a failure).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waits: list[tuple[str, BaseException | None]] = []

    def wait_for_previous_save(self, next_name: str | None = None) -> None:
        with self._recording("wait_for_previous_save"):
            super().wait_for_previous_save(next_name)

    def wait_until_finished(self, timeout: float | None = None) -> None:
        with self._recording("wait_until_finished"):
            super().wait_until_finished(timeout)

    def errors(self) -> list[BaseException]:
        """The errors the waits raised, in order."""
        return [error for _, error in self.waits if error is not None]

    @contextlib.contextmanager
    def _recording(self, what: str) -> Iterator[None]:
        try:
            yield
        except BaseException as err:
            self.waits.append((what, err))
            raise
        self.waits.append((what, None))


class GateOpeningSaver(WaitRecordingSaver):
    """A ``Saver`` on ``gate`` whose public waits open the gate while they wait.

    A held write goes on exactly when the training thread waits for it (the disk was slow, and
    the wait is what it took), and the writes after it are held again. Only the waits the
    saver offers are changed; ``save`` is the real one. A hook in synchronous mode waits on its
    handle instead: give it a ``SlowStorage``.
    """

    def __init__(self, gate: GatedStorage, **kwargs: Any) -> None:
        super().__init__(storage=gate, **kwargs)
        self.gate = gate

    def wait_for_previous_save(self, next_name: str | None = None) -> None:
        with self.gate.opened():
            super().wait_for_previous_save(next_name)

    def wait_until_finished(self, timeout: float | None = None) -> None:
        with self.gate.opened():
            super().wait_until_finished(timeout)


class SlowStorage(LocalStorage):
    """Each checkpoint write takes ``delay`` seconds longer; ``writes`` lists the finished ones."""

    def __init__(self, delay: float = 0.2) -> None:
        super().__init__()
        self.delay = delay
        self.writes: list[str] = []

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        time.sleep(self.delay)
        super().write(path, payload)
        self.writes.append(os.fspath(path))


# -- writes that fail -----------------------------------------------------------------------------


class FaultyStorage(LocalStorage):
    """The base of the failing disks: which checkpoint writes fail; ``fail`` says how.

    A write fails while the storage is armed, if its step is in ``steps`` (every write when
    ``steps`` is None). With ``once``, each fault happens once: a step fails only its first
    write, and without ``steps`` only the first write fails; ``arm()`` starts over.
    ``failed`` lists the paths whose write was made to fail.
    """

    def __init__(
        self,
        *,
        steps: Collection[int] | None = None,
        once: bool = False,
        armed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.steps = None if steps is None else frozenset(steps)
        self.once = once
        self.armed = armed
        self.failed: list[str] = []
        self._spent: set[int | None] = set()

    def arm(self) -> None:
        self.armed = True
        self._spent.clear()

    def disarm(self) -> None:
        self.armed = False

    def fails(self, path: str) -> bool:
        """Whether the next write of ``path`` fails."""
        if not self.armed:
            return False
        step = step_of(path)
        if self.steps is not None and step not in self.steps:
            return False
        return not (self.once and self._fault_key(step) in self._spent)

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        path = os.fspath(path)
        if not self.fails(path):
            super().write(path, payload)
            return
        self.failed.append(path)
        if self.once:
            self._spent.add(self._fault_key(step_of(path)))
        self.fail(path, payload)

    def write_for_real(self, path: str, payload: Mapping[str, Any]) -> None:
        """The local storage's own write, for a ``fail`` that lets the real one run into it."""
        super().write(path, payload)

    def fail(self, path: str, payload: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _fault_key(self, step: int | None) -> int | None:
        return None if self.steps is None else step


class FailingStorage(FaultyStorage):
    """The write of each selected checkpoint raises ``error`` (that very object) instead.

    ``FailingStorage(OSError(errno.EIO, "Input/output error"), steps={2}, once=True)``.
    """

    def __init__(self, error: BaseException, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error

    def fail(self, path: str, payload: Mapping[str, Any]) -> None:
        raise self.error


class RenameFailingStorage(FaultyStorage):
    """The real write of each selected checkpoint runs, and its final rename fails.

    While it runs, a directory stands where the checkpoint goes: the temporary file is written
    and fsynced, and ``os.replace`` onto the name fails (``IsADirectoryError``) as it would on
    a disk that cannot take the name. The directory is removed after, so nothing is left.
    """

    def fail(self, path: str, payload: Mapping[str, Any]) -> None:
        os.mkdir(path)
        try:
            self.write_for_real(path, payload)
        finally:
            os.rmdir(path)


class HeldRenameFailingStorage(GatedStorage, RenameFailingStorage):
    """A ``RenameFailingStorage`` whose failing writes are held at a gate.

    With a ``GateOpeningSaver`` the failure happens, and its handle reports it, only when the
    training thread waits for that save: the loop moved on before the disk gave up.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(holds=self.fails, **kwargs)


class DiskFullStorage(FaultyStorage):
    """A selected checkpoint write runs out of space after ``room`` bytes, partway through.

    The write goes through the package's own ``atomic_write`` and ``save_with_checksum``, with
    the temporary file wrapped so that its ``write`` stores what still fits and then raises
    ``OSError(ENOSPC)``, as a full disk's does. ``raised`` holds the errors it raised and
    ``bytes_written_before_failure`` how far each file got. A payload that fits is written
    whole.
    """

    def __init__(self, room: int = 4096, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.room = room
        self.raised: list[OSError] = []
        self.bytes_written_before_failure: list[int] = []

    def fail(self, path: str, payload: Mapping[str, Any]) -> None:
        # What LocalStorage.write does (write_checkpoint), with the file wrapped.
        atomic_write(path, lambda f: save_with_checksum(payload, _FillingFile(f, self)))  # type: ignore[arg-type]


class _FillingFile:
    """A file on a disk with ``disk.room`` bytes free."""

    def __init__(self, file: Any, disk: DiskFullStorage) -> None:
        self._file = file
        self._disk = disk
        self._written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        room = self._disk.room - self._written
        if len(view) > room:
            self._file.write(view[:room])
            self._written += room
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._disk.raised.append(error)
            self._disk.bytes_written_before_failure.append(self._written)
            raise error
        self._written += len(view)
        return int(self._file.write(view))

    def flush(self) -> None:
        self._file.flush()


# -- writes watched -------------------------------------------------------------------------------


class RecordingStorage(LocalStorage):
    """Records the commit's calls in order: ``("write", path)``, ``("write_state", latest)``,
    ``("delete", path)``.

    ``write`` and ``write_state`` are recorded once they returned, ``delete`` before it runs;
    ``on_call(method, path)`` runs right after each is recorded (to look at the directory then).
    """

    def __init__(self, on_call: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.on_call = on_call

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        super().write(path, payload)
        self._record("write", os.fspath(path))

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        super().write_state(directory, latest, paths)
        self._record("write_state", latest)

    def delete(self, path: str) -> None:
        self._record("delete", path)
        super().delete(path)

    def _record(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        if self.on_call is not None:
            self.on_call(method, path)
