"""``torch-ckpt export``: a checkpoint rewritten as one verified file, or its model's tensors.

Used by the ``torch-ckpt`` command only. Three outputs:

- a full checkpoint (the default): the payload as loaded, written by ``write_checkpoint``
  (atomic, with a checksum), so ``load_checkpoint`` and a session restore it;
- ``model_only``: the model's ``state_dict()`` alone, a flat ``{name: tensor}`` dict, written the
  same way: ``torch.load(path, weights_only=True)`` returns it and ``verify_checkpoint`` checks
  it, but it is not a payload (no ``format_version``), so ``load_checkpoint`` refuses it;
- ``safetensors``: the model's tensors as a safetensors file (the optional ``safetensors``
  package), which has no checksum of its own; it is read back once written.

Every output is written to a temporary file beside ``dst`` and renamed onto it, so ``dst`` is
never seen partly written. The command itself (argument checks, messages) is at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ._checkpoint_file import check_checkpoint, load_checkpoint, write_checkpoint
from ._cli_commands import EXIT_OK, EXIT_USAGE, PROG, CommandFailed, checkpoint_to_inspect
from ._cli_format import a_type, count, human_bytes, printable
from ._errors import CheckpointError
from ._fsutil import atomic_write, file_type, same_path
from ._sharded_read import is_sharded_checkpoint

# --dtype's choices: the floating dtypes a model is commonly served in.
DTYPES: Mapping[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

SAFETENSORS_MISSING = (
    "--safetensors needs the safetensors package, which is not installed; "
    "install it with: pip install 'torch-ckpt-hook[safetensors]'"
)


class ExportError(Exception):
    """The payload cannot be exported as asked (one line, for the command's error)."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export_payload`` wrote."""

    what: str
    """``checkpoint``, ``model`` or ``safetensors``."""
    tensors: int
    cast: int
    """The floating tensors cast to ``dtype``."""
    skipped: tuple[str, ...]
    """Model entries that are not tensors, left out of a safetensors file."""


def safetensors_available() -> bool:
    try:
        # The ignore: mypy runs without the optional package too (the dev extra lacks it).
        import safetensors.torch  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def export_payload(
    payload: Mapping[str, Any],
    dst: str,
    *,
    model_only: bool = False,
    dtype: torch.dtype | None = None,
    safetensors: bool = False,
) -> Exported:
    """Write ``payload`` (or its model) to ``dst``, atomically, and check what was written.

    ``dtype`` casts the model's floating tensors (integer and bool ones are kept); the rest of a
    full checkpoint (optimizer state, RNG states) keeps its dtypes, which an exact resume needs.

    Raises:
        ExportError: the payload has no model to export, or safetensors cannot hold it.
        OSError: ``dst`` cannot be written.
    """
    model = payload.get("model")
    if (model_only or safetensors or dtype is not None) and not isinstance(model, Mapping):
        raise ExportError(
            f"the checkpoint's model is {a_type(model)}, not a mapping of names to tensors "
            "(a model's state_dict())"
        )
    cast = 0
    if isinstance(model, Mapping) and dtype is not None:
        model, cast = _cast(model, dtype)
    if safetensors:
        return _write_safetensors(payload, model, dst, cast)
    if model_only:
        assert isinstance(model, Mapping)
        body: Mapping[str, Any] = dict(model)
        what = "model"
    else:
        body = {**payload, "model": model} if dtype is not None else payload
        what = "checkpoint"
    write_checkpoint(dst, body)
    _check_written(dst)
    tensors = sum(isinstance(value, torch.Tensor) for value in (model or {}).values())
    return Exported(what=what, tensors=tensors, cast=cast, skipped=())


def _cast(model: Mapping[str, Any], dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    cast: dict[str, Any] = {}
    n = 0
    for name, value in model.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
            n += 1
        cast[name] = value
    return cast, n


def _check_written(dst: str) -> None:
    """The file renamed onto ``dst`` passes its checksum: the bytes on disk are those written."""
    problem = check_checkpoint(dst)
    if problem is not None:
        _remove(dst)
        raise ExportError(
            f"the file written to {printable(dst)} does not verify ({problem.message}); "
            "it was removed"
        )


def _write_safetensors(payload: Mapping[str, Any], model: Any, dst: str, cast: int) -> Exported:
    try:
        from safetensors.torch import (  # type: ignore[import-not-found, unused-ignore]
            load_file,
            save,
        )
    except ImportError:
        raise ExportError(SAFETENSORS_MISSING) from None
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    seen: set[int] = set()
    for name, value in model.items():
        key = str(name)
        if not isinstance(value, torch.Tensor):
            skipped.append(printable(key))
            continue
        if value.layout != torch.strided:
            raise ExportError(
                f"model tensor {printable(key)!r} is {str(value.layout).removeprefix('torch.')}; "
                "safetensors holds dense tensors only"
            )
        value = value.detach().contiguous()
        # safetensors refuses tensors that share memory (tied weights, which torch.save keeps
        # shared): each after the first is stored as its own copy.
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    metadata = {"format": "pt"}
    step = payload.get("global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        metadata["global_step"] = str(step)
    data = save(tensors, metadata=metadata)
    atomic_write(dst, lambda f: f.write(data))
    try:
        loaded = load_file(dst)
    except Exception as err:
        _remove(dst)
        raise ExportError(
            f"the safetensors file written to {printable(dst)} does not load back ({err}); "
            "it was removed"
        ) from err
    if sorted(loaded) != sorted(tensors):
        _remove(dst)
        raise ExportError(
            f"the safetensors file written to {printable(dst)} does not hold the tensors "
            "written; it was removed"
        )
    return Exported(what="safetensors", tensors=len(tensors), cast=cast, skipped=tuple(skipped))


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# The command


def export(
    src: str,
    dst: str,
    *,
    model_only: bool = False,
    dtype: str | None = None,
    safetensors: bool = False,
    verify: bool = True,
    force: bool = False,
) -> int:
    if safetensors and not safetensors_available():
        raise CommandFailed(SAFETENSORS_MISSING)
    _check_destination(dst, force)
    if os.path.isdir(src) and not is_sharded_checkpoint(src):
        src = checkpoint_to_inspect(src, command="export")
        itself = f"the checkpoint SRC stands for ({printable(src)})"
    else:
        itself = "SRC itself"
    if os.path.lexists(dst) and (same_path(src, dst) or os.path.samefile(src, dst)):
        raise CommandFailed(
            f"argument DST: expected a path other than SRC's, got {dst!r}, which is {itself}",
            EXIT_USAGE,
        )
    try:
        payload = load_checkpoint(src, verify=verify)
    except (CheckpointError, ValueError) as err:
        raise CommandFailed(printable(str(err))) from err
    try:
        done = export_payload(
            payload,
            dst,
            model_only=model_only,
            dtype=None if dtype is None else DTYPES[dtype],
            safetensors=safetensors,
        )
    except ExportError as err:
        raise CommandFailed(str(err)) from err
    if done.skipped:
        sys.stderr.write(
            f"{PROG} export: warning: not tensors, so left out of the safetensors file: "
            f"{', '.join(done.skipped)}\n"
        )
    step = payload.get("global_step")
    source = printable(src) + ("" if step is None else f" (step {printable(str(step))})")
    size = human_bytes(os.path.getsize(dst))
    cast = f", {done.cast} cast to {dtype}" if done.cast else ""
    if done.what == "checkpoint":
        model_cast = f", {done.cast} model tensors cast to {dtype}" if done.cast else ""
        what = f"a checkpoint file, {size}{model_cast}"
        how = "load_checkpoint(DST) loads it, and a session restores it"
    elif done.what == "model":
        what = f"the model's tensors, {count(done.tensors, 'tensor')}{cast}, {size}"
        how = "torch.load(DST, weights_only=True) loads it; torch-ckpt verify checks it"
    else:
        what = f"the model's tensors as safetensors, {count(done.tensors, 'tensor')}{cast}, {size}"
        how = "safetensors.torch.load_file(DST) loads it"
    print(f"Exported {source} to {printable(dst)}: {what}; {how}.")
    return EXIT_OK


def _check_destination(dst: str, force: bool) -> None:
    """Refuse a ``DST`` that exists (without ``--force``), that is not a regular file, or whose
    directory does not exist: the export would fail, or replace what it must not."""
    try:
        mode = os.stat(dst).st_mode
    except FileNotFoundError:
        mode = None
    except OSError:
        mode = None  # the write will say what is wrong
    if mode is not None and stat.S_ISDIR(mode):
        raise CommandFailed(
            f"argument DST: expected a file path, got {dst!r}, which is a directory", EXIT_USAGE
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise CommandFailed(
            f"argument DST: expected a file path, got {dst!r}, which is {file_type(mode)}",
            EXIT_USAGE,
        )
    if mode is not None and not force:
        raise CommandFailed(
            f"argument DST: expected a path where nothing exists, got {dst!r}, which exists; "
            "pass --force to replace it",
            EXIT_USAGE,
        )
    parent = os.path.dirname(dst) or os.curdir
    if not os.path.isdir(parent):
        raise CommandFailed(
            f"argument DST: expected a path in an existing directory, got {dst!r}, whose "
            f"directory {parent!r} does not exist",
            EXIT_USAGE,
        )
