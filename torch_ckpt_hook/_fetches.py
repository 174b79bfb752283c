"""Hooks' fetches and feeds: resolving fetch structures, merging feed dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._hooks import SessionRunArgs, SessionRunHook
from ._validation import repr_with_type


def check_fetches(fetches: Any, where: str) -> None:
    """Reject a fetch structure the runner cannot resolve, before the step function runs."""
    if fetches is None or isinstance(fetches, str) or callable(fetches):
        return
    if isinstance(fetches, Mapping):
        for key, sub in fetches.items():
            check_fetches(sub, f"{where}[{key!r}]")
        return
    if isinstance(fetches, (list, tuple)):
        for index, sub in enumerate(fetches):
            check_fetches(sub, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} must be a str key, a callable, or a list/tuple/dict of them, "
        f"got {repr_with_type(fetches)}"
    )


def resolve_fetches(fetches: Any, value: Any) -> Any:
    """Resolve a fetch structure against the step function's return value, mirroring it."""
    if fetches is None:
        return None
    if isinstance(fetches, str):
        if not isinstance(value, Mapping):
            raise TypeError(
                f"fetch {fetches!r} is a key, so the step function must return a mapping, "
                f"but it returned {type(value).__qualname__}"
            )
        if fetches not in value:
            raise KeyError(
                f"fetch {fetches!r} is not a key of the step function's result "
                f"(its keys: {sorted(map(str, value))})"
            )
        return value[fetches]
    if callable(fetches):
        return fetches(value)
    if isinstance(fetches, Mapping):
        return {key: resolve_fetches(sub, value) for key, sub in fetches.items()}
    items = [resolve_fetches(sub, value) for sub in fetches]
    if isinstance(fetches, tuple):
        if hasattr(fetches, "_fields"):  # a namedtuple keeps its type
            return type(fetches)(*items)
        return tuple(items)
    return items


def merge_feeds(
    requests: Sequence[tuple[SessionRunHook, SessionRunArgs | None]],
    caller_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The step function's keyword arguments: the caller's plus every hook's ``feed_dict``.

    Raises:
        RuntimeError: two hooks feed the same name, or a hook feeds a name the caller passed.
    """
    hook_feeds: dict[str, Any] = {}
    conflicts: list[str] = []
    for _hook, request in requests:
        if request is None or not request.feed_dict:
            continue
        for name, value in request.feed_dict.items():
            if name in hook_feeds:
                conflicts.append(name)
            hook_feeds[name] = value
    if conflicts:
        raise RuntimeError(f"Same argument is fed by two hooks. Conflict(s): {sorted(conflicts)}")
    shared = sorted(set(hook_feeds) & set(caller_kwargs))
    if shared:
        raise RuntimeError(
            f"Same argument is fed by a SessionRunHook and the caller. Conflict(s): {shared}"
        )
    return {**caller_kwargs, **hook_feeds}
