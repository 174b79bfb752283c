"""Early writeback (``_writeback``): the disk starts on a large file before its fsync."""

from __future__ import annotations

import os
import pathlib

import pytest

from torch_ckpt_hook._fsutil import atomic_write
from torch_ckpt_hook._writeback import EarlyWriteback, start_writeback


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, fd: int, offset: int, length: int) -> None:
        self.calls.append((fd, offset, length))


def test_writeback_is_asked_for_each_chunk_written_in_order_and_the_bytes_pass_unchanged(
    tmp_path: pathlib.Path,
) -> None:
    advise = Recorder()
    with open(tmp_path / "f", "wb") as f:
        sink = EarlyWriteback(f, chunk=10, advise=advise)
        assert [sink.write(b"a" * 4), sink.write(b"b" * 4)] == [4, 4]
        assert advise.calls == []  # 8 bytes: below one chunk
        sink.write(memoryview(b"c" * 4))
        sink.write(b"d" * 25)
        sink.write(b"e")
        sink.flush()
        fd = f.fileno()
    # Every byte from the first to the last request's end asked for once, in order.
    assert advise.calls == [(fd, 0, 12), (fd, 12, 25)]
    assert (tmp_path / "f").read_bytes() == b"a" * 4 + b"b" * 4 + b"c" * 4 + b"d" * 25 + b"e"


def test_a_file_already_written_to_is_counted_from_its_position(tmp_path: pathlib.Path) -> None:
    advise = Recorder()
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 100)
        sink = EarlyWriteback(f, chunk=50, advise=advise)
        sink.write(b"y" * 60)
        fd = f.fileno()
    assert advise.calls == [(fd, 100, 60)]


@pytest.mark.parametrize("chunk", [0, -1])
def test_a_chunk_that_is_not_positive_is_refused(tmp_path: pathlib.Path, chunk: int) -> None:
    with (
        open(tmp_path / "f", "wb") as f,
        pytest.raises(ValueError, match="chunk must be a positive"),
    ):
        EarlyWriteback(f, chunk=chunk)


def test_the_request_is_harmless_on_a_real_file_and_ignored_where_refused(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        start_writeback(f.fileno(), 0, len(data))  # queued I/O: the bytes stay as written
        os.fsync(f.fileno())
    assert path.read_bytes() == data
    read_end, write_end = os.pipe()
    try:
        start_writeback(write_end, 0, 4096)  # a pipe: the kernel refuses (ESPIPE), nothing raised
    finally:
        os.close(read_end)
        os.close(write_end)


def test_atomic_write_of_a_file_larger_than_several_chunks_is_intact(
    tmp_path: pathlib.Path,
) -> None:
    data = os.urandom(70 << 20)  # the default chunk is 32 MiB: two requests, then the fsync
    atomic_write(
        tmp_path / "big",
        lambda f: [f.write(data[i : i + (8 << 20)]) for i in range(0, len(data), 8 << 20)],
    )
    assert (tmp_path / "big").read_bytes() == data


def test_atomic_write_hands_its_writer_the_early_writeback_file(tmp_path: pathlib.Path) -> None:
    seen: list[object] = []
    atomic_write(tmp_path / "f", lambda f: [seen.append(f), f.write(b"x")])
    assert [type(f) for f in seen] == [EarlyWriteback]
    assert (tmp_path / "f").read_bytes() == b"x"
