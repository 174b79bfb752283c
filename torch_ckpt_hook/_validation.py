"""Argument checks, with one message shape: ``<name> must be <expectation>, got <value>``.

A wrong type is a ``TypeError`` whose value carries its type, a wrong value of the right type a
``ValueError`` without it::

    every_n_secs must be a non-negative number, got '10' (a str)
    every_n_secs must be a non-negative number, got -0.5

A ``bool`` is never accepted where an ``int`` or a number is expected: ``True`` is an ``int`` to
Python but never a step count or an interval to a user. A NaN fails every bound.

TensorFlow's own messages (``SecondOrStepTimer``'s "Either every_secs or every_steps should be
provided.", ...) are raised where they are checked, word for word, not through these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, TypeGuard, TypeVar, overload

_T = TypeVar("_T")

# A repr longer than this is cut: a message names what was given, it does not print a tensor.
_REPR_LIMIT = 80


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_repr(value: object) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def repr_with_type(value: object) -> str:
    """What a ``TypeError`` says was given: ``'10' (a str)``, ``True (a bool)``, ``None``."""
    if value is None:
        return "None"
    name = type(value).__qualname__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{short_repr(value)} ({article} {name})"


def _expectation(what: str, hint: str | None, allow_none: bool) -> str:
    return what + (f" ({hint})" if hint else "") + (" or None" if allow_none else "")


@overload
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = ...,
    allow_none: Literal[False] = ...,
    hint: str | None = ...,
) -> int: ...
@overload
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = ...,
    allow_none: bool,
    hint: str | None = ...,
) -> int | None: ...
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    allow_none: bool = False,
    hint: str | None = None,
) -> int | None:
    """``value``, checked to be an ``int`` (not a ``bool``) of at least ``minimum``.

    Args:
        minimum: the smallest value allowed; 0 reads "a non-negative int", 1 "a positive int".
        allow_none: accept ``None`` (and return it).
        hint: what the number means, put in the message: ``"the last global step"``.

    Raises:
        TypeError: ``value`` is not an ``int`` (or ``None``, when allowed).
        ValueError: it is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if minimum == 0:
        what = "a non-negative int"
    elif minimum == 1:
        what = "a positive int"
    else:
        what = "an int" if minimum is None else f"an int >= {minimum}"
    expected = _expectation(what, hint, allow_none)
    if not is_int(value):
        raise TypeError(f"{name} must be {expected}, got {repr_with_type(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {short_repr(value)}")
    return value


@overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = ...,
    positive: bool = ...,
    allow_none: Literal[False] = ...,
    hint: str | None = ...,
) -> float: ...
@overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = ...,
    positive: bool = ...,
    allow_none: bool,
    hint: str | None = ...,
) -> float | None: ...
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    positive: bool = False,
    allow_none: bool = False,
    hint: str | None = None,
) -> float | None:
    """``value``, checked to be an ``int`` or a ``float`` (not a ``bool``) within its bound.

    It is returned as given: an ``int`` stays an ``int``.

    Args:
        minimum: the smallest value allowed; 0 reads "a non-negative number".
        positive: allow only values above 0 ("a positive number"), instead of a ``minimum``.
        allow_none: accept ``None`` (and return it).
        hint: what the number means, put in the message.

    Raises:
        TypeError: ``value`` is not a number (or ``None``, when allowed).
        ValueError: it is out of bounds, or NaN where there is a bound.
    """
    if positive and minimum is not None:
        raise TypeError("check_number takes a minimum or positive=True, not both")
    if value is None and allow_none:
        return None
    if positive:
        what = "a positive number"
    elif minimum == 0:
        what = "a non-negative number"
    else:
        what = "a number" if minimum is None else f"a number >= {minimum}"
    expected = _expectation(what, hint, allow_none)
    if not is_number(value):
        raise TypeError(f"{name} must be {expected}, got {repr_with_type(value)}")
    bounded = positive or minimum is not None
    if (
        (bounded and math.isnan(value))
        or (positive and value <= 0)
        or (minimum is not None and value < minimum)
    ):
        raise ValueError(f"{name} must be {expected}, got {short_repr(value)}")
    return value


@overload
def check_bool(name: str, value: object, *, allow_none: Literal[False] = ...) -> bool: ...
@overload
def check_bool(name: str, value: object, *, allow_none: bool) -> bool | None: ...
def check_bool(name: str, value: object, *, allow_none: bool = False) -> bool | None:
    """``value``, checked to be a ``bool`` (``0`` and ``1`` are not).

    Raises:
        TypeError: it is not a ``bool`` (or ``None``, when allowed).
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        expected = _expectation("a bool", None, allow_none)
        raise TypeError(f"{name} must be {expected}, got {repr_with_type(value)}")
    return value


@overload
def check_type(
    name: str,
    value: object,
    types: type[_T] | tuple[type[_T], ...],
    expected: str,
    *,
    allow_none: Literal[False] = ...,
) -> _T: ...
@overload
def check_type(
    name: str,
    value: object,
    types: type[_T] | tuple[type[_T], ...],
    expected: str,
    *,
    allow_none: bool,
) -> _T | None: ...
def check_type(
    name: str,
    value: object,
    types: type[_T] | tuple[type[_T], ...],
    expected: str,
    *,
    allow_none: bool = False,
) -> _T | None:
    """``value``, checked to be an instance of ``types``.

    Args:
        expected: the expectation as the message says it: ``"a Saver"``, ``"a path (str or
            os.PathLike)"``; " or None" is added when ``allow_none``.

    Raises:
        TypeError: it is not.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, types):
        expectation = _expectation(expected, None, allow_none)
        raise TypeError(f"{name} must be {expectation}, got {repr_with_type(value)}")
    return value


@overload
def check_callable(
    name: str,
    value: object,
    expected: str = ...,
    *,
    allow_none: Literal[False] = ...,
) -> Callable[..., Any]: ...
@overload
def check_callable(
    name: str,
    value: object,
    expected: str = ...,
    *,
    allow_none: bool,
) -> Callable[..., Any] | None: ...
def check_callable(
    name: str,
    value: object,
    expected: str = "a callable",
    *,
    allow_none: bool = False,
) -> Callable[..., Any] | None:
    """``value``, checked to be callable.

    Args:
        expected: the expectation as the message says it, such as ``"a callable taking
            (scaffold, session)"``; " or None" is added when ``allow_none``.

    Raises:
        TypeError: it is not.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        expectation = _expectation(expected, None, allow_none)
        raise TypeError(f"{name} must be {expectation}, got {repr_with_type(value)}")
    return value
