"""Checkpoints on an fsspec file system (S3, GCS, Azure, ``memory://``): the object-store commit.

Which storage a location gets, and the default ``Saver`` storage that routes between local
files and URLs, are ``_storage_for``'s.

The commit on an object store renames nothing (a rename there is a copy, and not atomic):

1. every object of the checkpoint is written as one atomic publication: one ``pipe_file`` put
   of the whole bytes (objects up to ``SINGLE_PUT_MAX``, and always on ``memory://``), or a file
   opened with ``autocommit=False`` (s3fs: a multipart upload, completed by ``commit()``; gcsfs:
   a resumable upload, finalised by ``commit()``).
   A failed or killed upload is discarded (the multipart upload aborted) or never completed, so
   nothing ever appears under the final key half-written; an aborted process can leave an
   incomplete multipart upload behind, invisible to readers, that a bucket lifecycle rule
   (``AbortIncompleteMultipartUpload``) reclaims;
2. then the state file object (one put): the commit point;
3. then the deletions retention asks for, each proved ours first (``why_not_deletable``: the name
   pattern and this package's checksum trailer, read with a ranged read of the object's last
   bytes).

Objects never have temporary names, so ``prepare`` has nothing to clean up. The bytes are those
of a local checkpoint file, CRC trailer included; reads download the object to a temporary local
file and verify it exactly as a local file (``_checkpoint_file``). Credentials and endpoints are
fsspec's and the protocol package's: the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL``...), fsspec's config (``fsspec.config.conf["s3"]``), or
``FsspecStorage(storage_options=...)`` handed to ``Saver(storage=...)``.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checkpoint_dir import CHECKPOINT_NAME
from ._checkpoint_file import CheckpointProblem, check_checkpoint, load_checkpoint
from ._integrity import _TRAILER_START, TRAILER_SIZE, save_with_checksum
from ._paths import basename, inside, is_url, join, protocol
from ._state_file import STATE_FILE_LIMIT, STATE_FILENAME, CheckpointState, existing_entries
from ._storage import CheckpointStorage
from ._text_format import format_checkpoint_state, parse_checkpoint_state

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from torch.serialization import MAP_LOCATION

logger = logging.getLogger(__name__)

INSTALL_REMOTE = "pip install 'torch-ckpt-hook[remote]'"
# The package a protocol needs, for the install command in the error.
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
}
_COPY_CHUNK = 8 << 20


def require_fsspec(url: str, what: str = "checkpoint_dir") -> None:
    """Fail unless fsspec and the package of ``url``'s protocol are installed.

    Raises:
        ImportError: one is missing; the message holds the install command.
        ValueError: fsspec knows no such protocol.
    """
    try:
        import fsspec
    except ImportError as err:
        raise ImportError(
            f"{what} {url!r} is an fsspec URL, which needs fsspec (not installed): {INSTALL_REMOTE}"
        ) from err
    for part in url.split("::"):
        name = protocol(part)
        try:
            fsspec.get_filesystem_class(name)
        except ImportError as err:
            package = _PACKAGES.get(name)
            fix = f"pip install {package}" if package else str(err)
            raise ImportError(
                f"{what} {url!r} needs {package or 'a package'} for {name}:// URLs (not "
                f"installed): {fix}"
            ) from err
        except ValueError as err:
            raise ValueError(
                f"{what} must be a local path or an fsspec URL of a known protocol, got "
                f"{url!r}: {err}"
            ) from err


def _mtime(info: Mapping[str, Any]) -> float:
    """A listing entry's modification time: S3's LastModified, memory's created, ..."""
    for key in ("LastModified", "mtime", "updated", "created", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


class FsspecStorage(CheckpointStorage):
    """Checkpoints as objects of an fsspec file system; the module docstring gives the commit.

    ``storage_options`` go to ``fsspec.core.url_to_fs`` (for s3fs: ``key``, ``secret``,
    ``endpoint_url``, ``client_kwargs``...); by default fsspec's config and the environment
    decide.
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = dict(storage_options or {})
        self._directories: set[str] = set()

    def fs(self, url: str) -> tuple[AbstractFileSystem, str]:
        """The file system of ``url`` and the path it has there."""
        require_fsspec(url)
        from fsspec.core import url_to_fs

        fs, key = url_to_fs(url, **self._options)
        return fs, key

    # -- writing ---------------------------------------------------------------------------

    def prepare(self, directory: str) -> None:
        # Objects have no temporary names: a killed upload left nothing visible to clean up.
        return None

    def write(self, path: str, payload: Mapping[str, Any]) -> None:
        self._publish(path, lambda f: save_with_checksum(payload, f))

    def put_file(self, source: str, path: str) -> None:
        with open(source, "rb") as src:
            self._publish(path, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def write_state(self, directory: str, latest: str, paths: Sequence[str]) -> None:
        self.write_state_file(directory, latest, paths, None)

    def write_state_file(
        self, directory: str, latest: str, paths: Sequence[str], latest_filename: str | None
    ) -> None:
        """Put ``directory``'s state file (one object: atomic); paths in it are relative."""
        names = [self._relative(directory, p) for p in paths]
        model = self._relative(directory, latest)
        if not names or names[-1] != model:
            names.append(model)
        data = format_checkpoint_state(model, names).encode("ascii")
        fs, key = self.fs(_state_url(directory, latest_filename))
        fs.pipe_file(key, data)

    def delete(self, path: str) -> None:
        fs, key = self.fs(path)
        fs.invalidate_cache(key)
        if not fs.exists(key):
            raise FileNotFoundError(path)
        fs.rm_file(key)

    def why_not_deletable(self, path: str, directory: str, prefix: str | None) -> str | None:
        if not inside(path, directory):
            return f"it is outside the checkpoint directory {directory}"
        name = basename(path)
        if name == STATE_FILENAME:
            return "it is the checkpoint state file"
        if prefix is not None and re.fullmatch(re.escape(prefix) + r"-[0-9]+", name) is None:
            return f"its name is not {prefix}-<step>"
        fs, key = self.fs(path)
        try:
            fs.invalidate_cache(key)
            info = fs.info(key)
            if info.get("type") != "file":
                return "it is not an object holding a file (a prefix, a directory)"
            size = int(info["size"])
            if size < TRAILER_SIZE:
                return "it does not end in torch_ckpt_hook's checksum trailer"
            tail = fs.cat_file(key, start=size - TRAILER_SIZE, end=size)
        except FileNotFoundError:
            return "it does not exist"
        except OSError as err:
            return f"it cannot be examined ({err})"
        if not bytes(tail).startswith(_TRAILER_START):
            return "it does not end in torch_ckpt_hook's checksum trailer"
        return None

    def check_writable(self, directory: str) -> None:
        """Prove an object can be written under ``directory`` (a probe, put then deleted).

        Raises:
            ValueError: ``directory`` is an object, or nothing can be written there.
        """
        fs, key = self.fs(directory)
        probe = join(directory, f".torch_ckpt_hook-probe-{uuid.uuid4().hex}.tmp")
        try:
            if fs.isfile(key):
                raise ValueError(
                    f"checkpoint_dir must be a directory, but {directory!r} is an object"
                )
            probe_fs, probe_key = self.fs(probe)
            probe_fs.pipe_file(probe_key, b"")
            probe_fs.rm_file(probe_key)
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"checkpoint_dir {directory!r} must be a writable location: {err} (check the "
                "bucket exists and the credentials in the environment can write to it)"
            ) from err

    def _publish(self, url: str, fill: Callable[[Any], object]) -> None:
        """Write ``url`` through ``fill(f)`` as one atomic publication (module docstring)."""
        fs, key = self.fs(url)
        from fsspec.implementations.memory import MemoryFileSystem

        if isinstance(fs, MemoryFileSystem):
            # Its files are visible from open(): build the bytes, then store them in one step.
            buffer = io.BytesIO()
            fill(buffer)
            fs.pipe_file(key, buffer.getvalue())
            return
        spill = _SpillWriter(lambda: fs.open(key, "wb", autocommit=False))
        try:
            fill(spill)
            if spill.file is None:
                # Small enough to have stayed in memory: one put request, atomic by itself.
                fs.pipe_file(key, spill.buffer.getvalue())
                return
            f = spill.file
            spill.flush_buffer()
            f.close()  # uploads the last part; with autocommit off, publishes nothing
            f.commit()  # completes the multipart upload: the object appears whole
        except BaseException:
            f = spill.file
            if f is not None:
                with contextlib.suppress(Exception):
                    f.discard()  # aborts the multipart upload
                # Closed for good, so garbage collection does not flush (and upload) it again.
                with contextlib.suppress(Exception):
                    f.closed = True
            raise

    @staticmethod
    def _relative(directory: str, path: str) -> str:
        return basename(path) if inside(path, directory) else path

    # -- reading ---------------------------------------------------------------------------

    def read_state(self, directory: str) -> CheckpointState | None:
        return self.state(directory, None)

    def state(self, directory: str, latest_filename: str | None) -> CheckpointState | None:
        """The state file's checkpoints that exist (as ``get_checkpoint_state``), or None."""
        state_url = _state_url(directory, latest_filename)
        fs, key = self.fs(state_url)
        try:
            fs.invalidate_cache(key)
            size = int(fs.size(key))
            if size > STATE_FILE_LIMIT:
                raise ValueError(f"it holds {size} bytes, more than a state file does")
            model, paths = parse_checkpoint_state(bytes(fs.cat_file(key)).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning("Checkpoint state file %s is unusable (%s); it is ignored.", key, err)
            return None
        if not model:
            return None

        def resolve(p: str) -> str:
            # A relative name is this directory's; an absolute local path (TensorFlow's) names
            # the object of that name here.
            return p if is_url(p) else join(directory, basename(p))

        present = {basename(p) for _, p in self.find(directory)}

        def exists(p: str) -> bool:
            # One listing for the directory's own entries; others are asked one by one.
            return basename(p) in present if inside(p, directory) else self.exists(p)

        return existing_entries(resolve(model), [resolve(p) for p in paths], exists, state_url)

    def find(self, directory: str) -> list[tuple[int, str]]:
        # Every object is complete (an upload publishes whole or not at all): no archive check.
        found: list[tuple[int, float, str]] = []
        for info in self._list(directory):
            name = basename(str(info["name"]))
            m = CHECKPOINT_NAME.fullmatch(name)
            if m is None or name == STATE_FILENAME or info.get("type") != "file":
                continue
            found.append((int(m["step"]), _mtime(info), join(directory, name)))
        found.sort()
        return [(step, path) for step, _, path in found]

    def _list(self, directory: str) -> list[dict[str, Any]]:
        fs, key = self.fs(directory)
        fs.invalidate_cache(key)  # another process may have written since a cached listing
        try:
            return list(fs.ls(key, detail=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def check(self, path: str) -> CheckpointProblem | None:
        try:
            with self._download(path) as local:
                problem = check_checkpoint(local)
        except FileNotFoundError:
            return CheckpointProblem("unreadable", f"unreadable: {path} does not exist")
        except OSError as err:
            return CheckpointProblem("unreadable", f"unreadable: {err}")
        return problem

    def read(self, path: str, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        return self.load(path, map_location, verify=True)

    def load(self, path: str, map_location: MAP_LOCATION, *, verify: bool) -> dict[str, Any]:
        """``load_checkpoint`` of the object at ``path``, its messages naming ``path``."""
        try:
            local_cm = self._download(path)
            local = local_cm.__enter__()
        except FileNotFoundError:
            raise ValueError(
                f"The passed save_path is not a valid checkpoint: {path} does not exist"
            ) from None
        try:
            return load_checkpoint(local, map_location, verify=verify)
        except (ValueError, RuntimeError) as err:  # CheckpointError is a RuntimeError
            if local not in str(err):
                raise
            renamed = type(err)(str(err).replace(local, path))
            raise renamed from err.__cause__
        finally:
            local_cm.__exit__(None, None, None)

    @contextlib.contextmanager
    def _download(self, path: str) -> Iterator[str]:
        """The object at ``path`` in a temporary local file, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="torch_ckpt_hook-") as tmp:
            local = join(tmp, basename(path) or "checkpoint-object")
            self.download(path, local)
            yield local

    def download(self, path: str, local: str) -> None:
        """Copy the object at ``path`` to the local file ``local``."""
        fs, key = self.fs(path)
        from fsspec.implementations.memory import MemoryFileSystem

        if isinstance(fs, MemoryFileSystem):
            # Its open() hands out the stored buffer itself; cat_file copies it.
            with open(local, "wb") as f:
                f.write(bytes(fs.cat_file(key)))
        else:
            fs.get_file(key, local)

    def saved_time(self, path: str) -> float:
        fs, key = self.fs(path)
        fs.invalidate_cache(key)
        return _mtime(fs.info(key))

    def exists(self, path: str) -> bool:
        fs, key = self.fs(path)
        fs.invalidate_cache(key)
        return bool(fs.exists(key))

    def is_directory(self, directory: str) -> bool:
        # Object stores have no directories: any key prefix that is not an object will do.
        # Asked on the training thread at every save: a request only the first time.
        if directory in self._directories:
            return True
        fs, key = self.fs(directory)
        if fs.isfile(key):
            return False
        self._directories.add(directory)
        return True


# Objects up to this size are built in memory and put in one request; larger ones stream as a
# multipart upload, part by part, never holding more than a part in memory.
SINGLE_PUT_MAX = 16 << 20


class _SpillWriter:
    """Holds writes in memory up to ``SINGLE_PUT_MAX``, then opens the real file and streams.

    Owned by the writing thread alone.
    """

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self.buffer = io.BytesIO()
        self.file: Any = None

    def write(self, data: Any) -> int:
        if self.file is not None:
            return int(self.file.write(data))
        n = self.buffer.write(data)
        if self.buffer.tell() > SINGLE_PUT_MAX:
            self.file = self._opener()
            self.flush_buffer()
        return n

    def flush_buffer(self) -> None:
        if self.buffer.tell():
            self.file.write(self.buffer.getbuffer())
            self.buffer = io.BytesIO()

    def flush(self) -> None:
        return None


def _state_url(directory: str, latest_filename: str | None) -> str:
    name = latest_filename or STATE_FILENAME
    if "/" in name or name in (".", ".."):
        raise ValueError("'latest_filename' must not contain path components")
    return join(directory, name)
