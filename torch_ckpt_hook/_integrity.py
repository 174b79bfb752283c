"""A whole-file CRC32 carried in the checkpoint's zip comment, computed while the file is written.

``torch.save`` writes a zip archive whose last 22 bytes are the end-of-central-directory record
(EOCD); its last two bytes give the length of an archive comment that follows it, normally 0.
``ChecksumWriter`` streams the archive through ``zlib.crc32`` as ``torch.save`` writes it, holds
the EOCD back, sets its comment length, and appends a fixed-size comment::

    torch_ckpt_hook crc32=<8 hex> size=<16 hex>

The CRC covers every byte before the comment (the patched EOCD included); ``size`` is how many
bytes that is. A zip comment is part of the format, so ``torch.load`` reads the file unchanged,
while ``verify`` detects truncation (the trailer is gone or ``size`` disagrees with the file) and
any flipped bit (the CRC disagrees), which ``torch.load`` does not: it ignores the CRC32s that
``torch.save`` stores per record.

CRC32 because it is the fastest check in the standard library (about 4 GB/s here, against 1.4
for SHA-256 and 0.8 for BLAKE2b; see the benchmark), it releases the GIL on large buffers, and
it detects every burst error up to 32 bits: the goal is catching damage, not tampering.

``torch.save`` computes a CRC32 of every record too, which ``torch.load`` never checks. The whole
-file CRC makes it redundant, so a save made here asks torch to skip it: that halves the cost
of serializing (torch's CRC is all of ``torch.save``'s CPU time on an in-memory write). torch
reads the setting through ``torch.serialization.get_crc32_options()``; it is replaced once by a
function that answers False on a thread inside ``save_with_checksum`` and defers to torch's own
setting everywhere else, so no other ``torch.save`` in the process changes. The records of our
files then hold CRC 0 (``unzip -t`` complains; ``torch.load`` does not look).

Reading is checked as carefully: ``_fsutil.open_regular_file`` opens only a regular file, so a
FIFO, a device or a directory under a checkpoint's name is refused at once instead of read
forever, and ``check_file`` sorts every problem into a ``CheckpointProblem`` kind, because what
a user (and restore) should do differs: a *corrupted* file is damaged; a file with *no checksum*
(plain ``torch.save``) is not known to be damaged at all, and must never be reported as if it
were.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import threading
import zlib
from collections.abc import Callable
from concurrent import futures
from typing import Any, Literal

import torch

from ._fsutil import NotRegularFileError, open_regular_file
from ._messages import os_error_reason
from ._writeback import Sink

_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_TRAILER = re.compile(rb"torch_ckpt_hook crc32=([0-9a-f]{8}) size=([0-9a-f]{16})")
_TRAILER_START = b"torch_ckpt_hook crc32="
TRAILER_SIZE = len(b"torch_ckpt_hook crc32=00000000 size=0000000000000000")
# Verification reads through a buffer this small: it stays in the CPU cache while it is CRC'd.
_CHUNK = 1 << 20


# Writes at least this large are CRC'd on a helper thread while this thread writes them: both
# release the GIL, so on two cores a save costs max(CRC, write) rather than their sum. Smaller
# ones are not worth a thread hand-off.
OVERLAP_MIN = 4 << 20


class ChecksumWriter:
    """A write-only file wrapper that CRCs what passes through it; ``finish`` adds the trailer.

    With a ``crc_pool``, a write of ``overlap_min`` bytes or more is CRC'd there while it is
    written here.
    """

    def __init__(
        self,
        file: Sink,
        crc_pool: futures.Executor | None = None,
        *,
        overlap_min: int = OVERLAP_MIN,
    ) -> None:
        self._file = file
        self._crc_pool = crc_pool
        self._overlap_min = overlap_min
        self._crc = 0
        self._size = 0
        # The last bytes written so far: the EOCD once torch.save is done.
        self._held = b""
        # The first OSError of the underlying file (ENOSPC, EFBIG, EIO), for save_with_checksum.
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _EOCD_SIZE:
            self._emit(self._held)
            self._emit(view[: n - _EOCD_SIZE])
            self._held = bytes(view[n - _EOCD_SIZE :])
        else:
            held = self._held + bytes(view)
            if len(held) > _EOCD_SIZE:
                self._emit(held[:-_EOCD_SIZE])
                held = held[-_EOCD_SIZE:]
            self._held = held
        return n

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> None:
        """Write the held-back EOCD with its comment length set, then the checksum trailer."""
        eocd = self._held
        if len(eocd) != _EOCD_SIZE or not eocd.startswith(_EOCD_SIGNATURE) or eocd[-2:] != b"\0\0":
            raise ValueError("torch.save did not end its archive with a comment-less EOCD record")
        self._emit(eocd[:-2] + TRAILER_SIZE.to_bytes(2, "little"))
        self._held = b""
        trailer = b"torch_ckpt_hook crc32=%08x size=%016x" % (self._crc, self._size)
        self._file.write(trailer)

    def _emit(self, data: bytes | memoryview) -> None:
        if not data:
            return
        crc = None
        if self._crc_pool is not None and len(data) >= self._overlap_min:
            crc = self._crc_pool.submit(zlib.crc32, data, self._crc)
        else:
            self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        try:
            self._file.write(data)
        except OSError as err:
            # torch.save's C++ writer turns this into "unexpected pos": keep it to re-raise.
            self.error = err
            raise
        finally:
            # Before returning: torch may reuse the memory behind ``data`` once write returns.
            if crc is not None:
                self._crc = crc.result()


_saving = threading.local()
_install_lock = threading.Lock()


def _skip_torch_record_crcs() -> None:
    """Make ``torch.save`` skip its per-record CRC32s on threads inside ``save_with_checksum``."""
    with _install_lock:
        torch_get = getattr(torch.serialization, "get_crc32_options", None)
        if torch_get is None or getattr(torch_get, "_torch_ckpt_hook", False):
            return  # an older torch without the option, or already in place

        def get_crc32_options() -> bool:
            return False if getattr(_saving, "active", False) else bool(torch_get())

        get_crc32_options._torch_ckpt_hook = True  # type: ignore[attr-defined]
        get_crc32_options.__doc__ = torch_get.__doc__
        torch.serialization.get_crc32_options = get_crc32_options


def save_with_checksum(obj: Any, file: Sink, *, overlap_min: int = OVERLAP_MIN) -> None:
    """``torch.save(obj, file)`` followed by the checksum trailer.

    Args:
        overlap_min: writes at least this large are CRC'd on a helper thread while they are
            written (``ChecksumWriter``); the CRC is the same either way.
    """
    _skip_torch_record_crcs()
    with futures.ThreadPoolExecutor(1, thread_name_prefix="torch_ckpt_hook-crc") as crc_pool:
        writer = ChecksumWriter(file, crc_pool, overlap_min=overlap_min)
        _saving.active = True
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]  # a duck-typed binary writer
        except Exception as err:
            # Report the disk's error (ENOSPC, EFBIG), not torch's "unexpected pos" hiding it.
            if writer.error is not None:
                raise writer.error from err
            raise
        finally:
            _saving.active = False
        writer.finish()


ProblemKind = Literal["corrupted", "unloadable", "unreadable", "not_a_file"]


@dataclasses.dataclass(frozen=True)
class CheckpointProblem:
    """What is wrong with one checkpoint file, as one of four kinds that call for different acts.

    - ``corrupted``: its bytes are damaged (truncated, a checksum mismatch, a damaged end
      record). Only this kind means the file is bad; restore skips it.
    - ``unloadable``: nothing shows damage, but it cannot be loaded as asked (a plain
      ``torch.save`` file has no checksum). It may be the newest good state of a run: restore
      stops there instead of falling back to an older checkpoint.
    - ``unreadable``: it could not be read (no permission, an I/O error, missing): its bytes may
      be fine, so restore stops there too.
    - ``not_a_file``: a directory, FIFO, socket or device stands where a checkpoint should be; it
      was not opened (a FIFO would block forever), and restore skips it.
    """

    kind: ProblemKind
    message: str
    """One line, naming the cause: ``"checksum mismatch: ..."``, ``"unreadable: ..."``."""

    def __str__(self) -> str:
        return self.message


def has_trailer(path: str) -> bool:
    """Whether the regular file at ``path`` ends in this package's checksum trailer.

    Only the trailer's opening is looked at, not the checksum: the proof that this package
    wrote the file, for retention (``_ownership``), not a verdict on its integrity.
    """
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < TRAILER_SIZE:
                return False
            f.seek(size - TRAILER_SIZE)
            return f.read(TRAILER_SIZE).startswith(_TRAILER_START)
    except (OSError, NotRegularFileError):
        return False


def check_file(path: str) -> CheckpointProblem | None:
    """The problem found in the checkpoint file at ``path``, or None when its checksum holds.

    Only the checksum is checked; nothing is unpickled. Never raises for a bad file.
    """
    try:
        f = open_regular_file(path)
    except NotRegularFileError as err:
        return CheckpointProblem("not_a_file", f"not a regular file: it is {err.what}")
    except OSError as err:
        # Missing counts as unreadable, not as "nothing there": a dangling link may point into
        # a file system that is not mounted, and its checkpoint must not be passed over.
        return CheckpointProblem("unreadable", f"unreadable: {os_error_reason(err)}")
    with f:
        try:
            return checksum_problem(f)
        except OSError as err:
            return CheckpointProblem("unreadable", f"unreadable: {os_error_reason(err)}")


def checksum_problem(f: io.BufferedReader) -> CheckpointProblem | None:
    """What the checksum trailer of the open file ``f`` says is wrong with it, or None.

    The kind is ``corrupted``, or ``unloadable`` for a file that has no checksum at all.

    Raises:
        OSError: a read failed (the file is unreadable, which says nothing of its bytes).
    """
    return _check(f, os.fstat(f.fileno()).st_size)


# torch.save's format before zip archives (torch < 1.6, or _use_new_zipfile_serialization=False)
# starts with a pickled magic number: protocol 2, then the 10-byte long 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

_NO_CHECKSUM = (
    "no checksum: {what}, not written by torch_ckpt_hook, so damage to it cannot be detected"
)


def _corrupted(message: str) -> CheckpointProblem:
    return CheckpointProblem("corrupted", message)


def _check(f: io.BufferedReader, size: int) -> CheckpointProblem | None:
    found = _structure(f, size)
    if isinstance(found, CheckpointProblem):
        return found
    stored_crc, covered = found
    f.seek(0)

    def read_at(view: memoryview, offset: int) -> int:
        return f.readinto(view)  # sequential: offset is where f already is

    return _crc_problem(read_at, covered, stored_crc)


def _structure(f: io.BufferedReader, size: int) -> CheckpointProblem | tuple[int, int]:
    """The problem the file's trailer and end record show, or ``(stored crc, covered bytes)``."""
    f.seek(0)
    if f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC:
        # Whether its end is intact cannot be told: the format has no end record.
        what = "a torch.save file of the format before zip archives (torch < 1.6)"
        return CheckpointProblem("unloadable", _NO_CHECKSUM.format(what=what))
    if size < _EOCD_SIZE + TRAILER_SIZE:
        return _corrupted(f"truncated: {size} bytes is too short for a checkpoint")
    f.seek(size - TRAILER_SIZE)
    match = _TRAILER.fullmatch(f.read(TRAILER_SIZE))
    if match is None:
        f.seek(size - _EOCD_SIZE)
        eocd = f.read(_EOCD_SIZE)
        if eocd.startswith(_EOCD_SIGNATURE) and eocd[-2:] == b"\0\0":
            # torch.save ends its archive with a comment-less end record; ours has a comment,
            # so a file of ours cut short never ends like this.
            what = "a plain torch.save archive"
            return CheckpointProblem("unloadable", _NO_CHECKSUM.format(what=what))
        return _corrupted("truncated or damaged: the checksum trailer at its end is missing")
    stored_crc, covered = int(match[1], 16), int(match[2], 16)
    if covered != size - TRAILER_SIZE:
        return _corrupted(
            f"truncated or damaged: its trailer covers {covered} bytes, "
            f"the file holds {size - TRAILER_SIZE} before it"
        )
    f.seek(covered - _EOCD_SIZE)
    eocd = f.read(_EOCD_SIZE)
    if not eocd.startswith(_EOCD_SIGNATURE) or eocd[-2:] != TRAILER_SIZE.to_bytes(2, "little"):
        return _corrupted("damaged: the zip end-of-archive record before its trailer is not intact")
    return stored_crc, covered


def _crc_problem(
    read_at: Callable[[memoryview, int], int], covered: int, stored_crc: int
) -> CheckpointProblem | None:
    """Whether the CRC of the first ``covered`` bytes, read by ``read_at(view, offset)``, holds.

    Reads go through one small buffer that stays in the CPU cache while it is CRC'd.
    """
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    offset = 0
    while offset < covered:
        n = read_at(view[: min(covered - offset, _CHUNK)], offset)
        if not n:
            return _corrupted(
                f"truncated: the file ended {covered - offset} bytes early while being read"
            )
        crc = zlib.crc32(view[:n], crc)
        offset += n
    if crc != stored_crc:
        return _corrupted(f"checksum mismatch: stored crc32 {stored_crc:08x}, computed {crc:08x}")
    return None


class PendingChecksum:
    """The whole-file CRC of an open checkpoint, computed on a helper thread.

    It reads with positional reads (``os.preadv``) from the same open file, so the thread never
    moves the file's position and the caller may read the file (``torch.load`` it) meanwhile:
    the bytes checked are those of the file that was opened, whatever its name points to since.
    """

    def __init__(self, fd: int, covered: int, stored_crc: int) -> None:
        self._outcome: CheckpointProblem | OSError | None = None

        def read_at(view: memoryview, offset: int) -> int:
            return os.preadv(fd, [view], offset)

        def run() -> None:
            try:
                self._outcome = _crc_problem(read_at, covered, stored_crc)
            except OSError as err:
                self._outcome = err

        self._thread = threading.Thread(target=run, name="torch_ckpt_hook-verify", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Wait for the thread, whatever it found: the file must not be closed under it."""
        self._thread.join()

    def result(self) -> CheckpointProblem | None:
        """The problem found, or None when the CRC holds; waits for the thread.

        Raises:
            OSError: a read failed (the file is unreadable, which says nothing of its bytes).
        """
        self._thread.join()
        if isinstance(self._outcome, OSError):
            raise self._outcome
        return self._outcome


def start_checksum(f: io.BufferedReader) -> CheckpointProblem | PendingChecksum | None:
    """``checksum_problem(f)``, with the CRC itself left running on a thread where it can be.

    Returns a problem the trailer or end record already shows; else a ``PendingChecksum``
    (where positional reads exist), or the finished verdict (None: intact) where they do not.

    Raises:
        OSError: a read failed.
    """
    size = os.fstat(f.fileno()).st_size
    if not hasattr(os, "preadv"):
        return _check(f, size)
    found = _structure(f, size)
    if isinstance(found, CheckpointProblem):
        return found
    stored_crc, covered = found
    return PendingChecksum(f.fileno(), covered, stored_crc)
