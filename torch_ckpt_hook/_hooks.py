"""The hook protocol: ``SessionRunHook`` and the values passed to it.

A hook observes a training loop driven by ``MonitoredSession`` (or one of its siblings). The
runner calls the hooks of its list, always in list order, as follows::

    for h in hooks: h.begin()
    restore the session (a checkpoint, else scaffold.init_fn)
    for h in hooks: h.after_create_session(session, coord)
    while not stop requested:                      # each MonitoredSession.run(fn, *args, **kw)
        for h in hooks: args_h = h.before_run(run_context)
        try:
            value = fn(*args, **kw, **merged feed_dicts)   # the step function
        except StopIteration:                      # end of input
            break
        for h in hooks: h.after_run(run_context, SessionRunValues(results_h))
    for h in hooks: h.end(session)                 # clean exit only
    close the session

The contract, exit paths included:

- ``begin()`` runs once per runner, before anything is restored. Recovery does not call it again.
- ``after_create_session(session, coord)`` runs once the session's state is restored or
  initialised, and again after every recovery (``MonitoredSession(recoverable_errors=...)``).
  ``session`` is the raw ``Session``; ``coord`` is the runner's coordinator: it has
  ``request_stop()`` and ``should_stop()``.
- ``before_run(run_context)`` may return ``SessionRunArgs``: ``fetches`` are resolved against the
  step function's return value (a ``str`` is a key into the mapping it returned, a callable is
  called with it, lists, tuples and dicts nest), and ``feed_dict`` entries are passed to the step
  function as keyword arguments. A name fed by two hooks, or by a hook and the caller, is a
  ``RuntimeError`` raised before the step function runs.
- If a ``before_run`` or the step function raises, no ``after_run`` runs for that call.
- ``after_run(run_context, run_values)`` runs for every hook, even after an earlier hook asked to
  stop; ``run_values.results`` mirrors that hook's fetches (``None`` when it asked for none). A
  stop requested through ``run_context.request_stop()`` takes effect once every hook's
  ``after_run`` has run: the runner's ``should_stop()`` then turns true, and a further ``run()``
  raises ``RuntimeError``. If an ``after_run`` raises, the later hooks' ``after_run`` is skipped
  and the exception propagates.
- ``end(session)`` runs on a clean exit: ``close()``, leaving the ``with`` block normally, or a
  ``StopIteration`` leaving it (which the runner swallows). On any other exception leaving the
  ``with`` block, ``end()`` is skipped and the exception propagates. If one hook's ``end()`` raises,
  the later hooks' ``end()`` is skipped, the runner still closes, and the exception propagates.
- Whatever the exit path, the runner ends up closed: ``should_stop()`` is true, and ``run()`` or a
  second ``close()`` raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session


class SessionRunArgs(NamedTuple):
    """What a hook asks of one ``run()``: values to fetch and keyword arguments to feed.

    ``fetches`` is ``None``, a leaf, or a list/tuple/dict nesting of leaves; a leaf is a ``str``
    (a key into the mapping the step function returned) or a callable (called with the step
    function's return value). ``feed_dict`` maps keyword-argument names to values passed to the
    step function. ``options`` is handed back to the same hook in ``SessionRunValues.options``.
    """

    fetches: Any
    feed_dict: Mapping[str, Any] | None = None
    options: Any = None


class SessionRunValues(NamedTuple):
    """What a hook gets back from one ``run()``: ``results`` mirrors its fetches."""

    results: Any
    options: Any = None
    run_metadata: Any = None


class SessionRunContext:
    """The context of one ``run()`` call, shared by every hook of that call.

    ``original_args`` is ``SessionRunArgs(fetches=fn, feed_dict=kwargs)`` for the caller's
    ``run(fn, *args, **kwargs)``; ``session`` is the raw ``Session``: running it calls no hook.
    """

    def __init__(self, original_args: SessionRunArgs, session: Session) -> None:
        self._original_args = original_args
        self._session = session
        self._stop_requested = False

    @property
    def original_args(self) -> SessionRunArgs:
        return self._original_args

    @property
    def session(self) -> Session:
        return self._session

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Ask the runner to stop once every hook's ``after_run`` has run for this call."""
        self._stop_requested = True


class SessionRunHook:
    """Base class of the hooks a ``MonitoredSession`` calls; every method is a no-op here."""

    def begin(self) -> None:
        """Called once, before the session's state is restored."""

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        """Called once the session is restored or initialised, and after every recovery."""

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Called before each step; may ask for fetches and feeds."""
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Called after each step that returned, with this hook's fetched results."""

    def end(self, session: Session) -> None:
        """Called once at a clean exit, before the runner closes."""


@runtime_checkable
class SavesInBackground(Protocol):
    """A hook (or saver) whose saves may still be being written after it returns.

    The runner calls ``wait_until_finished()`` on every such hook before ``close()`` returns,
    whatever the exit path, and before a recovery restores.
    """

    def wait_until_finished(self) -> None: ...
