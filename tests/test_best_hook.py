"""BestCheckpointSaverHook: the best k by a metric, in a series and a state file of its own."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_ckpt_hook import (
    BestCheckpointSaverHook,
    CheckpointSaverHook,
    Saver,
    Session,
    SingularMonitoredSession,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
)
from torch_ckpt_hook._best_hook import _BestSaver

STATE = "best_checkpoint"


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(
    directory: Path, values: Iterable[Any], *hooks: Any, key: str = "val", restore: bool = False
) -> SingularMonitoredSession:
    """One optimizer step per value; the step function returns ``{key: value}`` (or {} for None).

    With ``restore``, the session restores from ``directory``'s regular checkpoints.
    """
    model, optimizer = _model()
    checkpoint_dir = str(directory) if restore else None
    with SingularMonitoredSession(
        model, optimizer, hooks=list(hooks), checkpoint_dir=checkpoint_dir
    ) as sess:
        for value in values:

            def step(value: Any = value) -> dict[str, Any]:
                optimizer.zero_grad()
                model(torch.ones(1, 2)).sum().backward()
                optimizer.step()
                return {} if value is None else {key: value}

            sess.run(step)
    return sess


def _best_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("best.ckpt-*"))


def _state_names(directory: Path, latest_filename: str | None = STATE) -> tuple[str, list[str]]:
    state = get_checkpoint_state(directory, latest_filename)
    assert state is not None, f"no usable state file {latest_filename} in {directory}"
    return (
        Path(state.model_checkpoint_path).name,
        [Path(p).name for p in state.all_model_checkpoint_paths],
    )


def test_min_mode_saves_each_improvement_and_keeps_the_best(tmp_path: Path) -> None:
    hook = BestCheckpointSaverHook(tmp_path, "val")

    _train(tmp_path, [5.0, 3.0, 4.0, 2.0, 2.0, 6.0], hook)

    assert ["best.ckpt-4"] == _best_files(tmp_path)
    assert ("best.ckpt-4", ["best.ckpt-4"]) == _state_names(tmp_path)
    assert str(tmp_path / "best.ckpt-4") == latest_checkpoint(tmp_path, latest_filename=STATE)
    assert {"val": 2.0} == load_checkpoint(tmp_path / "best.ckpt-4")["metrics"]
    assert 2.0 == hook.best_value


def test_max_mode_with_keep_2_lists_the_two_best_with_the_best_named(tmp_path: Path) -> None:
    hook = BestCheckpointSaverHook(tmp_path, "acc", mode="max", keep=2)

    _train(tmp_path, [0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.7], hook, key="acc")

    assert ["best.ckpt-4", "best.ckpt-6"] == _best_files(tmp_path)
    assert ("best.ckpt-6", ["best.ckpt-4", "best.ckpt-6"]) == _state_names(tmp_path)
    assert {"acc": 0.5} == load_checkpoint(tmp_path / "best.ckpt-4")["metrics"]


@pytest.mark.parametrize(
    "ignored", [math.nan, math.inf, -math.inf, None, torch.tensor(math.nan)], ids=repr
)
def test_a_missing_or_non_finite_metric_is_ignored(tmp_path: Path, ignored: Any) -> None:
    hook = BestCheckpointSaverHook(tmp_path, "val")

    _train(tmp_path, [ignored, torch.tensor(3.0), ignored], hook)

    assert ["best.ckpt-2"] == _best_files(tmp_path)
    assert 3.0 == hook.best_value


def test_a_callable_metric_is_saved_under_its_function_name(tmp_path: Path) -> None:
    def val_loss(results: dict[str, Any]) -> Any:
        return results.get("val")

    _train(tmp_path, [1.0], BestCheckpointSaverHook(tmp_path, val_loss))

    assert {"val_loss": 1.0} == load_checkpoint(tmp_path / "best.ckpt-1")["metrics"]


def test_a_metric_that_is_no_number_is_a_type_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^metric 'val' must be a real number or a one-element"):
        _train(tmp_path, ["low"], BestCheckpointSaverHook(tmp_path, "val"))


def test_the_best_value_survives_a_restart(tmp_path: Path) -> None:
    _train(tmp_path, [3.0, 1.0], BestCheckpointSaverHook(tmp_path, "val", keep=2))

    resumed = BestCheckpointSaverHook(tmp_path, "val", keep=2)
    _train(tmp_path, [2.0, 1.0, 0.5], resumed)

    assert 0.5 == resumed.best_value
    assert ("best.ckpt-3", ["best.ckpt-2", "best.ckpt-3"]) == _state_names(tmp_path)
    assert ["best.ckpt-2", "best.ckpt-3"] == _best_files(tmp_path)
    assert {"val": 1.0} == load_checkpoint(tmp_path / "best.ckpt-2")["metrics"]


def test_a_restarted_hook_skips_a_damaged_kept_checkpoint_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _train(tmp_path, [3.0, 1.0], BestCheckpointSaverHook(tmp_path, "val", keep=2))
    damaged = tmp_path / "best.ckpt-2"
    damaged.write_bytes(damaged.read_bytes()[:100])

    resumed = BestCheckpointSaverHook(tmp_path, "val", keep=2)
    with caplog.at_level(logging.WARNING, logger="torch_ckpt_hook._best_hook"):
        _train(tmp_path, [None, None, 2.0], resumed)

    assert any("best.ckpt-2 cannot be read" in r.getMessage() for r in caplog.records)
    assert 2.0 == resumed.best_value, "2.0 beats the 3.0 read back; the damaged 1.0 is unknown"
    assert ("best.ckpt-3", ["best.ckpt-1", "best.ckpt-3"]) == _state_names(tmp_path)
    assert damaged.exists(), "not this saver's to delete any more (no checksum trailer)"


def test_a_best_checkpoint_restores_into_a_session(tmp_path: Path) -> None:
    _train(tmp_path, [1.0], BestCheckpointSaverHook(tmp_path, "val"))
    model, optimizer = _model()
    session = Session(model, optimizer)

    Saver().restore(session, str(tmp_path / "best.ckpt-1"))

    assert 1 == session.global_step


def test_it_coexists_with_a_checkpoint_saver_hook_in_one_directory(tmp_path: Path) -> None:
    rng = random.Random(0)
    values = [rng.uniform(0, 10) for _ in range(40)]
    for run in range(2):  # the second run restores step 20 and adopts both state files
        regular = CheckpointSaverHook(str(tmp_path), save_steps=1, saver=Saver(max_to_keep=1))
        best = BestCheckpointSaverHook(tmp_path, "val", keep=2)
        _train(tmp_path, values[run * 20 : (run + 1) * 20], regular, best, restore=run > 0)

    improvements = [
        step for step, value in enumerate(values, 1) if value < min(values[: step - 1], default=99)
    ]
    kept = [f"best.ckpt-{step}" for step in improvements[-2:]]
    assert len(improvements) > 2, "the test needs improvements that retention drops"
    assert ("model.ckpt-40", ["model.ckpt-40"]) == _state_names(tmp_path, None)
    assert (kept[-1], kept) == _state_names(tmp_path)
    assert {"checkpoint", STATE, "model.ckpt-40", *kept} == {p.name for p in tmp_path.iterdir()}
    assert str(tmp_path / "model.ckpt-40") == latest_checkpoint(tmp_path)


def test_the_regular_fallback_never_picks_a_best_checkpoint(tmp_path: Path) -> None:
    regular = CheckpointSaverHook(str(tmp_path), save_steps=100)
    _train(tmp_path, [5.0, 4.0, 3.0], regular, BestCheckpointSaverHook(tmp_path, "val"))
    (tmp_path / "checkpoint").unlink()

    assert str(tmp_path / "model.ckpt-3") == latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path, latest_filename=STATE) == str(tmp_path / "best.ckpt-3")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"metric": 3}, TypeError, r"metric must be a str \(a key .* got 3 \(an int\)$"),
        ({"metric": ""}, TypeError, r"metric must be a str"),
        ({"mode": "avg"}, ValueError, r"^mode must be 'min' or 'max', got 'avg'$"),
        ({"keep": 0}, ValueError, r"^keep must be a positive int, got 0$"),
        ({"keep": None}, TypeError, r"^keep must be a positive int, got None$"),
        (
            {"latest_filename": "checkpoint"},
            ValueError,
            r"^latest_filename must not be 'checkpoint', the state file of the regular",
        ),
        (
            {"checkpoint_basename": "a/best"},
            ValueError,
            r"^checkpoint_basename must be a file name without directories, got 'a/best'$",
        ),
        ({"async_save": 1}, TypeError, r"^async_save must be a bool"),
    ],
)
def test_bad_arguments_are_errors_naming_the_argument(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {"metric": "val", **kwargs}
    metric = arguments.pop("metric")
    with pytest.raises(error, match=message):
        BestCheckpointSaverHook(tmp_path, metric, **arguments)


def test_synchronous_saves_are_durable_when_the_step_returns(tmp_path: Path) -> None:
    hook = BestCheckpointSaverHook(tmp_path, "val", async_save=False)
    model, optimizer = _model()
    with SingularMonitoredSession(model, optimizer, hooks=[hook]) as sess:

        def step() -> dict[str, float]:
            optimizer.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            return {"val": 1.0}

        sess.run(step)
        assert str(tmp_path / "best.ckpt-1") == latest_checkpoint(tmp_path, STATE)


def test_its_saver_deletes_exactly_the_checkpoints_that_fall_out_of_the_best_k(
    tmp_path: Path,
) -> None:
    scores = {str(tmp_path / f"best.ckpt-{step}"): value for step, value in enumerate([3, 1, 2, 4])}
    saver = _BestSaver(2, "min", scores.get, STATE)
    for step in range(4):  # out of order, which the hook never does: the policy ranks anyway
        saver.save(Session(torch.nn.Linear(2, 1)), str(tmp_path / "best.ckpt"), step)

    assert ["best.ckpt-2", "best.ckpt-1"] == [Path(p).name for p in saver.last_checkpoints]
    assert ("best.ckpt-1", ["best.ckpt-2", "best.ckpt-1"]) == _state_names(tmp_path)
    assert ["best.ckpt-1", "best.ckpt-2"] == _best_files(tmp_path)
    assert not (tmp_path / "checkpoint").exists(), "the regular state file is never written"


def test_a_best_state_file_listing_regular_checkpoints_never_gets_them_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    regular = Saver(max_to_keep=5)
    for step in (1, 2):
        regular.save(Session(torch.nn.Linear(2, 1)), str(tmp_path / "model.ckpt"), step)
    (tmp_path / STATE).write_text(
        'model_checkpoint_path: "model.ckpt-2"\n'
        'all_model_checkpoint_paths: "model.ckpt-1"\n'
        'all_model_checkpoint_paths: "model.ckpt-2"\n'
    )

    with caplog.at_level(logging.WARNING):
        _train(tmp_path, [2.0, 1.0], BestCheckpointSaverHook(tmp_path, "val"))

    assert {"model.ckpt-1", "model.ckpt-2"} <= {p.name for p in tmp_path.iterdir()}
    assert ("best.ckpt-2", ["best.ckpt-2"]) == _state_names(tmp_path)
    assert ("model.ckpt-2", ["model.ckpt-1", "model.ckpt-2"]) == _state_names(tmp_path, None)
