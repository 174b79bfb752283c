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
from ._checkpoint_file import CheckpointProblem, check_checkpoint
from ._errors import CheckpointCorruptedError, CheckpointError, CheckpointUnloadableError
from ._fsutil import file_type
from ._messages import error_line
from ._mirror_policy import merge_newest_first
from ._paths import is_url
from ._scaffold import Scaffold
from ._session import Session
from ._sharded_read import is_sharded_checkpoint
from ._sharded_storage import read_sharded

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


def _candidates(checkpoint_dir: str, mirror_dir: str | None) -> list[str]:
    """The restore candidates of a directory (or URL), and of its mirror: newest step first."""

    def of(directory: str) -> list[str]:
        if is_url(directory):
            from ._storage_for import remote_candidates

            return remote_candidates(directory)
        return restore_candidates(directory)

    local = of(checkpoint_dir)
    if mirror_dir is None:
        return local
    try:
        mirrored = of(mirror_dir)
    except Exception as err:  # fsspec's and its back ends' errors are not all OSErrors
        if not local:
            # Nothing here, and the mirror may hold the run: never start over what may be there.
            raise CheckpointError(
                f"Cannot tell whether the mirror {mirror_dir} holds checkpoints to restore: "
                f"{error_line(err)}. {checkpoint_dir} holds none, so a session started now "
                "could train from step 0 over the run on the mirror. Make the mirror reachable "
                "(its endpoint, credentials, network), or create the session without "
                "mirror_dir to start a new run."
            ) from err
        logger.warning(
            "The mirror %s cannot be read (%s): restoring from %s alone; the mirror may hold a "
            "newer checkpoint.",
            mirror_dir,
            error_line(err),
            checkpoint_dir,
        )
        return local
    return merge_newest_first(local, mirrored)


def _restore_from(
    session: Session, scaffold: Scaffold, checkpoint_dir: str, mirror_dir: str | None = None
) -> str | None:
    """Restore the newest restorable candidate (the policy of ``_checkpoint_dir``).

    With a ``mirror_dir``, of both tiers: the newest intact checkpoint of either.

    Raises:
        CheckpointError: the directory holds checkpoints and none can be restored.
    """
    causes: dict[str, BaseException] = {}

    def attempt(path: str) -> CheckpointProblem | None:
        try:
            mode = None if is_url(path) else os.stat(path).st_mode
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

    choice = choose_restore(_candidates(checkpoint_dir, mirror_dir), attempt)
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
    mirror_dir: str | None = None,
) -> str | None:
    """Restore ``session`` and return the checkpoint it came from, or run ``init_fn``.

    A named checkpoint must load. From a directory, the newest intact checkpoint is restored
    (the module docstring gives the policy). The saver then adopts the directory's checkpoint
    list, so ``max_to_keep`` carries on across restarts. With a ``mirror_dir`` (the hook's
    mirror tier), the newest intact checkpoint of either tier is restored: a run whose local
    directory is lost resumes from the mirror (the checkpoint is read from there, not copied
    back; the hook's creation save then writes that state to the local tier).

    Raises:
        CheckpointCorruptedError: the directory holds checkpoints and every one is damaged.
        CheckpointUnloadableError: the newest checkpoint that is not damaged cannot be loaded.
    """
    session.clear_restored_from()
    if session.checkpoint_group.distributed:
        return _prepare_distributed(
            session, scaffold, checkpoint_dir, checkpoint_filename_with_path
        )
    if checkpoint_filename_with_path is not None:
        scaffold.get_saver().restore(session, checkpoint_filename_with_path)
        return checkpoint_filename_with_path
    if checkpoint_dir is not None and (
        is_url(checkpoint_dir) or mirror_dir is not None or os.path.isdir(checkpoint_dir)
    ):
        restored = _restore_from(session, scaffold, checkpoint_dir, mirror_dir)
        if restored is not None:
            scaffold.get_saver().recover_last_checkpoints_from(checkpoint_dir)
            return restored
    if scaffold.init_fn is not None:
        scaffold.init_fn(scaffold, session)
    return None


def _prepare_distributed(
    session: Session,
    scaffold: Scaffold,
    checkpoint_dir: str | None,
    checkpoint_filename_with_path: str | None,
) -> str | None:
    """Every rank restores the checkpoint the chief chose (SPEC.md section 3 "Distributed").

    The chief chooses by checksums (skipping damaged checkpoints with a warning) and broadcasts
    its choice, or its refusal; every rank then restores that one (together: a sharded one is
    read collectively), and the ranks agree that every one of them did before any trains.

    Raises:
        CheckpointError: the chief refused (as ``prepare_session``), or some rank could not
            restore the chosen checkpoint (on every rank).
    """
    group = session.checkpoint_group
    choice: tuple[str | None, str | None] = (None, None)
    if group.is_chief:
        if checkpoint_filename_with_path is not None:
            named = checkpoint_filename_with_path
            problem = check_checkpoint(named) if os.path.isdir(named) else None
            choice = (named, None) if problem is None else (None, f"{named}: {problem.message}")
        elif checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
            restore = choose_restore(restore_candidates(checkpoint_dir), check_checkpoint)
            for skipped, problem in restore.skipped:
                logger.warning("Skipping checkpoint %s: %s", skipped, problem.message)
            if restore.refused:
                choice = (None, str(_refusal(checkpoint_dir, restore)))
            else:
                choice = (restore.path, None)
    chosen: tuple[str | None, str | None] = group.broadcast(choice)
    path, refusal = chosen
    if refusal is not None:
        raise CheckpointCorruptedError(refusal)
    if path is None:
        if scaffold.init_fn is not None:
            scaffold.init_fn(scaffold, session)
        return None
    error: BaseException | None = None
    try:
        if os.path.isdir(path):
            # The chief verified every file of it for its choice: the ranks only read.
            logger.info("Restoring parameters from %s", path)
            payload = read_sharded(session, path, verify=False)
            session.load_state_dict(payload, restored_from=os.path.abspath(path))
        else:
            scaffold.get_saver().restore(session, path)
    except Exception as err:
        error = err
    failed = [
        f"rank {rank}: {message}"
        for rank, message in enumerate(group.all_gather(None if error is None else repr(error)))
        if message is not None
    ]
    if failed:
        raise CheckpointError(
            f"Cannot restore {path} on every rank, so no rank trains from it: {'; '.join(failed)}"
        ) from error
    if checkpoint_dir is not None and checkpoint_filename_with_path is None:
        scaffold.get_saver().recover_last_checkpoints_from(checkpoint_dir)
    return path
