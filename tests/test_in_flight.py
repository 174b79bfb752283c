"""Tests of ``InFlight``: the one owner of a saver's save in flight and its failures."""

from __future__ import annotations

import errno
import logging
import threading

import pytest

from torch_ckpt_hook import CheckpointSaveError
from torch_ckpt_hook._in_flight import InFlight
from torch_ckpt_hook._writer import SaveHandle, start_write


def _held(path: str) -> tuple[SaveHandle, threading.Event]:
    gate = threading.Event()

    def write() -> None:
        assert gate.wait(30), "the test never released the write"

    return start_write(path, write), gate


def _failed(path: str) -> SaveHandle:
    def fail() -> None:
        raise OSError(errno.EIO, "I/O error")

    handle = start_write(path, fail)
    handle.wait()
    return handle


def test_waiting_for_the_previous_save_warns_and_returns_once_it_is_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    in_flight = InFlight(drain_timeout_secs=30)
    handle, gate = _held("model.ckpt-1")
    in_flight.add(handle)
    assert handle is in_flight.being_written()
    threading.Timer(0.05, gate.set).start()

    with caplog.at_level(logging.WARNING):
        in_flight.wait_for_previous("model.ckpt-2")

    assert handle.done()
    assert in_flight.being_written() is None
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "Saving model.ckpt-2 waits for the previous save (model.ckpt-1)" in record.getMessage()


def test_a_drain_style_wait_without_a_next_save_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    in_flight = InFlight(drain_timeout_secs=30)
    handle, gate = _held("model.ckpt-1")
    in_flight.add(handle)
    threading.Timer(0.05, gate.set).start()

    with caplog.at_level(logging.WARNING):
        in_flight.wait_for_previous()

    assert handle.done()
    assert [] == caplog.records


def test_nothing_in_flight_means_no_wait_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        InFlight(drain_timeout_secs=30).wait_for_previous("model.ckpt-1")
    assert [] == caplog.records


def test_a_previous_save_still_written_after_the_timeout_is_an_error() -> None:
    in_flight = InFlight(drain_timeout_secs=0.05)
    handle, gate = _held("model.ckpt-1")
    in_flight.add(handle)
    try:
        with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-1 did not finish within"):
            in_flight.wait_for_previous("model.ckpt-2")
    finally:
        gate.set()
        handle.wait()


def test_a_failure_is_raised_once_by_drain_and_not_at_all_once_its_handle_reported_it() -> None:
    in_flight = InFlight(drain_timeout_secs=30)
    first = _failed("model.ckpt-1")
    in_flight.add(first)

    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-1 failed: OSError"):
        in_flight.drain()
    in_flight.drain()  # reported once

    second = _failed("model.ckpt-2")
    in_flight.add(second)
    with pytest.raises(CheckpointSaveError):
        second.result()  # the hook's poll reports it
    in_flight.drain()


def test_an_unreported_failure_survives_the_next_save_until_drained() -> None:
    in_flight = InFlight(drain_timeout_secs=30)
    in_flight.add(_failed("model.ckpt-1"))
    ok = start_write("model.ckpt-2", lambda: None)
    in_flight.add(ok)
    ok.wait()

    with pytest.raises(CheckpointSaveError, match=r"model\.ckpt-1 failed"):
        in_flight.drain()
