"""TensorFlow's CheckpointSaverHook and MonitoredSession for hand-written PyTorch training loops."""

from ._basic_hooks import LoggingTensorHook, NanTensorHook, StepCounterHook, StopAtStepHook
from ._best_hook import BestCheckpointSaverHook
from ._checkpoint_dir import latest_checkpoint, restorable_checkpoint
from ._checkpoint_file import load_checkpoint, verify_checkpoint
from ._checkpoint_hook import CheckpointSaverHook
from ._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointSaveError,
    CheckpointUnloadableError,
    NanLossDuringTrainingError,
)
from ._hooks import SessionRunArgs, SessionRunContext, SessionRunHook, SessionRunValues
from ._listeners import CheckpointSaverListener
from ._monitored import MonitoredSession, SingularMonitoredSession
from ._progress import ProgressBarHook
from ._saver import Saver
from ._scaffold import Scaffold
from ._session import Session
from ._state_file import CheckpointState, get_checkpoint_state
from ._timer import SecondOrStepTimer
from ._training import MonitoredTrainingSession
from ._writer import SaveHandle

__version__ = "0.1.0"

__all__ = [
    "BestCheckpointSaverHook",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointSaveError",
    "CheckpointSaverHook",
    "CheckpointSaverListener",
    "CheckpointState",
    "CheckpointUnloadableError",
    "LoggingTensorHook",
    "MonitoredSession",
    "MonitoredTrainingSession",
    "NanLossDuringTrainingError",
    "NanTensorHook",
    "ProgressBarHook",
    "SaveHandle",
    "Saver",
    "Scaffold",
    "SecondOrStepTimer",
    "Session",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "SingularMonitoredSession",
    "StepCounterHook",
    "StopAtStepHook",
    "__version__",
    "get_checkpoint_state",
    "latest_checkpoint",
    "load_checkpoint",
    "restorable_checkpoint",
    "verify_checkpoint",
]
