"""What ``torch-ckpt inspect`` says of a checkpoint's payload: tensors, values, optimizers, RNG.

Used by the ``torch-ckpt`` command only.

A payload comes from any file that loads with ``weights_only=True``, so nothing here assumes
the shape this package writes: every part is type-checked, and what does not fit is reported in
the document's ``problems`` rather than raised.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ._cli_format import a_type, count, printable
from ._sharded_read import directory_size
from ._validation import is_number


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    layout: str
    """``strided`` for an ordinary tensor; ``sparse_coo``, ``sparse_csr``, ... otherwise."""
    elements: int
    """The logical element count (``numel``), zeros of a sparse tensor included."""
    bytes: int
    """The bytes stored: the data of a dense tensor; values and indices of a sparse one."""


@dataclasses.dataclass(frozen=True)
class ValueInfo:
    """A value of the payload that is not a tensor: a number, a string, a list of them, ..."""

    name: str
    type: str
    value: Any
    """The value itself; cut to its first items or characters when ``truncated``."""
    length: int | None
    """The items of a list, tuple or mapping, the characters of a string; None for a scalar."""
    truncated: bool


# A list longer than this, or a string, is cut in --json (the text is cut shorter, to a line).
JSON_ITEMS_LIMIT = 100
JSON_CHARS_LIMIT = 1000
TEXT_CHARS_LIMIT = 72

# Parts of the payload that have their own lines (the step, the optimizer's summary, the RNG
# states' names, the metrics): their values are not listed again.
_SUMMARIZED = frozenset({"format_version", "global_step", "optimizer", "rng"})

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def build_document(path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The inspection of the checkpoint at ``path`` whose loaded payload is ``payload``."""
    problems: list[str] = []
    metrics = _metrics(payload.get("metrics"), problems)
    summarized = _SUMMARIZED | ({"metrics"} if metrics is not None else set())
    values = [
        _value_info(name, value)
        for key, part in payload.items()
        if key not in summarized
        for name, value in named_values(part, str(key))
    ]
    tensors = [_tensor_info(name, tensor) for name, tensor in named_tensors(payload)]
    totals: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        for part in (tensor.name.split(".", 1)[0], "all"):
            total = totals.setdefault(part, {"tensors": 0, "elements": 0, "bytes": 0})
            total["tensors"] += 1
            total["elements"] += tensor.elements
            total["bytes"] += tensor.bytes
    return {
        "path": printable(os.path.abspath(path)),
        "size_bytes": directory_size(path) if os.path.isdir(path) else os.path.getsize(path),
        "format_version": payload.get("format_version"),
        "global_step": payload.get("global_step"),
        "payload_keys": [printable(str(key)) for key in payload],
        "optimizer": describe_optimizers(payload.get("optimizer"), problems),
        "extra_state": _names(payload.get("extra_state"), "extra_state", problems),
        "metrics": metrics,
        "rng_states": rng_states(payload.get("rng")),
        "values": [dataclasses.asdict(value) for value in values],
        "tensors": [dataclasses.asdict(tensor) for tensor in tensors],
        "totals": totals,
        "problems": problems,
    }


def named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nest of mappings, lists and tuples, named by its dotted path."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def named_values(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every value that is not a tensor in a nest of mappings and lists, by its dotted path.

    A list or tuple of scalars (numbers, strings, None) is one value, ``[0.9, 0.999]``; a list
    that holds mappings, lists or tensors is walked, item by item. An empty mapping is a value
    (``{}``), except a part of the payload itself (an empty ``extra_state`` says nothing).
    """
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, Mapping):
        if not value and "." in prefix:
            yield prefix, {}
        for key, item in value.items():
            yield from named_values(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)) and not all(isinstance(i, _SCALARS) for i in value):
        for index, item in enumerate(value):
            yield from named_values(item, f"{prefix}.{index}")
    else:
        yield prefix, value


def _value_info(name: str, value: Any) -> ValueInfo:
    length = len(value) if isinstance(value, (str, bytes, list, tuple, Mapping)) else None
    truncated = False
    if isinstance(value, (str, bytes)) and len(value) > JSON_CHARS_LIMIT:
        value, truncated = value[:JSON_CHARS_LIMIT], True
    elif isinstance(value, (list, tuple)) and len(value) > JSON_ITEMS_LIMIT:
        value, truncated = value[:JSON_ITEMS_LIMIT], True
    return ValueInfo(
        name=printable(name),
        type="None" if value is None else type(value).__qualname__,
        value=value,
        length=length,
        truncated=truncated,
    )


def value_text(info: Mapping[str, Any], limit: int = TEXT_CHARS_LIMIT) -> str:
    """A value as one line of at most about ``limit`` characters: its ``repr``, cut when longer,
    with its full length: ``[1, 2, 3, ...] (5000 items)``."""
    text = printable(repr(info["value"]))
    length, unit = info["length"], "chars" if info["type"] in ("str", "bytes") else "items"
    if len(text) <= limit and not info["truncated"]:
        return text
    return f"{text[: limit - 3]}... ({length:,} {unit})"


def _metrics(value: Any, problems: list[str]) -> dict[str, Any] | None:
    """A best checkpoint's ``metrics`` (``{name: float}``), or None when it has none."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.append(f"metrics is {a_type(value)}, not a mapping of names to numbers")
        return None
    return {printable(str(name)): metric_number(number) for name, number in value.items()}


def metric_number(value: Any) -> Any:
    """A metric's number as a float (a one-element tensor's too); any other value as it is."""
    number = _number(value)
    return value if number is None else number


def _tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(
        name=printable(name),
        shape=list(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        layout=str(tensor.layout).removeprefix("torch."),
        elements=tensor.numel(),
        bytes=stored_bytes(tensor),
    )


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor`` holds: ``numel * element_size`` when dense; values and indices when
    sparse (a sparse tensor's ``numel`` counts the zeros it does not store)."""
    layout = tensor.layout
    if layout == torch.sparse_coo:
        parts = [tensor._values(), tensor._indices()]
    elif layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [tensor.values(), tensor.crow_indices(), tensor.col_indices()]
    elif layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [tensor.values(), tensor.ccol_indices(), tensor.row_indices()]
    else:
        parts = [tensor]
    return sum(part.numel() * part.element_size() for part in parts)


def rng_states(rng: Any) -> list[str]:
    """The RNG states present; ``cuda`` (a list, one per device) counts when it is not empty."""
    if not isinstance(rng, Mapping):
        return []
    present = []
    for name, state in rng.items():
        if name == "cuda" and isinstance(state, (list, tuple)):
            if state:
                present.append(f"cuda ({count(len(state), 'device')})")
        elif state is not None:
            present.append(printable(str(name)))
    return present


def _names(value: Any, what: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        problems.append(f"{what} is {a_type(value)}, not a mapping")
        return []
    return sorted(printable(str(key)) for key in value)


def describe_optimizers(
    state: Any, problems: list[str]
) -> dict[str, Any] | list[dict[str, Any] | None] | None:
    """``describe_optimizer`` of the payload's ``optimizer``: one state dict, or a list of them
    (a session with several optimizers, a GAN's two), described one by one."""
    if isinstance(state, (list, tuple)):
        return [
            describe_optimizer(item, problems, f"optimizer.{i}") for i, item in enumerate(state)
        ]
    if state is not None and not isinstance(state, Mapping):
        problems.append(f"optimizer is {a_type(state)}, not a mapping or a list of mappings")
        return None
    return describe_optimizer(state, problems)


def describe_optimizer(
    state: Any, problems: list[str], name: str = "optimizer"
) -> dict[str, Any] | None:
    """The optimizer's type, inferred: the payload holds its ``state_dict()``, not its class.

    What does not have ``Optimizer.state_dict()``'s shape is added to ``problems``, under
    ``name``, the optimizer's path in the payload.
    """
    if state is None:
        return None
    if not isinstance(state, Mapping):
        problems.append(f"{name} is {a_type(state)}, not a mapping")
        return None
    groups = state.get("param_groups")
    if groups is None:
        groups = []
    elif not isinstance(groups, (list, tuple)):
        problems.append(f"{name}.param_groups is {a_type(groups)}, not a list of mappings")
        groups = []
    mappings = [group for group in groups if isinstance(group, Mapping)]
    others = len(groups) - len(mappings)
    if others:
        problems.append(
            f"{name}.param_groups holds {others} "
            f"{'entry that is not a mapping' if others == 1 else 'entries that are not mappings'}"
        )
    first: Mapping[str, Any] = mappings[0] if mappings else {}
    per_parameter = state.get("state")
    if per_parameter is not None and not isinstance(per_parameter, Mapping):
        problems.append(f"{name}.state is {a_type(per_parameter)}, not a mapping")
        per_parameter = None
    return {
        "type": guess_optimizer_type(first) if first else "unknown",
        "param_groups": len(groups),
        "lr": _number(first.get("lr")),
        "parameters_with_state": len(per_parameter or {}),
    }


def _number(value: Any) -> float | None:
    """A float for an int, a float or a one-element tensor (a tensor LR); None otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_sparse:
        value = value.item()
    return float(value) if is_number(value) else None


def guess_optimizer_type(group: Mapping[str, Any]) -> str:
    """The ``torch.optim`` class whose constructor options the param group holds, or "unknown".

    A param group stores every option of its optimizer's constructor (and LR schedulers add
    theirs), so the class with the most options, all present, is the best guess. ``AdamW`` is
    ``Adam`` with ``decoupled_weight_decay=True`` in its group.
    """
    keys = set(map(str, group))
    best: list[tuple[int, str]] = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (
            isinstance(cls, type)
            and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer
        ):
            continue
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            continue
        options = set(parameters) - {"self", "params"}
        if options and options <= keys:
            best.append((len(options), name))
    if not best:
        return "unknown"
    most = max(n for n, _name in best)
    names = sorted(name for n, name in best if n == most)
    if names == ["Adam"] and group.get("decoupled_weight_decay") is True:
        return "AdamW"
    return " or ".join(names)
