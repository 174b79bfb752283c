"""Which files of a directory are checkpoints, and what ``torch-ckpt ls`` says of each.

Used by the ``torch-ckpt`` command only.
"""

from __future__ import annotations

import dataclasses
import os

from ._checkpoint_dir import (
    CHECKPOINT_NAME,
    RestoreChoice,
    find_checkpoints,
    latest_checkpoint,
    restore_choice,
    step_of,
)
from ._checkpoint_file import CheckpointProblem, check_checkpoint
from ._cli_format import printable, timestamp
from ._fsutil import is_temp_file, path_key, same_path
from ._integrity import ProblemKind
from ._messages import os_error_reason
from ._state_file import STATE_FILENAME, get_checkpoint_state

DEFAULT_PREFIX = "model.ckpt"


def checkpoint_paths(directory: str) -> list[str]:
    """The directory's checkpoints, oldest first: the state file's and those on disk.

    On disk, a file counts when it is a committed checkpoint (``find_checkpoints``), or when it
    is named ``<prefix>-<step>`` with a prefix a checkpoint here uses (``model.ckpt`` by default):
    a damaged checkpoint must be listed, a user's ``notes-2`` must not. So does anything else of
    such a name (a directory, a FIFO, a device): it stands where a checkpoint should be, and is
    listed to be reported, never opened.

    Raises:
        OSError: the directory cannot be listed.
    """
    state = get_checkpoint_state(directory)
    paths = list(state.all_model_checkpoint_paths) if state is not None else []
    if state is not None:
        paths.append(state.model_checkpoint_path)
    paths += [path for _step, path in find_checkpoints(directory)]
    prefixes = {DEFAULT_PREFIX}
    for path in paths:
        m = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
        if m is not None:
            prefixes.add(m["prefix"])
    with os.scandir(directory) as entries:
        for entry in entries:
            m = CHECKPOINT_NAME.fullmatch(entry.name)
            if (
                m is not None
                and m["prefix"] in prefixes
                and entry.name != STATE_FILENAME
                and not is_temp_file(entry.name)
            ):
                paths.append(entry.path)
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(path_key(path), path)

    def order(path: str) -> tuple[int, float]:
        step = step_of(path)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = 0.0
        return (-1 if step is None else step, mtime)

    return sorted(unique.values(), key=order)


def display_name(directory: str, path: str) -> str:
    """``path`` as the user reads it: its base name when it lies in ``directory``."""
    if same_path(os.path.dirname(path) or os.curdir, directory):
        path = os.path.basename(path)
    return printable(path)


@dataclasses.dataclass(frozen=True)
class Listed:
    """One checkpoint as ``ls`` shows it; ``path`` and ``name`` are ``printable``."""

    path: str
    name: str
    step: int | None
    size_bytes: int | None
    """None for a file that cannot be stat'ed, and for one that is not a regular file."""
    mtime: float | None
    saved_at: str | None
    intact: bool
    problem: str | None
    kind: ProblemKind | None
    """The problem's kind (``corrupted``, ``unloadable``, ``unreadable``, ``not_a_file``)."""
    latest: bool
    """The state file's ``model_checkpoint_path``: what ``latest_checkpoint`` returns."""
    restore: bool
    """The checkpoint a new session restores: ``restore_choice``'s."""


def list_checkpoints(directory: str) -> tuple[list[Listed], RestoreChoice]:
    """Every checkpoint ``checkpoint_paths`` finds, verified, oldest first; and the restore choice.

    Raises:
        OSError: the directory cannot be listed.
    """
    paths = checkpoint_paths(directory)
    problems = {path_key(path): check_checkpoint(path) for path in paths}
    latest = latest_checkpoint(directory)
    choice = restore_choice(directory, problems)
    listed = []
    for path in paths:
        problem = problems[path_key(path)]
        try:
            stat = os.stat(path)
        except OSError as err:
            size, mtime = None, None
            problem = problem or CheckpointProblem(
                "unreadable", f"unreadable: {os_error_reason(err)}"
            )
        else:
            mtime = stat.st_mtime
            # A directory's or a device's size says nothing about a checkpoint.
            size = None if problem is not None and problem.kind == "not_a_file" else stat.st_size
        listed.append(
            Listed(
                path=printable(os.path.abspath(path)),
                name=display_name(directory, path),
                step=step_of(path),
                size_bytes=size,
                mtime=mtime,
                saved_at=None if mtime is None else timestamp(mtime).isoformat(),
                intact=problem is None,
                problem=None if problem is None else printable(problem.message),
                kind=None if problem is None else problem.kind,
                latest=latest is not None and same_path(latest, path),
                restore=choice.path is not None and same_path(choice.path, path),
            )
        )
    return listed, choice
