"""``CheckpointSaverListener``: code that runs around each checkpoint the hook saves."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._session import Session


class CheckpointSaverListener:
    """Base class of the listeners a ``CheckpointSaverHook`` calls; every method is a no-op.

    ``begin()`` runs once from the hook's ``begin()``. ``before_save`` runs on the training thread
    before every save the hook makes (the one at session creation, each periodic one, the final one
    in ``end()``). ``after_save`` runs on the training thread once that checkpoint is durable: with
    ``async_save``, at the first hook call after the background write committed, or in
    ``wait_until_finished()`` / ``end()``. A truthy return from ``after_save`` asks training to
    stop; it is ignored for the save at session creation and the one in ``end()``.
    ``end(session, global_step_value)`` runs once from the hook's ``end()``, after the final save.
    """

    def begin(self) -> None:
        """Called once, from ``CheckpointSaverHook.begin()``."""

    def before_save(self, session: Session, global_step_value: int) -> None:
        """Called before each save, on the training thread."""

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        """Called once a save is durable; return a truthy value to ask training to stop."""
        return None

    def end(self, session: Session, global_step_value: int) -> None:
        """Called once, from ``CheckpointSaverHook.end()``."""
