"""Shared fixtures: a controllable clock and small training setups."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch


class FakeClock:
    """A ``time.time`` replacement the test advances by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:  # 0.25 s steps stay exact
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "time", fake)
    return fake


@pytest.fixture
def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def make_train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[], dict[str, torch.Tensor]]:
    """A step function that does one SGD update on a fixed batch and returns its loss."""
    inputs = torch.ones(4, 3)
    targets = torch.zeros(4, 1)

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return step


def call_within(
    seconds: float, call: Callable[[], Any], on_timeout: Callable[[], None] | None = None
) -> Any:
    """``call()``'s result (or its exception), failing the test rather than hanging it.

    A call still running after ``seconds`` blocked (on a FIFO, a device): ``on_timeout`` may
    unblock it (open the FIFO's other end) before the test fails.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        if on_timeout is not None:
            on_timeout()
            worker.join(seconds)
        pytest.fail(f"still running after {seconds} s: it blocked")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
