"""The CLI on fsspec URLs, and the mirror tier's line in ``torch-ckpt ls``.

A command given a URL (``torch-ckpt ls s3://bucket/run``) runs on a local copy: the object, or
every object directly under the URL, is downloaded to a temporary directory (each checkpoint is
read once, which ``ls`` and ``verify`` need anyway to check its checksum), the command runs there
unchanged, and the temporary path is replaced by the URL in what it prints. Nothing is written
to the remote location.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from ._cli_format import printable
from ._mirror import read_mirror_status
from ._paths import basename, is_url

# The arguments that name a checkpoint location, by command.
_LOCATION_ARGS = ("dir", "path", "src")


class RemoteMissing(Exception):
    """A URL given on the command line names nothing."""


@contextlib.contextmanager
def staged(url: str) -> Iterator[str]:
    """A local copy of the object, or the objects directly under ``url``, for the command."""
    from ._fsspec_storage import require_fsspec
    from ._storage_for import remote_storage

    require_fsspec(url, "the location")
    storage = remote_storage()
    fs, key = storage.fs(url)
    with tempfile.TemporaryDirectory(prefix="torch-ckpt-") as tmp:
        fs.invalidate_cache(key)
        if fs.isfile(key):
            local = os.path.join(tmp, basename(url))
            storage.download(url, local)
            yield local
            return
        entries = (
            [e for e in fs.ls(key, detail=True) if e.get("type") == "file"]
            if (fs.exists(key))
            else []
        )
        if not entries and not fs.isdir(key):
            raise RemoteMissing(f"{url} does not exist")
        local = os.path.join(tmp, basename(url) or "root")
        os.mkdir(local)
        for entry in entries:
            name = basename(str(entry["name"]))
            storage.download(f"{url.rstrip('/')}/{name}", os.path.join(local, name))
        yield local


def run_staged(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command``; URL arguments on local copies (module docstring)."""
    urls = [
        (name, getattr(args, name))
        for name in _LOCATION_ARGS
        if isinstance(getattr(args, name, None), str) and is_url(getattr(args, name))
    ]
    if not urls:
        return command(args)
    with contextlib.ExitStack() as stack:
        replacements: list[tuple[str, str]] = []
        for name, url in urls:
            local = stack.enter_context(staged(url))
            setattr(args, name, local)
            replacements.append((local, url.rstrip("/")))
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return command(args)
        finally:
            for buffer, stream in ((out, sys.stdout), (err, sys.stderr)):
                text = buffer.getvalue()
                for local, url in replacements:
                    text = text.replace(local, url)
                stream.write(text)
    raise AssertionError("unreachable")  # pragma: no cover


def mirror_summary(directory: str) -> tuple[str | None, dict[str, Any] | None]:
    """The line ``torch-ckpt ls`` prints about ``directory``'s mirror tier, and its JSON."""
    status = read_mirror_status(directory)
    if status is None:
        return None, None
    outcomes = [c for c in status["checkpoints"] if isinstance(c, dict)]
    by_state: dict[str, list[dict[str, Any]]] = {}
    for outcome in outcomes:
        by_state.setdefault(str(outcome.get("state")), []).append(outcome)
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_state.items()))
    line = f"Mirror {printable(str(status.get('mirror_dir')))}: {counts or 'nothing copied yet'}"
    failed = by_state.get("failed", [])
    if failed:
        newest = failed[-1]
        line += (
            f"; the copy of {printable(str(newest.get('name')))} failed: "
            f"{printable(str(newest.get('detail')))}"
        )
    return line, status
