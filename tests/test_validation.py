"""The argument checks: one message shape, ``<name> must be <expectation>, got <value>``."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pytest
import torch

from torch_ckpt_hook._validation import (
    check_bool,
    check_callable,
    check_int,
    check_number,
    check_type,
    is_int,
    is_number,
    repr_with_type,
    short_repr,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", "'10' (a str)"),
        (True, "True (a bool)"),
        (2.5, "2.5 (a float)"),
        (3, "3 (an int)"),
        ([1], "[1] (a list)"),
        (object, "<class 'object'> (a type)"),
        (None, "None"),
    ],
)
def test_repr_with_type_names_the_type_with_its_article(value: object, expected: str) -> None:
    assert expected == repr_with_type(value)


def test_a_long_repr_is_cut() -> None:
    text = short_repr("x" * 500)

    assert 80 == len(text)
    assert text.startswith("'xxx")
    assert text.endswith("...")
    assert repr_with_type(list(range(100))).endswith("... (a list)")


@pytest.mark.parametrize(
    ("value", "as_int", "as_number"),
    [(3, True, True), (2.5, False, True), (True, False, False), ("3", False, False)],
)
def test_a_bool_is_neither_an_int_nor_a_number(
    value: object, as_int: bool, as_number: bool
) -> None:
    assert (as_int, as_number) == (is_int(value), is_number(value))


# -- check_int ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "value", "error", "message"),
    [
        ({}, 2.5, TypeError, r"^n must be an int, got 2\.5 \(a float\)$"),
        ({}, True, TypeError, r"^n must be an int, got True \(a bool\)$"),
        ({}, None, TypeError, r"^n must be an int, got None$"),
        ({"minimum": 0}, -3, ValueError, r"^n must be a non-negative int, got -3$"),
        ({"minimum": 1}, 0, ValueError, r"^n must be a positive int, got 0$"),
        ({"minimum": 2}, 1, ValueError, r"^n must be an int >= 2, got 1$"),
        (
            {"minimum": 0, "allow_none": True},
            "5",
            TypeError,
            r"^n must be a non-negative int or None, got '5' \(a str\)$",
        ),
        (
            {"minimum": 0, "allow_none": True, "hint": "the last step"},
            -1,
            ValueError,
            r"^n must be a non-negative int \(the last step\) or None, got -1$",
        ),
    ],
)
def test_check_int_rejects(
    kwargs: dict[str, Any], value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_int("n", value, **kwargs)


def test_check_int_returns_the_value_and_none_when_allowed() -> None:
    assert 0 == check_int("n", 0, minimum=0)
    assert 7 == check_int("n", 7)
    assert check_int("n", None, allow_none=True) is None


# -- check_number ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "value", "error", "message"),
    [
        ({}, "1", TypeError, r"^x must be a number, got '1' \(a str\)$"),
        ({}, False, TypeError, r"^x must be a number, got False \(a bool\)$"),
        ({"minimum": 0}, -0.5, ValueError, r"^x must be a non-negative number, got -0\.5$"),
        ({"minimum": 0}, float("nan"), ValueError, r"^x must be a non-negative number, got nan$"),
        ({"minimum": 1.5}, 1, ValueError, r"^x must be a number >= 1\.5, got 1$"),
        ({"positive": True}, 0, ValueError, r"^x must be a positive number, got 0$"),
        ({"positive": True}, float("nan"), ValueError, r"^x must be a positive number, got nan$"),
        (
            {"positive": True, "allow_none": True},
            [],
            TypeError,
            r"^x must be a positive number or None, got \[\] \(a list\)$",
        ),
    ],
)
def test_check_number_rejects(
    kwargs: dict[str, Any], value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_number("x", value, **kwargs)


def test_check_number_returns_the_value_as_given() -> None:
    assert 3 == check_number("x", 3, minimum=0)
    assert isinstance(check_number("x", 3, minimum=0), int)
    assert 0.0 == check_number("x", 0.0, minimum=0)
    assert float("inf") == check_number("x", float("inf"), positive=True)
    assert check_number("x", None, allow_none=True) is None
    # Without a bound a NaN is a number like any other.
    assert math.isnan(check_number("x", float("nan")))


def test_check_number_takes_a_minimum_or_positive_not_both() -> None:
    with pytest.raises(TypeError, match="not both"):
        check_number("x", 1, minimum=0, positive=True)


# -- check_bool, check_type, check_callable ----------------------------------------------------


def test_check_bool() -> None:
    assert check_bool("flag", False) is False
    assert check_bool("flag", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^flag must be a bool, got 1 \(an int\)$"):
        check_bool("flag", 1)
    with pytest.raises(TypeError, match=r"^flag must be a bool or None, got 'yes' \(a str\)$"):
        check_bool("flag", "yes", allow_none=True)


def test_check_type() -> None:
    path = check_type("path", "/tmp", (str, os.PathLike), "a path (str or os.PathLike)")
    assert "/tmp" == path
    assert check_type("t", None, torch.Tensor, "a tensor", allow_none=True) is None
    with pytest.raises(
        TypeError,
        match=r"^path must be a path \(str or os\.PathLike\) or None, got 3 \(an int\)$",
    ):
        check_type("path", 3, (str, os.PathLike), "a path (str or os.PathLike)", allow_none=True)
    with pytest.raises(TypeError, match=r"^t must be a tensor, got None$"):
        check_type("t", None, torch.Tensor, "a tensor")


def test_check_callable() -> None:
    assert len is check_callable("fn", len)
    assert check_callable("fn", None, allow_none=True) is None
    with pytest.raises(
        TypeError,
        match=re.escape("fn must be a callable taking (a, b) or None, got 'f' (a str)"),
    ):
        check_callable("fn", "f", "a callable taking (a, b)", allow_none=True)
    with pytest.raises(TypeError, match=r"^fn must be a callable, got 3 \(an int\)$"):
        check_callable("fn", 3)
