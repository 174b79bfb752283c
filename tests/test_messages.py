"""An exception as one line: ``error_line`` and ``os_error_reason``."""

from __future__ import annotations

import errno

import pytest

from torch_ckpt_hook._messages import error_line, os_error_reason


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "RuntimeError: Error(s) in loading: Missing key(s): 'w'. Check the docs."),
        ({"with_type": False}, "Error(s) in loading: Missing key(s): 'w'. Check the docs."),
        ({"first_line": True}, "RuntimeError: Error(s) in loading:"),
        ({"limit": 30}, "RuntimeError: Error(s) in l..."),
    ],
)
def test_error_line_makes_one_line(kwargs: dict[str, object], expected: str) -> None:
    err = RuntimeError("\n  Error(s) in loading:\n\tMissing key(s): 'w'.\n\nCheck the docs.\n")

    assert expected == error_line(err, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_type", [True, False])
def test_an_error_without_a_message_is_its_type(with_type: bool) -> None:
    assert "ZeroDivisionError" == error_line(ZeroDivisionError(), with_type=with_type)
    assert "ValueError" == error_line(ValueError(" \n "), with_type=with_type)


def test_os_error_reason_leaves_out_the_path() -> None:
    denied = PermissionError(errno.EACCES, "Permission denied", "/ckpt/model.ckpt-1")

    assert "Permission denied" == os_error_reason(denied)
    assert "disk on fire" == os_error_reason(OSError("disk\non fire"))
    assert "OSError" == os_error_reason(OSError())
