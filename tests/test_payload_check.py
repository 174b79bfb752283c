"""The save-time check: a payload value that ``weights_only`` loading refuses is a TypeError.

SPEC.md §5.1, "Committed means restorable". The parity test is the one that keeps the checker
honest across torch versions: for every kind of value, the checker's verdict must be what a real
round trip says, through what the ``Saver`` does (stage, ``torch.save``, ``torch.load`` with
``weights_only=True``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import fractions
import io
import pathlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._payload_check import MAX_DEPTH, Attr, Key, Member, check_payload, format_path
from torch_ckpt_hook._staging import StagingArea


@dataclasses.dataclass
class Config:
    lr: Any = 0.1


class Point(NamedTuple):
    x: Any
    y: Any


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


class TaggedDict(dict):  # type: ignore[type-arg]
    pass


class TaggedList(list):  # type: ignore[type-arg]
    pass


class Ratio(float):
    pass


class Name(str):
    pass


class ScaledTensor(torch.Tensor):
    pass


def _with_attribute(tensor: torch.Tensor, **attrs: Any) -> torch.Tensor:
    for name, value in attrs.items():
        setattr(tensor, name, value)
    return tensor


def _ordered_with(**attrs: Any) -> collections.OrderedDict[str, Any]:
    ordered: collections.OrderedDict[str, Any] = collections.OrderedDict(w=torch.ones(1))
    for name, value in attrs.items():
        setattr(ordered, name, value)
    return ordered


def _self_containing_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# name -> a factory of the value put at extra_state['x']. Factories, so that each test gets a
# fresh value and a value that warns when built (sparse CSR) is built with warnings silenced.
VALUES: dict[str, Callable[[], Any]] = {
    # plain values
    "int": lambda: 3,
    "negative int": lambda: -(2**62),
    "int of 2000 bits": lambda: 2**2000,
    "int of 3000 bits": lambda: 2**3000,
    "float": lambda: 1.5,
    "nan": lambda: float("nan"),
    "inf": lambda: float("-inf"),
    "bool": lambda: True,
    "None": lambda: None,
    "str": lambda: "héllo",
    "bytes": lambda: b"\x00\xff",
    "empty bytes": lambda: b"",
    "bytearray": lambda: bytearray(b"ab"),
    "empty bytearray": lambda: bytearray(),
    "complex": lambda: 1 + 2j,
    "slice": lambda: slice(1, 2),
    "range": lambda: range(3),
    "Ellipsis": lambda: ...,
    # containers
    "list": lambda: [1, "a", None, [2.0]],
    "list of a million ints": lambda: list(range(1_000_000)),
    "tuple": lambda: (1, (2, 3)),
    "empty tuple": lambda: (),
    "dict with int keys": lambda: {0: "a", 1: "b"},
    "dict with a tuple key": lambda: {(1, "a"): 1},
    "dict with float, bool and None keys": lambda: {1.5: 1, True: 2, None: 3},
    "dict with a tensor key": lambda: {torch.ones(1): 1},
    "dict with a numpy key": lambda: {np.int64(3): 1},
    "dict with a frozenset key": lambda: {frozenset({1}): 1},
    "OrderedDict": lambda: collections.OrderedDict([("b", 1), ("a", 2)]),
    "OrderedDict with an attribute": lambda: _ordered_with(_metadata={"": {"version": 1}}),
    "OrderedDict with a numpy attribute": lambda: _ordered_with(_metadata=np.float32(1)),
    "Counter": lambda: collections.Counter("abracadabra"),
    "empty Counter": lambda: collections.Counter(),
    "Counter with a numpy count": lambda: collections.Counter({"a": np.int64(2)}),
    "set": lambda: {1, 2, 3},
    "empty set": lambda: set(),
    "set with a numpy element": lambda: {np.int64(1)},
    "frozenset": lambda: frozenset({1}),
    "empty frozenset": lambda: frozenset(),
    "defaultdict": lambda: collections.defaultdict(list, a=[1]),
    "empty defaultdict": lambda: collections.defaultdict(int),
    "deque": lambda: collections.deque([1]),
    "dict subclass": lambda: TaggedDict(a=1),
    "list subclass": lambda: TaggedList([1]),
    "namedtuple": lambda: Point(1, 2),
    "nested depth 50": lambda: _nested(50),
    # NumPy
    "numpy float64": lambda: np.float64(1.2),
    "numpy int64": lambda: np.int64(1),
    "numpy bool": lambda: np.bool_(True),
    "numpy str": lambda: np.str_("a"),
    "numpy array": lambda: np.zeros(3),
    "numpy 0-d array": lambda: np.array(1.0),
    # other Python objects
    "dataclass": lambda: Config(),
    "enum": lambda: Color.RED,
    "IntEnum": lambda: Level.LOW,
    "float subclass": lambda: Ratio(0.5),
    "str subclass": lambda: Name("a"),
    "lambda": lambda: lambda: 1,
    "builtin function": lambda: len,
    "class": lambda: int,
    "Fraction": lambda: fractions.Fraction(1, 3),
    "Decimal": lambda: decimal.Decimal("1.1"),
    "datetime": lambda: datetime.datetime(2026, 1, 1),
    "Path": lambda: pathlib.PurePosixPath("/tmp"),
    # torch values
    "tensor": lambda: torch.arange(4.0),
    "0-d tensor": lambda: torch.tensor(1.0),
    "strided view": lambda: torch.arange(10.0)[1::3],
    "bfloat16 tensor": lambda: torch.ones(2, dtype=torch.bfloat16),
    "float8 tensor": lambda: torch.ones(2).to(torch.float8_e4m3fn),
    "complex conj tensor": lambda: torch.ones(2, dtype=torch.complex64).conj(),
    "Parameter": lambda: torch.nn.Parameter(torch.ones(2)),
    "tensor with an attribute": lambda: _with_attribute(torch.ones(2), note="a"),
    # Staging writes a plain copy of a plain tensor: its Python attributes never reach the file.
    "tensor with a numpy attribute": lambda: _with_attribute(torch.ones(2), note=np.float64(1)),
    "tensor subclass": lambda: torch.ones(2).as_subclass(ScaledTensor),
    "sparse COO tensor": lambda: torch.eye(3).to_sparse(),
    "sparse CSR tensor": lambda: torch.eye(3).to_sparse_csr(),
    "quantized tensor": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
    "nested tensor": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    "meta tensor": lambda: torch.empty(2, device="meta"),
    "uninitialized parameter": lambda: torch.nn.parameter.UninitializedParameter(),
    "torch.Size": lambda: torch.Size([2, 3]),
    "dtype": lambda: torch.float32,
    "float8 dtype": lambda: torch.float8_e5m2,
    "uint16 dtype": lambda: torch.uint16,
    "device": lambda: torch.device("cpu"),
    "cuda device": lambda: torch.device("cuda", 1),
    "layout": lambda: torch.strided,
    "memory format": lambda: torch.channels_last,
    "qscheme": lambda: torch.per_tensor_affine,
    "Generator": lambda: torch.Generator(),
    "module state_dict": lambda: torch.nn.BatchNorm1d(2).state_dict(),
}

# Types allowlisted with torch.serialization.safe_globals for the cases below.
REGISTERED: list[Any] = [Config, Point, TaggedDict, ScaledTensor, Color, frozenset]
REGISTERED_VALUES: dict[str, Callable[[], Any]] = {
    "registered dataclass": lambda: Config(),
    "registered dataclass holding numpy": lambda: Config(np.float64(0.1)),
    "registered namedtuple": lambda: Point(1, [2]),
    "registered namedtuple holding numpy": lambda: Point(1, np.int64(2)),
    "registered dict subclass": lambda: TaggedDict(a=1),
    "registered empty dict subclass": lambda: TaggedDict(),
    "registered tensor subclass": lambda: torch.ones(2).as_subclass(ScaledTensor),
    "registered enum": lambda: Color.RED,
    "registered frozenset": lambda: frozenset({1}),
}


FIX = "store a tensor or a Python number/str/list/dict instead"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Beta and deprecation notes of exotic tensors (sparse CSR, TypedStorage) are not the point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _round_trips(payload: Any) -> bool:
    """What the ``Saver`` does with ``payload``: stage it, ``torch.save``, load it back."""
    with _quiet():
        try:
            staged, fence = StagingArea().stage(payload)
            fence.wait_on_host()
            buffer = io.BytesIO()
            torch.save(staged, buffer)
            buffer.seek(0)
            torch.load(buffer, map_location="cpu", weights_only=True)
        except Exception:
            return False
    return True


def _accepted(payload: Any) -> bool:
    try:
        check_payload(payload)
    except TypeError:
        return False
    return True


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture
def registered() -> Iterator[None]:
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("this torch has no torch.serialization.safe_globals")
    with torch.serialization.safe_globals(REGISTERED):
        yield


# Loaded by the installed torch, refused by torch 2.3 (the oldest this package supports), so
# refused by the check whatever is installed (decisions.md).
OLDER_TORCH_REFUSES = {"bytes", "bytearray", "empty bytearray", "complex", "set", "empty set"}


@pytest.mark.parametrize("name", sorted(OLDER_TORCH_REFUSES))
def test_values_older_supported_torch_refuses_are_refused(name: str) -> None:
    payload = {"extra_state": {"x": VALUES[name]()}}
    with pytest.raises(
        TypeError, match=r"refuses in torch 2\.3 (and 2\.4|to 2\.5), so the checkpoint"
    ):
        check_payload(payload)


@pytest.mark.parametrize("name", [n for n in VALUES if n not in OLDER_TORCH_REFUSES])
def test_the_check_agrees_with_a_real_round_trip(name: str) -> None:
    with _quiet():
        payload = {"extra_state": {"x": VALUES[name]()}}
    loads = _round_trips(payload)
    verdict = "accepted" if _accepted(payload) else "refused"
    assert loads == (verdict == "accepted"), (
        f"{name}: the check {verdict} it, but a real stage + torch.save + torch.load"
        f"(weights_only=True) {'loads' if loads else 'fails'}"
    )


@pytest.mark.parametrize("name", list(REGISTERED_VALUES))
def test_the_check_agrees_with_a_real_round_trip_for_allowlisted_types(
    name: str, registered: None
) -> None:
    payload = {"extra_state": {"x": REGISTERED_VALUES[name]()}}
    loads = _round_trips(payload)
    verdict = "accepted" if _accepted(payload) else "refused"
    assert loads == (verdict == "accepted"), (
        f"{name}: the check {verdict} it, but a real round trip {'loads' if loads else 'fails'}"
    )


def test_the_message_names_the_place_the_type_and_the_fix() -> None:
    payload = {"extra_state": {"stats": {"best": np.float64(1.2)}}}
    expected = (
        r"cannot save: extra_state\['stats'\]\['best'\] is a numpy\.float64 \(.*1\.2.*\), "
        r"which torch\.load\(weights_only=True\) refuses, so the checkpoint could not be "
        r"restored; store a tensor or a Python number/str/list/dict instead "
        r"\(e\.g\. x\.item\(\), float\(x\) or int\(x\)\)$"
    )
    with pytest.raises(TypeError, match=expected) as info:
        check_payload(payload)
    assert info.value.__cause__ is not None, "torch's own refusal is the cause"


PLACES = [
    (
        {"extra_state": {"stats": {"best": np.float64(1.2)}}},
        "extra_state['stats']['best']",
        "numpy.float64",
    ),
    (
        {"model": {"encoder.scale": torch.ones(1).as_subclass(ScaledTensor)}},
        "model['encoder.scale']",
        _qualified(ScaledTensor),
    ),
    (
        {"optimizer": {"state": {0: {"exp_avg": np.zeros(2)}}}},
        "optimizer['state'][0]['exp_avg']",
        "numpy.ndarray",
    ),
    ({"extra_state": {"m": {np.int64(3): 1}}}, "a key of extra_state['m']", "numpy.int64"),
    ({"extra_state": {"tags": {np.int64(3)}}}, "extra_state['tags']", "set"),
    ({"model": _ordered_with(_metadata=np.float32(1))}, "model._metadata", "numpy.float32"),
    ({"extra_state": {"runs": [(1, slice(0, 2))]}}, "extra_state['runs'][0][1]", "slice"),
    ({"extra_state": {"cfg": Config()}}, "extra_state['cfg']", _qualified(Config)),
    ({"extra_state": {"fn": lambda: 1}}, "extra_state['fn']", "function"),
    ({"extra_state": {"b": b""}}, "extra_state['b']", "bytes"),
    ({"rng": {"python": (3, [np.uint32(1)], None)}}, "rng['python'][1][0]", "numpy.uint32"),
    ([np.float64(1)], "payload[0]", "numpy.float64"),
    ({"a key": {"x": slice(1)}}, "payload['a key']['x']", "slice"),
]


@pytest.mark.parametrize(("payload", "place", "type_name"), PLACES, ids=[p for _, p, _ in PLACES])
def test_a_refusal_names_the_values_place_in_subscript_form(
    payload: Any, place: str, type_name: str
) -> None:
    expected = (
        rf"^cannot save: {re.escape(place)} is an? {re.escape(type_name)} \(.*{re.escape(FIX)}"
    )
    with pytest.raises(TypeError, match=expected):
        check_payload(payload)


@pytest.mark.parametrize(
    ("name", "place", "type_name"),
    [
        ("registered dataclass holding numpy", "extra_state['x'].lr", "numpy.float64"),
        ("registered namedtuple holding numpy", "extra_state['x'][1]", "numpy.int64"),
        ("registered dict subclass", "extra_state['x']", _qualified(TaggedDict)),
    ],
)
def test_inside_an_allowlisted_object_the_refused_part_is_named(
    name: str, place: str, type_name: str, registered: None
) -> None:
    expected = rf"^cannot save: {re.escape(place)} is an? {re.escape(type_name)} \("
    with pytest.raises(TypeError, match=expected):
        check_payload({"extra_state": {"x": REGISTERED_VALUES[name]()}})


class _WithStats(torch.nn.Module):
    """A module whose extra state holds a NumPy scalar, as a hand-written one easily does."""

    def get_extra_state(self) -> Any:
        return {"best": np.float64(0.5)}

    def set_extra_state(self, state: Any) -> None:
        pass


def test_a_modules_extra_state_is_checked_under_its_state_dict_key() -> None:
    model = torch.nn.Sequential(collections.OrderedDict(encoder=_WithStats()))
    payload = tch.Session(model).state_dict()
    with pytest.raises(
        TypeError,
        match=r"^cannot save: model\['encoder\._extra_state'\]\['best'\] is a numpy\.float64",
    ):
        check_payload(payload)


class _Stats:
    """An extra_state entry returning a scheduler-like state with a NumPy value."""

    def __init__(self, best: Any) -> None:
        self.best = best

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "history": [1.0, 2.0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


def test_a_real_session_payload_passes_and_a_numpy_scalar_in_it_does_not() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    session = tch.Session(
        model, optimizer, extra_state={"scheduler": scheduler, "stats": _Stats(1.5)}
    )
    check_payload(session.state_dict())

    session.extra_state["stats"].best = np.float64(1.5)
    with pytest.raises(
        TypeError, match=r"^cannot save: extra_state\['stats'\]\['best'\] is a numpy\.float64"
    ):
        check_payload(session.state_dict())


def test_tied_tensors_pass() -> None:
    shared = torch.ones(3)
    check_payload({"model": {"encoder.weight": shared, "decoder.weight": shared}})


def test_nan_and_infinite_floats_pass() -> None:
    check_payload(
        {
            "extra_state": {
                "best": float("nan"),
                "worst": float("inf"),
                "t": torch.tensor(float("nan")),
            }
        }
    )


def test_a_large_list_is_checked_and_a_refused_item_at_its_end_is_found() -> None:
    values: list[Any] = [float(i) for i in range(1_000_000)]
    check_payload({"extra_state": {"losses": values}})
    values[-1] = np.float32(1)
    with pytest.raises(
        TypeError, match=r"^cannot save: extra_state\['losses'\]\[999999\] is a numpy\.float32"
    ):
        check_payload({"extra_state": {"losses": values}})


def test_a_list_that_contains_itself_is_a_type_error_not_a_recursion_error() -> None:
    with pytest.raises(
        TypeError,
        match=r"^cannot save: extra_state\['loop'\]\[0\] is extra_state\['loop'\] again, a list that contains itself \(a reference cycle\)",
    ):
        check_payload({"extra_state": {"loop": _self_containing_list()}})


def test_a_dict_that_contains_itself_is_a_type_error() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = {"parent": loop}
    with pytest.raises(
        TypeError,
        match=r"extra_state\['loop'\]\['self'\]\['parent'\] is extra_state\['loop'\] again, a dict that contains itself",
    ):
        check_payload({"extra_state": {"loop": loop}})


def test_nesting_up_to_the_limit_passes_and_deeper_is_a_type_error() -> None:
    # The payload's dict is one level: MAX_DEPTH - 1 lists inside it reach the limit.
    check_payload({"x": _nested(MAX_DEPTH - 1)})
    with pytest.raises(
        TypeError,
        match=rf"^cannot save: x\[0\]\[0\].*is nested more than {MAX_DEPTH} containers deep",
    ):
        check_payload({"x": _nested(MAX_DEPTH)})
    with pytest.raises(TypeError, match=r"nested more than"):
        check_payload({"x": _nested(100_000)})


def test_a_value_shared_many_times_is_checked_once() -> None:
    shared: Any = [1]
    for _ in range(64):
        shared = [shared, shared]  # 2**64 paths, 65 lists
    check_payload({"x": shared})


def test_a_common_payload_is_checked_without_serializing_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    payload = tch.Session(model, optimizer, extra_state={"stats": _Stats(1.0)}).state_dict()
    check_payload(payload)  # learns, once, what the installed torch says of an OrderedDict

    def no_save(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the check serialized a value of a common payload")

    monkeypatch.setattr(torch, "save", no_save)
    check_payload(payload)


def test_allowlisting_a_type_is_honoured_at_once_and_withdrawn_with_it() -> None:
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("this torch has no torch.serialization.safe_globals")
    payload = {"extra_state": {"frozen": frozenset({1})}}
    with pytest.raises(TypeError, match="frozenset"):
        check_payload(payload)
    with torch.serialization.safe_globals([frozenset]):
        check_payload(payload)
    with pytest.raises(TypeError, match="frozenset"):
        check_payload(payload)


def test_the_check_leaves_the_payload_unchanged() -> None:
    counts = collections.Counter("aab")
    payload = {"extra_state": {"counts": counts, "w": torch.ones(2)}}
    check_payload(payload)
    assert collections.Counter("aab") == payload["extra_state"]["counts"]
    assert counts is payload["extra_state"]["counts"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((), "payload"),
        (("global_step",), "global_step"),
        (("optimizer", "state", 0, "exp_avg"), "optimizer['state'][0]['exp_avg']"),
        (("model", Attr("_metadata"), ""), "model._metadata['']"),
        (("extra_state", "m", Key()), "a key of extra_state['m']"),
        (("extra_state", "s", Member(2), 0), "(an element of extra_state['s'])[0]"),
        ((0, "a"), "payload[0]['a']"),
        (("not an identifier", 1), "payload['not an identifier'][1]"),
        (("x", *[0] * 20), "x[0][0][0][0][0][0]...(8 more)...[0][0][0][0][0][0]"),
    ],
)
def test_format_path_writes_python_subscripts(path: tuple[Any, ...], expected: str) -> None:
    assert expected == format_path(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_payload_is_checked_like_a_cpu_one() -> None:
    weight = torch.ones(4, device="cuda")
    with _quiet():
        sparse = torch.eye(3, device="cuda").to_sparse()
    check_payload({"model": {"w": weight, "tied": weight}, "extra_state": {"s": sparse}})
    with pytest.raises(TypeError, match=r"^cannot save: model\['scale'\] is a "):
        check_payload({"model": {"scale": weight.as_subclass(ScaledTensor)}})
