"""Session: the global step counter, the payload, and restoring every part of it."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from conftest import make_train_step

from torch_ckpt_hook import Session
from torch_ckpt_hook._session import FORMAT_VERSION, PAYLOAD_KEYS


class Counter:
    """A minimal stateful extra: anything with state_dict() and load_state_dict()."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def test_global_step_counts_optimizer_steps(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    step = make_train_step(model, optimizer)
    for _ in range(3):
        session.run(step)
    assert session.global_step == 3


def test_global_step_counts_updates_not_micro_batches_with_gradient_accumulation(
    model_and_optimizer,  # type: ignore[no-untyped-def]
) -> None:
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    accumulate = 4

    def micro_batch(index: int) -> None:
        model(torch.ones(2, 3)).sum().backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()

    for index in range(10):
        session.run(micro_batch, index)
    assert session.global_step == 2


def test_global_step_counts_one_per_run_without_optimizer() -> None:
    session = Session(torch.nn.Linear(1, 1), global_step=7)
    assert session.run(lambda x: x, "ok") == "ok"
    assert session.global_step == 8


def test_global_step_does_not_advance_when_the_step_function_raises() -> None:
    session = Session(torch.nn.Linear(1, 1))

    def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        session.run(failing)
    assert session.global_step == 0


def test_close_stops_counting_optimizer_steps(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    session.close()
    session.close()
    optimizer.step()
    assert session.global_step == 0


def test_global_step_is_settable_and_validated() -> None:
    session = Session(torch.nn.Linear(1, 1))
    session.global_step = 42
    assert session.global_step == 42
    with pytest.raises(ValueError, match=r"^global_step must be a non-negative int, got -1$"):
        session.global_step = -1
    with pytest.raises(
        TypeError, match=r"^global_step must be a non-negative int, got 1\.5 \(a float\)$"
    ):
        session.global_step = 1.5  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "net"}, TypeError, r"^model must be a torch\.nn\.Module, got str$"),
        (
            {"optimizer": object()},
            TypeError,
            r"^optimizer must be a torch\.optim\.Optimizer or None, got object$",
        ),
        ({"extra_state": [1]}, TypeError, r"^extra_state must be a dict of name -> object"),
        (
            {"extra_state": {"sched": 3}},
            TypeError,
            r"^extra_state\['sched'\] must have a state_dict\(\) method, got int",
        ),
        (
            {"global_step": True},
            TypeError,
            r"^global_step must be a non-negative int, got True \(a bool\)$",
        ),
        ({"global_step": -5}, ValueError, r"^global_step must be a non-negative int, got -5$"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    arguments = {"model": torch.nn.Linear(1, 1), **kwargs}
    with pytest.raises(error, match=message):
        Session(**arguments)


def test_state_dict_is_the_payload(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer, extra_state={"counter": Counter()}, global_step=3)
    payload = session.state_dict()
    assert list(PAYLOAD_KEYS) == list(payload)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["global_step"] == 3
    assert model.state_dict().keys() == payload["model"].keys()
    assert optimizer.state_dict()["param_groups"] == payload["optimizer"]["param_groups"]
    assert payload["extra_state"] == {"counter": {"value": 0}}
    assert {"python", "numpy", "torch", "cuda"} == set(payload["rng"])


def test_payload_without_optimizer_holds_none() -> None:
    assert Session(torch.nn.Linear(1, 1)).state_dict()["optimizer"] is None


def _round_trip(payload: dict) -> dict:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]


def test_payload_loads_with_weights_only_and_restores_everything() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counter = Counter()
    session = Session(model, optimizer, extra_state={"sched": scheduler, "counter": counter})

    def step() -> None:
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()

    session.run(step)
    counter.value = 11
    random.seed(5)
    np.random.seed(5)
    saved = _round_trip(session.state_dict())
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    expected_params = [p.detach().clone() for p in model.parameters()]

    session.run(step)
    counter.value = 99
    session.load_state_dict(saved)

    assert session.global_step == 1
    assert counter.value == 11
    assert scheduler.get_last_lr() == [0.005]
    for expected, actual in zip(expected_params, model.parameters(), strict=True):
        assert torch.equal(expected, actual)
    assert expected_draws == (random.random(), float(np.random.rand()), torch.rand(1).item())


def test_load_state_dict_rejects_a_payload_missing_keys_before_changing_anything() -> None:
    model = torch.nn.Linear(1, 1)
    session = Session(model, global_step=4)
    payload = session.state_dict()
    del payload["rng"]
    payload["global_step"] = 9
    with pytest.raises(ValueError, match=r"it lacks the keys \['rng'\]"):
        session.load_state_dict(payload)
    assert session.global_step == 4


def test_load_state_dict_rejects_an_unknown_format_version() -> None:
    session = Session(torch.nn.Linear(1, 1))
    payload = {**session.state_dict(), "format_version": 2}
    with pytest.raises(
        ValueError,
        match=r"format_version 2; this version of torch_ckpt_hook reads format_version 1",
    ):
        session.load_state_dict(payload)


def test_load_state_dict_names_missing_extra_state() -> None:
    saved = Session(torch.nn.Linear(1, 1)).state_dict()
    session = Session(torch.nn.Linear(1, 1), extra_state={"counter": Counter()})
    with pytest.raises(
        ValueError, match=r"no state for the session's extra_state entries \['counter'\]"
    ):
        session.load_state_dict(saved)


def test_load_state_dict_needs_optimizer_state_when_the_session_has_an_optimizer(
    model_and_optimizer,  # type: ignore[no-untyped-def]
) -> None:
    model, optimizer = model_and_optimizer
    saved = Session(torch.nn.Linear(3, 1)).state_dict()
    with pytest.raises(ValueError, match="holds no optimizer state"):
        Session(model, optimizer).load_state_dict(saved)
