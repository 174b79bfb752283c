"""Staging the payload into reused host buffers, and the stream/event order of device copies."""

from __future__ import annotations

import contextlib
from collections import OrderedDict, namedtuple
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from torch_ckpt_hook import Saver, Session, load_checkpoint
from torch_ckpt_hook._copy_engine import DeviceCopyEngine, HostCopyEngine
from torch_ckpt_hook._staging import StagingArea

Pair = namedtuple("Pair", ["a", "b"])


class RecordingBackend:
    """A ``StreamBackend`` that logs every stream and event operation, for CPU tensors."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self._events = 0
        self.active = "current"

    def current_stream(self, device: torch.device) -> str:
        return "current"

    def new_stream(self, device: torch.device) -> str:
        return "side"

    def new_event(self) -> str:
        self._events += 1
        return f"event{self._events}"

    def record(self, event: str, stream: str) -> None:
        self.log.append(("record", event, stream))

    def stream_wait(self, stream: str, event: str) -> None:
        self.log.append(("wait", stream, event))

    @contextlib.contextmanager
    def use_stream(self, stream: str) -> Iterator[None]:
        self.log.append(("enter", stream))
        self.active = stream
        try:
            yield
        finally:
            self.active = "current"
            self.log.append(("exit", stream))

    def record_stream(self, tensor: torch.Tensor, stream: str) -> None:
        # Copies are synchronous on the CPU: the value is there once copy_ returned.
        self.log.append(("copied", float(tensor.sum()), self.active, stream))

    def synchronize(self, event: str) -> None:
        self.log.append(("host_sync", event))


def test_staging_keeps_the_payload_structure_and_detaches_tensors() -> None:
    weight = torch.ones(2, requires_grad=True)
    payload = {
        "model": OrderedDict(w=weight),
        "list": [1, (2.0, weight)],
        "pair": Pair(weight, None),
    }
    staged, fence = StagingArea().stage(payload)
    assert not fence.on_device
    assert isinstance(staged["model"], OrderedDict)
    assert isinstance(staged["pair"], Pair)
    assert [1, (2.0, staged["list"][1][1])] == staged["list"]
    assert not staged["model"]["w"].requires_grad
    assert torch.equal(weight.detach(), staged["pair"].a)


def test_staged_tensors_are_copies_that_in_place_updates_do_not_reach() -> None:
    weight = torch.arange(4.0)
    staged, _ = StagingArea().stage({"w": weight})
    weight.add_(100)
    assert torch.equal(torch.arange(4.0), staged["w"])


def test_buffers_are_allocated_once_and_reused_across_saves() -> None:
    area = StagingArea()
    weight = torch.zeros(1000)
    first, _ = area.stage({"w": weight, "step": torch.tensor(1.0)})
    pointer = first["w"].data_ptr()
    weight.fill_(7)
    second, _ = area.stage({"w": weight, "step": torch.tensor(2.0)})
    assert pointer == second["w"].data_ptr()
    assert torch.all(second["w"] == 7)
    assert 2.0 == second["step"].item()
    assert (1000 + 1) * 4 == area.nbytes


def test_a_changed_shape_or_dtype_reallocates_and_a_dropped_tensor_frees_its_buffer() -> None:
    area = StagingArea()
    first, _ = area.stage({"w": torch.zeros(4), "gone": torch.zeros(1000)})
    second, _ = area.stage({"w": torch.zeros(8, dtype=torch.float64)})
    assert (8,) == tuple(second["w"].shape)
    assert torch.float64 == second["w"].dtype
    assert first["w"].data_ptr() != second["w"].data_ptr()
    assert 8 * 8 == area.nbytes


def test_tied_weights_are_staged_once_and_stay_one_storage() -> None:
    shared = torch.ones(3)
    staged, _ = StagingArea().stage({"encoder": shared, "decoder": shared})
    assert staged["encoder"] is staged["decoder"]


def test_cpu_sources_are_copied_by_the_host_engine() -> None:
    fence = HostCopyEngine().copy([(torch.zeros(2), torch.ones(2))])
    assert not fence.on_device


def test_device_copies_run_on_the_side_stream_after_the_current_streams_work() -> None:
    backend = RecordingBackend()
    engine = DeviceCopyEngine(torch.device("cpu"), backend)
    a, b = torch.full((2,), 1.0), torch.full((3,), 2.0)
    dst_a, dst_b = torch.empty(2), torch.empty(3)

    fence = engine.copy([(dst_a, a), (dst_b, b)])

    assert [
        ("record", "event1", "current"),  # what the step enqueued ...
        ("wait", "side", "event1"),  # ... comes before the copies
        ("enter", "side"),
        ("copied", 2.0, "side", "side"),  # each source is kept alive for the side stream
        ("copied", 6.0, "side", "side"),
        ("exit", "side"),
        ("record", "event2", "side"),  # the fence: recorded after the last copy
    ] == backend.log
    assert torch.equal(a, dst_a)
    assert fence.on_device

    backend.log.clear()
    fence.wait_on_device()
    fence.wait_on_host()
    assert [("wait", "current", "event2"), ("host_sync", "event2")] == backend.log


def test_a_staging_area_groups_copies_per_device_engine() -> None:
    backend = RecordingBackend()
    engines: list[torch.device] = []

    def engine_for(device: torch.device) -> DeviceCopyEngine:
        engines.append(device)
        return DeviceCopyEngine(device, backend)

    area = StagingArea(engine_for)
    _, fence = area.stage({"a": torch.ones(1), "b": torch.ones(2)})
    area.stage({"a": torch.ones(1), "b": torch.ones(2)})
    assert [torch.device("cpu")] == engines, "one engine (one side stream) per device, kept"
    assert fence.on_device
    assert 2 == sum(1 for entry in backend.log if entry[0] == "record" and entry[2] == "side")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stage_into_reused_pinned_buffers() -> None:
    area = StagingArea()
    weight = torch.ones(1 << 20, device="cuda")
    first, fence = area.stage({"w": weight})
    fence.wait_on_device()  # what the session's guard does before the next in-place update
    weight.mul_(3)
    fence.wait_on_host()
    second, fence = area.stage({"w": weight})
    fence.wait_on_host()
    assert first["w"].is_pinned()
    assert first["w"].data_ptr() == second["w"].data_ptr()
    assert torch.all(second["w"] == 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_is_written_with_cpu_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(2, 2).cuda()
    path = Saver().save(Session(model), str(tmp_path / "model.ckpt"), 0)
    loaded = torch.load(path, weights_only=True)  # no map_location: the file itself is on the CPU
    assert "cpu" == loaded["model"]["weight"].device.type
    assert "cpu" == load_checkpoint(path)["model"]["bias"].device.type
