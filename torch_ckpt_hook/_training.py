"""``MonitoredTrainingSession``: a ``MonitoredSession`` with TensorFlow's default hooks."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._basic_hooks import StepCounterHook
from ._checkpoint_hook import CheckpointSaverHook
from ._hooks import SessionRunHook
from ._monitored import MonitoredSession, _check_hooks, _check_path
from ._scaffold import Scaffold
from ._validation import check_bool, check_number


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


def _positive(value: Any, name: str) -> bool:
    """Whether an interval asks for its hook: ``None`` and non-positive numbers do not (TF)."""
    interval = check_number(name, value, allow_none=True)
    return interval is not None and interval > 0


def MonitoredTrainingSession(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
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
    stop_on_signals: Iterable[int] = (signal.SIGTERM,),
    summary_dir: str | None = None,
    recoverable_errors: Iterable[type[BaseException]] = (),
    max_recoveries: int = 3,
    async_save: bool = True,
) -> MonitoredSession:
    """A ``MonitoredSession`` with a step counter and a checkpoint hook, as TensorFlow's.

    The chief's hooks run in this order: ``chief_only_hooks``, a ``StepCounterHook`` (when
    ``summary_dir`` or ``checkpoint_dir`` is set and ``log_step_count_steps > 0``), a
    ``CheckpointSaverHook`` (when ``checkpoint_dir`` is set and the interval is positive), then
    ``hooks``. Checkpoints default to every 600 seconds; giving ``save_checkpoint_steps`` alone
    replaces that. A non-chief gets ``hooks`` only, but restores like the chief.
    """
    chief = _resolve_is_chief(is_chief)
    checkpoint_dir = _check_path(checkpoint_dir, "checkpoint_dir")
    summary_dir = _check_path(summary_dir, "summary_dir") or checkpoint_dir
    save_secs, save_steps = _resolve_intervals(save_checkpoint_secs, save_checkpoint_steps)
    scaffold = scaffold or Scaffold()
    user_hooks = _check_hooks(hooks, "hooks")
    all_hooks: list[SessionRunHook] = []
    if chief:
        all_hooks.extend(_check_hooks(chief_only_hooks, "chief_only_hooks"))
        if summary_dir is not None and _positive(log_step_count_steps, "log_step_count_steps"):
            all_hooks.append(
                StepCounterHook(every_n_steps=log_step_count_steps, output_dir=summary_dir)
            )
        wants_checkpoints = _positive(save_secs, "save_checkpoint_secs") or _positive(
            save_steps, "save_checkpoint_steps"
        )
        if checkpoint_dir is not None and wants_checkpoints:
            all_hooks.append(
                CheckpointSaverHook(
                    checkpoint_dir,
                    save_secs=save_secs,
                    save_steps=save_steps,
                    scaffold=scaffold,
                    async_save=async_save,
                )
            )
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
    )
