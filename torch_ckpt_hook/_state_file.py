"""TensorFlow's ``checkpoint`` state file: which checkpoints a directory holds, newest last.

The file is the protobuf text format of TensorFlow's ``CheckpointState`` message (``_text_format``),
byte for byte what ``text_format.MessageToString`` writes, so TensorFlow tools read it and we read
theirs::

    model_checkpoint_path: "model.ckpt-300"
    all_model_checkpoint_paths: "model.ckpt-200"
    all_model_checkpoint_paths: "model.ckpt-300"

Unlike TensorFlow's ``Saver`` (absolute paths unless ``save_relative_paths=True``), paths are always
written relative to the directory, so a moved or copied directory still resolves (TensorFlow
issues #571, #9146). Paths read back are joined with the directory as given, as TensorFlow does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

from ._fsutil import atomic_write, read_small_file, same_path
from ._paths import is_url, normalize
from ._text_format import format_checkpoint_state, parse_checkpoint_state

logger = logging.getLogger(__name__)

STATE_FILENAME = "checkpoint"

# A state file listing a million checkpoints is about 50 MB; anything larger is not one, and is
# refused before it is read (a garbage file, or /dev/zero under the name).
STATE_FILE_LIMIT = 64 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The checkpoints a directory's state file lists.

    Paths are absolute, or relative ones joined with the checkpoint directory as given
    (``os.path.join(checkpoint_dir, p)``, not normalised, as in TensorFlow).
    """

    model_checkpoint_path: str
    """The newest checkpoint."""
    all_model_checkpoint_paths: tuple[str, ...]
    """Every checkpoint the saver manages, oldest first."""


def state_file_path(checkpoint_dir: str, latest_filename: str | None) -> str:
    """The path of ``checkpoint_dir``'s state file (``checkpoint``, or ``latest_filename``)."""
    if not latest_filename:
        return os.path.join(checkpoint_dir, STATE_FILENAME)
    head, tail = os.path.split(latest_filename)
    if head or tail in (os.curdir, os.pardir):
        raise ValueError("'latest_filename' must not contain path components")
    return os.path.join(checkpoint_dir, latest_filename)


def _relative_to(checkpoint_dir: str, path: str) -> str:
    try:
        return os.path.relpath(path, checkpoint_dir)
    except ValueError:
        # Windows: a path on another drive has no relative form; an absolute one still resolves.
        return os.path.abspath(path)


def update_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str],
    model_checkpoint_path: str,
    all_model_checkpoint_paths: Sequence[str] | None = None,
    latest_filename: str | None = None,
) -> None:
    """Atomically replace the directory's state file, with every path relative to the directory.

    Relative input paths are relative to the working directory, like the paths ``Saver.save`` and
    ``get_checkpoint_state`` return, so a state read can be written back unchanged. (TensorFlow's
    ``save_relative_paths`` took them as relative to an absolute ``checkpoint_dir`` instead.)
    ``model_checkpoint_path`` is appended to the list when it is not its last entry (TensorFlow's
    ``generate_checkpoint_state_proto``).

    Raises:
        ValueError: ``latest_filename`` has path components, or ``model_checkpoint_path`` is empty.
        RuntimeError: ``model_checkpoint_path`` is the state file's own path.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_path = state_file_path(checkpoint_dir, latest_filename)
    if not model_checkpoint_path:
        raise ValueError("model_checkpoint_path must be a non-empty path, got ''")
    if same_path(state_path, model_checkpoint_path):
        raise RuntimeError(
            f"Save path '{model_checkpoint_path}' conflicts with path used for checkpoint state.  "
            "Please use a different save path."
        )
    model = _relative_to(checkpoint_dir, model_checkpoint_path)
    paths = [_relative_to(checkpoint_dir, p) for p in all_model_checkpoint_paths or ()]
    if not paths or paths[-1] != model:
        logger.info(
            "%s is not in all_model_checkpoint_paths. Manually adding it.", model_checkpoint_path
        )
        paths.append(model)
    data = format_checkpoint_state(model, paths).encode("ascii")
    atomic_write(state_path, lambda f: f.write(data))


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> CheckpointState | None:
    """The directory's state file, with the entries that name missing checkpoints dropped.

    Returns None when the state file is missing, unreadable, unparsable, has an empty
    ``model_checkpoint_path``, or names no checkpoint that exists. Where it could not be used, a
    warning names the file. TensorFlow raised ``ValueError`` for an empty
    ``model_checkpoint_path``; treating it as "no usable state" instead lets ``latest_checkpoint``
    fall back to the checkpoints in the directory, which is what a half-written or truncated state
    file from another tool needs.

    Entries naming files that no longer exist are dropped, with a warning naming them. If
    ``model_checkpoint_path`` is one of them, the newest remaining entry takes its place.

    Raises:
        ValueError: ``latest_filename`` has path components.
    """
    checkpoint_dir = normalize(os.fspath(checkpoint_dir))
    if is_url(checkpoint_dir):
        from ._storage_for import remote_state

        return remote_state(checkpoint_dir, latest_filename)
    state_path = state_file_path(checkpoint_dir, latest_filename)
    try:
        raw = read_small_file(state_path, STATE_FILE_LIMIT)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning(
            "Checkpoint state file %s is unreadable (%s); it is ignored.", state_path, err
        )
        return None
    try:
        model, paths = parse_checkpoint_state(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        logger.warning(
            "Checkpoint state file %s does not parse (%s); it is ignored.", state_path, err
        )
        return None
    if not model:
        logger.warning(
            "Checkpoint state file %s has no model_checkpoint_path; it is ignored.", state_path
        )
        return None

    def resolve(p: str) -> str:
        if not os.path.isabs(p):
            return os.path.join(checkpoint_dir, p)
        # TensorFlow wrote absolute paths, and its state file always lies beside its
        # checkpoints: in a copied or moved run directory, an absolute path naming another
        # directory means the file of that name here. The copy then resumes (and later prunes)
        # its own files, never the original run's.
        local = os.path.join(checkpoint_dir, os.path.basename(p))
        if not same_path(os.path.dirname(p), checkpoint_dir) and os.path.lexists(local):
            return local
        return p

    # exists, not isfile: a checkpoint may be a directory (torch.distributed.checkpoint).
    return existing_entries(resolve(model), [resolve(p) for p in paths], os.path.exists, state_path)


def existing_entries(
    model: str, all_paths: Sequence[str], exists: Callable[[str], bool], state_name: str
) -> CheckpointState | None:
    """A state file's entries (already resolved) less the checkpoints that do not exist.

    The one policy of every state file reader (local files, object stores): missing entries are
    dropped with a warning naming them; a missing ``model_checkpoint_path`` gives way to the
    newest remaining entry; with none left there is no usable state (None).
    """
    missing = [p for p in all_paths if not exists(p)]
    if model not in missing and not exists(model):
        missing.append(model)
    if missing:
        logger.warning(
            "Checkpoint state file %s lists checkpoints that do not exist; they are ignored: %s",
            state_name,
            ", ".join(missing),
        )
    kept = tuple(p for p in all_paths if p not in missing)
    if model in missing:
        if not kept:
            return None
        logger.warning(
            "Checkpoint state file %s: model_checkpoint_path %s does not exist; using %s instead.",
            state_name,
            model,
            kept[-1],
        )
        model = kept[-1]
    return CheckpointState(model_checkpoint_path=model, all_model_checkpoint_paths=kept)
