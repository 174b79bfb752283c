"""Which files of a directory are checkpoints, and what ``torch-ckpt ls`` says of each.

Used by the ``torch-ckpt`` command only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

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
from ._cli_inspection import metric_number
from ._fsutil import is_temp_file, path_key, same_path
from ._integrity import ProblemKind
from ._messages import os_error_reason
from ._sharded_dir import MANIFEST_NAME
from ._sharded_read import directory_size, is_sharded_checkpoint
from ._state_file import STATE_FILENAME, CheckpointState, get_checkpoint_state

DEFAULT_PREFIX = "model.ckpt"

# BestCheckpointSaverHook's defaults (SPEC 5.3): its own state file, and its files' prefix.
BEST_STATE_FILENAME = "best_checkpoint"
BEST_PREFIX = "best.ckpt"


def _prefix(path: str) -> str | None:
    m = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return None if m is None else m["prefix"]


def split_series(directory: str, paths: list[str]) -> tuple[list[str], list[str]]:
    """``paths`` as the regular series and the best checkpoints (``best_checkpoint``'s).

    A checkpoint is a best one when the ``best_checkpoint`` state file lists it, or when it is
    not in the ``checkpoint`` state file and its prefix is a best one's (``best.ckpt`` unless
    the ``checkpoint`` file's own checkpoints use that prefix).
    """
    regular_state = get_checkpoint_state(directory)
    best_state = get_checkpoint_state(directory, BEST_STATE_FILENAME)
    regular_listed = _listed_keys(regular_state)
    best_listed = _listed_keys(best_state)
    regular_prefixes = {_prefix(p) for p in state_paths(regular_state)}
    best_prefixes = {_prefix(p) for p in state_paths(best_state)}
    if BEST_PREFIX not in regular_prefixes:
        best_prefixes.add(BEST_PREFIX)
    regular: list[str] = []
    best: list[str] = []
    for path in paths:
        key = path_key(path)
        is_best = key in best_listed or (
            key not in regular_listed and _prefix(path) in best_prefixes
        )
        (best if is_best else regular).append(path)
    return regular, best


def state_paths(state: CheckpointState | None) -> list[str]:
    """Every path a state file names; none for no state file."""
    if state is None:
        return []
    return [*state.all_model_checkpoint_paths, state.model_checkpoint_path]


def _listed_keys(state: CheckpointState | None) -> set[str]:
    return {path_key(p) for p in state_paths(state)}


def checkpoint_paths(directory: str) -> list[str]:
    """The directory's checkpoints, oldest first: the state files' and those on disk.

    On disk, a file counts when it is a committed checkpoint (``find_checkpoints``), or when it
    is named ``<prefix>-<step>`` with a prefix a checkpoint here uses (``model.ckpt`` by default):
    a damaged checkpoint must be listed, a user's ``notes-2`` must not. So does anything else of
    such a name (a directory, a FIFO, a device): it stands where a checkpoint should be, and is
    listed to be reported, never opened.

    Raises:
        OSError: the directory cannot be listed.
    """
    paths = state_paths(get_checkpoint_state(directory))
    paths += state_paths(get_checkpoint_state(directory, BEST_STATE_FILENAME))
    paths += [path for _step, path in find_checkpoints(directory)]
    prefixes = {DEFAULT_PREFIX, BEST_PREFIX}
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
                and entry.name not in (STATE_FILENAME, BEST_STATE_FILENAME)
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


@dataclasses.dataclass(frozen=True)
class Inventory:
    """A directory as ``ls`` shows it: the regular series, the best checkpoints, the restore."""

    listed: list[Listed]
    """The regular series (``checkpoint``'s), oldest first; ``latest`` marks its latest."""
    best: list[Listed]
    """The best checkpoints (``best_checkpoint``'s), oldest first; ``latest`` marks the best."""
    metrics: Mapping[str, dict[str, Any] | None]
    """Each best checkpoint's ``metrics``, by its ``Listed.path``; None where it cannot be read."""
    choice: RestoreChoice


def list_checkpoints(directory: str) -> Inventory:
    """Every checkpoint ``checkpoint_paths`` finds, verified, oldest first, by series; each best
    one's metrics; and the restore choice.

    Raises:
        OSError: the directory cannot be listed.
    """
    paths = checkpoint_paths(directory)
    problems = {path_key(path): check_checkpoint(path) for path in paths}
    choice = restore_choice(directory, problems)
    regular, best = split_series(directory, paths)
    listed = _listed(directory, regular, problems, latest_checkpoint(directory), choice)
    best_listed = _listed(
        directory,
        best,
        problems,
        latest_checkpoint(directory, BEST_STATE_FILENAME) if best else None,
        choice,
    )
    metrics = {
        item.path: None if problems[path_key(path)] is not None else read_metrics(path)
        for item, path in zip(best_listed, best, strict=True)
    }
    return Inventory(listed, best_listed, metrics, choice)


def read_metrics(path: str) -> dict[str, Any] | None:
    """A best checkpoint's ``metrics`` (``{name: float}``), or None when it has none.

    Only the metrics are read: the file is memory-mapped, so its tensors are never copied in
    (a model's gigabytes). Called for a file whose checksum just held.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unloadable as asked: ls shows no metrics, inspect says why
        return None
    metrics = payload.get("metrics") if isinstance(payload, Mapping) else None
    if not isinstance(metrics, Mapping):
        return None
    return {printable(str(name)): metric_number(value) for name, value in metrics.items()}


def _listed(
    directory: str,
    paths: list[str],
    problems: Mapping[str, CheckpointProblem | None],
    latest: str | None,
    choice: RestoreChoice,
) -> list[Listed]:
    listed = []
    for path in paths:
        problem = problems[path_key(path)]
        sharded = is_sharded_checkpoint(path)
        try:
            # A sharded checkpoint was saved when its manifest, written last, was.
            manifest = os.path.join(path, MANIFEST_NAME)
            stat = os.stat(manifest if sharded and os.path.isfile(manifest) else path)
        except OSError as err:
            size, mtime = None, None
            problem = problem or CheckpointProblem(
                "unreadable", f"unreadable: {os_error_reason(err)}"
            )
        else:
            mtime = stat.st_mtime
            # A directory's or a device's size says nothing about a checkpoint.
            size = None if problem is not None and problem.kind == "not_a_file" else stat.st_size
            if sharded:
                size = directory_size(path)
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
    return listed
