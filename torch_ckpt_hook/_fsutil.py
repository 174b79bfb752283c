"""Durable file writes: temporary file, fsync, rename, fsync of the directory.

A file written through ``atomic_write`` is either absent or complete under its final name, even if
the process is killed at any instant; what a killed write can leave behind is a temporary file
(``<basename>.tmp-<32 hex digits>``) beside it, which ``remove_stray_temp_files`` cleans up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import uuid
from collections.abc import Callable
from typing import BinaryIO

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


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(f)`` so that it is never seen partly written.

    ``write``'s return value is ignored (so ``f.write`` itself can be the writer's last call).

    The bytes go to a temporary file in the same directory (a rename is atomic only within one
    file system), which is flushed, fsynced and renamed onto ``path``; the directory is then
    fsynced so the rename survives a power loss. If anything fails before the rename, the
    temporary file is removed, any previous file at ``path`` is left untouched, and the original
    exception propagates.
    """
    path = os.fspath(path)
    directory, basename = os.path.split(path)
    tmp_path = os.path.join(directory, f"{basename}{TEMP_INFIX}{uuid.uuid4().hex}")
    try:
        # "x": a fresh uuid never names an existing file; if it somehow did, fail, not clobber.
        with open(tmp_path, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt in the middle of a write must not leave the file.
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise
    fsync_dir(directory or os.curdir)


def is_temp_file(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` (a file name or path) is a temporary file left by ``atomic_write``."""
    return _TEMP_NAME.fullmatch(os.path.basename(os.fspath(name))) is not None


def remove_stray_temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary files that killed ``atomic_write`` calls left in ``directory``.

    Call it only while no other process writes to ``directory``: a temporary file of a write in
    progress cannot be told apart from a stray one. A missing directory has nothing to clean.

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
            os.remove(entry.path)
        except FileNotFoundError:
            # Removed by someone else since the listing: nothing left to clean.
            continue
        except OSError as err:
            # Leftovers waste space but harm nothing; a failed cleanup must not stop training.
            logger.warning("Could not remove stray temporary file %s: %s", entry.path, err)
            continue
        logger.info("Removed stray temporary file %s left by an interrupted save.", entry.path)
        removed.append(entry.path)
    return sorted(removed)
