"""``CheckpointSaverListener``: code that runs around each checkpoint the hook saves."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._session import Session


class CheckpointSaverListener:
    """Base class of the listeners a ``CheckpointSaverHook`` calls; every method is a no-op.

    ``begin()`` runs once from the hook's ``begin()``. ``before_save`` runs on the training thread
    before every save the hook makes (the one at session creation, each periodic one, the final one
    in ``end()``). ``after_save`` runs on the training thread once that checkpoint is durable.
    When depends on ``run_after_commit``:

    - ``False`` (the default, TensorFlow's semantics): at the save step. The hook call that saves
      waits for the write to commit and then calls ``after_save``, so the listener sees both the
      file and the state of the step it is told (the model, the RNG, ``session.global_step``).
    - ``True``: the save stays asynchronous and ``after_save`` runs at the first hook call after
      the background write committed, or in ``wait_until_finished()`` / ``end()``: for a listener
      that only uses the file (upload, mirror, notify) and should not make training wait.

    A hook whose listeners all set ``run_after_commit`` (or that has none) never waits for the
    disk. A truthy return from ``after_save`` asks training to stop; it is ignored for the save at
    session creation and the one in ``end()``. ``end(session, global_step_value)`` runs once from
    the hook's ``end()``, after the final save.

    A listener that raises an ``Exception`` does not stop the hook's work: the save goes ahead,
    every other listener is called, and the error is raised once, at the end of that hook call,
    as the same object with a note naming the listener and the method (when several raise, the
    first; the others are logged). A listener whose ``before_save(N)`` raised gets no
    ``after_save(N)``; every other one that got ``before_save(N)`` gets ``after_save(N)`` once N
    is durable. Errors from ``begin()`` and ``end()`` are raised after every listener's
    ``begin()`` or ``end()`` ran, and those from ``end()`` after every save is durable.
    """

    run_after_commit: bool = False
    """``True``: ``after_save`` runs at the first hook call after the commit (not the save step)."""

    def begin(self) -> None:
        """Called once, from ``CheckpointSaverHook.begin()``."""

    def before_save(self, session: Session, global_step_value: int) -> None:
        """Called before each save, on the training thread."""

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        """Called once a save is durable; return a truthy value to ask training to stop."""
        return None

    def end(self, session: Session, global_step_value: int) -> None:
        """Called once, from ``CheckpointSaverHook.end()``."""
