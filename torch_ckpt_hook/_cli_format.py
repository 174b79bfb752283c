"""Output of the ``torch-ckpt`` command: printable text, tables, sizes, times and JSON.

Every path and message the command prints goes through ``printable``: a file name that is not
valid UTF-8 reaches Python as a string with lone surrogates (PEP 383), which a strict UTF-8
stream refuses to write and JSON cannot carry; its raw bytes are shown as ``\\xff`` escapes.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import torch


def printable(text: str) -> str:
    """``text`` (a path, or a message that holds one) with undecodable bytes as ``\\xNN``."""
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        # A lone surrogate that surrogateescape did not make (a str key in a pickle can hold one).
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def a_type(value: object) -> str:
    """``a list``, ``an int``, ``a None``: the article and the type's name, for messages."""
    name = "None" if value is None else type(value).__qualname__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"


def timestamp(mtime: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc).astimezone()


def local_time(mtime: float) -> str:
    return timestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")


def print_table(rows: Sequence[Sequence[str]], right_aligned: set[int] | None = None) -> None:
    right_aligned = right_aligned or set()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _value in fields)
    for label, value in fields:
        print(f"{label:<{width}}  {value}")


def print_json(document: Any) -> None:
    """Print ``document`` as JSON that any reader parses: strict JSON, valid UTF-8.

    NaN and infinities become null, and a value JSON has no type for (a tensor, bytes) its
    ``str``; ``allow_nan=False`` and ``default=str`` stay as the guard for anything missed.
    """
    print(json.dumps(_jsonable(document), indent=2, default=str, allow_nan=False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {printable(str(key)): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_sparse:
        return _jsonable(value.item())
    return printable(str(value))


class ConsoleHandler(logging.Handler):
    """Writes log records to a stream, above a live tqdm bar when one is drawn.

    The stream is looked up at each record (``sys.stderr`` by default), so a stream replaced
    after the handler was made (pytest's capture, a redirect) is the one written to.
    """

    def __init__(self, formatter: logging.Formatter, stream: TextIO | None = None) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = printable(self.format(record))
            stream = self._stream if self._stream is not None else sys.stderr
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None and getattr(tqdm, "tqdm", None) is not None:
                # tqdm.write clears the bars on this stream, writes, and draws them again.
                tqdm.tqdm.write(line, file=stream)
            else:
                stream.write(line + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


class PrefixFormatter(logging.Formatter):
    """``<prefix>: warning: <message>``, ``<prefix>: error: ...``: a command's own line style."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._prefix}: {record.levelname.lower()}: {record.getMessage()}"
