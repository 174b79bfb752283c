"""A sharded checkpoint's directory layout and its manifest, the proof it is complete and intact.

A sharded checkpoint (SPEC.md section 5.2) is a directory ``<prefix>-<step>/``:

- the files ``torch.distributed.checkpoint`` writes (``.metadata``, ``__<rank>_<n>.distcp``),
  holding ``{"model": ..., "optimizer": ...}`` as ``get_state_dict`` returns them;
- ``PAYLOAD_NAME``, a regular checkpoint file of this package (checksum trailer, loads with
  ``weights_only=True``) holding the rest of the payload (``format_version``, ``global_step``,
  ``extra_state``, ``rng``, ``rank_rng``, ``rank_state``), written by the chief, with
  ``SHARDED_KEY`` naming the keys that live in the DCP files;
- ``MANIFEST_NAME``, written last, by the chief, atomically, once every rank's files are durable:
  every other file's size and CRC32. A directory without a manifest is not a checkpoint (a save
  that was killed, or is still being written); one whose files do not match it is damaged.

This module is the format only: writing and reading the manifest, digesting files. The save
(DCP, collectives) and the reads (verify, load without a process group) build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Mapping

from ._fsutil import atomic_write, fsync_dir, open_regular_file, read_small_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "torch_ckpt_manifest.json"
PAYLOAD_NAME = "payload.pt"
# The key of the payload file that lists the payload keys held in the DCP files.
SHARDED_KEY = "sharded_keys"
MANIFEST_FORMAT = "torch_ckpt_hook.sharded"
MANIFEST_VERSION = 1
# A manifest lists file names and numbers only; anything bigger is not one of ours.
MANIFEST_LIMIT = 16 << 20
_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """The size and CRC32 of one file of a sharded checkpoint."""

    size: int
    crc32: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What the manifest of a sharded checkpoint says: its step, world size and files."""

    global_step: int
    world_size: int
    # Relative POSIX paths inside the directory (never the manifest itself) -> digest.
    files: Mapping[str, FileDigest]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable as JSON, or not of this format."""


class ManifestVersionError(ManifestError):
    """A valid manifest of a newer version of this format: intact, but not readable here."""


def digest_file(path: str | os.PathLike[str]) -> FileDigest:
    """The size and CRC32 of the regular file at ``path``, read in chunks.

    Raises:
        OSError: it cannot be read.
        NotRegularFileError: it is not a regular file.
    """
    crc = 0
    size = 0
    with open_regular_file(os.fspath(path)) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return FileDigest(size, crc)


def _body(manifest: Manifest) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "global_step": manifest.global_step,
        "world_size": manifest.world_size,
        "files": {
            name: {"size": d.size, "crc32": d.crc32} for name, d in sorted(manifest.files.items())
        },
    }


def _body_crc(body: Mapping[str, object]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``directory``'s manifest atomically and durably (the directory is fsynced).

    The manifest carries a CRC32 of its own body, so a damaged manifest is told from a valid one.
    """
    if MANIFEST_NAME in manifest.files:
        raise ValueError(f"a manifest must not list itself ({MANIFEST_NAME})")
    body = _body(manifest)
    document = {**body, "crc32": _body_crc(body)}
    data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(os.path.join(os.fspath(directory), MANIFEST_NAME), lambda f: f.write(data))


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """The manifest of the sharded checkpoint in ``directory``.

    Raises:
        FileNotFoundError: the directory has no manifest (not a committed checkpoint).
        OSError: it cannot be read.
        ManifestError: it is not a valid manifest of this format (damaged, or someone else's);
            ``ManifestVersionError`` for an intact one of another version.
    """
    path = os.path.join(os.fspath(directory), MANIFEST_NAME)
    raw = read_small_file(path, MANIFEST_LIMIT)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a torch_ckpt_hook manifest")
    stored = document.pop("crc32", None)
    if stored != _body_crc(document):
        raise ManifestError(f"{path} is damaged: its checksum does not match its contents")
    if document.get("version") != MANIFEST_VERSION:
        raise ManifestVersionError(
            f"{path} has manifest version {document.get('version')!r}; this torch_ckpt_hook "
            f"reads version {MANIFEST_VERSION}: upgrade torch-ckpt-hook"
        )
    try:
        files = {
            str(name): FileDigest(int(d["size"]), int(d["crc32"]))
            for name, d in document["files"].items()
        }
        return Manifest(int(document["global_step"]), int(document["world_size"]), files)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ManifestError(f"{path} is not a valid manifest: {err!r}") from err


def has_manifest(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a manifest file (not whether it is valid)."""
    return os.path.isfile(os.path.join(os.fspath(directory), MANIFEST_NAME))


# What DCP and the chief put in a sharded checkpoint directory: a directory holding any of these
# but no manifest is a save that never committed (killed, or still being written).
DCP_METADATA_NAME = ".metadata"
DCP_DATA_SUFFIX = ".distcp"


def looks_sharded(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a manifest, DCP files or a payload file (not whether valid)."""
    try:
        names = os.listdir(os.fspath(directory))
    except OSError:
        return False
    return any(
        name in (MANIFEST_NAME, PAYLOAD_NAME)
        or name.startswith(DCP_METADATA_NAME)
        or name.endswith(DCP_DATA_SUFFIX)
        for name in names
    )


def is_member_name(name: str) -> bool:
    """Whether ``name`` (from a manifest) is a relative POSIX path staying inside its directory."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def unlisted_entries(directory: str | os.PathLike[str], manifest: Manifest) -> list[str]:
    """The entries of ``directory`` (sorted names) that neither are nor hold a listed file.

    Listed files in subdirectories count for their top-level directory.
    """
    listed = {name.split("/", 1)[0] for name in manifest.files} | {MANIFEST_NAME}
    return sorted(set(os.listdir(os.fspath(directory))) - listed)


def remove_sharded_dir(directory: str | os.PathLike[str], manifest: Manifest) -> list[str]:
    """Delete the sharded checkpoint ``directory``: its manifest first, then its listed files.

    The manifest goes first, so a deletion interrupted part-way never leaves a directory that
    is listed as a checkpoint. Only the manifest and the files it lists are removed, then the
    directory (and listed files' subdirectories) if that left them empty. Returns the names
    of the entries left behind (someone else's files), with which the directory stays.

    Raises:
        OSError: the manifest could not be removed (nothing else was).
    """
    directory = os.fspath(directory)
    os.remove(os.path.join(directory, MANIFEST_NAME))
    fsync_dir(directory)
    for name in sorted(filter(is_member_name, manifest.files)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, *name.split("/")))
    subdirectories = {os.path.dirname(n) for n in manifest.files if is_member_name(n)} - {""}
    for sub in sorted(subdirectories, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(directory, *sub.split("/")))
    left = sorted(os.listdir(directory))
    if not left:
        os.rmdir(directory)
    return left


def delete_sharded_dir(directory: str | os.PathLike[str]) -> None:
    """Delete the sharded checkpoint ``directory`` (``remove_sharded_dir``), once its manifest
    has been read again: anything else found inside (put there after retention's ownership
    check) is left, with the directory, and a warning names it.

    Raises:
        FileNotFoundError: it has no manifest any more (nothing is deleted).
        OSError: its manifest is not valid, or could not be removed (nothing is deleted).
    """
    try:
        manifest = read_manifest(directory)
    except ValueError as err:  # ManifestError, or not a regular file
        raise OSError(f"not deleting {directory}: its manifest is not valid ({err})") from err
    left = remove_sharded_dir(directory, manifest)
    if left:
        logger.warning(
            "Deleted the files of checkpoint %s but left the directory: it holds files its "
            "manifest does not list, which are not this package's to delete: %s",
            os.fspath(directory),
            ", ".join(left),
        )
