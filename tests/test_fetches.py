"""Fetch resolution and feed merging."""

from __future__ import annotations

from collections import namedtuple

import pytest

from torch_ckpt_hook import SessionRunArgs, SessionRunHook
from torch_ckpt_hook._fetches import check_fetches, merge_feeds, resolve_fetches

Pair = namedtuple("Pair", ["first", "second"])


def test_a_str_fetch_is_a_key_into_the_returned_mapping() -> None:
    assert 1.5 == resolve_fetches("loss", {"loss": 1.5, "acc": 0.9})


def test_a_callable_fetch_is_called_with_the_returned_value() -> None:
    assert 6 == resolve_fetches(lambda value: value * 2, 3)


def test_nested_fetches_mirror_their_structure() -> None:
    value = {"loss": 1.0, "acc": 0.5}
    fetches = {"a": ["loss", ("acc", lambda v: len(v))], "b": Pair("acc", "loss"), "c": None}
    expected = {"a": [1.0, (0.5, 2)], "b": Pair(0.5, 1.0), "c": None}
    assert expected == resolve_fetches(fetches, value)
    assert isinstance(resolve_fetches(fetches, value)["b"], Pair)


def test_none_fetches_resolve_to_none() -> None:
    assert resolve_fetches(None, {"loss": 1}) is None


def test_a_missing_key_names_the_fetch_and_the_keys() -> None:
    with pytest.raises(
        KeyError,
        match=r"fetch 'lss' is not a key of the step function's result \(its keys: \['loss'\]\)",
    ):
        resolve_fetches("lss", {"loss": 1})


def test_a_key_fetch_needs_a_mapping_result() -> None:
    with pytest.raises(
        TypeError,
        match=r"fetch 'loss' is a key, so the step function must return a mapping, but it returned float",
    ):
        resolve_fetches("loss", 1.0)


def test_check_fetches_rejects_leaves_that_are_neither_keys_nor_callables() -> None:
    with pytest.raises(
        TypeError,
        match=r"^Hook fetches\['x'\]\[1\] must be a str key, a callable, or a list/tuple/dict of them, got 3 \(an int\)$",
    ):
        check_fetches({"x": ["ok", 3]}, "Hook fetches")


class _Hook(SessionRunHook):
    pass


def test_hook_feeds_are_merged_with_the_callers_keyword_arguments() -> None:
    requests = [
        (_Hook(), SessionRunArgs(None, feed_dict={"lr": 0.1})),
        (_Hook(), None),
        (_Hook(), SessionRunArgs("loss", feed_dict={"scale": 2})),
    ]
    caller = {"batch": [1, 2]}
    assert {"batch": [1, 2], "lr": 0.1, "scale": 2} == merge_feeds(requests, caller)
    assert {"batch": [1, 2]} == caller, "the caller's dict is not mutated"


def test_two_hooks_feeding_one_name_is_a_runtime_error() -> None:
    requests = [
        (_Hook(), SessionRunArgs(None, feed_dict={"lr": 0.1})),
        (_Hook(), SessionRunArgs(None, feed_dict={"lr": 0.2})),
    ]
    with pytest.raises(
        RuntimeError, match=r"^Same argument is fed by two hooks\. Conflict\(s\): \['lr'\]$"
    ):
        merge_feeds(requests, {})


def test_a_hook_feeding_a_name_the_caller_passed_is_a_runtime_error() -> None:
    requests = [(_Hook(), SessionRunArgs(None, feed_dict={"batch": 0}))]
    with pytest.raises(
        RuntimeError,
        match=r"^Same argument is fed by a SessionRunHook and the caller\. Conflict\(s\): \['batch'\]$",
    ):
        merge_feeds(requests, {"batch": 1})
