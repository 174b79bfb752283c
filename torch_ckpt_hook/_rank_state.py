"""Per-rank state in the payload (SPEC.md section 5.2): ``rank_rng`` and ``rank_state``.

Each rank's RNG states and ``rank_state`` objects are gathered to the chief at a save (the
chief's RNG states also stay in ``rng``). At a restore each rank takes its own entry when the
checkpoint's world size is the current one; otherwise it takes the chief's (entry 0), with a
warning: after a world-size change the ranks' streams and positions cannot be mapped one to one,
and the chief's is the one a single-process run would have restored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ._distributed import CheckpointGroup

logger = logging.getLogger(__name__)


def rank_entry(saved: object, group: CheckpointGroup, what: str) -> Any:
    """This rank's entry of the per-rank list ``saved`` (``rank_rng`` or ``rank_state``).

    Raises:
        TypeError: ``saved`` is not a non-empty list.
    """
    if not isinstance(saved, Sequence) or isinstance(saved, (str, bytes)) or not saved:
        raise TypeError(
            f"state_dict[{what!r}] must be a non-empty list of per-rank dicts, got "
            f"{type(saved).__qualname__}"
        )
    if len(saved) == group.world_size:
        return saved[group.rank]
    logger.warning(
        "The checkpoint holds %s for %d ranks but this run has %d: rank %d restores the "
        "chief's (rank 0's).",
        what,
        len(saved),
        group.world_size,
        group.rank,
    )
    return saved[0]


def rng_to_restore(state_dict: Mapping[str, Any], group: CheckpointGroup) -> Any:
    """The RNG states this rank restores: its own of ``rank_rng``, else ``rng``."""
    if "rank_rng" not in state_dict:
        if group.distributed:
            logger.warning(
                "The checkpoint holds one RNG state (no rank_rng): every one of the %d ranks "
                "restores it.",
                group.world_size,
            )
        return state_dict["rng"]
    return rank_entry(state_dict["rank_rng"], group, "rank_rng")


def gathered_payload(
    state: dict[str, Any], local_rank_state: dict[str, Any] | None, gathered: list[Any]
) -> dict[str, Any]:
    """The chief's payload: ``state`` with ``rank_rng`` and ``rank_state`` from ``gathered``.

    ``gathered`` holds each rank's ``(rng, rank_state)`` by rank.
    """
    payload = dict(state)
    payload["rank_rng"] = [rng for rng, _ in gathered]
    if local_rank_state is not None:
        payload["rank_state"] = [ranked for _, ranked in gathered]
    return payload
