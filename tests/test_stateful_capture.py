"""Capturing extra_state without host syncs (``_stateful_capture``), and the save path's syncs.

On the CPU the logic runs against real ``GradScaler``s: a CPU scaler (its state stays plain
numbers), a disabled one, and one whose tensors are on the ``meta`` device, which stands in for
an accelerator: a meta tensor has no value, so any ``.item()`` on it fails, which is exactly
what a sync-free capture must never call. The sync count itself needs CUDA.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from torch_ckpt_hook import Saver, Session, load_checkpoint
from torch_ckpt_hook._staging import StagingArea
from torch_ckpt_hook._stateful_capture import (
    capture_state,
    loadable_state,
    needs_coarse_guard,
    scaler_state,
)


def stepped_scaler(device: str = "cpu") -> torch.amp.GradScaler:
    """A scaler after one optimizer step, so its scale and growth tracker tensors exist."""
    scaler = torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=7)
    model = torch.nn.Linear(2, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(1, 2, device=device)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    return scaler


def test_a_cpu_scaler_is_captured_by_its_own_state_dict() -> None:
    scaler = stepped_scaler()
    assert scaler.state_dict() == capture_state(scaler)
    assert isinstance(capture_state(scaler)["scale"], float)


def test_a_disabled_scaler_captures_nothing() -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert {} == capture_state(scaler)
    assert {} == scaler_state(scaler, as_tensors=True)


def test_the_tensor_capture_holds_the_same_values_as_state_dict() -> None:
    scaler = stepped_scaler()
    captured = scaler_state(scaler, as_tensors=True)
    assert {key: torch.is_tensor(value) for key, value in captured.items()} == {
        "scale": True,
        "growth_factor": False,
        "backoff_factor": False,
        "growth_interval": False,
        "_growth_tracker": True,
    }
    as_numbers = {k: v.item() if torch.is_tensor(v) else v for k, v in captured.items()}
    assert scaler.state_dict() == as_numbers


def test_a_scaler_before_its_first_step_is_captured_as_its_initial_numbers() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    assert scaler.state_dict() == scaler_state(scaler, as_tensors=True)


def test_a_scaler_on_an_accelerator_is_captured_without_item() -> None:
    scaler = stepped_scaler()
    # Stand-ins for device tensors: a meta tensor's .item() raises, as a sync must never happen.
    scaler._scale = torch.empty((), device="meta")
    scaler._growth_tracker = torch.empty((), dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError):
        scaler.state_dict()  # torch's own calls .item()
    captured = capture_state(scaler)
    assert "meta" == captured["scale"].device.type
    assert captured["_growth_tracker"].device.type == "meta"
    assert 7 == captured["growth_interval"]


def test_a_scaler_subclass_with_its_own_state_dict_keeps_it() -> None:
    class Custom(torch.amp.GradScaler):
        def state_dict(self) -> dict[str, object]:
            return {**super().state_dict(), "mine": 1}

    scaler = Custom("cpu")
    assert 1 == capture_state(scaler)["mine"]
    scaler._scale = torch.empty((), device="meta")
    with pytest.raises(RuntimeError):
        capture_state(scaler)  # its own state_dict ran, never the sync-free path


def test_other_objects_are_captured_by_their_state_dict() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    assert scheduler.state_dict() == capture_state(scheduler)


def test_loadable_state_turns_captured_tensors_back_into_numbers() -> None:
    scaler = stepped_scaler()
    captured = scaler_state(scaler, as_tensors=True)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(loadable_state(restored, captured))
    assert isinstance(restored.get_scale(), float)
    assert scaler.state_dict() == restored.state_dict()
    other = {"scale": torch.tensor(3.0)}
    assert other is loadable_state(object(), other), "only a GradScaler's state is converted"


def test_a_session_restores_a_scaler_saved_with_tensors(tmp_path: pathlib.Path) -> None:
    scaler = stepped_scaler()
    model = torch.nn.Linear(2, 1)
    session = Session(model, torch.optim.SGD(model.parameters(), lr=0.1), extra_state={"s": scaler})
    payload = session.state_dict()
    payload["extra_state"]["s"] = scaler_state(scaler, as_tensors=True)  # as on CUDA
    fresh = torch.amp.GradScaler("cpu")
    other = Session(model, torch.optim.SGD(model.parameters(), lr=0.1), extra_state={"s": fresh})
    path = tmp_path / "model.ckpt-0"
    Saver().storage.write(str(path), payload)
    other.load_state_dict(load_checkpoint(path))
    assert scaler.state_dict() == fresh.state_dict()
    assert isinstance(fresh.get_scale(), float)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_a_cuda_session_with_a_scaler_makes_no_host_sync() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 1)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(8, 64, device="cuda")).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    session = Session(model, optimizer, extra_state={"scaler": scaler})
    area = StagingArea()
    torch.cuda.synchronize()
    # Everything the training thread does in Saver.save for a device state: the payload (RNG
    # states, the state-dict walk, the scaler), and the staging copies with record_stream.
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = session.state_dict()
        payload, fence = area.stage(state)
        # The scaler's tensors are private snapshots: the fine-grained guard suffices.
        assert not needs_coarse_guard(state["extra_state"])
        session.protect_until_copied(fence, coarse=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fence.wait_on_host()
    assert torch.equal(model[0].weight.detach().cpu(), payload["model"]["0.weight"])
    assert scaler.get_scale() == payload["extra_state"]["scaler"]["scale"].item()
