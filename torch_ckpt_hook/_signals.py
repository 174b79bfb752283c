"""Preemption: turn termination signals into a stop request after the current step."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from ._validation import repr_with_type

logger = logging.getLogger(__name__)

_UNCATCHABLE = frozenset(
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


def check_signals(signals: object) -> tuple[signal.Signals, ...]:
    if signals is None:
        return ()
    if isinstance(signals, (int, signal.Signals)):
        signals = (signals,)
    if not isinstance(signals, Iterable):
        raise TypeError(
            f"stop_on_signals must be a tuple of signals, got {repr_with_type(signals)}"
        )
    result = []
    for sig in signals:
        try:
            result.append(signal.Signals(sig))
        except (ValueError, TypeError):
            raise ValueError(
                f"stop_on_signals must hold signal numbers such as signal.SIGTERM, got {sig!r}"
            ) from None
        if result[-1] in _UNCATCHABLE:
            raise ValueError(
                f"stop_on_signals must hold signals a process can catch, got {result[-1].name}"
            )
    return tuple(result)


class SignalStopper:
    """Installs handlers that call ``on_signal`` once, then restores the previous handlers.

    The handler only records the request: the step in progress finishes, and the runner stops
    and writes its final checkpoint from the training thread. A later SIGINT (a second Ctrl-C)
    raises ``KeyboardInterrupt`` at once, wherever the training thread is: the user asked to get
    out now, final save or not. Other later signals are logged and ignored, so a second SIGTERM
    (a scheduler repeating itself) cannot interrupt the final save.
    """

    def __init__(self, signals: tuple[signal.Signals, ...], on_signal: Callable[[], None]) -> None:
        self._signals = signals
        self._on_signal = on_signal
        self._previous: dict[signal.Signals, Any] = {}
        self._received: signal.Signals | None = None

    def install(self) -> None:
        if not self._signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "stop_on_signals %s ignored: signal handlers can only be installed from the "
                "main thread.",
                [s.name for s in self._signals],
            )
            return
        try:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put the previous handlers back; from another thread, log that they cannot be."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            try:
                # None means a handler installed from C, which Python cannot reinstall.
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            except ValueError as err:
                logger.warning("Could not restore the previous %s handler: %s", sig.name, err)

    @property
    def received(self) -> signal.Signals | None:
        return self._received

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self._received is not None:
            if sig == signal.SIGINT:
                logger.warning("Received SIGINT again while stopping: exiting at once.")
                raise KeyboardInterrupt
            logger.warning("Received %s again while stopping; ignored.", sig.name)
            return
        self._received = sig
        again = " Press Ctrl-C again to exit at once." if sig == signal.SIGINT else ""
        logger.warning(
            "Received %s: stopping after the current step and saving a final checkpoint.%s",
            sig.name,
            again,
        )
        self._on_signal()
