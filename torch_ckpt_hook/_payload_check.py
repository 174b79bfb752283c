"""The save-time check: every value of a payload must load back with ``weights_only=True``.

A value that ``torch.load(..., weights_only=True)`` refuses (a NumPy scalar in a scheduler's
state, a ``slice``, a dataclass) saves without complaint and then makes the checkpoint
unrestorable, which loses the run at its first restart. ``check_payload`` finds such a value
before anything is staged and raises a ``TypeError`` naming its place in the payload.

The walk dispatches on exact types, so the common payload (dicts, lists, tuples, strings,
numbers, dense tensors) costs no serialization at all. Every other value is settled by the
loader itself: ``torch.save`` into memory, then ``torch.load(weights_only=True)``. Values whose
answer depends only on their type (or on one small property: an empty ``bytes`` is refused, a
non-empty one is not) are probed once per process and remembered, per set of user-registered
safe globals (``torch.serialization.add_safe_globals``); values of unknown types are probed in
one batch per payload, and one by one only to find the refused one. So the check follows the
installed torch's unpickler, whatever it allows, without copying its allowlist.

The check is of the payload as the ``Saver`` writes it: staging copies a plain dense tensor (a
``Tensor`` or ``Parameter``, ``plain_dense``) into a plain CPU buffer, so its Python attributes
never reach the file, and writes any other tensor as ``tensor.detach().to("cpu", copy=True)``,
which is what the check probes. A reference cycle and nesting deeper than ``MAX_DEPTH`` are
refused as well: staging copies by value and ``torch.save`` recurses.

Paths are tuples of dict keys and sequence indices, plus ``Attr``, ``Key`` and ``Member`` steps;
``format_path`` renders them in Python subscript form (``optimizer['state'][0]['exp_avg']``).
Staging names the places it cannot copy with the same format.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import reprlib
import threading
import types
import warnings
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

__all__ = [
    "MAX_DEPTH",
    "Attr",
    "Key",
    "Member",
    "check_payload",
    "format_path",
    "plain_dense",
    "type_name",
]

# torch.save pickles recursively and fails near half the recursion limit (about 490 containers
# deep with Python's default of 1000), and the check and staging recurse too (two or three frames
# a level, on top of the caller's stack); a real payload is under ten deep. Past this depth the
# check and staging refuse, on the calling thread, what the writer thread might not pickle.
MAX_DEPTH = 100

# Protocol 2 pickles an int of up to 255 bytes as LONG1; a larger one as LONG4, which the
# weights_only unpickler does not read. Ints past this bit length are probed.
_MAX_PLAIN_INT_BITS = 1000
_INT_BOUND = 1 << _MAX_PLAIN_INT_BITS

# Pickled as bare opcodes (BINFLOAT, BINUNICODE, NEWTRUE, NONE): no global, nothing to refuse.
_ATOMS = frozenset({str, float, bool, type(None)})
_NUMBERS = frozenset({int, float, bool})

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# Lazy modules' parameters and buffers before their first forward (no data yet).
_LAZY: Any = getattr(torch.nn.parameter, "UninitializedTensorMixin", ())

# Values the installed torch may load but the oldest torch this package supports (2.3) refuses:
# its weights_only unpickler gained bytes and bytearray in 2.5, set and complex in 2.6. A
# checkpoint must restore on every torch the package runs on (an older cluster image, a
# downgrade), and SPEC.md names a set as refused, so these are refused whatever is installed.
_OLDER_TORCH_REFUSES: dict[type, str] = {
    bytes: "2.3 and 2.4",
    bytearray: "2.3 and 2.4",
    set: "2.3 to 2.5",
    complex: "2.3 to 2.5",
}
OLDEST_TORCH = "2.3"

_FIX = "store a tensor or a Python number/str/list/dict instead"
_RESTORE = "so the checkpoint could not be restored"


@dataclasses.dataclass(frozen=True)
class Attr:
    """An attribute step of a payload path (an ``OrderedDict``'s ``_metadata``): ``.name``."""

    name: str


@dataclasses.dataclass(frozen=True)
class Key:
    """The step from a dict to one of its keys (the key itself, not its value)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """The step from a set to its ``index``-th element (in iteration order)."""

    index: int


_Path = tuple[Any, ...]

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def _short_repr(value: object) -> str:
    try:
        return _repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        return f"<{type_name(type(value))} object>"


def type_name(cls: type) -> str:
    """``cls`` with its module (``numpy.float64``); builtins go bare (``slice``)."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


def format_path(path: Sequence[Any], max_steps: int = 12) -> str:
    """``path`` in Python subscript form: ``extra_state['stats']['best']``, ``model['w']``.

    A first step that is an identifier-like str is the payload's top-level key and goes bare;
    otherwise the path starts at ``payload``. Overlong paths (a refused depth) keep their ends.
    """
    steps = list(path)
    if steps and type(steps[0]) is str and steps[0].isidentifier():
        text, steps = steps[0], steps[1:]
    else:
        text = "payload"
    elided = len(steps) > max_steps
    if elided:
        head, tail = steps[: max_steps // 2], steps[-(max_steps // 2) :]
        steps = [*head, _Elided(len(steps) - len(head) - len(tail)), *tail]
    for step in steps:
        if isinstance(step, _Elided):
            text += f"...({step.count} more)..."
        elif isinstance(step, Attr):
            text += f".{step.name}"
        elif isinstance(step, Key):
            text = f"a key of {text}"
        elif isinstance(step, Member):
            text = f"an element of {text}"
        else:
            if text.startswith(("a key of ", "an element of ")):
                text = f"({text})"
            text += f"[{_short_repr(step)}]"
    return text


@dataclasses.dataclass(frozen=True)
class _Elided:
    count: int


class _NotPortable(TypeError):
    """The cause of a value that only newer torch releases load with ``weights_only``."""

    def __init__(self, cls: type) -> None:
        super().__init__(
            f"{type_name(cls)} is in torch's weights_only allowlist only since torch 2.5 or 2.6, "
            f"and torch_ckpt_hook supports torch >= {OLDEST_TORCH}"
        )


class _NoData(RuntimeError):
    """The cause of a refused meta tensor."""

    def __init__(self) -> None:
        super().__init__("a meta tensor has a shape and a dtype but no data")


@dataclasses.dataclass(frozen=True)
class _Refusal:
    """Why a probe failed: which half of the round trip, and torch's error."""

    stage: str
    error: Exception
    consequence: str = _RESTORE


def _probe(value: object) -> _Refusal | None:
    """The exact test: ``torch.save`` into memory, then ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    # Deprecation notes (TypedStorage, sparse CSR) are the loader's business, not the check's:
    # under warnings-as-errors they would read as refusals.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.save(value, buffer)
        except Exception as err:
            return _Refusal("torch.save cannot pickle", err, "so the save would fail")
        buffer.seek(0)
        try:
            torch.load(buffer, map_location="cpu", weights_only=True)
        except Exception as err:
            return _Refusal("torch.load(weights_only=True) refuses", err)
    return None


def _safe_globals() -> list[Any]:
    getter = getattr(torch.serialization, "get_safe_globals", None)
    return list(getter()) if getter is not None else []


class _ProbeCache:
    """Probe results for type-determined values, valid while the safe globals stay the same.

    Shared by every check in the process; two threads racing on it at worst probe twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._globals: frozenset[Any] = frozenset()
        self._results: dict[Hashable, _Refusal | None] = {}

    def results_for(self, safe_globals: frozenset[Any]) -> dict[Hashable, _Refusal | None]:
        with self._lock:
            if safe_globals != self._globals:
                self._globals = safe_globals
                self._results = {}
            return self._results


_CACHE = _ProbeCache()


def _leaf_signature(value: Any) -> tuple[Hashable, Any] | None:
    """``(signature, sample)`` for a value whose acceptance its signature decides; else None.

    The sample is a small value with the same signature, so that a large ``bytes`` is not
    serialized to learn what a one-byte one shows.
    """
    cls = type(value)
    if cls is bytes:
        # An empty bytes pickles as a call to ``bytes()``, a global; a non-empty one does not.
        return (bytes, bool(value)), (b"x" if value else b"")
    if cls is bytearray:
        return (bytearray, bool(value)), (bytearray(b"x") if value else bytearray())
    if cls is complex:
        return complex, 1j
    if cls is torch.Size:
        return torch.Size, torch.Size([1])
    if cls in (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme):
        return (cls, value), value
    return None


def _container_signature(value: Any) -> tuple[Hashable, Any] | None:
    """``(signature, sample)`` for the shell of a walked container that is pickled by a global."""
    cls = type(value)
    if cls is OrderedDict:
        has_attrs = bool(vars(value))
        sample: OrderedDict[str, int] = OrderedDict(a=1)
        if has_attrs:
            sample.x = 1  # type: ignore[attr-defined]  # attributes go through BUILD
        return (OrderedDict, has_attrs), sample
    if cls is Counter:
        return Counter, Counter(a=1)
    if cls in (set, frozenset):
        # An empty set is one opcode; a non-empty one a call to ``set``.
        return (cls, bool(value)), cls((0,) if value else ())
    return None


def plain_dense(tensor: torch.Tensor) -> bool:
    """Whether staging copies ``tensor`` into a reused plain buffer (written as a plain tensor).

    Staging and the check share this test: a tensor it accepts, on any device, reaches the file
    as a plain CPU tensor, whatever its Python attributes.
    """
    return (
        type(tensor) in _PLAIN_TENSORS
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        # A nested tensor reports a strided layout but has no single shape for a buffer.
        and not tensor.is_nested
    )


def _tensor_signature(tensor: torch.Tensor) -> Hashable:
    quantized = tensor.is_quantized
    return (
        torch.Tensor,
        type(tensor),
        tensor.layout,
        tensor.dtype,
        tensor.device.type,
        tensor.qscheme() if quantized else None,
        tensor.is_nested,
    )


def _hint(value: object) -> str:
    """A concrete fix for the common kinds of refused values."""
    cls = type(value)
    module = getattr(cls, "__module__", "") or ""
    if module.split(".")[0] == "numpy":
        ndim: object = getattr(value, "ndim", 0)
        if ndim:
            return "e.g. torch.from_numpy(x) or x.tolist()"
        return "e.g. x.item(), float(x) or int(x)"
    if isinstance(value, _LAZY):
        return "e.g. run one forward pass first, so that lazy modules initialize it"
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            return "e.g. module.to_empty(device='cpu') and initialize it before saving"
        if type(value) not in _PLAIN_TENSORS:
            return "e.g. x.as_subclass(torch.Tensor), a plain tensor"
        return "e.g. a plain dense tensor: x.to_dense() or x.dequantize()"
    if isinstance(value, enum.Enum):
        return "e.g. x.value or x.name"
    if isinstance(value, (set, frozenset)):
        return "e.g. sorted(x) or list(x)"
    if isinstance(value, (bytes, bytearray)):
        return "e.g. x.hex(), or torch.frombuffer(x, dtype=torch.uint8) for binary data"
    if isinstance(value, complex):
        return "e.g. [x.real, x.imag], or a complex tensor: torch.tensor(x)"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return "e.g. x._asdict() or tuple(x)"
    if isinstance(value, dict):
        return "e.g. dict(x)"
    if isinstance(value, list):
        return "e.g. list(x)"
    if isinstance(value, tuple):
        return "e.g. tuple(x)"
    if cls is int:
        return "e.g. str(x) for an int this large"
    if cls is bytes:
        return "an empty bytes is refused: e.g. None or ''"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return "e.g. its name as a str"
    if dataclasses.is_dataclass(value):
        return "e.g. dataclasses.asdict(x)"
    if isinstance(value, slice):
        return "e.g. [x.start, x.stop, x.step]"
    return "e.g. float(x) or torch.as_tensor(x)"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _refused(path: _Path, value: object, refusal: _Refusal) -> TypeError:
    name = type_name(type(value))
    error = TypeError(
        f"cannot save: {format_path(path)} is {_article(name)} {name} ({_short_repr(value)}), "
        f"which {refusal.stage}, {refusal.consequence}; {_FIX} ({_hint(value)})"
    )
    error.__cause__ = refusal.error
    return error


class _Checker:
    """One walk over one payload."""

    def __init__(self) -> None:
        safe = _safe_globals()
        self._cache = _CACHE.results_for(frozenset(safe))
        # Types the user allowlisted: a refusal of such a value is looked for inside it.
        self._registered = {g[0] if isinstance(g, tuple) else g for g in safe}
        # Containers on the way from the root to the value being visited: id -> path.
        self._open: dict[int, _Path] = {}
        # Containers already checked, met again through another reference.
        self._done: set[int] = set()
        # Values of unknown types, probed together once the walk is over.
        self._deferred: list[tuple[_Path, Any]] = []

    def run(self, payload: Any, path: _Path = ()) -> None:
        self._visit(payload, path, 0)
        self._settle_deferred()

    def _cached_probe(self, signature: Hashable, sample: Any) -> _Refusal | None:
        if signature not in self._cache:
            self._cache[signature] = _probe(sample)
        return self._cache[signature]

    def _visit(self, value: Any, path: _Path, depth: int) -> None:
        cls = type(value)
        if cls in _ATOMS:
            return
        if cls is int:
            if value.bit_length() > _MAX_PLAIN_INT_BITS:
                self._deferred.append((path, value))
            return
        if cls in _PLAIN_TENSORS:
            if plain_dense(value):
                if value.is_meta:
                    # Staging's copy into the host buffer has no data to read.
                    why = _Refusal(
                        "has no data for staging to copy", _NoData(), "so the save would fail"
                    )
                    raise _refused(path, value, why)
                return
            self._exotic_tensor(value, path, cached=True)
            return
        if cls in _OLDER_TORCH_REFUSES:
            versions = _OLDER_TORCH_REFUSES[cls]
            why = _Refusal(
                f"torch.load(weights_only=True) refuses in torch {versions}",
                _NotPortable(cls),
                "so the checkpoint could not be restored there",
            )
            raise _refused(path, value, why)
        if cls in (dict, OrderedDict, Counter, list, tuple, set, frozenset):
            self._container(value, path, depth)
            return
        if isinstance(value, torch.Tensor):
            self._exotic_tensor(value, path, cached=False)
            return
        leaf = _leaf_signature(value)
        if leaf is not None:
            refusal = self._cached_probe(*leaf)
            if refusal is not None:
                raise _refused(path, value, refusal)
            return
        self._deferred.append((path, value))

    def _exotic_tensor(self, tensor: torch.Tensor, path: _Path, *, cached: bool) -> None:
        # What staging writes: ``tensor.detach().to("cpu", copy=True)``, never the Python state.
        try:
            written = tensor.detach().to("cpu", copy=True)
        except Exception as err:  # a meta tensor, a lazy parameter: no data to copy
            why = _Refusal("staging cannot copy to the CPU", err, "so the save would fail")
            raise _refused(path, tensor, why) from err
        if cached:
            refusal = self._cached_probe(_tensor_signature(tensor), written)
            if refusal is not None:
                raise _refused(path, tensor, refusal)
        else:
            # A subclass's state decides, value by value.
            self._deferred.append((path, written))

    def _container(self, value: Any, path: _Path, depth: int) -> None:
        ident = id(value)
        if ident in self._done:
            return
        if ident in self._open:
            raise TypeError(
                f"cannot save: {format_path(path)} is {format_path(self._open[ident])} again, a "
                f"{type_name(type(value))} that contains itself (a reference cycle); a checkpoint "
                "holds copies of values, so store the data without the cycle"
            )
        if depth >= MAX_DEPTH:
            raise TypeError(
                f"cannot save: {format_path(path)} is nested more than {MAX_DEPTH} containers "
                "deep, which torch.save, pickling recursively, may not write; store the data "
                "flatter (e.g. a list of records)"
            )
        shell = _container_signature(value)
        if shell is not None:
            refusal = self._cached_probe(*shell)
            if refusal is not None:
                raise _refused(path, value, refusal)
        self._open[ident] = path
        depth += 1
        if isinstance(value, dict):
            self._mapping(value, path, depth)
            if type(value) is OrderedDict:
                # Its attributes (a state_dict's ``_metadata``) are pickled as its state.
                for name, attr in vars(value).items():
                    self._visit(attr, (*path, Attr(name)), depth)
        elif isinstance(value, (set, frozenset)):
            for index, element in enumerate(value):
                if type(element) not in _ATOMS:
                    self._visit(element, (*path, Member(index)), depth)
        elif not _plain_sequence(value):
            for index, item in enumerate(value):
                if type(item) not in _ATOMS:
                    self._visit(item, (*path, index), depth)
        del self._open[ident]
        self._done.add(ident)

    def _mapping(self, mapping: dict[Any, Any], path: _Path, depth: int) -> None:
        for key, item in mapping.items():
            key_type = type(key)
            if key_type is not str and (
                key_type is not int or key.bit_length() > _MAX_PLAIN_INT_BITS
            ):
                self._visit(key, (*path, Key()), depth)
            if type(item) not in _ATOMS:
                self._visit(item, (*path, key), depth)

    def _settle_deferred(self) -> None:
        if not self._deferred:
            return
        # One round trip for all of them; the refused one is looked for only when it fails.
        together = _probe([value for _, value in self._deferred])
        if together is None:
            return
        for path, value in self._deferred:
            refusal = _probe(value)
            if refusal is not None:
                self._locate(value, path)
                raise _refused(path, value, refusal)
        # Each loads alone but not beside the others: blame the first, with torch's reason.
        path, value = self._deferred[0]
        raise _refused(path, value, together)

    def _locate(self, value: Any, path: _Path) -> None:
        """Raise for the refused value inside an allowlisted one, when there is one to blame."""
        if type(value) not in self._registered:
            return
        for child_path, child in _children(value, path):
            _Checker().run(child, child_path)


def _plain_sequence(value: list[Any] | tuple[Any, ...]) -> bool:
    """Whether ``value`` holds only atoms and plain-sized numbers, checked at C speed."""
    kinds = set(map(type, value))
    if kinds <= _ATOMS:
        return True
    if kinds <= _NUMBERS:
        try:
            return bool(-_INT_BOUND < min(value) and max(value) < _INT_BOUND)
        except (TypeError, OverflowError):
            return False
    return False


def _children(value: Any, path: _Path) -> list[tuple[_Path, Any]]:
    """The values pickled inside ``value``, each with its path."""
    children: list[tuple[_Path, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            children.append(((*path, Key()), key))
            children.append(((*path, key), item))
    elif isinstance(value, (set, frozenset)):
        children.extend(((*path, Member(i)), element) for i, element in enumerate(value))
    elif isinstance(value, (list, tuple)):
        children.extend(((*path, i), item) for i, item in enumerate(value))
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        children.extend(((*path, Attr(str(name))), item) for name, item in state.items())
    return children


def check_payload(payload: Any) -> None:
    """Raise ``TypeError`` when a value of ``payload`` would not load with ``weights_only=True``.

    ``payload`` is what the ``Saver`` stages and writes (``Session.state_dict()``). The message
    names the value's place (``extra_state['stats']['best']``), its type and the fix. A reference
    cycle, or nesting deeper than ``MAX_DEPTH``, is refused too: staging copies values and
    ``torch.save`` recurses. Nothing is changed or kept.
    """
    _Checker().run(payload)
