"""The package's exception tree."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class of every checkpoint failure raised by this package."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint file is damaged: truncated, a checksum mismatch, an archive that won't parse."""


class CheckpointUnloadableError(CheckpointError):
    """A checkpoint file is intact but cannot be loaded as asked.

    It holds an object ``weights_only`` loading refuses, it has no checksum (written by plain
    ``torch.save``; ``load_checkpoint(..., verify=False)`` loads it), or ``map_location`` names a
    device this machine does not have.
    """


class CheckpointSaveError(CheckpointError):
    """A save failed; the original exception is the ``__cause__``."""


class NanLossDuringTrainingError(RuntimeError):
    """Raised by ``NanTensorHook`` when the loss is NaN."""

    def __str__(self) -> str:
        return "NaN loss during training."
