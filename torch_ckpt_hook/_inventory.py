"""Which files of a directory are checkpoints, and what ``torch-ckpt ls`` says of each."""

from __future__ import annotations

import dataclasses
import os

from ._checkpoint_file import verify_checkpoint
from ._cli_format import printable, timestamp
from ._fsutil import is_temp_file, path_key, same_path
from ._session_manager import _candidates as restore_candidates
from ._state_file import (
    _CHECKPOINT_NAME,
    STATE_FILENAME,
    find_checkpoints,
    get_checkpoint_state,
    latest_checkpoint,
)

DEFAULT_PREFIX = "model.ckpt"


def step_of(path: str) -> int | None:
    """The step a checkpoint's name ends with (``model.ckpt-300``: 300), or None."""
    m = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return None if m is None else int(m["step"])


def checkpoint_paths(directory: str) -> list[str]:
    """The directory's checkpoints, oldest first: the state file's and those on disk.

    On disk, a file counts when it is a committed checkpoint (``find_checkpoints``), or when it
    is named ``<prefix>-<step>`` with a prefix a checkpoint here uses (``model.ckpt`` by default):
    a damaged checkpoint must be listed, a user's ``notes-2`` must not.

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
        m = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
        if m is not None:
            prefixes.add(m["prefix"])
    with os.scandir(directory) as entries:
        for entry in entries:
            m = _CHECKPOINT_NAME.fullmatch(entry.name)
            if (
                m is not None
                and m["prefix"] in prefixes
                and entry.name != STATE_FILENAME
                and not is_temp_file(entry.name)
                and entry.is_file()
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
    mtime: float | None
    saved_at: str | None
    intact: bool
    problem: str | None
    latest: bool
    """The state file's ``model_checkpoint_path``: what ``latest_checkpoint`` returns."""
    restore: bool
    """The checkpoint a new session restores: the newest intact one, in the session's order."""

    @property
    def unreadable(self) -> bool:
        return self.problem is not None and self.problem.startswith("unreadable")


def list_checkpoints(directory: str) -> list[Listed]:
    """Every checkpoint ``checkpoint_paths`` finds, verified, oldest first.

    Raises:
        OSError: the directory cannot be listed.
    """
    paths = checkpoint_paths(directory)
    problems = {path_key(path): problem_of(path) for path in paths}
    latest = latest_checkpoint(directory)
    restore, _skipped = restore_choice(directory, problems)
    listed = []
    for path in paths:
        problem = problems[path_key(path)]
        try:
            stat = os.stat(path)
        except OSError as err:
            size, mtime = None, None
            problem = problem or f"unreadable: {err.strerror or err}"
        else:
            size, mtime = stat.st_size, stat.st_mtime
        listed.append(
            Listed(
                path=printable(os.path.abspath(path)),
                name=display_name(directory, path),
                step=step_of(path),
                size_bytes=size,
                mtime=mtime,
                saved_at=None if mtime is None else timestamp(mtime).isoformat(),
                intact=problem is None,
                problem=None if problem is None else printable(problem),
                latest=latest is not None and same_path(latest, path),
                restore=restore is not None and same_path(restore, path),
            )
        )
    return listed


def problem_of(path: str) -> str | None:
    """``verify_checkpoint``'s verdict, with a file that cannot be stat'ed unreadable too."""
    try:
        os.stat(path)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return verify_checkpoint(path)


def restore_choice(
    directory: str, problems: dict[str, str | None] | None = None
) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint a new session on ``directory`` restores, and the ones it skips first.

    A session tries the state file's checkpoints newest first, then the others on disk, and
    restores the first intact one; the skipped ones come back as ``(path, problem)``.
    ``problems`` maps ``path_key``s to verdicts already known, so no file is read twice.
    """
    known = problems if problems is not None else {}
    skipped: list[tuple[str, str]] = []
    for path in restore_candidates(directory):
        key = path_key(path)
        problem = known[key] if key in known else problem_of(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped
