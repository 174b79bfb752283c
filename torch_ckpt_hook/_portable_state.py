"""Model state that does not depend on the wrappers around the model (DDP, ``torch.compile``).

``DistributedDataParallel`` (and ``DataParallel``) hold the model as their ``module`` child and
``torch.compile``'s ``OptimizedModule`` as its ``_orig_mod`` child, so their ``state_dict()``
keys carry a ``module.`` or ``_orig_mod.`` prefix per wrapper. The session saves from and loads
into the innermost module instead, so a checkpoint written with a wrapper restores without it
and the other way round.

A checkpoint written otherwise (by an older version of this package, or by a hand-rolled loop
that saved the wrapper) still loads: when every key of its model state carries one of the
prefixes and its keys do not match the model's, the prefix is removed, repeatedly, and the
result is used only if it then matches the model's keys exactly. Otherwise the state is left
as it is, so an error names the keys as they are in the file.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

import torch

__all__ = ["WRAPPER_PREFIXES", "strip_wrapper_prefixes", "unwrap_model", "wrappers"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapped(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module ``module`` wraps, or None when it is not a known wrapper."""
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = module.module
        return inner if isinstance(inner, torch.nn.Module) else None
    # A compiled module exists only once torch.compile has imported dynamo; not importing it
    # here keeps the check free for every model that was never compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        inner = module._orig_mod
        return inner if isinstance(inner, torch.nn.Module) else None
    return None


def wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The wrappers around the model proper, outermost first (empty for a plain model)."""
    chain: list[torch.nn.Module] = []
    inner = _wrapped(model)
    while inner is not None:
        chain.append(model)
        model = inner
        inner = _wrapped(model)
    return chain


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside every DDP, ``DataParallel`` and ``torch.compile`` wrapper of ``model``."""
    inner = _wrapped(model)
    while inner is not None:
        model = inner
        inner = _wrapped(model)
    return model


def _common_prefix(keys: list[str]) -> str | None:
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in keys):
            return prefix
    return None


def strip_wrapper_prefixes(
    state: Mapping[str, Any], expected: Collection[str]
) -> Mapping[str, Any]:
    """``state`` without the wrapper prefixes of its keys, when that makes them ``expected``.

    Returns ``state`` itself when its keys match already, carry no common wrapper prefix, or
    would still not match without it. A stripped state keeps the ``_metadata`` (module versions)
    of the modules inside the wrappers, under their new names.
    """
    wanted = set(expected)
    keys = [key for key in state if isinstance(key, str)]
    if not keys or len(keys) != len(state) or set(keys) == wanted:
        return state
    prefixes: list[str] = []
    prefix = _common_prefix(keys)
    while prefix is not None and set(keys) != wanted:
        prefixes.append(prefix)
        keys = [key[len(prefix) :] for key in keys]
        prefix = _common_prefix(keys)
    if not prefixes or set(keys) != wanted:
        return state
    stripped: OrderedDict[str, Any] = OrderedDict(zip(keys, state.values(), strict=True))
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, Mapping):
        for prefix in prefixes:
            metadata = _strip_metadata(metadata, prefix)
        stripped._metadata = metadata  # type: ignore[attr-defined]
    return stripped


def _strip_metadata(metadata: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """Module metadata keyed by module names, the wrapper's own entry dropped."""
    name = prefix[:-1]
    result: OrderedDict[str, Any] = OrderedDict()
    for key, value in metadata.items():
        if key == name:
            result[""] = value
        elif isinstance(key, str) and key.startswith(prefix):
            result[key[len(prefix) :]] = value
    return result
