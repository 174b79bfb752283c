"""Which files a saver may delete: only checkpoints it can prove this package committed there.

Retention deletes files, and a state file is just text anyone can write (a hostile or stale one,
one copied from another run, one with TensorFlow's absolute paths). So before a path listed in
it is adopted, and again right before it is deleted, it must be a checkpoint of this saver: a
regular file (not a link, a directory or a device) directly inside the directory the saver
writes to, named ``<prefix>-<step>`` with the saver's prefix, ending in this package's checksum
trailer. Anything else is dropped from the list with a warning and left on disk.

A sharded checkpoint (a directory ``<prefix>-<step>``, not a link) is proved ours by its
manifest: valid, of this package's format, its own checksum holding. A directory without one
(someone's, or a save that never committed), or holding anything its manifest does not list
(someone put a file there), is never deleted.
"""

from __future__ import annotations

import os
import re
import stat

from ._integrity import has_trailer
from ._paths import inside
from ._sharded_dir import ManifestError, read_manifest, unlisted_entries
from ._state_file import STATE_FILENAME


def why_not_deletable(path: str, directory: str, prefix: str | None) -> str | None:
    """Why ``path`` must not be deleted by a saver of ``prefix`` in ``directory``, or None.

    ``prefix`` is the base name checkpoints are numbered after (``model.ckpt``); ``None`` skips
    the name test, for a file this saver committed itself under a name of its caller's choosing.
    """
    if not inside(path, directory):
        return f"it is outside the checkpoint directory {directory}"
    name = os.path.basename(path)
    if name == STATE_FILENAME:
        return "it is the checkpoint state file"
    if prefix is not None and re.fullmatch(re.escape(prefix) + r"-[0-9]+", name) is None:
        return f"its name is not {prefix}-<step>"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "it does not exist"
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return why_not_deletable_directory(path)
    if not stat.S_ISREG(mode):
        return "it is not a regular file (a link, a directory or a device)"
    if not has_trailer(path):
        return "it does not end in torch_ckpt_hook's checksum trailer"
    return None


def why_not_deletable_directory(path: str) -> str | None:
    """Why the directory ``path`` is not a sharded checkpoint this package committed, or None."""
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return (
            "it is a directory without a sharded checkpoint manifest (not one this package "
            "committed)"
        )
    except ManifestError as err:
        return f"its manifest is not a valid torch_ckpt_hook manifest ({err})"
    except (OSError, ValueError) as err:
        return f"its manifest cannot be read ({err})"
    try:
        extra = unlisted_entries(path, manifest)
    except OSError as err:
        return f"it cannot be listed ({err.strerror or err})"
    if extra:
        return (
            f"it holds files its manifest does not list ({', '.join(extra)}), which are not "
            "this package's to delete"
        )
    return None
