"""Reading a sharded checkpoint directory in one process: verify it, assemble its payload.

A sharded checkpoint (``_sharded_dir``) is verified by its manifest: every file it lists must
be there with its size and CRC32, ``payload.pt`` must pass the regular file check, and the DCP
metadata (unpickled by the restricted unpickler of ``_dcp_read``) may name only listed files.
Problems get the kinds of a single file (``CheckpointProblem``), chosen for what restore does:

- no manifest, but DCP files or a payload (a save killed before it committed, or still being
  written): ``corrupted``, so restore passes over it to the previous checkpoint. It never
  blocks a restore, and it is never deleted (nothing proves it ours).
- a directory with no manifest and nothing of a sharded checkpoint: not handled here at all
  (``is_sharded_checkpoint`` is False), so callers treat it as before (``not_a_file``).
- a damaged manifest, a file missing, of another size or CRC: ``corrupted``.
- a valid manifest of a newer format version, metadata that refers to objects the restricted
  unpickler refuses or to files outside the manifest: ``unloadable`` (intact, not loadable by
  this version: restore stops there rather than roll the run back).
- an I/O error (no permission): ``unreadable``.

Files in the directory that the manifest does not list (an extra ``.distcp``) do not make it
damaged: the load reads only the files the metadata names, which must all be listed. Retention
never deletes such a directory (``_ownership``).

``load_directory`` returns the payload with the same keys as a single file's: ``payload.pt``'s
contents (less ``sharded_keys``) with each sharded key loaded whole from the DCP files: ``model``
the full tensors by FQN, ``optimizer`` the *FQN-keyed* optimizer state dict that
``get_state_dict`` returns (``{"state": {fqn: {...}}, "param_groups": [{..., "params":
[fqn, ...]}]}``). ``fit_to_session`` turns the latter into the parameter-id form a plain
optimizer loads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import CheckpointCorruptedError, CheckpointError, CheckpointUnloadableError
from ._fsutil import NotRegularFileError
from ._integrity import CheckpointProblem, check_file
from ._messages import os_error_reason
from ._portable_state import unwrap_model
from ._sharded_dir import (
    DCP_METADATA_NAME,
    MANIFEST_NAME,
    PAYLOAD_NAME,
    SHARDED_KEY,
    Manifest,
    ManifestError,
    ManifestVersionError,
    digest_file,
    is_member_name,
    looks_sharded,
    read_manifest,
)

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION

    from ._session import Session


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory that holds (a part of) a sharded checkpoint."""
    return os.path.isdir(path) and looks_sharded(path)


def _corrupted(message: str) -> CheckpointProblem:
    return CheckpointProblem("corrupted", message)


def read_verified_manifest(path: str) -> Manifest | CheckpointProblem:
    """The manifest of the directory ``path``, or the problem that stands for its absence."""
    try:
        return read_manifest(path)
    except FileNotFoundError:
        return _corrupted(
            f"incomplete: no {MANIFEST_NAME}, so this sharded checkpoint was never committed "
            "(its save was killed, or is still being written)"
        )
    except ManifestVersionError as err:
        return CheckpointProblem("unloadable", f"manifest of another version: {err}")
    except ManifestError as err:
        return _corrupted(f"damaged manifest: {err}")
    except ValueError as err:  # not a regular file, or too large to be one of ours
        return _corrupted(f"damaged manifest: {err}")
    except OSError as err:
        return CheckpointProblem(
            "unreadable", f"unreadable: {MANIFEST_NAME}: {os_error_reason(err)}"
        )


def _file_problem(
    directory: str, name: str, expected_size: int, crc: int
) -> CheckpointProblem | None:
    if not is_member_name(name):
        return _corrupted(f"damaged manifest: it lists {name!r}, which is not a file inside it")
    try:
        digest = digest_file(os.path.join(directory, *name.split("/")))
    except FileNotFoundError:
        return _corrupted(f"missing file: {name}, which its manifest lists, is not there")
    except NotRegularFileError as err:
        return _corrupted(f"damaged: {name} is {err.what}, not a regular file")
    except OSError as err:
        return CheckpointProblem("unreadable", f"unreadable: {name}: {os_error_reason(err)}")
    if digest.size != expected_size:
        return _corrupted(
            f"truncated or damaged: {name} holds {digest.size} bytes, its manifest says "
            f"{expected_size}"
        )
    if digest.crc32 != crc:
        return _corrupted(
            f"checksum mismatch: {name}: stored crc32 {crc:08x}, computed {digest.crc32:08x}"
        )
    return None


def check_directory(path: str | os.PathLike[str]) -> CheckpointProblem | None:
    """The problem found in the sharded checkpoint directory ``path``, or None when intact.

    Every listed file is read and its CRC32 compared; nothing is unpickled except the DCP
    metadata, by the restricted unpickler. Never raises for a bad directory.
    """
    directory = os.fspath(path)
    manifest = read_verified_manifest(directory)
    if isinstance(manifest, CheckpointProblem):
        return manifest
    for required in (PAYLOAD_NAME, DCP_METADATA_NAME):
        if required not in manifest.files:
            return _corrupted(f"damaged manifest: it does not list {required}")
    for name, digest in sorted(manifest.files.items()):
        problem = _file_problem(directory, name, digest.size, digest.crc32)
        if problem is not None:
            return problem
    problem = check_file(os.path.join(directory, PAYLOAD_NAME))
    if problem is not None:
        return CheckpointProblem(problem.kind, f"{problem.message} ({PAYLOAD_NAME})")
    return _metadata_problem(directory, manifest)


def _metadata_problem(directory: str, manifest: Manifest) -> CheckpointProblem | None:
    from ._dcp_read import read_safe_metadata, referenced_files  # torch.distributed, on demand

    try:
        unlisted = sorted(referenced_files(read_safe_metadata(directory)) - set(manifest.files))
    except CheckpointError as err:
        # The manifest's CRC held: the metadata's bytes are as written, so this is no damage.
        return CheckpointProblem("unloadable", f"unloadable DCP metadata: {err}")
    except (OSError, ValueError) as err:
        return CheckpointProblem("unreadable", f"unreadable: {DCP_METADATA_NAME}: {err}")
    if unlisted:
        return CheckpointProblem(
            "unloadable",
            f"its DCP metadata names data files its manifest does not list: {unlisted}",
        )
    return None


def directory_size(path: str | os.PathLike[str]) -> int:
    """The bytes of the files in the directory ``path`` (not recursive), for listings."""
    total = 0
    with os.scandir(os.fspath(path)) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _raise_for(directory: str, problem: CheckpointProblem) -> None:
    if problem.kind == "corrupted":
        raise CheckpointCorruptedError(f"Checkpoint {directory} is corrupted: {problem.message}")
    if problem.kind == "unreadable":
        raise OSError(f"Checkpoint {directory} is {problem.message}")
    raise CheckpointUnloadableError(f"Checkpoint {directory} cannot be loaded: {problem.message}")


def load_directory(
    path: str | os.PathLike[str],
    map_location: MAP_LOCATION = "cpu",
    *,
    verify: bool = True,
    outline: bool = False,
) -> dict[str, Any]:
    """The full, unsharded payload of the sharded checkpoint ``path`` (module docstring).

    In this process, with no process group. ``verify=False`` skips the manifest (a directory
    without one loads), still loading everything with ``weights_only=True``. ``outline=True``
    reads no tensor of the DCP files: each is a ``meta`` tensor of its shape and dtype.

    Raises:
        CheckpointCorruptedError: a file is damaged or missing, or there is no manifest.
        CheckpointUnloadableError: it is intact but cannot be loaded (a refused object, a newer
            format, ``map_location`` naming a missing device).
        ValueError: ``map_location`` is not a device (a callable is not supported here).
        OSError: a file cannot be read.
    """
    from ._checkpoint_file import load_checkpoint

    directory = os.fspath(path)
    if callable(map_location):
        raise ValueError(
            "map_location for a sharded checkpoint directory must be a device, a device "
            f"string or a dict of them, got the callable {map_location!r}"
        )
    if verify:
        problem = check_directory(directory)
        if problem is not None:
            _raise_for(directory, problem)
    payload = load_checkpoint(os.path.join(directory, PAYLOAD_NAME), map_location, verify=verify)
    keys = payload.pop(SHARDED_KEY, None)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointUnloadableError(
            f"Checkpoint {directory}: its {PAYLOAD_NAME} has no list of sharded keys "
            f"({SHARDED_KEY!r}), got {keys!r}; it was not written by torch_ckpt_hook's "
            "sharded save"
        )
    state = _load_dcp(directory, set(keys), verify=verify, outline=outline)
    for key in keys:
        payload[key] = _normalized(key, state.get(key, {}))
    target = _target_device(map_location)
    if target is not None and not outline:
        for key in keys:
            payload[key] = _to_device(payload[key], target)
    return payload


def _load_dcp(directory: str, keys: set[str], *, verify: bool, outline: bool) -> dict[str, Any]:
    from ._dcp_read import load_full_state, load_outline  # torch.distributed, on demand

    try:
        return (load_outline if outline else load_full_state)(directory, keys)
    except CheckpointUnloadableError:
        raise
    except Exception as err:
        if not verify:
            raise CheckpointCorruptedError(
                f"Checkpoint {directory} is corrupted: DCP cannot load it: {err!r} (its manifest "
                "was not checked: verify=False)"
            ) from err
        problem = check_directory(directory)
        if problem is not None and problem.kind == "corrupted":
            raise CheckpointCorruptedError(
                f"Checkpoint {directory} is corrupted: {problem.message} (it changed while it "
                "was being loaded)"
            ) from err
        raise CheckpointUnloadableError(
            f"Checkpoint {directory} cannot be loaded: its manifest's checksums hold, but torch "
            f"{torch.__version__} cannot load its DCP files ({type(err).__name__}: {err})"
        ) from err


def _normalized(key: str, value: Any) -> Any:
    # DCP stores no entry for an empty container: an optimizer before its first step comes back
    # without "state".
    if key == "optimizer" and isinstance(value, dict) and "param_groups" in value:
        value.setdefault("state", {})
    return value


def _target_device(map_location: MAP_LOCATION) -> torch.device | None:
    """Where DCP's CPU tensors go, for a device or a ``{"cpu": device}`` map; None: stay."""
    if isinstance(map_location, Mapping):
        map_location = map_location.get("cpu")
    if map_location is None:
        return None
    device = torch.device(map_location)  # type: ignore[arg-type]
    return None if device.type == "cpu" else device


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


# -- into a plain (unsharded) session ---------------------------------------------------------


def _is_fqn_keyed(state: object) -> bool:
    if not isinstance(state, Mapping):
        return False
    groups = state.get("param_groups")
    return isinstance(groups, list) and any(
        isinstance(group, Mapping) and any(isinstance(p, str) for p in group.get("params", ()))
        for group in groups
    )


def fit_optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: Mapping[str, Any]
) -> dict[str, Any]:
    """``saved`` (FQN-keyed, as ``get_state_dict`` returns it) in ``optimizer``'s id form.

    Parameters are matched by name through ``model``: each of the optimizer's parameters takes
    the state saved under its FQN, so the order in which the saving run listed them does not
    matter, only that each group holds the same parameters.

    Raises:
        ValueError: a parameter of the optimizer is not in ``model``, or the groups differ.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer state has {len(saved_groups)} param groups, the "
            f"optimizer {len(optimizer.param_groups)}; nothing was loaded"
        )
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    index = 0
    pairs = zip(optimizer.param_groups, saved_groups, strict=True)
    for number, (group, saved_group) in enumerate(pairs):
        wanted = set(saved_group["params"])
        ids = []
        found = set()
        for param in group["params"]:
            fqn = next((n for n in names.get(id(param), ()) if n in wanted), None)
            if fqn is None:
                known = names.get(id(param), ["<not a parameter of the model>"])
                raise ValueError(
                    f"the optimizer's parameter {known[0]} (group {number}) has no state in "
                    f"the checkpoint's group {number}, which holds {sorted(wanted)}; nothing "
                    "was loaded"
                )
            found.add(fqn)
            if fqn in saved["state"]:
                state[index] = saved["state"][fqn]
            ids.append(index)
            index += 1
        if found != wanted:
            raise ValueError(
                f"the checkpoint's optimizer group {number} holds parameters the optimizer's "
                f"does not: {sorted(wanted - found)}; nothing was loaded"
            )
        groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": groups}


def fit_to_session(payload: dict[str, Any], session: Session) -> dict[str, Any]:
    """``payload`` with FQN-keyed optimizer states in the session's optimizers' id form.

    A payload with none (a single file's) is returned as it is.
    """
    saved = payload.get("optimizer")
    optimizers = session.optimizers
    if not optimizers:
        return payload
    model = unwrap_model(session.model)
    if isinstance(saved, list) and len(saved) == len(optimizers):
        fitted: Any = [
            fit_optimizer_state(opt, model, s) if _is_fqn_keyed(s) else s
            for opt, s in zip(optimizers, saved, strict=True)
        ]
    elif _is_fqn_keyed(saved) and len(optimizers) == 1:
        fitted = fit_optimizer_state(optimizers[0], model, saved)  # type: ignore[arg-type]
    else:
        return payload
    return {**payload, "optimizer": fitted}
