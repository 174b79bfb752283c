"""Checkpoint locations that are local paths or fsspec URLs, handled without importing fsspec.

A location is a URL when it starts with a protocol (``s3://bucket/run``, ``gs://...``,
``memory://run``, or a chained ``simplecache::s3://...``); everything else, ``file://`` URLs
included once ``normalize`` has turned them into plain paths, is a local path and goes through
``os.path`` exactly as before. URLs are joined and split on ``/`` as text: object stores have no
directories, links or relative paths to resolve, so no call here touches the network.
"""

from __future__ import annotations

import os
import posixpath
import re

# A protocol of two letters or more (``C:/`` stays a Windows path), then ``://`` or ``::``.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+(://|::)")
_FILE_URL = "file://"


def normalize(path: str) -> str:
    """``path`` with a ``file://`` prefix removed (a local path then); anything else unchanged."""
    if path.startswith(_FILE_URL):
        return path[len(_FILE_URL) :] or os.curdir
    return path


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an fsspec URL other than ``file://`` (a remote location)."""
    if not isinstance(path, str):
        return False
    return _URL.match(path) is not None and not path.startswith(_FILE_URL)


def protocol(url: str) -> str:
    """The protocol of ``url``, the last of a chain: ``s3`` for ``simplecache::s3://b/k``."""
    last = url.split("::")[-1]
    return last.split("://", 1)[0] if "://" in last else last


def join(directory: str, name: str) -> str:
    """``name`` in ``directory``: ``os.path.join`` for paths, ``/``-joined for URLs."""
    if not is_url(directory):
        return os.path.join(directory, name)
    return directory.rstrip("/") + "/" + name


def dirname(path: str) -> str:
    """The location ``path`` lies in."""
    if not is_url(path):
        return os.path.dirname(path)
    return posixpath.dirname(path.rstrip("/"))


def basename(path: str) -> str:
    """The last component of ``path``."""
    if not is_url(path):
        return os.path.basename(path)
    return posixpath.basename(path.rstrip("/"))


def abspath(path: str) -> str:
    """``os.path.abspath`` for paths; a URL is absolute already (trailing ``/`` dropped)."""
    if not is_url(path):
        return os.path.abspath(path)
    return path.rstrip("/")


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies directly in ``directory``: for local paths with links in either
    resolved, for URLs by name."""
    if not is_url(path) and not is_url(directory):
        parent = os.path.dirname(os.path.abspath(path))
        return os.path.realpath(parent) == os.path.realpath(directory)
    return is_url(path) and is_url(directory) and dirname(path) == directory.rstrip("/")
