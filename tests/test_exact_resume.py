"""Exact resume: 2N steps straight equal N steps, a stop, a resume and N more, bit for bit.

SPEC.md §3, Exact resume: the checkpoint carries the global step, the RNG states (Python, NumPy,
torch CPU, every CUDA device) and every ``extra_state`` object, so with deterministic ops and data
that depends only on the global step, a resumed run is the straight run. The step here draws from
every generator a training step typically touches: dropout and ``torch.rand`` (torch's generator
on the model's device), ``random.random()`` and NumPy's global generator; the LR scheduler lives
in ``extra_state``. The resumed half uses new model, optimizer and scheduler objects, built from
another seed, after every RNG was reseeded: only the checkpoint can make the runs agree.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch

np: Any
try:
    import numpy as np
except ImportError:  # pragma: no cover - NumPy is optional
    np = None

N = 5

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


@dataclasses.dataclass
class Training:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def _build(seed: int, device: str) -> Training:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(p=0.3),
        torch.nn.Linear(32, 1),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    # step_size 3 with N = 5: the learning rate changes on both sides of the resume.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return Training(model, optimizer, scheduler)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too
    if np is not None:
        np.random.seed(seed)


def _train(
    training: Training,
    device: str,
    checkpoint_dir: pathlib.Path,
    last_step: int,
    crash_after: int | None = None,
) -> int:
    """Train until ``last_step`` (from whatever the directory restores); the final global step.

    With ``crash_after``, the loop raises after that step, so ``end()`` writes no final save.
    """
    with tch.MonitoredTrainingSession(
        training.model,
        training.optimizer,
        checkpoint_dir=str(checkpoint_dir),
        save_checkpoint_steps=N,
        log_step_count_steps=0,
        extra_state={"scheduler": training.scheduler},
        hooks=[tch.StopAtStepHook(last_step=last_step)],
    ) as sess:
        step = _make_step(training, device, lambda: sess.global_step)
        while not sess.should_stop():
            sess.run(step)
            if sess.global_step == crash_after:
                raise _Crash
    return sess.global_step


class _Crash(Exception):
    pass


def _make_step(
    training: Training, device: str, global_step: Callable[[], int]
) -> Callable[[], None]:
    def step() -> None:
        # The batch depends only on the global step; the noise on the RNG states.
        batch = torch.Generator().manual_seed(1000 + global_step())
        inputs = torch.randn(16, 6, generator=batch).to(device)
        targets = torch.randn(16, 1, generator=batch).to(device)
        noise = torch.rand(16, 6, device=device) * random.random()
        if np is not None:
            noise = noise + float(np.random.rand())
        training.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(training.model(inputs + noise), targets)
        loss.backward()
        training.optimizer.step()
        training.scheduler.step()

    return step


def _rng_states(device: str) -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device == "cuda":
        states["cuda"] = torch.cuda.get_rng_state()
    if np is not None:
        states["numpy"] = np.random.get_state(legacy=False)
    return states


def _assert_identical(expected: Training, actual: Training) -> None:
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(tensor, actual.model.state_dict()[name]), f"parameter {name} differs"
    expected_opt = expected.optimizer.state_dict()
    actual_opt = actual.optimizer.state_dict()
    assert expected_opt["param_groups"] == actual_opt["param_groups"]
    assert expected_opt["state"].keys() == actual_opt["state"].keys()
    assert expected_opt["state"], "AdamW has state after its steps"
    for index, state in expected_opt["state"].items():
        assert state.keys() == actual_opt["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, actual_opt["state"][index][key]), (
                f"optimizer state[{index}][{key!r}] differs"
            )
    assert expected.scheduler.state_dict() == actual.scheduler.state_dict()


def _assert_same_rng_states(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert expected.keys() == actual.keys()
    assert expected["python"] == actual["python"]
    assert torch.equal(expected["torch"], actual["torch"])
    if "cuda" in expected:
        assert torch.equal(expected["cuda"], actual["cuda"])
    if "numpy" in expected:
        assert expected["numpy"]["state"]["pos"] == actual["numpy"]["state"]["pos"]
        assert (expected["numpy"]["state"]["key"] == actual["numpy"]["state"]["key"]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop", ["clean stop", "crash after a periodic save"])
def test_resuming_from_a_checkpoint_is_bit_identical_to_training_straight(
    tmp_path: pathlib.Path, device: str, stop: str
) -> None:
    straight = _build(seed=0, device=device)
    _seed_everything(1)
    assert 2 * N == _train(straight, device, tmp_path / "straight", last_step=2 * N)
    straight_rng = _rng_states(device)

    first = _build(seed=0, device=device)
    _seed_everything(1)
    if stop == "clean stop":
        assert N == _train(first, device, tmp_path / "resumed", last_step=N)
    else:
        # Two steps past the checkpoint at N are lost in the crash, and redone after the resume.
        with pytest.raises(_Crash):
            _train(first, device, tmp_path / "resumed", last_step=2 * N, crash_after=N + 2)
    assert str(tmp_path / "resumed" / f"model.ckpt-{N}") == tch.latest_checkpoint(
        str(tmp_path / "resumed")
    )

    _seed_everything(999)  # as a new process would: the RNG states must come from the checkpoint
    resumed = _build(seed=7, device=device)
    assert not torch.equal(
        straight.model.state_dict()["0.weight"], resumed.model.state_dict()["0.weight"]
    )
    assert 2 * N == _train(resumed, device, tmp_path / "resumed", last_step=2 * N)

    _assert_identical(straight, resumed)
    _assert_same_rng_states(straight_rng, _rng_states(device))
    payload = tch.load_checkpoint(str(tmp_path / "resumed" / f"model.ckpt-{2 * N}"))
    assert 2 * N == payload["global_step"]
    straight_payload = tch.load_checkpoint(str(tmp_path / "straight" / f"model.ckpt-{2 * N}"))
    for name, tensor in straight_payload["model"].items():
        assert torch.equal(tensor, payload["model"][name]), f"saved parameter {name} differs"


@dataclasses.dataclass
class Gan:
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    # Plain values in extra_state (SPEC §5.3), updated in place by the step.
    stats: dict[str, Any]


def _build_gan(seed: int) -> Gan:
    torch.manual_seed(seed)
    generator = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(p=0.2), torch.nn.Linear(16, 6)
    )
    discriminator = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1)
    )
    return Gan(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), lr=0.01, betas=(0.5, 0.999)),
        torch.optim.AdamW(discriminator.parameters(), lr=0.02, betas=(0.5, 0.999)),
        {"best_d_loss": float("inf"), "d_steps": 0},
    )


def _train_gan(gan: Gan, checkpoint_dir: pathlib.Path, last_step: int) -> int:
    model = torch.nn.ModuleDict({"g": gan.generator, "d": gan.discriminator})
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with tch.MonitoredTrainingSession(
        model,
        [gan.opt_g, gan.opt_d],  # type: ignore[arg-type]
        checkpoint_dir=str(checkpoint_dir),
        save_checkpoint_steps=N,
        log_step_count_steps=0,
        extra_state={"stats": gan.stats},
        hooks=[tch.StopAtStepHook(last_step=last_step)],
    ) as sess:

        def step() -> None:
            batch = torch.Generator().manual_seed(1000 + sess.global_step)
            real = torch.randn(8, 6, generator=batch)
            for _ in range(2):  # the discriminator steps twice per counted generator step
                fake = gan.generator(torch.randn(8, 4)).detach()
                gan.opt_d.zero_grad()
                d_loss = bce(gan.discriminator(real), torch.ones(8, 1)) + bce(
                    gan.discriminator(fake), torch.zeros(8, 1)
                )
                d_loss.backward()
                gan.opt_d.step()
                gan.stats["d_steps"] += 1
                gan.stats["best_d_loss"] = min(gan.stats["best_d_loss"], d_loss.item())
            gan.opt_g.zero_grad()
            g_loss = bce(gan.discriminator(gan.generator(torch.randn(8, 4))), torch.ones(8, 1))
            g_loss.backward()
            gan.opt_g.step()

        while not sess.should_stop():
            sess.run(step)
    return sess.global_step


def _assert_same_optimizer(expected: torch.optim.Optimizer, actual: torch.optim.Optimizer) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert want["state"], "Adam has state after its steps"
    for index, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got["state"][index][key]), f"state[{index}][{key!r}] differs"


def test_a_gan_with_two_optimizers_resumes_bit_identically(tmp_path: pathlib.Path) -> None:
    straight = _build_gan(seed=0)
    _seed_everything(1)
    assert 2 * N == _train_gan(straight, tmp_path / "straight", last_step=2 * N)

    first = _build_gan(seed=0)
    _seed_everything(1)
    assert N == _train_gan(first, tmp_path / "resumed", last_step=N)
    payload = tch.load_checkpoint(str(tmp_path / "resumed" / f"model.ckpt-{N}"))
    assert 2 == len(payload["optimizer"])
    assert {"best_d_loss": first.stats["best_d_loss"], "d_steps": 2 * N} == payload["extra_state"][
        "stats"
    ]

    _seed_everything(999)
    resumed = _build_gan(seed=7)
    stats = resumed.stats
    assert 2 * N == _train_gan(resumed, tmp_path / "resumed", last_step=2 * N)

    assert stats is resumed.stats
    assert straight.stats == resumed.stats
    assert 4 * N == resumed.stats["d_steps"]
    for expected, actual in [
        (straight.generator, resumed.generator),
        (straight.discriminator, resumed.discriminator),
    ]:
        for name, tensor in expected.state_dict().items():
            assert torch.equal(tensor, actual.state_dict()[name]), f"parameter {name} differs"
    _assert_same_optimizer(straight.opt_g, resumed.opt_g)
    _assert_same_optimizer(straight.opt_d, resumed.opt_d)
