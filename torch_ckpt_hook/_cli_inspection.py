"""What ``torch-ckpt inspect`` says of a checkpoint's payload: tensors, optimizer, RNG states.

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

from ._cli_format import count, printable
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


def build_document(path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The inspection of the checkpoint at ``path`` whose loaded payload is ``payload``."""
    problems: list[str] = []
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
        "size_bytes": os.path.getsize(path),
        "format_version": payload.get("format_version"),
        "global_step": payload.get("global_step"),
        "payload_keys": [printable(str(key)) for key in payload],
        "optimizer": describe_optimizer(payload.get("optimizer"), problems),
        "extra_state": _names(payload.get("extra_state"), "extra_state", problems),
        "rng_states": rng_states(payload.get("rng")),
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
        problems.append(f"{what} is a {type(value).__qualname__}, not a mapping")
        return []
    return sorted(printable(str(key)) for key in value)


def describe_optimizer(state: Any, problems: list[str]) -> dict[str, Any] | None:
    """The optimizer's type, inferred: the payload holds its ``state_dict()``, not its class.

    What does not have ``Optimizer.state_dict()``'s shape is added to ``problems``.
    """
    if state is None:
        return None
    if not isinstance(state, Mapping):
        problems.append(f"optimizer is a {type(state).__qualname__}, not a mapping")
        return None
    groups = state.get("param_groups")
    if groups is None:
        groups = []
    elif not isinstance(groups, (list, tuple)):
        problems.append(
            f"optimizer.param_groups is a {type(groups).__qualname__}, not a list of mappings"
        )
        groups = []
    mappings = [group for group in groups if isinstance(group, Mapping)]
    others = len(groups) - len(mappings)
    if others:
        problems.append(
            f"optimizer.param_groups holds {others} "
            f"{'entry that is not a mapping' if others == 1 else 'entries that are not mappings'}"
        )
    first: Mapping[str, Any] = mappings[0] if mappings else {}
    per_parameter = state.get("state")
    if per_parameter is not None and not isinstance(per_parameter, Mapping):
        problems.append(f"optimizer.state is a {type(per_parameter).__qualname__}, not a mapping")
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
