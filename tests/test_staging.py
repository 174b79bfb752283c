"""Staging the payload into reused host buffers, and the stream/event order of device copies."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from torch_ckpt_hook import Saver, Session, load_checkpoint
from torch_ckpt_hook._copy_engine import DeviceCopyEngine, HostCopyEngine
from torch_ckpt_hook._payload_check import MAX_DEPTH
from torch_ckpt_hook._staging import StagingArea

Pair = namedtuple("Pair", ["a", "b"])
Outer = namedtuple("Outer", ["inner", "tag"])


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


@dataclasses.dataclass
class Progress:
    """A mutable object in the payload (an allowlisted class, or anything staging is given)."""

    epoch: int
    seen: list[int]


class TaggedDict(dict):  # type: ignore[type-arg]
    """A dict subclass with an attribute, built without calling its __init__."""

    def __init__(self, tag: str, **items: Any) -> None:
        super().__init__(**items)
        self.tag = tag


def test_a_counter_is_staged_as_an_equal_counter() -> None:
    counts = collections.Counter({"a": 3, "b": 1})
    staged, _ = StagingArea().stage({"counts": counts})
    assert collections.Counter is type(staged["counts"])
    assert collections.Counter({"a": 3, "b": 1}) == staged["counts"]


def test_a_defaultdict_keeps_its_type_default_factory_and_contents() -> None:
    buckets = collections.defaultdict(list, {"a": [1, 2]})
    staged, _ = StagingArea().stage({"buckets": buckets})
    assert collections.defaultdict is type(staged["buckets"])
    assert list is staged["buckets"].default_factory
    assert {"a": [1, 2]} == dict(staged["buckets"])
    assert [] == staged["buckets"]["missing"]


def test_an_ordered_dict_keeps_its_order_and_a_state_dicts_metadata() -> None:
    ordered = OrderedDict([("z", 1), ("a", 2), ("m", 3)])
    model_state = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.BatchNorm1d(1)).state_dict()
    staged, _ = StagingArea().stage({"ordered": ordered, "model": model_state})
    assert ["z", "a", "m"] == list(staged["ordered"])
    assert list(model_state) == list(staged["model"])
    # load_state_dict reads the per-module versions from _metadata (BatchNorm's upgrades).
    assert model_state._metadata == staged["model"]._metadata
    assert model_state._metadata is not staged["model"]._metadata


def test_nested_namedtuples_stay_namedtuples_with_staged_tensors() -> None:
    weight = torch.zeros(3)
    payload = {"batches": [Outer(Pair(weight, [1, 2]), "first")]}
    staged, _ = StagingArea().stage(payload)
    outer = staged["batches"][0]
    assert Outer is type(outer)
    assert Pair is type(outer.inner)
    assert "first" == outer.tag
    weight.add_(1)
    payload["batches"][0].inner.b.append(3)
    assert torch.equal(torch.zeros(3), outer.inner.a)
    assert [1, 2] == outer.inner.b


def test_a_dict_subclass_keeps_its_type_and_attributes() -> None:
    tagged = TaggedDict("run-1", a=1, b=[2])
    staged, _ = StagingArea().stage({"tagged": tagged})
    assert TaggedDict is type(staged["tagged"])
    assert {"a": 1, "b": [2]} == staged["tagged"]
    assert "run-1" == staged["tagged"].tag
    tagged["b"].append(3)
    assert [2] == staged["tagged"]["b"]


# name -> (a fresh value, a mutation made right after stage(), how to compare)
MUTATIONS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "set": (lambda: {1, 2}, lambda v: v.add(3)),
    "bytearray": (lambda: bytearray(b"ab"), lambda v: v.__setitem__(0, ord("z"))),
    "list": (lambda: [1, [2]], lambda v: (v.append(3), v[1].append(4))),
    "dict": (lambda: {"a": 1, "b": {"c": 2}}, lambda v: (v["b"].update(c=5), v.update(d=1))),
    "Counter": (lambda: collections.Counter(a=1), lambda v: v.update(a=5)),
    "defaultdict": (lambda: collections.defaultdict(list, a=[1]), lambda v: v["a"].append(2)),
    "OrderedDict": (lambda: OrderedDict(a=[1]), lambda v: (v["a"].append(2), v.move_to_end("a"))),
    "list in a tuple": (lambda: (1, [2]), lambda v: v[1].append(3)),
    "object": (lambda: Progress(1, [10]), lambda v: (setattr(v, "epoch", 2), v.seen.append(11))),
    "numpy array": (lambda: np.zeros(2), lambda v: v.__setitem__(0, 9.0)),
}


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, np.ndarray):
        return bool(np.array_equal(expected, actual))
    return type(expected) is type(actual) and expected == actual


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_value_mutated_right_after_stage_is_staged_as_it_was_at_the_call(name: str) -> None:
    make, mutate = MUTATIONS[name]
    value = make()
    staged, _ = StagingArea().stage({"extra_state": {"x": value}})
    mutate(value)
    assert _same(make(), staged["extra_state"]["x"]), (
        f"{name}: the staged copy follows the live value: {staged['extra_state']['x']!r}"
    )


def test_tensors_inside_any_container_are_staged_copies() -> None:
    weight = torch.zeros(2)
    payload = {
        "counter": collections.Counter({"w": weight}),
        "buckets": collections.defaultdict(list, {"w": [weight]}),
        "members": {weight},
    }
    staged, _ = StagingArea().stage(payload)
    weight.add_(1)
    (member,) = staged["members"]
    for copy in (staged["counter"]["w"], staged["buckets"]["w"][0], member):
        assert torch.equal(torch.zeros(2), copy)
    assert staged["counter"]["w"] is member, "one tensor, one staged copy"


def test_immutable_values_are_shared_and_mutable_ones_copied() -> None:
    text, blob, items = "x" * 1000, b"y" * 1000, [1, 2]
    staged, _ = StagingArea().stage({"text": text, "blob": blob, "items": items})
    assert text is staged["text"]
    assert blob is staged["blob"]
    assert items is not staged["items"]


def test_a_container_met_twice_is_copied_once_and_stays_shared() -> None:
    shared: Any = [1]
    for _ in range(16):
        shared = [shared, shared]  # 65536 paths, 17 lists: copied once each
    staged, _ = StagingArea().stage({"a": shared, "b": shared})
    assert staged["a"] is staged["b"]
    assert staged["a"][0] is staged["a"][1]
    assert staged["a"] is not shared


def test_a_value_that_cannot_be_copied_is_a_type_error_naming_its_place() -> None:
    with pytest.raises(
        TypeError,
        match=r"^cannot stage extra_state\['sync'\]\['lock'\]: a _thread\.lock could not be copied \(TypeError: cannot pickle '_thread\.lock' object\); store a tensor or a Python number/str/list/dict instead$",
    ):
        StagingArea().stage({"extra_state": {"sync": {"lock": threading.Lock()}}})


def test_a_reference_cycle_is_a_type_error_not_a_recursion_error() -> None:
    loop: list[Any] = []
    loop.append({"back": loop})
    with pytest.raises(
        TypeError,
        match=r"^cannot stage extra_state\['loop'\]\[0\]\['back'\]: it is extra_state\['loop'\] again, a list that contains itself \(a reference cycle\)",
    ):
        StagingArea().stage({"extra_state": {"loop": loop}})


def test_nesting_deeper_than_the_limit_is_a_type_error() -> None:
    value: Any = torch.ones(1)
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    StagingArea().stage({"x": value})  # at the limit: staged
    with pytest.raises(TypeError, match=rf"nested more than {MAX_DEPTH} containers deep"):
        StagingArea().stage({"x": [value]})


class _Counts:
    """An extra_state entry whose state is a Counter, as a vocabulary or a sampler keeps."""

    def __init__(self) -> None:
        self.counts = collections.Counter({"the": 5, "a": 2})

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"]


def test_a_counter_in_extra_state_is_written_as_the_same_counter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    counts = _Counts()
    session = Session(torch.nn.Linear(1, 1), extra_state={"vocab": counts})
    handle = Saver().save(session, str(tmp_path / "model.ckpt"), 0, blocking=False)
    counts.counts["the"] += 100  # training goes on while the file is written
    loaded = load_checkpoint(handle.result())["extra_state"]["vocab"]["counts"]
    assert collections.Counter is type(loaded)
    assert collections.Counter({"the": 5, "a": 2}) == loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_inside_a_counter_or_a_defaultdict_stage_into_pinned_buffers() -> None:
    weight = torch.zeros(1 << 10, device="cuda")
    payload = {
        "counter": collections.Counter({"w": weight}),
        "buckets": collections.defaultdict(list, {"w": [weight]}),
    }
    staged, fence = StagingArea().stage(payload)
    fence.wait_on_device()
    weight.add_(1)
    fence.wait_on_host()
    assert staged["counter"]["w"] is staged["buckets"]["w"][0], "one tensor, one buffer"
    assert staged["counter"]["w"].is_pinned()
    assert torch.equal(torch.zeros(1 << 10), staged["counter"]["w"])
