"""The public API: exactly the names SPEC.md lists (plus those later issues add as they land)."""

from __future__ import annotations

import torch_ckpt_hook

EXPECTED = {
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
}


def test_all_lists_exactly_the_public_names() -> None:
    assert EXPECTED == set(torch_ckpt_hook.__all__)


def test_every_public_name_is_importable_and_public_classes_live_in_private_modules() -> None:
    for name in torch_ckpt_hook.__all__:
        value = getattr(torch_ckpt_hook, name)
        module = getattr(value, "__module__", "torch_ckpt_hook._")
        assert module.startswith("torch_ckpt_hook._"), f"{name} is defined in {module}"


def test_version_is_a_string() -> None:
    assert isinstance(torch_ckpt_hook.__version__, str)


def test_errors_form_one_tree_rooted_in_runtime_error() -> None:
    assert issubclass(torch_ckpt_hook.CheckpointError, RuntimeError)
    assert issubclass(torch_ckpt_hook.CheckpointCorruptedError, torch_ckpt_hook.CheckpointError)
    assert issubclass(torch_ckpt_hook.CheckpointSaveError, torch_ckpt_hook.CheckpointError)
    assert issubclass(torch_ckpt_hook.CheckpointUnloadableError, torch_ckpt_hook.CheckpointError)
    assert issubclass(torch_ckpt_hook.NanLossDuringTrainingError, RuntimeError)
