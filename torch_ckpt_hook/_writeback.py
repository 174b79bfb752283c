"""Starting the disk's work while a large file is still being written, not only at its fsync.

A checkpoint is written into the page cache and then fsynced. Left alone, the kernel writes
nothing back before the fsync (the file is below its dirty thresholds), so the disk idles while
the serializer runs and the fsync then does all of the disk's work. Worse, when the dirty pages
of one large write do cross the thresholds, the writer is throttled in bursts: the same file
took 1.3 s to write into the cache in one run and 3.4 s in the next.

``EarlyWriteback`` wraps the file being written and, every ``chunk`` bytes, asks the kernel to
start writing that range back (asynchronously: the call queues the I/O and returns). The fsync
at the end then waits for less, and the dirty pages of a checkpoint stay bounded. PostgreSQL does
the same for its checkpoints (``checkpoint_flush_after``). The request is
``posix_fadvise(POSIX_FADV_DONTNEED)``, the standard library's way to what Linux's
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` does: on Linux it starts writeback of the range's
dirty pages and drops from the page cache only those of its pages that are already clean. Pages
just written are dirty, so they stay; on a disk fast enough to finish a range's writeback
before the call returns, some may go, and a reader right after the save (the mirror's copy)
reads them from the disk again. Where the call is missing (macOS, Windows) or refused, nothing
is asked and the fsync does it all, as before: the request is advice, and durability still
comes from the fsync alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

# Writeback is started for every this many bytes written: large enough that the calls cost
# nothing beside the copy into the page cache, small enough that the disk starts early.
WRITEBACK_CHUNK = 32 << 20

Advise = Callable[[int, int, int], None]  # (fd, offset, length)


class Sink(Protocol):
    """What a file's writer may use of the file it is handed: ``write`` and ``flush``."""

    def write(self, data: Any, /) -> int: ...

    def flush(self) -> None: ...


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` back to disk."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return
    with contextlib.suppress(OSError):  # advice: a file system that refuses it loses nothing
        fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class EarlyWriteback:
    """A write-only wrapper of ``file`` that starts writeback of every ``chunk`` bytes written.

    ``file`` is written from its current position on, sequentially (``atomic_write``'s fresh
    temporary file). ``advise`` is the request (default ``start_writeback``); a test passes a
    recorder.
    """

    def __init__(
        self, file: BinaryIO, chunk: int = WRITEBACK_CHUNK, advise: Advise = start_writeback
    ) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive number of bytes, got {chunk}")
        self._file = file
        self._chunk = chunk
        self._advise = advise
        self._written = file.tell()
        self._started = self._written  # writeback was asked for every byte before this offset

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self._written += n
        if self._written - self._started >= self._chunk:
            # Bytes still in the file object's own buffer are not in the page cache yet: the
            # request misses them, and the fsync writes them.
            self._advise(self._file.fileno(), self._started, self._written - self._started)
            self._started = self._written
        return n

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def name(self) -> str:
        """The path of the file being written (the temporary file, for ``atomic_write``)."""
        return str(self._file.name)
