"""``MonitoredTrainingSession``: a ``MonitoredSession`` with TensorFlow's default hooks."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._basic_hooks import StepCounterHook
from ._checkpoint_hook import CheckpointSaverHook
from ._hooks import SessionRunHook
from ._monitored import MonitoredSession, _check_hooks, _check_path
from ._saver import Saver
from ._scaffold import Scaffold
from ._session import OptimizerArg
from ._validation import check_bool, check_int, check_number

logger = logging.getLogger(__name__)


class _UseDefault:
    def __repr__(self) -> str:
        return "<default>"


USE_DEFAULT: Any = _UseDefault()
DEFAULT_SAVE_CHECKPOINT_SECS = 600


def _resolve_is_chief(is_chief: bool | None) -> bool:
    chief = check_bool("is_chief", is_chief, allow_none=True)
    if chief is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
        return True
    return chief


def _distributed() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _resolve_intervals(secs: Any, steps: Any) -> tuple[float | None, int | None]:
    """TensorFlow's rules: default to every 600 s; one interval given replaces the other."""
    if secs is USE_DEFAULT and steps is USE_DEFAULT:
        return DEFAULT_SAVE_CHECKPOINT_SECS, None
    if secs is USE_DEFAULT:
        return None, steps
    if steps is USE_DEFAULT:
        return secs, None
    if secs is not None and steps is not None:
        raise ValueError(
            "Can not provide both save_checkpoint_secs and save_checkpoint_steps: give one "
            f"(got save_checkpoint_secs={secs!r}, save_checkpoint_steps={steps!r})."
        )
    return secs, steps


def _positive(value: Any, name: str, *, integer: bool = False) -> bool:
    """Whether an interval asks for its hook: ``None`` and non-positive numbers do not (TF).

    Checked under the user's name: the hook would name its own argument (``save_steps``).
    """
    check = check_int if integer else check_number
    interval = check(name, value, allow_none=True)
    return interval is not None and interval > 0


# The defaults of the retention arguments, the Saver's: a scaffold's own saver takes no others.
_RETENTION_DEFAULTS: dict[str, Any] = {
    "max_to_keep": 5,
    "keep_checkpoint_every_n_hours": 10000.0,
    "keep_checkpoint_every_n_steps": None,
}


def _default_saver_scaffold(
    scaffold: Scaffold | None,
    max_to_keep: int | None,
    keep_checkpoint_every_n_hours: float,
    keep_checkpoint_every_n_steps: int | None,
) -> Scaffold:
    """The scaffold to use, its default saver built from the retention arguments.

    A scaffold that brings its own ``Saver`` keeps it; retention arguments given beside it
    (other than the defaults) would be silently ignored, so they are a ``ValueError``.
    """
    retention: dict[str, Any] = {
        "max_to_keep": max_to_keep,
        "keep_checkpoint_every_n_hours": keep_checkpoint_every_n_hours,
        "keep_checkpoint_every_n_steps": keep_checkpoint_every_n_steps,
    }
    if scaffold is not None and scaffold.saver is not None:
        given = {
            name: value
            for name, value in retention.items()
            if value != _RETENTION_DEFAULTS.get(name)
        }
        if given:
            listing = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise ValueError(
                f"Can not provide both {listing} and a scaffold with its own saver: they apply "
                "to the default saver only. Give them to that Saver(...), or leave the "
                "scaffold's saver unset."
            )
        return scaffold
    saver = Saver(max_to_keep, keep_checkpoint_every_n_hours, keep_checkpoint_every_n_steps)
    if scaffold is None:
        return Scaffold(saver=saver)
    scaffold.saver = saver
    return scaffold


def _warn_no_checkpoints(save_secs: Any, save_steps: Any) -> None:
    for name, value in (("save_checkpoint_secs", save_secs), ("save_checkpoint_steps", save_steps)):
        if value is not None and value <= 0:
            logger.warning(
                "%s=%r is not positive: no CheckpointSaverHook, so this run saves no checkpoint "
                "(TensorFlow's rule). Pass a positive interval to save checkpoints.",
                name,
                value,
            )


def MonitoredTrainingSession(
    model: torch.nn.Module,
    optimizer: OptimizerArg = None,
    *,
    is_chief: bool | None = None,
    checkpoint_dir: str | None = None,
    scaffold: Scaffold | None = None,
    hooks: Iterable[SessionRunHook] | None = None,
    chief_only_hooks: Iterable[SessionRunHook] | None = None,
    save_checkpoint_secs: float | None = USE_DEFAULT,
    save_checkpoint_steps: int | None = USE_DEFAULT,
    log_step_count_steps: int = 100,
    extra_state: Mapping[str, Any] | None = None,
    stop_on_signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
    summary_dir: str | None = None,
    recoverable_errors: Iterable[type[BaseException]] = (),
    max_recoveries: int = 3,
    async_save: bool = True,
    max_to_keep: int | None = 5,
    keep_checkpoint_every_n_hours: float = 10000.0,
    keep_checkpoint_every_n_steps: int | None = None,
    checkpoint_on_error: bool = False,
    rank_state: Mapping[str, Any] | None = None,
    mirror_dir: str | None = None,
) -> MonitoredSession:
    """A ``MonitoredSession`` with a step counter and a checkpoint hook, as TensorFlow's.

    The chief's hooks run in this order: ``chief_only_hooks``, a ``StepCounterHook`` (when
    ``summary_dir`` or ``checkpoint_dir`` is set and ``log_step_count_steps > 0``), a
    ``CheckpointSaverHook`` (when ``checkpoint_dir`` is set and the interval is positive), then
    ``hooks``. Checkpoints default to every 600 seconds; giving ``save_checkpoint_steps`` alone
    replaces that; a non-positive interval means no checkpoint hook at all (TensorFlow's rule,
    with a warning). A non-chief gets ``hooks`` only, but restores like the chief.

    ``max_to_keep``, ``keep_checkpoint_every_n_hours`` and ``keep_checkpoint_every_n_steps`` build
    the default ``Saver``; a ``scaffold`` with its own saver keeps it, and giving any of them
    (other than its default) beside such a scaffold is a ``ValueError``. ``stop_on_signals``
    (SIGTERM and SIGINT by default): the first such signal finishes the step, stops, and saves the
    final checkpoint; a second Ctrl-C raises ``KeyboardInterrupt`` at once.
    ``checkpoint_on_error`` is ``MonitoredSession``'s; only the chief saves, and it needs the
    checkpoint hook (a ``checkpoint_dir`` and a positive interval). ``mirror_dir`` is the
    checkpoint hook's (a second, durable tier each checkpoint is copied to in the background;
    restore takes the newest intact checkpoint of either).
    """
    chief = _resolve_is_chief(is_chief)
    checkpoint_dir = _check_path(checkpoint_dir, "checkpoint_dir")
    summary_dir = _check_path(summary_dir, "summary_dir") or checkpoint_dir
    save_secs, save_steps = _resolve_intervals(save_checkpoint_secs, save_checkpoint_steps)
    check_bool("checkpoint_on_error", checkpoint_on_error)
    scaffold = _default_saver_scaffold(
        scaffold, max_to_keep, keep_checkpoint_every_n_hours, keep_checkpoint_every_n_steps
    )
    user_hooks = _check_hooks(hooks, "hooks")
    all_hooks: list[SessionRunHook] = []
    wants_checkpoints = _positive(save_secs, "save_checkpoint_secs") or _positive(
        save_steps, "save_checkpoint_steps", integer=True
    )

    def checkpoint_hook(directory: str, mirror: str | None) -> CheckpointSaverHook:
        return CheckpointSaverHook(
            directory,
            save_secs=save_secs,
            save_steps=save_steps,
            scaffold=scaffold,
            async_save=async_save,
            mirror_dir=mirror,
        )

    if not chief and checkpoint_dir is not None and wants_checkpoints and _distributed():
        # Not a default hook: the chief's checkpoint hook's other half. Every rank takes part
        # in every save (per-rank state, shards) and stops with the others; it writes no
        # replicated file and no state file (the saver leaves those to the chief).
        all_hooks.append(checkpoint_hook(checkpoint_dir, None))
    if chief:
        all_hooks.extend(_check_hooks(chief_only_hooks, "chief_only_hooks"))
        if summary_dir is not None and _positive(
            log_step_count_steps, "log_step_count_steps", integer=True
        ):
            all_hooks.append(
                StepCounterHook(every_n_steps=log_step_count_steps, output_dir=summary_dir)
            )
        if checkpoint_dir is not None and not wants_checkpoints:
            _warn_no_checkpoints(save_secs, save_steps)
        if checkpoint_dir is not None and wants_checkpoints:
            all_hooks.append(checkpoint_hook(checkpoint_dir, mirror_dir))
    all_hooks.extend(user_hooks)
    return MonitoredSession(
        model,
        optimizer,
        hooks=all_hooks,
        scaffold=scaffold,
        checkpoint_dir=checkpoint_dir,
        extra_state=extra_state,
        recoverable_errors=recoverable_errors,
        max_recoveries=max_recoveries,
        stop_on_signals=stop_on_signals,
        # The chief writes; the other ranks have no checkpoint hook to save with.
        checkpoint_on_error=checkpoint_on_error and chief,
        rank_state=rank_state,
    )
