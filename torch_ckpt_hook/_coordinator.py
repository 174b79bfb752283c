"""The coordinator handed to ``after_create_session``: a thread-safe stop flag."""

from __future__ import annotations

import threading


class Coordinator:
    """A stop flag that hooks, signal handlers and threads may set.

    Like TensorFlow's ``tf.train.Coordinator`` without thread management: once any party calls
    ``request_stop()``, the runner's ``should_stop()`` is true.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Ask the training loop to stop after the current step."""
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def clear_stop(self) -> None:
        self._stop.clear()
