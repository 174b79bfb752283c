"""Creating a session's state: restore a checkpoint, else run the scaffold's ``init_fn``.

The restore policy never starts over a run it could not read: damaged checkpoints are skipped
(newest first, a warning naming each) and the newest intact one is restored; a checkpoint that is
intact but cannot be loaded (an object ``weights_only`` refuses, no checksum, a missing device),
or cannot be read at all, stops session creation with a ``CheckpointError`` listing every
checkpoint tried and its problem; so does a directory whose checkpoints are all damaged. Nothing
is deleted, and the session is left as it was.
"""

from __future__ import annotations

import logging
import os
import stat

from ._checkpoint_dir import RestoreChoice, choose_restore, restore_candidates
from ._checkpoint_file import CheckpointProblem
from ._errors import CheckpointCorruptedError, CheckpointError, CheckpointUnloadableError
from ._fsutil import file_type
from ._scaffold import Scaffold
from ._session import Session
from ._sharded_read import is_sharded_checkpoint

logger = logging.getLogger(__name__)


def _refusal(checkpoint_dir: str, choice: RestoreChoice) -> CheckpointError:
    tried = [*choice.skipped, *([choice.blocked_by] if choice.blocked_by else [])]
    listing = "".join(
        f"\n  {problem.message if path in problem.message else f'{path}: {problem.message}'}"
        for path, problem in tried
    )
    why = (
        "the newest checkpoint that is not damaged cannot be loaded"
        if choice.blocked_by is not None
        else "no checkpoint in it can be restored (each is damaged or not a checkpoint file)"
    )
    message = (
        f"Cannot restore a session from {checkpoint_dir}: {why}. Not training from step 0 over "
        f"them, and nothing was deleted.{listing}\n"
        "Fix the problem named above, or move the checkpoints away to start a new run in this "
        "directory."
    )
    kind = CheckpointUnloadableError if choice.blocked_by is not None else CheckpointCorruptedError
    return kind(message)


def _restore_from(session: Session, scaffold: Scaffold, checkpoint_dir: str) -> str | None:
    """Restore the newest restorable candidate (the policy of ``_checkpoint_dir``).

    Raises:
        CheckpointError: the directory holds checkpoints and none can be restored.
    """
    causes: dict[str, BaseException] = {}

    def attempt(path: str) -> CheckpointProblem | None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None  # the load reports it
        # A sharded checkpoint directory goes to the load, which verifies it.
        sharded = mode is not None and stat.S_ISDIR(mode) and is_sharded_checkpoint(path)
        if mode is not None and not stat.S_ISREG(mode) and not sharded:
            return CheckpointProblem(
                "not_a_file", f"not a checkpoint file: it is {file_type(mode)}"
            )
        try:
            scaffold.get_saver().restore(session, path)
        except CheckpointCorruptedError as err:
            return CheckpointProblem("corrupted", str(err))
        except CheckpointUnloadableError as err:
            causes[path] = err
            return CheckpointProblem("unloadable", str(err))
        except OSError as err:
            causes[path] = err
            return CheckpointProblem("unreadable", f"unreadable: {err}")
        return None

    choice = choose_restore(restore_candidates(checkpoint_dir), attempt)
    for path, problem in choice.skipped:
        logger.warning("Skipping checkpoint %s: %s", path, problem.message)
    if choice.refused:
        cause = causes.get(choice.blocked_by[0]) if choice.blocked_by else None
        raise _refusal(checkpoint_dir, choice) from cause
    return choice.path


def prepare_session(
    session: Session,
    scaffold: Scaffold,
    checkpoint_dir: str | None,
    checkpoint_filename_with_path: str | None,
) -> str | None:
    """Restore ``session`` and return the checkpoint it came from, or run ``init_fn``.

    A named checkpoint must load. From a directory, the newest intact checkpoint is restored
    (the module docstring gives the policy). The saver then adopts the directory's checkpoint
    list, so ``max_to_keep`` carries on across restarts.

    Raises:
        CheckpointCorruptedError: the directory holds checkpoints and every one is damaged.
        CheckpointUnloadableError: the newest checkpoint that is not damaged cannot be loaded.
    """
    session.clear_restored_from()
    if checkpoint_filename_with_path is not None:
        scaffold.get_saver().restore(session, checkpoint_filename_with_path)
        return checkpoint_filename_with_path
    if checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
        restored = _restore_from(session, scaffold, checkpoint_dir)
        if restored is not None:
            scaffold.get_saver().recover_last_checkpoints_from(checkpoint_dir)
            return restored
    if scaffold.init_fn is not None:
        scaffold.init_fn(scaffold, session)
    return None
