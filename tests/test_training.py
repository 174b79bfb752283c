"""MonitoredTrainingSession: default hooks, their order, intervals, chief rules."""

from __future__ import annotations

import logging
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


def test_sigint_is_handled_by_default_and_restored_on_close() -> None:
    previous = signal.getsignal(signal.SIGINT)
    with tch.MonitoredTrainingSession(torch.nn.Linear(1, 1)):
        assert previous is not signal.getsignal(signal.SIGINT)
    assert previous is signal.getsignal(signal.SIGINT)


# -- retention arguments (SPEC 5.3) ----------------------------------------------------------------


def _train_to(directory: pathlib.Path, last_step: int, **kwargs) -> tch.MonitoredSession:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=str(directory),
        save_checkpoint_steps=1,
        hooks=[tch.StopAtStepHook(last_step=last_step)],
        **kwargs,
    ) as sess:
        while not sess.should_stop():
            sess.run(step)
    return sess


def _steps_on_disk(directory: pathlib.Path) -> list[int]:
    return sorted(
        int(p.name.rsplit("-", 1)[1])
        for p in directory.iterdir()
        if p.name.startswith("model.ckpt-") and p.name.rsplit("-", 1)[1].isdigit()
    )


def test_max_to_keep_goes_to_the_default_saver(tmp_path: pathlib.Path) -> None:
    _train_to(tmp_path, 6, max_to_keep=2)
    assert [5, 6] == _steps_on_disk(tmp_path)


def test_the_default_max_to_keep_is_five(tmp_path: pathlib.Path) -> None:
    _train_to(tmp_path, 6)
    assert [2, 3, 4, 5, 6] == _steps_on_disk(tmp_path)


def test_keep_checkpoint_every_n_hours_goes_to_the_default_saver(tmp_path: pathlib.Path) -> None:
    with pytest.raises(
        ValueError, match=r"^keep_checkpoint_every_n_hours must be a positive number, got -1$"
    ):
        tch.MonitoredTrainingSession(torch.nn.Linear(1, 1), keep_checkpoint_every_n_hours=-1)


def test_keep_checkpoint_every_n_steps_goes_to_the_default_saver(tmp_path: pathlib.Path) -> None:
    _train_to(tmp_path, 7, max_to_keep=2, keep_checkpoint_every_n_steps=3)
    # Steps 3 and 6 are milestones kept on disk; 6 and 7 are the two listed.
    assert [3, 6, 7] == _steps_on_disk(tmp_path)


def test_a_scaffold_without_a_saver_gets_the_default_saver_with_the_retention_arguments(
    tmp_path: pathlib.Path,
) -> None:
    scaffold = tch.Scaffold()
    _train_to(tmp_path, 6, scaffold=scaffold, max_to_keep=1)
    assert [6] == _steps_on_disk(tmp_path)
    assert scaffold.saver is not None


def test_a_scaffolds_own_saver_wins(tmp_path: pathlib.Path) -> None:
    saver = tch.Saver(max_to_keep=2)
    _train_to(tmp_path, 6, scaffold=tch.Scaffold(saver=saver))
    assert [5, 6] == _steps_on_disk(tmp_path)


def test_retention_arguments_beside_a_scaffolds_own_saver_are_a_value_error() -> None:
    scaffold = tch.Scaffold(saver=tch.Saver())
    with pytest.raises(
        ValueError,
        match=(
            r"^Can not provide both max_to_keep=2, keep_checkpoint_every_n_hours=1 and a "
            r"scaffold with its own saver: they apply to the default saver only\. Give them to "
            r"that Saver\(\.\.\.\), or leave the scaffold's saver unset\.$"
        ),
    ):
        tch.MonitoredTrainingSession(
            torch.nn.Linear(1, 1),
            scaffold=scaffold,
            max_to_keep=2,
            keep_checkpoint_every_n_hours=1,
        )


# -- argument errors name the user's argument (issue 13, item 12) ---------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"save_checkpoint_steps": 2.5},
            TypeError,
            r"^save_checkpoint_steps must be an int or None, got 2\.5 \(a float\)$",
        ),
        (
            {"save_checkpoint_secs": "10"},
            TypeError,
            r"^save_checkpoint_secs must be a number or None, got '10' \(a str\)$",
        ),
        (
            {"log_step_count_steps": 2.5},
            TypeError,
            r"^log_step_count_steps must be an int or None, got 2\.5 \(a float\)$",
        ),
        (
            {"max_to_keep": -1},
            ValueError,
            r"^max_to_keep must be a non-negative int or None, got -1$",
        ),
    ],
)
def test_bad_arguments_are_named_as_the_user_gave_them(
    tmp_path: pathlib.Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        tch.MonitoredTrainingSession(torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"save_checkpoint_steps": 0}, "save_checkpoint_steps=0"),
        ({"save_checkpoint_steps": -5}, "save_checkpoint_steps=-5"),
        ({"save_checkpoint_secs": 0}, "save_checkpoint_secs=0"),
    ],
)
def test_a_non_positive_interval_logs_that_no_checkpoint_is_saved(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, kwargs: dict[str, int], named: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="torch_ckpt_hook._training"):
        tch.MonitoredTrainingSession(
            torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path), **kwargs
        ).close()
    assert [
        f"{named} is not positive: no CheckpointSaverHook, so this run saves no checkpoint "
        "(TensorFlow's rule). Pass a positive interval to save checkpoints."
    ] == [r.getMessage() for r in caplog.records if r.name == "torch_ckpt_hook._training"]
    assert [] == _steps_on_disk(tmp_path)


def test_a_positive_interval_logs_no_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="torch_ckpt_hook._training"):
        tch.MonitoredTrainingSession(
            torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path), save_checkpoint_steps=3
        ).close()
    assert [] == [r for r in caplog.records if r.name == "torch_ckpt_hook._training"]


# -- checkpoint_on_error and restored_from through MonitoredTrainingSession -----------------------


def test_checkpoint_on_error_reaches_the_session(tmp_path: pathlib.Path) -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, optimizer)

    def fails() -> None:
        raise RuntimeError("data loader died")

    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="data loader died"),
        tch.MonitoredTrainingSession(
            model,
            optimizer,
            checkpoint_dir=str(tmp_path),
            save_checkpoint_steps=100,
            checkpoint_on_error=True,
        ) as sess,
    ):
        sess.run(step)
        sess.run(step)
        sess.run(fails)
    assert str(tmp_path / "model.ckpt-2") == tch.latest_checkpoint(str(tmp_path))
    resumed = tch.MonitoredTrainingSession(model, optimizer, checkpoint_dir=str(tmp_path))
    assert str(tmp_path / "model.ckpt-2") == resumed.restored_from
    assert 2 == resumed.global_step
    resumed.close()


def test_checkpoint_on_error_needs_the_checkpoint_hook_on_the_chief() -> None:
    with pytest.raises(ValueError, match=r"^checkpoint_on_error=True needs a CheckpointSaverHook"):
        tch.MonitoredTrainingSession(torch.nn.Linear(1, 1), checkpoint_on_error=True)


def test_checkpoint_on_error_on_a_non_chief_saves_nothing(tmp_path: pathlib.Path) -> None:
    def fails() -> None:
        raise RuntimeError("boom")

    with (
        pytest.raises(RuntimeError, match="boom"),
        tch.MonitoredTrainingSession(
            torch.nn.Linear(1, 1),
            is_chief=False,
            checkpoint_dir=str(tmp_path),
            checkpoint_on_error=True,
        ) as sess,
    ):
        sess.run(fails)
    assert [] == _steps_on_disk(tmp_path)
