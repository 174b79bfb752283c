"""Distributed pieces in one process: safe DCP reading, per-rank state, the agreement's checks.

The multi-process scenarios are in test_distributed.py; these use small implementations of
``CheckpointGroup`` instead of a process group.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

import torch_ckpt_hook as tch
from torch_ckpt_hook._agreement import StepAgreement
from torch_ckpt_hook._dcp_read import SafeLoadPlanner, safe_reader
from torch_ckpt_hook._distributed import CheckpointGroup, SingleProcessGroup
from torch_ckpt_hook._sharded_dir import MANIFEST_NAME, PAYLOAD_NAME, read_manifest
from torch_ckpt_hook._sharded_storage import ShardedStorage

# DCP says so when it saves or loads in one process (the package's own calls silence it).
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class RankOf(CheckpointGroup):
    """Rank ``rank`` of ``world_size``, whose collectives see only this rank's values."""

    def __init__(self, rank: int, world_size: int, others: list[int] | None = None) -> None:
        self._rank = rank
        self._world_size = world_size
        self.others = others  # what max_all sees from the other ranks

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def writer_process_group(self) -> Any:
        return None

    @property
    def step_process_group(self) -> Any:
        return None

    def max_all(self, values: list[int]) -> list[int]:
        others = self.others or [0] * len(values)
        return [max(a, b) for a, b in zip(values, others, strict=True)]

    def all_gather(self, obj: object, *, writer: bool = False) -> list[Any]:
        return [obj] * self._world_size

    def broadcast(self, obj: object) -> Any:
        return obj

    def close(self) -> None:
        pass


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > /dev/null",))


# -- safe DCP reading ------------------------------------------------------------------------


@single_process
def test_safe_planner_loads_plain_values_and_refuses_objects(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    save({"w": torch.ones(3), "meta": {"lr": 0.5}}, checkpoint_id=str(good), no_dist=True)
    target: dict[str, Any] = {"w": torch.zeros(3), "meta": {"lr": 0.0}}
    load(
        target,
        storage_reader=safe_reader(good),
        planner=SafeLoadPlanner(),
        no_dist=True,
    )
    assert torch.equal(target["w"], torch.ones(3))
    assert target["meta"] == {"lr": 0.5}
    save({"obj": Evil()}, checkpoint_id=str(bad), no_dist=True)
    with pytest.raises((tch.CheckpointUnloadableError, CheckpointException), match="weights_only"):
        load(
            {"obj": None},
            storage_reader=safe_reader(bad),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )


# -- sharded directories in one process ------------------------------------------------------


def _write_directory(tmp_path: Path, session: tch.Session, step: int) -> str:
    storage = ShardedStorage(SingleProcessGroup())
    path = str(tmp_path / f"model.ckpt-{step}")
    payload = session.state_dict()
    model, optimizer = session.sharded_state()
    storage.write(path, {**payload, "model": model, "optimizer": optimizer})
    storage.finish(path, step, storage.digests(path))
    return path


def test_a_directory_checkpoint_restores_into_a_plain_model(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer, global_step=7)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    path = _write_directory(tmp_path, session, 8)
    manifest = read_manifest(path)
    assert set(manifest.files) == {".metadata", "__0_0.distcp", PAYLOAD_NAME}
    assert not os.path.exists(path + ".partial")
    torch.manual_seed(1)
    other = torch.nn.Linear(3, 1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    restored = tch.Session(other, other_optimizer)
    tch.Saver().restore(restored, path)
    assert restored.global_step == 8
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_damaged_directory_is_refused_and_the_session_untouched(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    model, optimizer = model_and_optimizer
    path = _write_directory(tmp_path, tch.Session(model, optimizer), 1)
    shard = os.path.join(path, "__0_0.distcp")
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    other = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in other.parameters()]
    session = tch.Session(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(tch.CheckpointCorruptedError, match=r"checksum mismatch: __0_0\.distcp"):
        tch.Saver().restore(session, path)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
    os.remove(os.path.join(path, MANIFEST_NAME))
    # Without its manifest the directory is no checkpoint at all.
    with pytest.raises(tch.CheckpointCorruptedError, match="incomplete: no torch_ckpt_manifest"):
        tch.Saver().restore(session, path)


# -- per-rank state --------------------------------------------------------------------------


def test_rank_state_round_trips_in_one_process(tmp_path: Path, model_and_optimizer: Any) -> None:
    model, optimizer = model_and_optimizer
    loader = {"position": 3}
    session = tch.Session(model, optimizer, rank_state={"loader": loader})
    assert session.state_dict()["rank_state"] == [{"loader": {"position": 3}}]
    path = tch.Saver().save(session, str(tmp_path / "model.ckpt"), 0)
    loader["position"] = 99
    tch.Saver().restore(session, path)
    assert loader == {"position": 3}


def test_rank_state_must_be_stateful_or_plain(model_and_optimizer: Any) -> None:
    model, optimizer = model_and_optimizer
    with pytest.raises(TypeError, match=r"rank_state\['loader'\] must be an object with"):
        tch.Session(model, optimizer, rank_state={"loader": 3})


def _payload_of_two_ranks(model_and_optimizer: Any) -> tuple[tch.Session, dict[str, Any]]:
    model, optimizer = model_and_optimizer
    loader = {"position": 0}
    session = tch.Session(model, optimizer, rank_state={"loader": loader})
    payload = session.state_dict()
    torch.manual_seed(11)
    chief_rng = tch.Session(torch.nn.Linear(1, 1)).state_dict()["rng"]
    torch.manual_seed(22)
    other_rng = tch.Session(torch.nn.Linear(1, 1)).state_dict()["rng"]
    payload["rng"] = chief_rng
    payload["rank_rng"] = [chief_rng, other_rng]
    payload["rank_state"] = [{"loader": {"position": 10}}, {"loader": {"position": 20}}]
    return session, payload


def test_each_rank_restores_its_own_rng_and_rank_state(model_and_optimizer: Any) -> None:
    session, payload = _payload_of_two_ranks(model_and_optimizer)
    session.set_checkpoint_group(RankOf(1, 2))
    session.load_state_dict(payload)
    assert session.rank_state["loader"] == {"position": 20}
    assert torch.equal(torch.get_rng_state(), payload["rank_rng"][1]["torch"])


def test_a_world_size_change_restores_the_chiefs_with_a_warning(
    model_and_optimizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    session, payload = _payload_of_two_ranks(model_and_optimizer)
    session.set_checkpoint_group(RankOf(2, 3))
    with caplog.at_level(logging.WARNING, logger="torch_ckpt_hook"):
        session.load_state_dict(payload)
    assert session.rank_state["loader"] == {"position": 10}
    assert torch.equal(torch.get_rng_state(), payload["rank_rng"][0]["torch"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("rank_rng for 2 ranks but this run has 3" in m for m in messages)
    assert any("rank_state for 2 ranks but this run has 3" in m for m in messages)


# -- the agreement ---------------------------------------------------------------------------


def test_ranks_with_different_checkpoint_hooks_are_refused(tmp_path: Path) -> None:
    hook = tch.CheckpointSaverHook(str(tmp_path), save_steps=1)
    # The other rank has 2 checkpoint hooks: max_all sees (2, -0) against this rank's (1, -1).
    with pytest.raises(ValueError, match="every rank must run the same checkpoint hooks"):
        StepAgreement(RankOf(0, 2, others=[2, 0]), [hook])
    StepAgreement(RankOf(0, 2, others=[1, -1]), [hook])


def test_a_process_without_a_process_group_gets_the_single_process_group(
    model_and_optimizer: Any,
) -> None:
    model, optimizer = model_and_optimizer
    with tch.SingularMonitoredSession(model, optimizer) as sess:
        assert isinstance(sess.raw_session().checkpoint_group, SingleProcessGroup)
    session = tch.Session(model, optimizer)
    assert isinstance(session.checkpoint_group, SingleProcessGroup)
    assert session.checkpoint_group.is_chief
    assert not session.sharded


def test_a_chief_that_cannot_see_a_ranks_files_does_not_commit(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    """Without a shared file system the other rank's shards are not in the chief's directory."""
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer)
    storage = ShardedStorage(SingleProcessGroup())
    path = str(tmp_path / "model.ckpt-1")
    state = session.state_dict()
    model_state, optimizer_state = session.sharded_state()
    storage.write(path, {**state, "model": model_state, "optimizer": optimizer_state})
    files = storage.digests(path)
    files["__1_0.distcp"] = files["__0_0.distcp"]  # reported by a rank on another node
    with pytest.raises(FileNotFoundError, match="shared mount"):
        storage.finish(path, 1, files)
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.join(path + ".partial", MANIFEST_NAME))


def test_the_collectives_timeout_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch_ckpt_hook._distributed import DEFAULT_TIMEOUT_SECS, TIMEOUT_ENV, timeout_secs

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_secs() == DEFAULT_TIMEOUT_SECS
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_secs() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(
            ValueError, match=f"{TIMEOUT_ENV} must be a positive number of seconds, got '{bad}'"
        ):
            timeout_secs()


class _Context:
    """What StepAgreement needs of a run context."""

    def __init__(self, session: tch.Session) -> None:
        self.session = session
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True


class Scripted(RankOf):
    """Rank 1 of 2, whose all-reduces return the next of ``replies`` (the chief's vector)."""

    def __init__(self, replies: list[list[int]]) -> None:
        super().__init__(1, 2)
        self.replies = replies

    def max_all(self, values: list[int]) -> list[int]:
        return [max(a, b) for a, b in zip(values, self.replies.pop(0), strict=True)]


class Calls(tch.CheckpointSaverListener):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def before_save(self, session: Any, global_step_value: int) -> None:
        self.calls.append(f"before_save({global_step_value})")

    def after_save(self, session: Any, global_step_value: int) -> None:
        self.calls.append(f"after_save({global_step_value})")


def test_the_agreement_carries_the_chiefs_save_and_any_ranks_stop(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer, global_step=5)
    listener = Calls()
    hook = tch.CheckpointSaverHook(str(tmp_path), save_steps=1000, listeners=[listener])
    hook.begin()
    # This rank is rank 1: its timer would not fire, and it never proposes a save. The chief's
    # vectors: the hook count (1), then "save, not busy", then "stop".
    group = Scripted([[1, -1], [0, 1, 0], [1, 0, 0]])
    session.set_checkpoint_group(group)
    agreement = StepAgreement(group, [hook])
    assert hook.proposal(_Context(session)) == (0, 0)  # type: ignore[arg-type]
    assert not agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    # It took part in the save of step 5 (a blocking one: a TensorFlow-style listener); only
    # the chief writes files.
    assert listener.calls == ["before_save(5)", "after_save(5)"]
    assert os.listdir(tmp_path) == []
    assert agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    hook.end(session)  # step 5 is saved: no other save
    assert listener.calls == ["before_save(5)", "after_save(5)"]


def test_a_skipped_save_is_skipped_and_then_made_on_every_rank_together(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    """if_busy='skip' under the agreement: a busy writer on any rank skips the save everywhere;
    the chief owes it (proposes 1) and a non-chief, which owes nothing itself, follows."""
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer, global_step=5)
    listener = Calls()
    hook = tch.CheckpointSaverHook(
        str(tmp_path), save_steps=1000, listeners=[listener], if_busy="skip"
    )
    hook.begin()
    # This rank is rank 1. The chief's vectors: the hook count, then "save due, a rank busy",
    # then "a skipped save owed, nobody busy".
    group = Scripted([[1, -1], [0, 2, 1], [0, 1, 0]])
    session.set_checkpoint_group(group)
    agreement = StepAgreement(group, [hook])
    assert not agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    assert listener.calls == []
    assert hook.skipped_saves == 1
    assert not agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    assert listener.calls == ["before_save(5)", "after_save(5)"]
    assert hook.skipped_saves == 1


def test_the_chief_proposes_the_save_it_owes_after_a_skip(
    tmp_path: Path, model_and_optimizer: Any
) -> None:
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer, global_step=5)
    hook = tch.CheckpointSaverHook(str(tmp_path), save_steps=1, if_busy="skip")
    hook.begin()
    session.set_checkpoint_group(RankOf(0, 2))
    hook.join_agreement()
    context = _Context(session)
    assert hook.proposal(context) == (2, 0)  # type: ignore[arg-type]
    # Another rank was busy: skipped here too, and owed.
    hook.after_agreement(context, 2, settled=False)  # type: ignore[arg-type]
    assert hook.skipped_saves == 1
    assert os.listdir(tmp_path) == []
    assert hook.proposal(context) == (1, 0)  # type: ignore[arg-type]


def test_only_the_chief_mirrors_a_save(tmp_path: Path, model_and_optimizer: Any) -> None:
    """A non-chief's hook with a mirror takes part in the save but copies nothing: the chief
    wrote the file, and the chief's mirror copies it."""
    model, optimizer = model_and_optimizer
    session = tch.Session(model, optimizer, global_step=5)
    mirror = f"memory://only-the-chief-{os.getpid()}"
    hook = tch.CheckpointSaverHook(
        str(tmp_path), save_steps=1000, listeners=[Calls()], mirror_dir=mirror
    )
    hook.begin()
    group = Scripted([[1, -1], [0, 2, 0], [1, 0, 0]])
    session.set_checkpoint_group(group)
    agreement = StepAgreement(group, [hook])
    assert not agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    assert agreement.after_step(_Context(session), False)  # type: ignore[arg-type]
    hook.end(session)
    # No copy attempted: no mirror status file beside the (empty) local directory, nothing there.
    assert os.listdir(tmp_path) == []
    assert tch.latest_checkpoint(mirror) is None
