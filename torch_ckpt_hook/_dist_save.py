"""The two collective steps of a distributed save, one per thread (SPEC.md section 5.2).

On the training thread, ``gather_payload``: every rank checks its own part of the payload and
sends its RNG states and ``rank_state`` to the others (one all-gather on the step group); a
value ``weights_only`` refuses on any rank fails the save on every rank, before anything is
staged. The chief's payload gets ``rank_rng`` and ``rank_state``.

On the writer thread, ``commit_everywhere``: every rank writes its part (the chief the
replicated file, or every rank its shards), then the ranks report to each other (one
all-gather on the writer group): the path each one wrote, and its error or its files' digests.
Only when every rank wrote the same checkpoint does the chief commit (manifest, state file);
then it tells the others whether that worked (a second all-gather). A rank that failed makes
the save fail on every rank; a rank that died makes the others' collective fail (the gloo
timeout), so nobody commits and the previous checkpoint stays the latest everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._distributed import CheckpointGroup
from ._payload_check import check_payload
from ._rank_state import gathered_payload

T = TypeVar("T")

# Payload keys a sharded save writes through DCP (their DTensors are not weights_only values
# of a regular file, and are checked by DCP instead).
SHARDED_KEYS = ("model", "optimizer")


class DistributedSaveError(RuntimeError):
    """A save that did not commit on every rank (the cause of a ``CheckpointSaveError``)."""


def gather_payload(
    state: dict[str, Any],
    local_rank_state: dict[str, Any] | None,
    group: CheckpointGroup,
    *,
    sharded: bool,
) -> dict[str, Any] | None:
    """The chief's full payload (None on the other ranks); every rank calls it together.

    Raises:
        TypeError: a value of some rank's payload would not load with ``weights_only=True``;
            raised on every rank, naming the rank.
    """
    local = {k: v for k, v in state.items() if not (sharded and k in SHARDED_KEYS)}
    problem: str | None = None
    try:
        check_payload(local)
    except TypeError as err:
        problem = str(err)
    mine = (problem, None, None) if problem else (None, state["rng"], local_rank_state)
    parts = group.all_gather(mine)
    problems = [f"rank {rank}: {p}" for rank, (p, _, _) in enumerate(parts) if p]
    if problems:
        raise TypeError("; ".join(problems))
    if not group.is_chief:
        return None
    return gathered_payload(state, local_rank_state, [(rng, ranked) for _, rng, ranked in parts])


def commit_everywhere(
    group: CheckpointGroup,
    path: str,
    write_local: Callable[[], dict[str, tuple[int, int]]],
    commit: Callable[[dict[str, tuple[int, int]]], T],
) -> T | None:
    """Write this rank's part; once every rank's is durable, the chief commits. Writer thread.

    ``write_local()`` returns the digests (name -> (size, crc32)) of the files this rank
    wrote; ``commit(files)`` gets every rank's, on the chief only, and its result is returned
    there (None elsewhere).

    Raises:
        DistributedSaveError: some rank could not write its part, or the chief could not
            commit; raised on every rank.
        RuntimeError: a collective failed (a rank died or timed out).
    """
    error: BaseException | None = None
    files: dict[str, tuple[int, int]] = {}
    try:
        files = write_local()
    except Exception as err:
        error = err
    report = (path, None if error is None else f"{type(error).__name__}: {error}", files)
    reports = group.all_gather(report, writer=True)
    failed = [f"rank {rank}: {message}" for rank, (_, message, _) in enumerate(reports) if message]
    failed += [
        f"rank {rank} wrote {other} instead"
        for rank, (other, _, _) in enumerate(reports)
        if other != path
    ]
    if failed:
        raise DistributedSaveError(
            f"{path} was not written on every rank, so no rank commits it: {'; '.join(failed)}"
        ) from error
    merged: dict[str, tuple[int, int]] = {}
    for _, _, digests in reports:
        merged.update(digests)
    result: T | None = None
    commit_error: BaseException | None = None
    if group.is_chief:
        try:
            result = commit(merged)
        except Exception as err:
            commit_error = err
    outcome = group.all_gather(None if commit_error is None else str(commit_error), writer=True)
    if outcome[0] is not None:
        raise DistributedSaveError(
            f"the chief could not commit {path}: {outcome[0]}"
        ) from commit_error
    return result
