"""A checkpoint directory: the naming scheme, its checkpoints on disk, the latest, the restore.

One policy, used by session creation and by ``torch-ckpt ls`` / ``inspect`` alike: try the
candidates newest first; pass over one that is damaged or not a regular file (it cannot hold a
usable state); stop at one that is intact but unloadable, or unreadable (it may hold the newest
state, and falling back past it would silently roll the run back); restore the first good one.

Several series of checkpoints may share a directory, each with its own state file: the regular
``model.ckpt-<step>`` listed in ``checkpoint``, ``BestCheckpointSaverHook``'s ``best.ckpt-<step>``
listed in ``best_checkpoint``. Falling back to the files on disk (no usable state file) is for
the default state file only, and takes only the checkpoints whose prefix no other state file in
the directory lists (``unclaimed_checkpoints``): a missing ``checkpoint`` never makes another
series' checkpoint the latest, and a series with a custom prefix and no state file yet (killed
between its first checkpoint and its first state file) is still found.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping

from ._checkpoint_file import CheckpointProblem, check_checkpoint
from ._fsutil import is_temp_file, path_key, read_small_file
from ._integrity import ProblemKind
from ._paths import is_url, normalize
from ._sharded_dir import MANIFEST_NAME, has_manifest
from ._state_file import STATE_FILENAME, get_checkpoint_state, state_file_path
from ._text_format import parse_checkpoint_state

logger = logging.getLogger(__name__)

# The naming scheme: ``<prefix>-<step>`` (``model.ckpt-300``), TensorFlow's.
CHECKPOINT_NAME = re.compile(r"(?P<prefix>.+)-(?P<step>[0-9]+)", re.DOTALL)


def checkpoint_name(prefix: str, step: int) -> str:
    """The name of ``prefix``'s checkpoint of ``step``: ``model.ckpt-300``."""
    return f"{prefix}-{step}"


def step_of(path: str) -> int | None:
    """The step a checkpoint's name ends with (``model.ckpt-300``: 300), or None."""
    m = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return None if m is None else int(m["step"])


def prefix_of(path: str) -> str | None:
    """The prefix a checkpoint's name starts with (``model.ckpt-300``: ``model.ckpt``), or None."""
    m = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return None if m is None else m["prefix"]


def is_default_state_file(latest_filename: str | None) -> bool:
    """Whether ``latest_filename`` names the default state file, ``checkpoint``."""
    return latest_filename in (None, "", STATE_FILENAME)


# Another series' state file lists a few checkpoints: a larger file is not one, and is not read.
_CLAIM_LIMIT = 1 << 20


def claimed_prefixes(checkpoint_dir: str | os.PathLike[str]) -> set[str]:
    """The checkpoint prefixes that a state file other than ``checkpoint`` lists.

    Any small regular file of the directory not named like a checkpoint (``<prefix>-<step>``) is
    read as a state file; one that does not parse as one, or names no checkpoint, claims nothing.
    Nor does a copy of the default one (a name starting with ``checkpoint``: ``checkpoint.bak``,
    ``checkpoint~``): a backup of the state file must not hide the series it lists.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        entries = list(os.scandir(checkpoint_dir))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    claimed: set[str] = set()
    for entry in entries:
        name = entry.name
        if name.startswith(STATE_FILENAME) or is_temp_file(name) or CHECKPOINT_NAME.fullmatch(name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_size > _CLAIM_LIMIT:
                continue
            model, paths = parse_checkpoint_state(
                read_small_file(entry.path, _CLAIM_LIMIT).decode("utf-8")
            )
        except (OSError, ValueError):  # gone, unreadable, not text, not a state file
            continue
        for path in (model, *paths) if model else ():
            prefix = prefix_of(path)
            if prefix is not None:
                claimed.add(prefix)
    return claimed


def unclaimed_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``find_checkpoints``, less those of a prefix that another series' state file lists."""
    claimed = claimed_prefixes(checkpoint_dir)
    return [
        (step, path)
        for step, path in find_checkpoints(checkpoint_dir)
        if prefix_of(path) not in claimed
    ]


def find_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """The committed checkpoint files in ``checkpoint_dir``, as ``(step, path)``, oldest first.

    A committed checkpoint is a regular file named ``<prefix>-<step>`` that is a complete zip
    archive (``torch.save``'s format), or a directory of that name holding a sharded
    checkpoint's manifest (``_sharded_dir``: written last, so a save that never committed is
    not listed); temporary files of unfinished saves, the state file and truncated or foreign
    files are left out. Sorted by step, then modification time (a manifest's, for a directory).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        entries = list(os.scandir(checkpoint_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[int, float, str]] = []
    for entry in entries:
        m = CHECKPOINT_NAME.fullmatch(entry.name)
        if m is None or entry.name == STATE_FILENAME or is_temp_file(entry.name):
            continue
        try:
            if entry.is_dir():
                # A sharded checkpoint counts once its manifest, written last, is there.
                if has_manifest(entry.path):
                    mtime = os.stat(os.path.join(entry.path, MANIFEST_NAME)).st_mtime
                    found.append((int(m["step"]), mtime, entry.path))
                continue
            if not entry.is_file():
                continue
            mtime = entry.stat().st_mtime
        except OSError:
            # Deleted (retention, another process) since the listing.
            continue
        # is_zipfile finds the zip's end record, which torch.save writes last: a file cut short
        # by a crash mid-write (with no atomic rename) is not taken for a checkpoint.
        if zipfile.is_zipfile(entry.path):
            found.append((int(m["step"]), mtime, entry.path))
    found.sort()
    return [(step, path) for step, _, path in found]


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> str | None:
    """The newest checkpoint in ``checkpoint_dir``, or None when there is none.

    The state file's ``model_checkpoint_path`` when it names a checkpoint that exists. Otherwise
    (no state file, or one that is unusable or names only missing files): for the default state
    file, the newest committed checkpoint on disk whose prefix no other state file lists (the
    module docstring), with a warning when a state file was there; for another
    ``latest_filename``, None (its series is only what its state file lists).
    """
    checkpoint_dir = normalize(os.fspath(checkpoint_dir))
    if is_url(checkpoint_dir):
        from ._storage_for import remote_latest

        return remote_latest(checkpoint_dir, latest_filename)
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is not None:
        return state.model_checkpoint_path
    if not is_default_state_file(latest_filename):
        return None
    found = unclaimed_checkpoints(checkpoint_dir)
    if not found:
        return None
    newest = found[-1][1]
    state_path = state_file_path(checkpoint_dir, latest_filename)
    if os.path.lexists(state_path):
        logger.warning(
            "Checkpoint state file %s is unusable; using the newest checkpoint in %s instead: %s",
            state_path,
            checkpoint_dir,
            newest,
        )
    else:
        logger.info(
            "No checkpoint state file in %s; using its newest checkpoint %s.",
            checkpoint_dir,
            newest,
        )
    return newest


# What restore does with a candidate that has a problem of each kind: pass over it to the next
# older one (these), or stop there (the others).
SKIPPED_KINDS: frozenset[ProblemKind] = frozenset({"corrupted", "not_a_file"})


@dataclasses.dataclass(frozen=True)
class RestoreChoice:
    """What a new session on a directory restores, and what it passes over or stops at."""

    path: str | None
    """The checkpoint restored; None when nothing is (``blocked_by`` says when that is why)."""
    skipped: tuple[tuple[str, CheckpointProblem], ...]
    """The candidates passed over before it, newest first: corrupted, or not a regular file."""
    blocked_by: tuple[str, CheckpointProblem] | None
    """The unloadable or unreadable candidate restore stopped at: the session refuses to start."""

    @property
    def refused(self) -> bool:
        """Whether a session refuses to start: checkpoints are there, none can be restored."""
        return self.path is None and bool(self.skipped or self.blocked_by)


def restore_candidates(checkpoint_dir: str, latest_filename: str | None = None) -> list[str]:
    """The checkpoints of a directory, newest first: the state file's list, then any others.

    The others (committed checkpoint files on disk that the state file does not list) count for
    the default state file only, and only those of a prefix no other state file lists: another
    series' state file (``best_checkpoint``) names its own.
    """
    ordered: list[str] = []
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is not None:
        listed = [*state.all_model_checkpoint_paths]
        if state.model_checkpoint_path in listed:
            listed.remove(state.model_checkpoint_path)
        ordered = [state.model_checkpoint_path, *reversed(listed)]
    if not is_default_state_file(latest_filename):
        return ordered
    seen = {os.path.realpath(p) for p in ordered}
    for _step, path in reversed(unclaimed_checkpoints(checkpoint_dir)):
        if os.path.realpath(path) not in seen:
            ordered.append(path)
    return ordered


def choose_restore(
    candidates: Iterable[str], examine: Callable[[str], CheckpointProblem | None]
) -> RestoreChoice:
    """Apply the restore policy to ``candidates`` (newest first).

    ``examine(path)`` returns the candidate's problem, or None when it is good: a check for
    ``torch-ckpt ls``, the restore itself for session creation (which then stops at the first
    candidate that restored).
    """
    skipped: list[tuple[str, CheckpointProblem]] = []
    for path in candidates:
        problem = examine(path)
        if problem is None:
            return RestoreChoice(path, tuple(skipped), None)
        if problem.kind not in SKIPPED_KINDS:
            return RestoreChoice(None, tuple(skipped), (path, problem))
        skipped.append((path, problem))
    return RestoreChoice(None, tuple(skipped), None)


def restore_choice(
    directory: str,
    problems: Mapping[str, CheckpointProblem | None] | None = None,
    latest_filename: str | None = None,
) -> RestoreChoice:
    """The checkpoint a new session on ``directory`` restores, by checksum, without loading.

    ``problems`` maps ``path_key``s to verdicts already known, so no file is read twice. An
    intact file whose contents cannot be loaded (a refused object) passes this check; the
    session stops at it when it loads it.
    """
    known = problems if problems is not None else {}

    def examine(path: str) -> CheckpointProblem | None:
        key = path_key(path)
        return known[key] if key in known else check_checkpoint(path)

    return choose_restore(restore_candidates(directory, latest_filename), examine)


def restorable_checkpoint(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> str | None:
    """The checkpoint a new session on ``checkpoint_dir`` would restore, or None.

    The newest candidate that verifies, passing over damaged ones. None when there is no
    checkpoint, and also when a session would refuse to start (every checkpoint damaged, or the
    newest undamaged one unloadable or unreadable): ``torch-ckpt ls`` says why.
    """
    directory = normalize(os.fspath(checkpoint_dir))
    if is_url(directory):
        from ._storage_for import remote_restorable

        return remote_restorable(directory, latest_filename)
    if not os.path.isdir(directory):
        return None
    return restore_choice(directory, latest_filename=latest_filename).path
