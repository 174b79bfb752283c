"""``Scaffold``: the saver and the initialiser a runner uses to create its session."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ._saver import Saver
from ._validation import check_callable, check_type

if TYPE_CHECKING:
    from ._session import Session

InitFn = Callable[["Scaffold", "Session"], object]


class Scaffold:
    """What a runner needs to create a session: a ``Saver`` and an ``init_fn``.

    ``init_fn(scaffold, session)`` runs when a session is created and nothing was restored. A
    scaffold without a saver gets a default ``Saver()`` when one is first needed.
    """

    def __init__(self, saver: Saver | None = None, init_fn: InitFn | None = None) -> None:
        self.saver = check_type("saver", saver, Saver, "a Saver", allow_none=True)
        check_callable("init_fn", init_fn, "a callable taking (scaffold, session)", allow_none=True)
        self.init_fn = init_fn

    def get_saver(self) -> Saver:
        """The scaffold's saver, creating the default ``Saver()`` on first use."""
        if self.saver is None:
            self.saver = Saver()
        return self.saver
