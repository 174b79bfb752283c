"""MonitoredTrainingSession: default hooks, their order, intervals, chief rules."""

from __future__ import annotations

import pathlib
import signal

import pytest
import torch
from conftest import make_train_step

import torch_ckpt_hook as tch
from torch_ckpt_hook._training import _resolve_intervals


def _hook_types(sess: tch.MonitoredSession) -> list[str]:
    return [type(h).__name__ for h in sess._hooks]


class UserHook(tch.SessionRunHook):
    pass


def test_default_hooks_run_in_tensorflows_order(tmp_path: pathlib.Path) -> None:
    chief_hook, user_hook = UserHook(), UserHook()
    sess = tch.MonitoredTrainingSession(
        torch.nn.Linear(1, 1),
        checkpoint_dir=str(tmp_path),
        hooks=[user_hook],
        chief_only_hooks=[chief_hook],
    )
    assert ["UserHook", "StepCounterHook", "CheckpointSaverHook", "UserHook"] == _hook_types(sess)
    assert chief_hook is sess._hooks[0]
    assert user_hook is sess._hooks[-1]
    sess.close()


def test_a_non_chief_gets_only_the_users_hooks_but_restores(tmp_path: pathlib.Path) -> None:
    tch.Saver().save(
        tch.Session(torch.nn.Linear(1, 1), global_step=7), str(tmp_path / "model.ckpt"), 7
    )
    sess = tch.MonitoredTrainingSession(
        torch.nn.Linear(1, 1),
        is_chief=False,
        checkpoint_dir=str(tmp_path),
        hooks=[UserHook()],
        chief_only_hooks=[UserHook()],
    )
    assert ["UserHook"] == _hook_types(sess)
    assert 7 == sess.global_step
    sess.close()


def test_without_a_checkpoint_dir_there_are_no_default_hooks() -> None:
    sess = tch.MonitoredTrainingSession(torch.nn.Linear(1, 1))
    assert [] == _hook_types(sess)
    sess.close()


def test_is_chief_none_means_chief_without_torch_distributed(tmp_path: pathlib.Path) -> None:
    sess = tch.MonitoredTrainingSession(torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path))
    assert "CheckpointSaverHook" in _hook_types(sess)
    sess.close()


@pytest.mark.parametrize(
    ("secs", "steps", "expected"),
    [
        ("default", "default", (600, None)),
        (30, "default", (30, None)),
        ("default", 100, (None, 100)),
        (None, 100, (None, 100)),
    ],
)
def test_checkpoint_intervals_resolve_like_tensorflow(secs, steps, expected) -> None:  # type: ignore[no-untyped-def]
    from torch_ckpt_hook._training import USE_DEFAULT

    secs = USE_DEFAULT if secs == "default" else secs
    steps = USE_DEFAULT if steps == "default" else steps
    assert expected == _resolve_intervals(secs, steps)


def test_both_checkpoint_intervals_is_a_value_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(
        ValueError, match=r"^Can not provide both save_checkpoint_secs and save_checkpoint_steps"
    ):
        tch.MonitoredTrainingSession(
            torch.nn.Linear(1, 1),
            checkpoint_dir=str(tmp_path),
            save_checkpoint_secs=10,
            save_checkpoint_steps=10,
        )


@pytest.mark.parametrize("kwargs", [{"save_checkpoint_secs": 0}, {"save_checkpoint_steps": -1}])
def test_a_non_positive_interval_means_no_checkpoint_hook(tmp_path: pathlib.Path, kwargs) -> None:  # type: ignore[no-untyped-def]
    sess = tch.MonitoredTrainingSession(
        torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path), **kwargs
    )
    assert ["StepCounterHook"] == _hook_types(sess)
    sess.close()


def test_log_step_count_steps_zero_means_no_step_counter(tmp_path: pathlib.Path) -> None:
    sess = tch.MonitoredTrainingSession(
        torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path), log_step_count_steps=0
    )
    assert ["CheckpointSaverHook"] == _hook_types(sess)
    sess.close()


def test_the_checkpoint_hook_saves_every_n_steps_and_at_the_end(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=2,
        hooks=[tch.StopAtStepHook(last_step=5)],
    ) as sess:
        while not sess.should_stop():
            sess.run(step)
    state = tch.get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert [str(tmp_path / f"model.ckpt-{s}") for s in (0, 2, 4, 5)] == list(
        state.all_model_checkpoint_paths
    )
    assert 5 == tch.load_checkpoint(state.model_checkpoint_path)["global_step"]


def test_sigterm_is_handled_by_default_and_restored_on_close() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with tch.MonitoredTrainingSession(torch.nn.Linear(1, 1)):
        assert previous is not signal.getsignal(signal.SIGTERM)
    assert previous == signal.getsignal(signal.SIGTERM)


def test_the_readme_loop_trains_a_model(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step = make_train_step(model, optimizer)
    first_loss = train_step()["loss"].item()

    hooks = [tch.StopAtStepHook(last_step=50), tch.NanTensorHook("loss")]
    with tch.MonitoredTrainingSession(
        model, optimizer, checkpoint_dir=str(tmp_path), save_checkpoint_steps=10, hooks=hooks
    ) as sess:
        while not sess.should_stop():
            result = sess.run(train_step)
    assert result["loss"].item() < first_loss / 10
    assert 50 == sess.global_step
