"""The guard that makes the next in-place update wait on the device for a save's copies.

A recording fence stands in for the CUDA event: these tests check *when* the session waits on it,
which is the part of the CUDA path that is logic rather than hardware.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
import torch

from torch_ckpt_hook import Saver, Session
from torch_ckpt_hook._copy_engine import DeviceCopyEngine
from torch_ckpt_hook._staging import StagingArea


class RecordingFence:
    on_device = True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def wait_on_host(self) -> None:
        self.log.append("host wait")

    def wait_on_device(self) -> None:
        self.log.append("device wait")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()


def test_the_first_buffer_update_in_forward_waits_on_the_device_then_nothing_else_does() -> None:
    log: list[str] = []
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(model, optimizer)
    # Registered before the guard's hook; the guard prepends, so it still runs first.
    model[1].register_forward_pre_hook(lambda *_: log.append("batchnorm forward"))
    optimizer.register_step_pre_hook(lambda *_: log.append("optimizer step"))

    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.run(_step, model, optimizer)

    assert ["device wait", "batchnorm forward", "optimizer step"] == log


def test_without_buffers_the_optimizer_step_waits() -> None:
    log: list[str] = []

    class LoggingAdamW(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:
            log.append("optimizer step")
            return super().step(closure)

    model = torch.nn.Linear(3, 1)
    optimizer = LoggingAdamW(model.parameters())
    session = Session(model, optimizer)

    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.run(_step, model, optimizer)

    assert ["device wait", "optimizer step"] == log


def test_the_hooks_are_gone_at_the_step_after_the_wait() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(model, optimizer)
    before = (len(model[1]._forward_pre_hooks), len(optimizer._optimizer_step_pre_hooks))

    session.protect_until_copied(RecordingFence([]), coarse=False)
    assert 1 == len(model[1]._forward_pre_hooks) - before[0]
    session.run(_step, model, optimizer)  # the wait happens inside this step
    session.run(_step, model, optimizer)  # and the hooks go at the start of the next one

    assert before == (len(model[1]._forward_pre_hooks), len(optimizer._optimizer_step_pre_hooks))


def test_without_an_optimizer_the_next_step_waits_before_it_starts() -> None:
    log: list[str] = []
    session = Session(torch.nn.Linear(1, 1))
    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.run(lambda: log.append("step"))
    session.run(lambda: log.append("step"))
    assert ["device wait", "step", "step"] == log


def test_coarse_mode_waits_before_the_step_even_with_an_optimizer() -> None:
    log: list[str] = []
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(model, optimizer)
    session.protect_until_copied(RecordingFence(log), coarse=True)
    session.run(lambda: log.append("step"))
    assert ["device wait", "step"] == log


def test_a_restore_and_a_close_wait_for_pending_copies() -> None:
    log: list[str] = []
    model = torch.nn.Linear(1, 1)
    session = Session(model, torch.optim.SGD(model.parameters(), lr=0.1))
    payload = session.state_dict()
    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.load_state_dict(payload)
    assert ["device wait"] == log

    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.close()
    assert ["device wait", "device wait"] == log
    assert 0 == len(session.optimizer._optimizer_step_pre_hooks)  # type: ignore[union-attr]


def test_a_new_save_settles_the_previous_fence_first() -> None:
    log: list[str] = []
    session = Session(torch.nn.Linear(1, 1))
    session.protect_until_copied(RecordingFence(log), coarse=False)
    session.protect_until_copied(RecordingFence(log), coarse=False)
    assert ["device wait"] == log


class GatedBackend:
    """Device copies whose completion the test controls: ``synchronize`` waits for ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.log: list[str] = []

    def current_stream(self, device: torch.device) -> str:
        return "current"

    def new_stream(self, device: torch.device) -> str:
        return "side"

    def new_event(self) -> object:
        return object()

    def record(self, event: Any, stream: str) -> None:
        pass

    def stream_wait(self, stream: str, event: Any) -> None:
        self.log.append(f"{stream} waits")

    def use_stream(self, stream: str) -> Any:
        return contextlib.nullcontext()

    def record_stream(self, tensor: torch.Tensor, stream: str) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        self.log.append("writer waits for the copies")
        assert self.done.wait(30)


def test_the_writer_waits_for_the_copies_before_writing_and_training_never_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = GatedBackend()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(model, optimizer)
    saver = Saver()
    saver._staging = StagingArea(lambda device: DeviceCopyEngine(device, backend))

    handle = saver.save(session, str(tmp_path / "model.ckpt"), 1, blocking=False)
    session.run(_step, model, optimizer)  # training goes on: only the device would wait
    assert not handle.done()
    assert not (tmp_path / "model.ckpt-1").exists()

    backend.done.set()
    assert str(tmp_path / "model.ckpt-1") == handle.result(30)
    # The writer thread and the training thread run concurrently: only the first entry is ordered.
    assert "side waits" == backend.log[0]
    assert ["current waits", "writer waits for the copies"] == sorted(backend.log[1:])


def test_every_optimizer_step_waits_until_the_first_wait() -> None:
    log: list[str] = []
    torch.manual_seed(0)
    generator, discriminator = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    opt_g = torch.optim.Adam(generator.parameters())
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    model = torch.nn.ModuleDict({"g": generator, "d": discriminator})
    session = Session(model, [opt_g, opt_d])

    def step() -> None:
        # The discriminator steps first: its step, not the first optimizer's, must wait.
        opt_d.zero_grad()
        discriminator(generator(torch.randn(4, 2)).detach()).mean().backward()
        opt_d.step()
        opt_g.zero_grad()
        discriminator(generator(torch.randn(4, 2))).mean().backward()
        opt_g.step()

    session.protect_until_copied(RecordingFence(log), coarse=False)
    # Registered after the guard's hooks, so they run after them.
    opt_d.register_step_pre_hook(lambda *_: log.append("discriminator step"))
    opt_g.register_step_pre_hook(lambda *_: log.append("generator step"))
    session.run(step)
    assert ["device wait", "discriminator step", "generator step"] == log
    session.run(lambda: None)
    # Only the test's own pre-hooks are left once the wait has happened.
    assert (1, 1) == (len(opt_g._optimizer_step_pre_hooks), len(opt_d._optimizer_step_pre_hooks))


def test_a_compiled_model_waits_in_the_wrappers_hook_and_hooks_nothing_inside() -> None:
    try:
        torch.compile(torch.nn.Linear(1, 1), backend="eager")(torch.ones(1, 1))
    except Exception as err:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile(backend='eager') is unavailable here: {err}")
    log: list[str] = []
    model = _model()
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    session = Session(compiled, optimizer)  # type: ignore[arg-type]
    inner_hooks = [len(m._forward_pre_hooks) for m in model.modules()]

    session.protect_until_copied(RecordingFence(log), coarse=False)
    assert inner_hooks == [len(m._forward_pre_hooks) for m in model.modules()]
    assert 1 == len(compiled._forward_pre_hooks)
    session.run(_step, compiled, optimizer)
    assert ["device wait"] == log
