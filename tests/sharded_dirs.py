"""Sharded checkpoint directories for tests, written in one process with no process group.

``write_sharded_dir`` lays out what the sharded save writes (``_sharded_dir``): the DCP files of
``{"model": ..., "optimizer": ...}`` (``torch.distributed.checkpoint.save`` with ``no_dist``),
``payload.pt`` with the rest of the payload, then the manifest. ``save_sharded`` does it for a
plain ``Session``, with the FQN-keyed state ``get_state_dict`` returns; the other helpers damage
a directory in the ways a test needs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from torch_ckpt_hook import Session
from torch_ckpt_hook._checkpoint_file import write_checkpoint
from torch_ckpt_hook._sharded_dir import (
    MANIFEST_NAME,
    PAYLOAD_NAME,
    SHARDED_KEY,
    Manifest,
    digest_file,
    write_manifest,
)


def dcp_save(state: Mapping[str, Any], directory: str | os.PathLike[str]) -> None:
    """``dcp.save`` in this process alone (its "single process" warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        dcp.save(dict(state), checkpoint_id=os.fspath(directory), no_dist=True)


def commit_manifest(
    directory: str | os.PathLike[str], global_step: int, world_size: int = 1
) -> None:
    """Write ``directory``'s manifest over every file in it (recursively), as the chief does."""
    directory = os.fspath(directory)
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                files[rel] = digest_file(path)
    write_manifest(directory, Manifest(global_step, world_size, files))


def write_sharded_dir(
    directory: str | os.PathLike[str],
    sharded: Mapping[str, Any],
    rest: Mapping[str, Any],
    *,
    world_size: int = 1,
    manifest: bool = True,
) -> str:
    """A sharded checkpoint at ``directory``: DCP files of ``sharded``, ``rest`` in the payload.

    ``rest`` holds the payload's other keys (``format_version``, ``global_step``, ...).
    ``manifest=False`` leaves it uncommitted, as a killed save does.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    dcp_save(sharded, directory)
    write_checkpoint(os.path.join(directory, PAYLOAD_NAME), {**rest, SHARDED_KEY: sorted(sharded)})
    if manifest:
        commit_manifest(directory, int(rest["global_step"]), world_size)
    return directory


def split_payload(session: Session) -> tuple[dict[str, Any], dict[str, Any]]:
    """The session's state as a sharded save splits it: (DCP part, payload.pt part).

    The DCP part is ``get_state_dict``'s: model and optimizer keyed by parameter name.
    """
    full = session.state_dict()
    optimizer = session.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer), "one optimizer, for get_state_dict"
    model_state, optimizer_state = get_state_dict(session.model, optimizer)
    rest = {k: v for k, v in full.items() if k not in ("model", "optimizer")}
    return {"model": model_state, "optimizer": optimizer_state}, rest


def save_sharded(session: Session, directory: str | os.PathLike[str], **kwargs: Any) -> str:
    """Write ``session``'s state as a sharded checkpoint at ``directory``."""
    sharded, rest = split_payload(session)
    return write_sharded_dir(directory, sharded, rest, **kwargs)


def shard_names(directory: str | os.PathLike[str]) -> list[str]:
    """The ``.distcp`` files of ``directory``, sorted."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))


def flip_byte(path: str | os.PathLike[str], at: float = 0.5) -> None:
    """Flip one bit of the file at ``path``, at the fraction ``at`` of its length."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[int(len(data) * at)] ^= 0x10
        f.seek(0)
        f.write(data)


def truncate(path: str | os.PathLike[str], by: int = 7) -> None:
    """Cut the last ``by`` bytes off the file at ``path``."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - by)


def fsdp2_model() -> torch.nn.Module:
    """The small model ``fsdp2_save_worker`` shards (seeded: every rank builds the same)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6), torch.nn.LayerNorm(6)
    )


def fsdp2_save_worker(
    rank: int | str, world_size: int | str, init_file: str, directory: str, expected: str
) -> None:
    """One rank of a real FSDP2 run on CPU (gloo) that writes a sharded checkpoint directory.

    Every rank shards the model with ``fully_shard``, takes two Adam steps and saves its shards
    with DCP into ``directory``; rank 0 then writes ``payload.pt`` and the manifest (the sharded
    save's layout, ``_sharded_dir``) and the full state dict, gathered, to ``expected`` with
    ``torch.save`` for the test to compare against.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world_size = int(rank), int(world_size)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = fsdp2_model()
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        torch.manual_seed(1)
        for _ in range(2):
            model(torch.randn(4, 8)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_model, full_optimizer = get_state_dict(model, optimizer, options=full)
        if rank == 0:
            rest = {
                "format_version": 1,
                "global_step": 2,
                "extra_state": {},
                "rng": {"torch": torch.get_rng_state()},
            }
            write_checkpoint(
                os.path.join(directory, PAYLOAD_NAME), {**rest, SHARDED_KEY: ["model", "optimizer"]}
            )
            commit_manifest(directory, 2, world_size)
            torch.save({"model": full_model, "optimizer": full_optimizer}, expected)
        dist.barrier()
    finally:
        dist.destroy_process_group()
