"""The package's exception tree."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class of every checkpoint failure raised by this package."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint file fails verification or cannot be parsed."""


class CheckpointSaveError(CheckpointError):
    """A save failed; the original exception is the ``__cause__``."""


class NanLossDuringTrainingError(RuntimeError):
    """Raised by ``NanTensorHook`` when the loss is NaN."""

    def __str__(self) -> str:
        return "NaN loss during training."
