"""``BestCheckpointSaverHook``: keep the ``keep`` best checkpoints by a metric, beside the others.

A series of its own: files ``<basename>-<step>`` (``best.ckpt-1200``) listed in a state file of
its own (``best_checkpoint``), written by a ``Saver`` of its own whose retention ranks by the
metric (``BestKPolicy``) instead of age. The regular series (``model.ckpt-<step>`` in
``checkpoint``) and this one never touch each other: each saver adopts, lists and deletes only
what its own state file and prefix name, and ``latest_checkpoint(dir)`` /
``restore_candidates`` never fall back to a prefix another state file claims.

The payload of a best checkpoint is the session's (SPEC.md section 4) plus ``metrics``, a
``{name: float}`` dict; restoring it into a session ignores ``metrics``. The best value so far
survives a restart: ``after_create_session`` reads ``metrics`` from the checkpoints its state
file lists (only the pickled structure, the tensors are memory-mapped and never read).

Thread rules: the training thread runs every hook call and writes ``_scores`` before it starts
a save; the saver's writer thread reads ``_scores`` (through ``BestKPolicy.score_of``) when it
commits. A better value found while a save is still being written waits for that save, as
``CheckpointSaverHook`` does: one save in flight, and the new best is never skipped.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from ._checkpoint_dir import checkpoint_name, is_default_state_file
from ._checkpoint_hook import check_writable_dir
from ._faults import Failures
from ._fsutil import path_key
from ._hooks import SessionRunArgs, SessionRunContext, SessionRunHook, SessionRunValues
from ._retention import BestKPolicy
from ._saver import Saver
from ._state_file import CheckpointState, get_checkpoint_state, update_checkpoint_state
from ._storage import LocalStorage
from ._validation import check_bool, check_int, is_number, repr_with_type

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session
    from ._writer import SaveHandle

logger = logging.getLogger(__name__)

METRICS_KEY = "metrics"


class _SeriesStorage(LocalStorage):
    """Local checkpoint files whose state file is ``latest_filename``, not ``checkpoint``."""

    def __init__(self, latest_filename: str) -> None:
        super().__init__()
        self._latest_filename = latest_filename

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        update_checkpoint_state(directory, latest, paths, self._latest_filename)

    def read_state(self, directory: str) -> CheckpointState | None:
        return get_checkpoint_state(directory, self._latest_filename)


class _BestSaver(Saver):
    """A ``Saver`` that keeps the ``keep`` best by ``score_of`` and lists them best last."""

    def __init__(
        self,
        keep: int,
        mode: Literal["min", "max"],
        score_of: Callable[[str], float | None],
        latest_filename: str,
    ) -> None:
        super().__init__(max_to_keep=keep, storage=_SeriesStorage(latest_filename))
        self._retention = BestKPolicy(keep, mode, score_of)


def _metric_name(metric: str | Callable[[Any], Any]) -> str:
    if isinstance(metric, str):
        return metric
    name = getattr(metric, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else "metric"


def _as_number(value: Any, name: str) -> float | None:
    """The metric's value as a float; None when absent. Non-finite values are returned as is."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"metric {name!r} must be a real number or a one-element tensor, got a tensor "
                f"of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return float(value.detach().item())
    if is_number(value):
        return float(value)
    raise TypeError(
        f"metric {name!r} must be a real number or a one-element tensor, "
        f"got {repr_with_type(value)}"
    )


class BestCheckpointSaverHook(SessionRunHook):
    """Saves ``<basename>-<step>`` when ``metric`` beats every kept value; keeps the ``keep`` best.

    ``metric`` is a fetch leaf: a key of the mapping the step function returns, or a callable
    of its return value. A step where it is absent (a missing key, ``None``) or not finite (NaN,
    inf) is ignored. ``mode`` is ``"min"`` (lower is better) or ``"max"``; a value equal to the
    best is not better. The kept checkpoints are listed in ``latest_filename`` in
    ``checkpoint_dir``, best last: ``latest_checkpoint(dir, latest_filename="best_checkpoint")``
    is the best one. With ``async_save`` the write happens in the background; a failed save is
    raised (``CheckpointSaveError``) at the next hook call, and ``end()`` waits for the last.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        metric: str | Callable[[Any], Any],
        *,
        mode: Literal["min", "max"] = "min",
        keep: int = 1,
        checkpoint_basename: str = "best.ckpt",
        latest_filename: str = "best_checkpoint",
        async_save: bool = True,
    ) -> None:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(
                f"checkpoint_dir must be a path, got {type(checkpoint_dir).__qualname__}"
            )
        if not (isinstance(metric, str) and metric) and not callable(metric):
            raise TypeError(
                "metric must be a str (a key of the step function's returned mapping) or a "
                f"callable (called with that return value), got {repr_with_type(metric)}"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        _check_file_name("checkpoint_basename", checkpoint_basename)
        _check_file_name("latest_filename", latest_filename)
        if is_default_state_file(latest_filename):
            raise ValueError(
                f"latest_filename must not be {latest_filename!r}, the state file of the regular "
                "checkpoints; the best ones need a state file of their own"
            )
        self._checkpoint_dir = os.fspath(checkpoint_dir)
        self._save_path = os.path.join(self._checkpoint_dir, checkpoint_basename)
        self._latest_filename = latest_filename
        self._metric = metric
        self._name = _metric_name(metric)
        self._mode: Literal["min", "max"] = mode
        self._async_save = check_bool("async_save", async_save)
        # path_key -> metric value of each best checkpoint known: saved by this hook, or read
        # back from the payloads its state file lists. Written by the training thread before a
        # save starts; read by the writer thread, through the policy, when it commits.
        self._scores: dict[str, float] = {}
        # The best value of the checkpoints kept or being written, None before the first.
        self._best: float | None = None
        self._pending: list[SaveHandle] = []
        self._saver = _BestSaver(
            check_int("keep", keep, minimum=1), mode, self._score_of, latest_filename
        )

    @property
    def save_path(self) -> str:
        """The prefix of this hook's checkpoints: ``os.path.join(checkpoint_dir, basename)``."""
        return self._save_path

    @property
    def latest_filename(self) -> str:
        """The name of this hook's state file in ``checkpoint_dir``."""
        return self._latest_filename

    @property
    def best_value(self) -> float | None:
        """The best metric value of the checkpoints kept (or being written), or None."""
        return self._best

    # -- the hook protocol -------------------------------------------------------------------

    def begin(self) -> None:
        check_writable_dir(self._checkpoint_dir)

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        failures = Failures()
        self._poll(failures)
        self._read_kept_scores()
        self._best = self._best_of_kept()
        failures.raise_first()

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        failures = Failures()
        self._poll(failures)
        failures.raise_first()
        return SessionRunArgs(self._fetch)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        failures = Failures()
        self._poll(failures)
        value = _as_number(run_values.results, self._name)
        if value is None:
            pass
        elif not math.isfinite(value):
            logger.debug("Ignoring metric %s = %s: not finite.", self._name, value)
        elif self._is_better(value):
            self._save(run_context.session, value, failures)
        failures.raise_first()

    def end(self, session: Session) -> None:
        self.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Block until every best checkpoint is durable; raise a failed save once.

        Bounded by the saver's ``drain_timeout_secs``.
        """
        failures = Failures()
        try:
            self._saver.wait_until_finished()
        except Exception as err:
            failures.add(err)
        self._poll(failures)
        failures.raise_first()

    # -- deciding and saving -----------------------------------------------------------------

    def _fetch(self, results: Any) -> Any:
        if callable(self._metric):
            return self._metric(results)
        # A missing key means "no metric this step" (an evaluation every N steps), not an error.
        return results.get(self._metric) if isinstance(results, Mapping) else None

    def _is_better(self, value: float) -> bool:
        if self._best is None:
            return True
        return value < self._best if self._mode == "min" else value > self._best

    def _score_of(self, path: str) -> float | None:
        return self._scores.get(path_key(path))

    def _save(self, session: Session, value: float, failures: Failures) -> None:
        step = session.global_step
        path = checkpoint_name(self._save_path, step)
        # One save in flight: a better value waits for the save still being written.
        try:
            self._saver.wait_for_previous_save()
        except Exception as err:
            failures.add(err)
            return
        self._poll(failures)
        logger.info("New best %s = %g at step %d: saving %s.", self._name, value, step, path)
        previous = self._scores.get(path_key(path))
        self._scores[path_key(path)] = value
        try:
            handle = self._saver.save(
                session,
                self._save_path,
                global_step=step,
                blocking=False,
                extra_payload={METRICS_KEY: {self._name: value}},
                # Each rank's metric is its own: the hook saves alone (on the chief, usually).
                collective=False,
            )
        except Exception as err:
            self._forget(path, previous)
            failures.add(err)
            return
        self._best = value
        self._pending.append(handle)
        if not self._async_save:
            handle.wait()  # the _poll below reports it, failed or not
            self._poll(failures)

    def _poll(self, failures: Failures) -> None:
        """Settle the saves that finished; a failed one no longer counts as kept."""
        while self._pending and self._pending[0].done():
            handle = self._pending.pop(0)
            reported = handle.reported
            try:
                handle.result()
            except Exception as err:
                self._forget(handle.path, None)
                self._best = self._best_of_kept()
                if not reported:
                    failures.add(err)

    def _forget(self, path: str, previous: float | None) -> None:
        if previous is None:
            self._scores.pop(path_key(path), None)
        else:
            self._scores[path_key(path)] = previous

    def _best_of_kept(self) -> float | None:
        paths = [*self._saver.last_checkpoints, *(h.path for h in self._pending)]
        state = get_checkpoint_state(self._checkpoint_dir, self._latest_filename)
        if state is not None:
            paths += state.all_model_checkpoint_paths
        scores = [s for s in map(self._score_of, paths) if s is not None]
        if not scores:
            return None
        return min(scores) if self._mode == "min" else max(scores)

    def _read_kept_scores(self) -> None:
        """Read the metric of every checkpoint the state file lists that is not known yet."""
        state = get_checkpoint_state(self._checkpoint_dir, self._latest_filename)
        for path in state.all_model_checkpoint_paths if state is not None else ():
            if path_key(path) in self._scores:
                continue
            score = self._read_score(path)
            if score is not None:
                self._scores[path_key(path)] = score

    def _read_score(self, path: str) -> float | None:
        """The metric value in the payload at ``path``, or None with a warning."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise ValueError("it is not a regular file")
            # Only the pickled structure is read: the tensors are memory-mapped, never loaded.
            # The checksum is not checked either; restoring the file checks it.
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            logger.warning(
                "Best checkpoint %s cannot be read (%s); its %s is unknown, so it ranks below "
                "every other kept checkpoint.",
                path,
                err,
                self._name,
            )
            return None
        metrics = payload.get(METRICS_KEY) if isinstance(payload, Mapping) else None
        value = metrics.get(self._name) if isinstance(metrics, Mapping) else None
        if not is_number(value) or not math.isfinite(value):
            logger.warning(
                "Best checkpoint %s holds no finite %r in its %r; it ranks below every other "
                "kept checkpoint.",
                path,
                self._name,
                METRICS_KEY,
            )
            return None
        return float(value)


def _check_file_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty file name, got {value!r}")
    if os.sep in value or (os.altsep and os.altsep in value) or value in (os.curdir, os.pardir):
        raise ValueError(f"{name} must be a file name without directories, got {value!r}")
