"""Sharded checkpoint directories read offline: verify, load, restore, find, retention.

Directories are written in this process (``tests/sharded_dirs.py``); the 2-process FSDP2 one at
the end proves the same reads on real DTensor output.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from sharded_dirs import (
    commit_manifest,
    flip_byte,
    fsdp2_model,
    save_sharded,
    shard_names,
    split_payload,
    truncate,
    write_sharded_dir,
)
from torch.distributed.checkpoint.state_dict import get_state_dict

from torch_ckpt_hook import (
    CheckpointCorruptedError,
    CheckpointUnloadableError,
    MonitoredSession,
    Saver,
    Session,
    latest_checkpoint,
    load_checkpoint,
    restorable_checkpoint,
    verify_checkpoint,
)
from torch_ckpt_hook._checkpoint_dir import find_checkpoints
from torch_ckpt_hook._checkpoint_file import check_checkpoint, write_checkpoint
from torch_ckpt_hook._cli_inspection import named_tensors
from torch_ckpt_hook._dcp_read import SafeLoadPlanner, read_safe_metadata, safe_reader
from torch_ckpt_hook._ownership import why_not_deletable
from torch_ckpt_hook._sharded_dir import MANIFEST_NAME, PAYLOAD_NAME, _body_crc
from torch_ckpt_hook._sharded_read import load_directory
from torch_ckpt_hook._state_file import update_checkpoint_state
from torch_ckpt_hook._storage import LocalStorage


def _session(seed: int = 0, steps: int = 2) -> Session:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    session = Session(model, optimizer, extra_state={"stats": {"seen": 0}})
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    session.extra_state["stats"]["seen"] = steps
    return session


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Session, str]:
    session = _session()
    return session, save_sharded(session, tmp_path / "model.ckpt-2")


@pytest.fixture
def ckpt(saved: tuple[Session, str]) -> str:
    return saved[1]


def _assert_same(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert sorted(map(str, expected)) == sorted(map(str, actual)), where
        for key in expected:
            _assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _assert_same(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, where


# -- verify ---------------------------------------------------------------------------------


def test_intact_directory_verifies(ckpt: str) -> None:
    path = ckpt
    assert None is verify_checkpoint(path)
    assert None is check_checkpoint(path)


@pytest.mark.parametrize(
    ("damage", "kind", "message"),
    [
        ("flip_shard", "corrupted", "checksum mismatch: __0_0.distcp"),
        ("truncate_shard", "corrupted", "truncated or damaged: __0_0.distcp holds"),
        ("flip_metadata", "corrupted", "checksum mismatch: .metadata"),
        ("flip_payload", "corrupted", "checksum mismatch: payload.pt"),
        ("missing_manifest", "corrupted", "incomplete: no torch_ckpt_manifest.json"),
        ("damaged_manifest", "corrupted", "damaged manifest: "),
        ("not_json_manifest", "corrupted", "damaged manifest: .* is not valid JSON"),
        ("missing_shard", "corrupted", "missing file: __0_0.distcp"),
        ("newer_manifest", "unloadable", "manifest of another version"),
    ],
)
def test_each_damage_is_found_with_its_kind(
    ckpt: str, damage: str, kind: str, message: str
) -> None:
    path = ckpt
    shard = os.path.join(path, shard_names(path)[0])
    manifest = os.path.join(path, MANIFEST_NAME)
    if damage == "flip_shard":
        flip_byte(shard)
    elif damage == "truncate_shard":
        truncate(shard)
    elif damage == "flip_metadata":
        flip_byte(os.path.join(path, ".metadata"))
    elif damage == "flip_payload":
        flip_byte(os.path.join(path, PAYLOAD_NAME))
    elif damage == "missing_manifest":
        os.remove(manifest)
    elif damage == "damaged_manifest":
        text = Path(manifest).read_text().replace('"world_size": 1', '"world_size": 2')
        Path(manifest).write_text(text)
    elif damage == "not_json_manifest":
        Path(manifest).write_text('{"format": ')
    elif damage == "missing_shard":
        os.remove(shard)
    elif damage == "newer_manifest":
        document = json.loads(Path(manifest).read_text())
        document.pop("crc32")
        document["version"] = 99
        Path(manifest).write_text(json.dumps({**document, "crc32": _body_crc(document)}))

    problem = check_checkpoint(path)

    assert problem is not None
    assert kind == problem.kind
    assert re.search(message, problem.message), problem.message
    assert problem.message == verify_checkpoint(path)


def test_an_extra_unlisted_shard_does_not_make_it_damaged(ckpt: str) -> None:
    """The load reads only the files the metadata names, and every one must be listed."""
    path = ckpt
    shutil.copy(os.path.join(path, "__0_0.distcp"), os.path.join(path, "__7_0.distcp"))

    assert None is verify_checkpoint(path)


def test_a_directory_without_anything_sharded_is_still_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    problem = check_checkpoint(tmp_path)

    assert problem is not None
    assert ("not_a_file", "not a regular file: it is a directory") == (
        problem.kind,
        problem.message,
    )


# -- safe reading ---------------------------------------------------------------------------


class _Pwn:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_and_never_runs(ckpt: str, tmp_path: Path) -> None:
    path = ckpt
    marker = tmp_path / "pwned"
    Path(path, ".metadata").write_bytes(pickle.dumps(_Pwn(str(marker))))
    commit_manifest(path, 2)  # a checksum over the crafted file: intact, not damage

    with pytest.raises(CheckpointUnloadableError, match=r"global posix\.system is not allowed"):
        read_safe_metadata(path)
    problem = check_checkpoint(path)
    with pytest.raises(CheckpointUnloadableError, match="is not allowed in DCP metadata"):
        load_checkpoint(path)

    assert problem is not None
    assert "unloadable" == problem.kind
    assert not marker.exists(), "the crafted pickle ran"


def test_metadata_naming_a_file_outside_the_directory_is_refused(
    ckpt: str,
) -> None:
    path = ckpt
    metadata = read_safe_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    Path(path, ".metadata").write_bytes(pickle.dumps(metadata))
    commit_manifest(path, 2)

    with pytest.raises(CheckpointUnloadableError, match="not a file inside the checkpoint"):
        safe_reader(path)
    problem = check_checkpoint(path)
    assert problem is not None
    assert "unloadable" == problem.kind
    assert "names data files its manifest does not list: ['../elsewhere.distcp']" in problem.message


def test_dcp_load_with_the_safe_reader_and_planner_fills_a_state_dict(
    saved: tuple[Session, str],
) -> None:
    """How the distributed restore uses them: dcp.load into the live state, in place."""
    session, path = saved
    fresh = _session(seed=1, steps=1)
    model_state, optimizer_state = get_state_dict(fresh.model, fresh.optimizer)  # type: ignore[arg-type]
    state = {"model": model_state, "optimizer": optimizer_state}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=safe_reader(path), planner=SafeLoadPlanner(), no_dist=True)

    model_state, optimizer_state = get_state_dict(session.model, session.optimizer)  # type: ignore[arg-type]
    _assert_same({"model": model_state, "optimizer": optimizer_state}, state)


class _Custom:
    """A class weights_only loading refuses."""

    def __init__(self) -> None:
        self.value = 1


def test_a_refused_object_among_the_dcp_values_is_unloadable(tmp_path: Path) -> None:
    session = _session()
    sharded, rest = split_payload(session)
    sharded["optimizer"]["param_groups"][0]["custom"] = _Custom()
    path = tmp_path / "model.ckpt-2"
    write_sharded_dir(path, sharded, rest)

    assert None is verify_checkpoint(path), "intact: verify unpickles no value"
    with pytest.raises(CheckpointUnloadableError, match="weights_only loading refused it"):
        load_checkpoint(path)


# -- load -----------------------------------------------------------------------------------


def test_load_assembles_the_full_payload(saved: tuple[Session, str]) -> None:
    session, path = saved
    model_state, optimizer_state = get_state_dict(session.model, session.optimizer)  # type: ignore[arg-type]
    expected = {**session.state_dict(), "model": model_state, "optimizer": optimizer_state}

    loaded = load_checkpoint(path)

    _assert_same(expected, loaded)
    assert "sharded_keys" not in loaded


def test_an_outline_has_every_tensor_as_a_meta_tensor_of_its_shape(ckpt: str) -> None:
    full = load_checkpoint(ckpt)

    outline = load_directory(ckpt, outline=True)

    shapes = {name: (t.shape, t.dtype) for name, t in named_tensors(full)}
    assert shapes == {name: (t.shape, t.dtype) for name, t in named_tensors(outline)}
    assert {"meta"} == {t.device.type for _name, t in named_tensors(outline["model"])}
    assert full["optimizer"]["param_groups"] == outline["optimizer"]["param_groups"]
    assert torch.equal(full["rng"]["torch"], outline["rng"]["torch"]), "payload.pt is read"


def test_load_of_an_optimizer_before_its_first_step_has_empty_state(tmp_path: Path) -> None:
    sharded, rest = split_payload(_session())
    sharded["optimizer"]["state"] = {}  # DCP stores nothing for it

    loaded = load_checkpoint(write_sharded_dir(tmp_path / "model.ckpt-0", sharded, rest))

    assert {} == loaded["optimizer"]["state"]
    assert 6 == len(loaded["optimizer"]["param_groups"][0]["params"])


def test_load_refuses_damage_and_an_uncommitted_directory(ckpt: str) -> None:
    path = ckpt
    flip_byte(os.path.join(path, "__0_0.distcp"))
    with pytest.raises(CheckpointCorruptedError, match="is corrupted: checksum mismatch"):
        load_checkpoint(path)
    os.remove(os.path.join(path, MANIFEST_NAME))
    with pytest.raises(CheckpointCorruptedError, match="incomplete: no torch_ckpt_manifest"):
        load_checkpoint(path)


def test_load_without_verify_reads_a_directory_without_a_manifest(
    saved: tuple[Session, str],
) -> None:
    session, path = saved
    os.remove(os.path.join(path, MANIFEST_NAME))

    loaded = load_checkpoint(path, verify=False)

    assert session.global_step == loaded["global_step"]
    _assert_same(session.model.state_dict(), loaded["model"])


def test_load_refuses_a_callable_map_location(ckpt: str) -> None:
    path = ckpt
    with pytest.raises(ValueError, match="map_location for a sharded checkpoint directory"):
        load_checkpoint(path, map_location=lambda storage, location: storage)


# -- restore --------------------------------------------------------------------------------


def test_saver_restores_a_directory_into_a_plain_session(saved: tuple[Session, str]) -> None:
    session, path = saved
    fresh = _session(seed=1, steps=1)

    Saver().restore(fresh, path)

    _assert_same(session.model.state_dict(), fresh.model.state_dict())
    _assert_same(session.optimizer.state_dict(), fresh.optimizer.state_dict())  # type: ignore[union-attr]
    assert (session.global_step, {"seen": 2}) == (fresh.global_step, fresh.extra_state["stats"])
    assert os.path.abspath(path) == fresh.restored_from


def test_session_load_state_dict_takes_a_loaded_directory_as_it_is(
    saved: tuple[Session, str],
) -> None:
    """torch's Optimizer.load_state_dict treats FQNs as opaque ids, matched by position."""
    session, path = saved
    fresh = _session(seed=1, steps=1)

    fresh.load_state_dict(load_checkpoint(path))

    _assert_same(session.optimizer.state_dict(), fresh.optimizer.state_dict())  # type: ignore[union-attr]


def test_restore_matches_the_optimizer_state_by_name_not_order(
    saved: tuple[Session, str],
) -> None:
    """An optimizer built over the parameters in another order still gets each its own state."""
    session, path = saved
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    optimizer = torch.optim.Adam(list(model.parameters())[::-1], lr=0.01)
    fresh = Session(model, optimizer, extra_state={"stats": {}})

    Saver().restore(fresh, path)

    original = dict(session.model.named_parameters())
    for name, param in model.named_parameters():
        _assert_same(
            session.optimizer.state[original[name]],  # type: ignore[union-attr]
            optimizer.state[param],
            name,
        )


def test_restore_into_a_model_that_does_not_fit_changes_nothing(
    ckpt: str,
) -> None:
    path = ckpt
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    fresh = Session(model, optimizer, extra_state={"stats": {}})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match="does not fit this session's model and optimizer"):
        Saver().restore(fresh, path)

    _assert_same(before, model.state_dict())


def _mixed_directory(tmp_path: Path) -> tuple[Session, Path]:
    """model.ckpt-1 a file, model.ckpt-2 and -3 sharded directories, -3 the latest."""
    session = _session()
    write_checkpoint(tmp_path / "model.ckpt-1", session.state_dict())
    save_sharded(session, tmp_path / "model.ckpt-2")
    session.global_step = 3
    save_sharded(session, tmp_path / "model.ckpt-3")
    update_checkpoint_state(
        str(tmp_path),
        str(tmp_path / "model.ckpt-3"),
        [str(tmp_path / f"model.ckpt-{i}") for i in (1, 2, 3)],
    )
    return session, tmp_path


def test_latest_and_restorable_with_files_and_directories(tmp_path: Path) -> None:
    directory = _mixed_directory(tmp_path)[1]
    os.remove(directory / "checkpoint")  # found on disk, not from the state file

    assert [1, 2, 3] == [step for step, _ in find_checkpoints(directory)]
    assert str(directory / "model.ckpt-3") == latest_checkpoint(directory)
    assert str(directory / "model.ckpt-3") == restorable_checkpoint(directory)


def test_restore_falls_back_past_a_damaged_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session, directory = _mixed_directory(tmp_path)
    flip_byte(directory / "model.ckpt-3" / "__0_0.distcp")
    fresh = _session(seed=1, steps=1)

    with caplog.at_level(logging.WARNING):
        runner = MonitoredSession(fresh.model, fresh.optimizer, checkpoint_dir=str(directory))
    runner.close()

    assert str(directory / "model.ckpt-2") == restorable_checkpoint(directory)
    assert os.path.abspath(directory / "model.ckpt-2") == runner.restored_from
    assert "Skipping checkpoint" in caplog.text
    assert "model.ckpt-3" in caplog.text
    _assert_same(session.model.state_dict(), fresh.model.state_dict())


def test_an_uncommitted_directory_is_not_listed_and_restore_passes_it(tmp_path: Path) -> None:
    session = _session()
    write_checkpoint(tmp_path / "model.ckpt-1", session.state_dict())
    save_sharded(session, tmp_path / "model.ckpt-5", manifest=False)

    assert [1] == [step for step, _ in find_checkpoints(tmp_path)]
    assert str(tmp_path / "model.ckpt-1") == latest_checkpoint(tmp_path)
    assert str(tmp_path / "model.ckpt-1") == restorable_checkpoint(tmp_path)


# -- retention ------------------------------------------------------------------------------


def _saver_over(directory: Path, names: list[str]) -> tuple[Saver, Session]:
    update_checkpoint_state(
        str(directory), str(directory / names[-1]), [str(directory / n) for n in names]
    )
    saver = Saver(max_to_keep=1)
    saver.recover_last_checkpoints_from(str(directory))
    return saver, _session()


def test_retention_deletes_whole_sharded_directories(tmp_path: Path) -> None:
    session = _session()
    save_sharded(session, tmp_path / "model.ckpt-1")
    save_sharded(session, tmp_path / "model.ckpt-2")
    saver, session = _saver_over(tmp_path, ["model.ckpt-1", "model.ckpt-2"])

    saver.save(session, str(tmp_path / "model.ckpt"), global_step=3)

    assert ["checkpoint", "model.ckpt-3"] == sorted(os.listdir(tmp_path))


@pytest.mark.parametrize("case", ["no_manifest", "foreign_manifest", "extra_file", "link"])
def test_retention_never_deletes_a_directory_that_is_not_ours(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    session = _session()
    target = tmp_path / "model.ckpt-1"
    save_sharded(session, target)
    if case == "no_manifest":
        os.remove(target / MANIFEST_NAME)  # still listed by the state file, still not ours
    elif case == "foreign_manifest":
        (target / MANIFEST_NAME).write_text('{"format": "someone.else", "files": {}}')
    elif case == "extra_file":
        (target / "notes.txt").write_text("mine")
    elif case == "link":
        real = tmp_path / "elsewhere"
        target.rename(real)
        target.symlink_to(real, target_is_directory=True)
    before = sorted(os.listdir(target))
    saver, session = _saver_over(tmp_path, ["model.ckpt-1"])

    with caplog.at_level(logging.WARNING):
        saver.save(session, str(tmp_path / "model.ckpt"), global_step=2)

    assert before == sorted(os.listdir(target))
    assert "never deleted" in caplog.text or "Not deleting" in caplog.text


def test_why_not_deletable_names_the_reason_for_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt-1"
    save_sharded(_session(), target)
    assert None is why_not_deletable(str(target), str(tmp_path), "model.ckpt")
    (target / "notes.txt").write_text("mine")
    assert "holds files its manifest does not list (notes.txt)" in str(
        why_not_deletable(str(target), str(tmp_path), "model.ckpt")
    )
    os.remove(target / "notes.txt")
    os.remove(target / MANIFEST_NAME)
    assert "without a sharded checkpoint manifest" in str(
        why_not_deletable(str(target), str(tmp_path), "model.ckpt")
    )


def test_delete_removes_the_manifest_first_and_leaves_a_file_put_there_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "model.ckpt-1"
    save_sharded(_session(), target)
    (target / "late.txt").write_text("arrived after the ownership check")

    with caplog.at_level(logging.WARNING):
        LocalStorage().delete(str(target))

    assert ["late.txt"] == os.listdir(target)
    assert "left the directory" in caplog.text
    assert [] == find_checkpoints(tmp_path)


# -- real FSDP2 output ----------------------------------------------------------------------


@pytest.mark.slow
def test_load_and_restore_a_directory_written_by_fsdp2_on_two_ranks(tmp_path: Path) -> None:
    """Two gloo ranks shard a model with fully_shard and save it through DCP; one process with
    no process group assembles the full state, equal to the one FSDP2 gathers itself."""
    directory = str(tmp_path / "model.ckpt-2")
    expected_path = str(tmp_path / "expected.pt")
    tests = Path(__file__).parent
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]
        ),
    )
    # Fresh interpreters: forking this one (threads, OpenMP) can deadlock the children.
    code = (
        "import sys; from sharded_dirs import fsdp2_save_worker; fsdp2_save_worker(*sys.argv[1:])"
    )
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                str(rank),
                "2",
                str(tmp_path / "init"),
                directory,
                expected_path,
            ],
            env=env,
        )
        for rank in range(2)
    ]
    try:
        assert [0, 0] == [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    expected = torch.load(expected_path, weights_only=True)

    assert 2 == len(shard_names(directory))
    assert None is verify_checkpoint(directory)
    loaded = load_checkpoint(directory)
    _assert_same(expected["model"], loaded["model"])
    _assert_same(expected["optimizer"], loaded["optimizer"])

    model = fsdp2_model()
    fresh = Session(model, torch.optim.Adam(model.parameters(), lr=0.5))
    Saver().restore(fresh, directory)
    _assert_same(expected["model"], model.state_dict())
    assert 0.01 == fresh.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]
