"""The demo job: trains, checkpoints, resumes from the latest checkpoint, and says so."""

from __future__ import annotations

import io
import logging
import pathlib

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._cli_demo import DemoError, batch_for_step, demo_logging, run_demo


def test_demo_trains_then_resumes_from_the_latest_checkpoint(tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path)
    out = io.StringIO()

    first = run_demo(directory, 12, save_every=5, out=out)

    assert (0, 12, None) == (first.start_step, first.final_step, first.restored_from)
    assert (
        f"{directory}/model.ckpt-12" == first.latest_checkpoint == tch.latest_checkpoint(directory)
    )
    assert [0, 5, 10, 12] == sorted(
        int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("model.ckpt-*")
    )
    lines = out.getvalue().splitlines()
    assert f"No checkpoint in {directory}: training from step 0 to 12." == lines[0]
    assert lines[1].startswith("Trained steps 0 -> 12 in ")
    assert f"Latest checkpoint: {directory}/model.ckpt-12" == lines[-1]

    out = io.StringIO()
    second = run_demo(directory, 20, save_every=5, out=out)

    assert (12, 20) == (second.start_step, second.final_step)
    assert f"{directory}/model.ckpt-12" == second.restored_from
    lines = out.getvalue().splitlines()
    assert f"Resumed from {directory}/model.ckpt-12 at step 12" == lines[0]
    assert lines[1].startswith("Trained steps 12 -> 20 in ")
    assert 20 == tch.load_checkpoint(f"{directory}/model.ckpt-20")["global_step"]


def test_resumed_demo_ends_with_the_weights_of_a_straight_run(tmp_path: pathlib.Path) -> None:
    run_demo(str(tmp_path / "resumed"), 6, save_every=100, out=io.StringIO())
    run_demo(str(tmp_path / "resumed"), 10, save_every=100, out=io.StringIO())
    run_demo(str(tmp_path / "straight"), 10, save_every=100, out=io.StringIO())

    resumed = tch.load_checkpoint(tmp_path / "resumed" / "model.ckpt-10")
    straight = tch.load_checkpoint(tmp_path / "straight" / "model.ckpt-10")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_demo_with_nothing_to_do_trains_no_step(tmp_path: pathlib.Path) -> None:
    run_demo(str(tmp_path), 5, out=io.StringIO())
    out = io.StringIO()

    result = run_demo(str(tmp_path), 3, out=out)

    assert (5, 5, None) == (result.start_step, result.final_step, result.loss)
    assert (
        "Nothing to do: the checkpoint is at step 5 and --steps is 3; "
        "pass a larger --steps to train on."
    ) == out.getvalue().splitlines()[1]
    assert not (tmp_path / "model.ckpt-6").exists()


def test_demo_leaves_the_thread_count_as_it_found_it(tmp_path: pathlib.Path) -> None:
    threads = torch.get_num_threads()

    run_demo(str(tmp_path), 2, out=io.StringIO())

    assert threads == torch.get_num_threads()


def test_batches_depend_only_on_the_step() -> None:
    torch.manual_seed(123)
    first = batch_for_step(7)
    torch.manual_seed(456)
    again = batch_for_step(7)

    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], batch_for_step(8)[0])


@pytest.mark.parametrize(
    ("steps", "save_every", "error", "message"),
    [
        (0, 10, ValueError, r"^steps must be a positive int, got 0$"),
        (10, 0, ValueError, r"^save_every must be a positive int, got 0$"),
        (True, 10, TypeError, r"^steps must be a positive int, got True \(a bool\)$"),
    ],
)
def test_demo_arguments_are_checked(
    tmp_path: pathlib.Path, steps: int, save_every: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        run_demo(str(tmp_path), steps, save_every=save_every, out=io.StringIO())


def test_demo_refuses_a_directory_that_holds_another_models_checkpoints(
    tmp_path: pathlib.Path,
) -> None:
    model = torch.nn.Linear(2, 2)
    session = tch.Session(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved = tch.Saver().save(session, str(tmp_path / "model.ckpt"), global_step=1)

    with pytest.raises(DemoError) as raised:
        run_demo(str(tmp_path), 5, out=io.StringIO())

    message = str(raised.value)
    assert message.startswith(
        f"{tmp_path} holds checkpoints of a different model (the checkpoint's model state does "
        "not fit the model (missing keys ['0.weight'"
    )
    assert message.endswith("); use an empty --dir")
    assert "\n" not in message
    assert saved == tch.latest_checkpoint(str(tmp_path))


def test_demo_logging_shows_info_lines_and_leaves_warnings_to_the_command() -> None:
    package_logger = logging.getLogger("torch_ckpt_hook")
    handlers, level = list(package_logger.handlers), package_logger.level
    stream = io.StringIO()

    with demo_logging(stream):
        logging.getLogger("torch_ckpt_hook._saver").info("Saved step %d", 5)
        logging.getLogger("torch_ckpt_hook._checkpoint_hook.tensorflow").info(
            "Calling checkpoint listeners before saving checkpoint %d...", 5
        )
        logging.getLogger("torch_ckpt_hook._saver").warning("reported by torch-ckpt itself")

    assert "Saved step 5\n" == stream.getvalue()
    assert (handlers, level) == (package_logger.handlers, package_logger.level)


def test_demo_shows_the_hooks_saves_but_not_its_listener_lines(tmp_path: pathlib.Path) -> None:
    stream = io.StringIO()

    with demo_logging(stream):
        run_demo(str(tmp_path), 2, save_every=100, out=io.StringIO())

    lines = stream.getvalue().splitlines()
    assert f"Saving checkpoints for 0 into {tmp_path}/model.ckpt." in lines
    assert f"Saving checkpoints for 2 into {tmp_path}/model.ckpt." in lines
    assert [] == [
        line for line in lines if line.startswith(("Calling checkpoint", "Create Checkpoint"))
    ]
