"""Trigger and stop agreement: one small collective per step (SPEC.md section 5.2).

With more than one rank, a runner calls ``StepAgreement.after_step`` once per step, after every
hook's ``after_run``. Every rank contributes one vector of small integers to one all-reduce
(maximum) on the step group of the package's own:

- ``stop``: whether a stop was asked on this rank (a hook's ``request_stop()``,
  ``StopAtStepHook``, a signal through ``stop_on_signals``, ``coord.request_stop()``);
- per checkpoint hook, ``save``: 2 when the chief's timer fired for this step, 1 when the chief
  still owes the save of a trigger skipped with ``if_busy="skip"`` (the other ranks send 0, so a
  skewed clock on another rank never matters), and ``busy``: this rank's previous save of that
  hook is still being written.

The result is the same on every rank: the hooks save together (``save``), look at finished
saves only when no rank's is still being written (so a failure is raised at the same step
everywhere), and every rank stops after the same step. The checkpoint hooks of a distributed
runner therefore leave their trigger to the agreement (``AgreedSaves``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ._distributed import CheckpointGroup
from ._hooks import SessionRunContext, SessionRunHook


@runtime_checkable
class AgreedSaves(Protocol):
    """A hook whose saves every rank makes together, when the agreement says so."""

    def join_agreement(self) -> None:
        """From now on, save only when ``after_agreement`` says so."""

    def proposal(self, run_context: SessionRunContext) -> tuple[int, int]:
        """``(save, busy)``: 2 the timer fired, 1 a skipped save is owed, 0 neither; whether
        a save of this rank is in flight."""
        ...

    def after_agreement(self, run_context: SessionRunContext, save: int, settled: bool) -> None:
        """Save when ``save`` (as proposed); when ``settled`` no rank's save is being written."""


class StepAgreement:
    """The per-step agreement of one distributed runner over its checkpoint hooks."""

    def __init__(self, group: CheckpointGroup, hooks: Sequence[SessionRunHook]) -> None:
        self._group = group
        self._savers = [hook for hook in hooks if isinstance(hook, AgreedSaves)]
        count = len(self._savers)
        most, least = group.max_all([count, -count])
        if most != -least:
            raise ValueError(
                f"every rank must run the same checkpoint hooks (each save is made by every "
                f"rank together), but rank {group.rank} has {count} and another rank has "
                f"{most if most != count else -least}: give every rank the same hooks "
                "(chief_only_hooks must not hold a checkpoint hook)"
            )
        for hook in self._savers:
            hook.join_agreement()

    def after_step(self, run_context: SessionRunContext, stop: bool) -> bool:
        """Agree on this step's saves and stop; make the saves; return whether to stop."""
        vector = [int(stop)]
        for hook in self._savers:
            vector.extend(hook.proposal(run_context))
        agreed = self._group.max_all(vector)
        for index, hook in enumerate(self._savers):
            save, busy = agreed[1 + 2 * index], agreed[2 + 2 * index]
            hook.after_agreement(run_context, save, not busy)
        return bool(agreed[0])
