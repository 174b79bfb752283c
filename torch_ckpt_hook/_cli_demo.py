"""The ``torch-ckpt demo`` job: a small model trained with checkpoints, that resumes when rerun.

Used by the ``torch-ckpt`` command only. Step N's batch is drawn from a generator seeded with N,
so the data depends only on the global step: a run stopped at step 300 and resumed to 400 sees
the batches a straight run to 400 sees, and (with the RNG states the checkpoint carries) ends
with the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

import torch

from ._basic_hooks import NanTensorHook, StopAtStepHook
from ._checkpoint_dir import latest_checkpoint
from ._cli_format import ConsoleHandler
from ._errors import CheckpointError
from ._hooks import SessionRunHook
from ._messages import error_line
from ._progress import ProgressBarHook
from ._training import MonitoredTrainingSession
from ._validation import check_int

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._session import Session

DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "torch-ckpt-demo")
DEFAULT_STEPS = 300
DEFAULT_SAVE_EVERY = 100

_SEED = 0
_FEATURES = 16
_HIDDEN = 64
_BATCH = 64
_LR = 3e-3


class DemoError(Exception):
    """The demo cannot run in the directory it was given; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What one demo run did."""

    start_step: int
    """The global step it started from: 0, or the restored checkpoint's."""
    final_step: int
    restored_from: str | None
    """The checkpoint it resumed from, or None when it started from scratch."""
    seconds: float
    """Wall time of the training loop, session creation and the final save included."""
    loss: float | None
    """The last step's loss, or None when it trained no step."""
    latest_checkpoint: str | None


def make_model() -> torch.nn.Module:
    torch.manual_seed(_SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(_FEATURES, _HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(_HIDDEN, _HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(_HIDDEN, 1),
    )


Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Step N's batch: inputs and targets, from the global step alone."""


def batch_for_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: inputs, and targets from a fixed nonlinear function of them."""
    teacher = torch.Generator().manual_seed(_SEED)
    linear = torch.randn(_FEATURES, 1, generator=teacher)
    bend = torch.randn(_FEATURES, 1, generator=teacher) / 4
    inputs = torch.randn(_BATCH, _FEATURES, generator=torch.Generator().manual_seed(step))
    return inputs, inputs @ linear + torch.sin(inputs @ bend)


class _StartReporter(SessionRunHook):
    """Says where training starts: ``Session.restored_from`` is what a hook sees of the restore.

    A chief-only hook, so it runs before the checkpoint hook's creation save and its message
    comes first.
    """

    def __init__(self, checkpoint_dir: str, steps: int, out: TextIO) -> None:
        self._checkpoint_dir = checkpoint_dir
        self._steps = steps
        self._out = out
        self.restored_from: str | None = None
        self.start_step = 0
        self._created = False

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        if self._created:  # a recovery, not the start
            return
        self._created = True
        self.restored_from = session.restored_from
        self.start_step = step = session.global_step
        if self.restored_from is None:
            self._out.write(
                f"No checkpoint in {self._checkpoint_dir}: training from step 0 to {self._steps}.\n"
            )
        else:
            self._out.write(f"Resumed from {self.restored_from} at step {step}\n")
        if step >= self._steps:
            self._out.write(
                f"Nothing to do: the checkpoint is at step {step} and --steps is "
                f"{self._steps}; pass a larger --steps to train on.\n"
            )
        self._out.flush()


def run_demo(
    checkpoint_dir: str,
    steps: int,
    *,
    save_every: int = DEFAULT_SAVE_EVERY,
    out: TextIO,
    batches: Batches = batch_for_step,
) -> DemoResult:
    """Train to global step ``steps``, checkpointing into ``checkpoint_dir`` every ``save_every``.

    Messages for the user go to ``out``; progress goes to a ``ProgressBarHook``. Ctrl-C (and
    SIGTERM) stops after the current step and writes a final checkpoint, so a rerun resumes.

    Args:
        batches: step N's batch (``batch_for_step``; a test gives one that yields a NaN loss).
    """
    check_int("steps", steps, minimum=1)
    check_int("save_every", save_every, minimum=1)
    # The model is far too small for intra-op threads: syncing them costs more than they save,
    # ten times more on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(checkpoint_dir, steps, save_every, out, batches)
    finally:
        torch.set_num_threads(threads)


def _train(
    checkpoint_dir: str, steps: int, save_every: int, out: TextIO, batches: Batches
) -> DemoResult:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR)

    def train_step(inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return {"loss": loss.detach()}

    start = _StartReporter(checkpoint_dir, steps, out)
    hooks = [StopAtStepHook(last_step=steps), NanTensorHook("loss"), ProgressBarHook(steps)]
    losses: list[float] = []
    began = time.perf_counter()
    try:
        session = MonitoredTrainingSession(
            model,
            optimizer,
            checkpoint_dir=checkpoint_dir,
            save_checkpoint_steps=save_every,
            log_step_count_steps=save_every,
            hooks=hooks,
            chief_only_hooks=[start],
            stop_on_signals=(signal.SIGTERM, signal.SIGINT),
        )
    except (RuntimeError, ValueError, KeyError) as err:
        # load_state_dict's refusal (missing keys, other shapes, other parameter groups): the
        # directory holds another model's checkpoints, which the demo must not overwrite.
        if isinstance(err, CheckpointError) or latest_checkpoint(checkpoint_dir) is None:
            raise
        raise DemoError(
            f"{checkpoint_dir} holds checkpoints of a different model "
            f"({error_line(err, with_type=False, limit=200)}); "
            "use an empty --dir"
        ) from err
    with session as sess:
        # Checked here, not left to StopAtStepHook: as in TensorFlow, it would run one step.
        if sess.global_step < steps:
            while not sess.should_stop():
                result = sess.run(train_step, *batches(sess.global_step))
                losses.append(result["loss"].item())
    seconds = time.perf_counter() - began
    final = sess.global_step
    latest = latest_checkpoint(checkpoint_dir)
    if losses:
        out.write(
            f"Trained steps {start.start_step} -> {final} in {seconds:.1f} s "
            f"({len(losses) / seconds:.0f} steps/s); loss {losses[0]:.4g} -> {losses[-1]:.4g}.\n"
        )
    if final < steps:
        out.write(f"Stopped at step {final} of {steps}: run the same command again to resume.\n")
    out.write(f"Latest checkpoint: {latest}\n")
    return DemoResult(
        start_step=start.start_step,
        final_step=final,
        restored_from=start.restored_from,
        seconds=seconds,
        loss=losses[-1] if losses else None,
        latest_checkpoint=latest,
    )


@contextlib.contextmanager
def demo_logging(stream: TextIO) -> Iterator[None]:
    """Show the package's INFO lines (saves, steps/s, progress) for the demo, above a tqdm bar.

    Only the lines below WARNING: the ``torch-ckpt`` command reports warnings itself, with its
    prefix. TensorFlow's lines about checkpoint listeners are left out (``QUIET_LOGGERS``): the
    demo has no listeners, so they say nothing.
    """
    package_logger = logging.getLogger(__package__)
    handler = ConsoleHandler(logging.Formatter("%(message)s"), stream)
    handler.addFilter(_demo_lines)
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


QUIET_LOGGERS = frozenset({f"{__package__}._checkpoint_hook.tensorflow"})
"""Loggers whose lines the demo leaves out: ``CheckpointSaverHook``'s TensorFlow lines."""


def _demo_lines(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING and record.name not in QUIET_LOGGERS
