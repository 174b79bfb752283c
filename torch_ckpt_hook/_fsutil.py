"""Durable file writes: temporary file, fsync, rename, fsync of the directory.

A file written through ``atomic_write`` is either absent or complete under its final name, even if
the process is killed at any instant; what a killed write can leave behind is a temporary file
(``<basename>.tmp-<32 hex digits>``) beside it, which ``remove_stray_temp_files`` cleans up.

Temporary files are owned through a lock: the writer holds an exclusive ``flock`` on its
temporary file from creation until the rename, and the cleanup deletes a temporary file only
after taking that lock itself without waiting. A write in progress (in this process or any other
on the machine) holds the lock, so its file is left alone; a killed writer's lock died with its
process, so its leftover is removed. ``flock`` locks belong to the open file description, so two
savers in one process exclude each other as two processes do. Where ``flock`` is missing
(Windows), an open file cannot be deleted anyway, which gives the same protection.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ._writeback import EarlyWriteback, Sink

logger = logging.getLogger(__name__)

TEMP_INFIX = ".tmp-"

# uuid4().hex is 32 lowercase hex digits; matching it exactly keeps a user's file that merely
# contains ".tmp-" in its name safe from the cleanup.
_TEMP_NAME = re.compile(r".+" + re.escape(TEMP_INFIX) + r"[0-9a-f]{32}", re.DOTALL)

# Errors of fsync on a directory that mean "this file system cannot do that", not "it failed".
_FSYNC_DIR_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR})


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two spellings name one path (relative or absolute, case on case-blind systems)."""
    return path_key(a) == path_key(b)


def path_key(path: str | os.PathLike[str]) -> str:
    """One spelling per path, for comparing and deduplicating paths."""
    return os.path.normcase(os.path.abspath(path))


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` durable by fsyncing the directory itself.

    Platforms and file systems that cannot open or fsync a directory (Windows, some network file
    systems) are tolerated: there the rename is as durable as the platform makes it.
    """
    if os.name == "nt":
        # Windows cannot open a directory with os.open; NTFS journals the rename itself.
        return
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except (PermissionError, IsADirectoryError) as err:
        # A directory can be writable but not readable (mode -wx); the files are still written.
        logger.debug("Cannot open directory %s to fsync it: %s", directory, err)
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
        logger.debug("Cannot fsync directory %s: %s", directory, err)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Sink], object]) -> None:
    """Write ``path`` through ``write(f)`` so that it is never seen partly written.

    ``write``'s return value is ignored (so ``f.write`` itself can be the writer's last call).
    ``f`` is written sequentially; the disk starts on a large file while it is still being
    written (``_writeback``).

    The bytes go to a temporary file in the same directory (a rename is atomic only within one
    file system), which is flushed, fsynced and renamed onto ``path``; the directory is then
    fsynced so the rename survives a power loss. If anything fails before the rename, the
    temporary file is removed, any previous file at ``path`` is left untouched, and the original
    exception propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path)
    with _owned_temp_file(path) as (tmp_path, f):
        write(EarlyWriteback(f))
        f.flush()
        os.fsync(f.fileno())
        # Renamed while still locked: the cleanup never sees this name unlocked while it is ours.
        os.replace(tmp_path, path)
    fsync_dir(directory or os.curdir)


# A cleanup that unlinks a file between our create and our lock makes us retry with a new name.
_CREATE_ATTEMPTS = 5


@contextlib.contextmanager
def _owned_temp_file(path: str) -> Iterator[tuple[str, BinaryIO]]:
    """A new temporary file beside ``path``, locked against the cleanup until it is closed.

    If the body raises, the temporary file is removed and the exception propagates.
    """
    directory, basename = os.path.split(path)
    for _attempt in range(_CREATE_ATTEMPTS):
        tmp_path = os.path.join(directory, f"{basename}{TEMP_INFIX}{uuid.uuid4().hex}")
        # "x": a fresh uuid never names an existing file; if it somehow did, fail, not clobber.
        f = open(tmp_path, "xb")  # noqa: SIM115  # closed below on every path
        try:
            _lock(f.fileno())
            if _still_named(f.fileno(), tmp_path):
                break
        except BaseException:
            f.close()
            raise
        # Another saver's cleanup removed it between the create and the lock: try a new name.
        f.close()
    else:
        raise OSError(
            errno.EAGAIN,
            f"could not create a temporary file beside {path}: it was deleted "
            f"{_CREATE_ATTEMPTS} times before it could be locked",
        )
    try:
        with f:
            yield tmp_path, f
    except BaseException:
        # BaseException: a KeyboardInterrupt in the middle of a write must not leave the file.
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise


def _lock(fd: int) -> None:
    """Hold an exclusive ``flock`` on ``fd`` until it is closed (a no-op where there is none)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        # A file system without locks: write anyway; its cleanup leaves every temp file alone.
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def _still_named(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def is_temp_file(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` (a file name or path) is a temporary file left by ``atomic_write``."""
    return _TEMP_NAME.fullmatch(os.path.basename(os.fspath(name))) is not None


def remove_stray_temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary files that killed ``atomic_write`` calls left in ``directory``.

    A temporary file whose writer is still at work (in any process) is locked by it and left
    alone; only a file whose lock this call can take is deleted, while it holds the lock. A
    missing directory has nothing to clean.

    Returns:
        The paths removed, sorted.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not is_temp_file(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if not _remove_if_unowned(entry.path):
                logger.debug("Temporary file %s is being written; it is left alone.", entry.path)
                continue
        except FileNotFoundError:
            # Removed by someone else since the listing, or committed (renamed) by its writer.
            continue
        except OSError as err:
            # Leftovers waste space but harm nothing; a failed cleanup must not stop training.
            logger.warning("Could not remove stray temporary file %s: %s", entry.path, err)
            continue
        logger.info("Removed stray temporary file %s left by an interrupted save.", entry.path)
        removed.append(entry.path)
    return sorted(removed)


def _remove_if_unowned(path: str) -> bool:
    """Delete the temporary file at ``path`` unless a live writer holds its lock."""
    # O_NONBLOCK: a FIFO given a temporary file's name must not hang the cleanup.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return False  # no locks here: a live write cannot be told from a stray
                raise
        # Locked by us: the writer is gone, or renamed it already (then this name is not its).
        if not _still_named(fd, path):
            return False
        os.remove(path)
        return True
    finally:
        os.close(fd)


def file_type(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for messages: ``"a FIFO"``, ``"a directory"``."""
    for test, what in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


class NotRegularFileError(ValueError):
    """``path`` names a directory, FIFO, socket or device, which was not opened.

    A ``ValueError``: what stands at the path is not what the caller can read.
    """

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} is {what}, not a regular file")
        self.path = path
        self.what = what
        """``"a FIFO"``, ``"a directory"``, ...: what stands at ``path``."""


# O_NONBLOCK: if a FIFO is swapped in between the stat and the open, the open returns at once
# instead of waiting for a writer. O_NOCTTY: a terminal device never becomes ours.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = _NONBLOCK | getattr(os, "O_NOCTTY", 0)


def _open_without_blocking(path: str, flags: int) -> int:
    return os.open(path, flags | _OPEN_FLAGS)


def open_regular_file(path: str) -> io.BufferedReader:
    """``path`` opened for reading, when it is a regular file (a symbolic link to one is).

    Anything else is refused unopened: reading a FIFO waits for a writer forever, ``/dev/zero``
    never ends, and opening some devices has effects (a tape rewinds). The file opened is checked
    again through its descriptor, so what is read is the regular file that was checked.

    Raises:
        NotRegularFileError: ``path`` is a directory, FIFO, socket or device.
        OSError: it does not exist (``FileNotFoundError``) or cannot be opened.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, file_type(mode))
    f = open(path, "rb", opener=_open_without_blocking)  # noqa: SIM115  # the caller closes it
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_type(mode))
        if _NONBLOCK:
            # A slow device's read must wait for its data, not fail with EAGAIN.
            os.set_blocking(f.fileno(), True)
    except BaseException:
        f.close()
        raise
    return f


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file at ``path``, which must hold at most ``limit`` bytes.

    A FIFO, a device or a directory under that name is refused at once rather than read (or
    waited on) forever (``open_regular_file``), and so is a file larger than ``limit``.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``path`` is not a regular file (``NotRegularFileError``), or is larger than
            ``limit``.
        OSError: it cannot be opened or read.
    """
    with open_regular_file(os.fspath(path)) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{os.fspath(path)} is larger than {limit} bytes")
    return data
