"""Creating a session's state: restore a checkpoint, else run the scaffold's ``init_fn``."""

from __future__ import annotations

import logging
import os

from ._errors import CheckpointCorruptedError
from ._scaffold import Scaffold
from ._session import Session
from ._state_file import find_checkpoints, get_checkpoint_state

logger = logging.getLogger(__name__)


def _candidates(checkpoint_dir: str) -> list[str]:
    """The checkpoints of a directory, newest first: the state file's list, then any others."""
    ordered: list[str] = []
    state = get_checkpoint_state(checkpoint_dir)
    if state is not None:
        listed = [*state.all_model_checkpoint_paths]
        if state.model_checkpoint_path in listed:
            listed.remove(state.model_checkpoint_path)
        ordered = [state.model_checkpoint_path, *reversed(listed)]
    seen = {os.path.realpath(p) for p in ordered}
    for _step, path in reversed(find_checkpoints(checkpoint_dir)):
        if os.path.realpath(path) not in seen:
            ordered.append(path)
    return ordered


def prepare_session(
    session: Session,
    scaffold: Scaffold,
    checkpoint_dir: str | None,
    checkpoint_filename_with_path: str | None,
) -> str | None:
    """Restore ``session`` and return the checkpoint it came from, or run ``init_fn``.

    A named checkpoint must load. From a directory, the newest intact checkpoint is restored; a
    corrupted one is skipped with a warning that names it. The saver then adopts the directory's
    checkpoint list, so ``max_to_keep`` carries on across restarts.
    """
    session._restored_from = None
    if checkpoint_filename_with_path is not None:
        scaffold.get_saver().restore(session, checkpoint_filename_with_path)
        return checkpoint_filename_with_path
    if checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
        for path in _candidates(checkpoint_dir):
            saver = scaffold.get_saver()
            try:
                saver.restore(session, path)
            except CheckpointCorruptedError as err:
                logger.warning("Skipping corrupted checkpoint %s: %s", path, err)
                continue
            saver.recover_last_checkpoints_from(checkpoint_dir)
            return path
    if scaffold.init_fn is not None:
        scaffold.init_fn(scaffold, session)
    return None
