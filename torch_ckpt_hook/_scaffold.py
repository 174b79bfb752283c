"""``Scaffold``: the saver and the initialiser a runner uses to create its session."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ._saver import Saver

if TYPE_CHECKING:
    from ._session import Session

InitFn = Callable[["Scaffold", "Session"], object]


class Scaffold:
    """What a runner needs to create a session: a ``Saver`` and an ``init_fn``.

    ``init_fn(scaffold, session)`` runs when a session is created and nothing was restored. A
    scaffold without a saver gets a default ``Saver()`` when one is first needed.
    """

    def __init__(self, saver: Saver | None = None, init_fn: InitFn | None = None) -> None:
        if saver is not None and not isinstance(saver, Saver):
            raise TypeError(f"saver must be a Saver or None, got {type(saver).__qualname__}")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(
                "init_fn must be a callable taking (scaffold, session) or None, "
                f"got {type(init_fn).__qualname__}"
            )
        self.saver = saver
        self.init_fn = init_fn

    def get_saver(self) -> Saver:
        """The scaffold's saver, creating the default ``Saver()`` on first use."""
        if self.saver is None:
            self.saver = Saver()
        return self.saver
