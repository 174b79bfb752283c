"""The mirror tier (SPEC.md §5.4): background copies to ``mirror_dir``, its own retention, restore.

Mirrors are fsspec file systems: ``memory://``, and two small in-memory ones registered for these
tests under protocols of their own: ``tchgated://`` holds every write until the test opens its
gate, ``tchdown://`` fails every write as an unreachable endpoint would. The package runs its own
code against them; nothing of it is patched.
"""

from __future__ import annotations

import errno
import json
import logging
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

import torch_ckpt_hook as tch
from torch_ckpt_hook._mirror import STATUS_FILENAME, Mirror, read_mirror_status
from torch_ckpt_hook._mirror_policy import RetryPolicy, merge_newest_first, mirror_retention


class _OwnMemory(MemoryFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """An in-memory file system with a store of its own, under its own protocol."""

    protocol: ClassVar[str] = "tchmem"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        prefix = f"{cls.protocol}://"
        if isinstance(path, str) and path.startswith(prefix):
            path = "memory://" + path[len(prefix) :]
        return str(MemoryFileSystem._strip_protocol(path))


class GatedFS(_OwnMemory):
    """Holds every write until ``gate`` is set (30 s at most, then fails the write)."""

    protocol: ClassVar[str] = "tchgated"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    gate = threading.Event()
    waiting = threading.Event()

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        GatedFS.waiting.set()
        if not GatedFS.gate.wait(30):
            raise AssertionError("the test never opened the mirror's gate")
        super().pipe_file(path, value, *args, **kwargs)


class DownFS(_OwnMemory):
    """Fails every write: an unreachable mirror. ``attempts`` counts them."""

    protocol: ClassVar[str] = "tchdown"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    attempts = 0

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        DownFS.attempts += 1
        raise ConnectionError("mirror endpoint unreachable")


class DeadFS(DownFS):
    """Fails every read and listing as well: a mirror whose endpoint is gone."""

    protocol: ClassVar[str] = "tchdead"

    def _dead(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("mirror endpoint unreachable")

    ls = info = cat_file = _open = exists = find = _dead


for _fs in (GatedFS, DownFS, DeadFS):
    fsspec.register_implementation(_fs.protocol, _fs, clobber=True)


@pytest.fixture(autouse=True)
def _fresh_filesystems() -> Iterator[None]:
    GatedFS.store.clear()
    GatedFS.gate.clear()
    GatedFS.waiting.clear()
    DownFS.store.clear()
    DownFS.attempts = 0
    yield
    GatedFS.gate.set()  # a failing test leaves no mirror thread parked


@pytest.fixture
def mem_mirror() -> Iterator[str]:
    name = f"mirror-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(local: pathlib.Path, mirror: str, steps: int, **hook_kwargs: Any) -> tch.Session:
    model, opt = _model()
    saver = hook_kwargs.pop("saver", None)
    hook = tch.CheckpointSaverHook(
        str(local), save_steps=1, saver=saver, mirror_dir=mirror, **hook_kwargs
    )

    def step() -> None:
        opt.zero_grad()
        model(torch.ones(2, 4)).square().sum().backward()
        opt.step()

    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)) as sess:
        for _ in range(steps):
            sess.run(step)
    return tch.Session(model, opt)


def _names(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


# -- the policy -------------------------------------------------------------------------------


def test_retry_delays_back_off_to_a_ceiling() -> None:
    policy = RetryPolicy(attempts=5, first_delay=1.0, factor=2.0, max_delay=3.0)
    assert [1.0, 2.0, 3.0, 3.0] == [policy.delay(n) for n in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        RetryPolicy(attempts=0)


def test_mirror_retention_keeps_the_newest_and_never_a_protected_one() -> None:
    assert (["b", "c"], ["a"]) == mirror_retention(["a", "b", "c"], 2, {"c"})
    assert (["a", "c"], ["b"]) == mirror_retention(["a", "b", "c"], 2, {"a", "c"})
    assert (["a", "b"], []) == mirror_retention(["a", "b"], 1, {"a", "b"})
    assert (["a", "b", "c"], []) == mirror_retention(["a", "b", "c"], None, set())
    assert (["a", "b", "c"], []) == mirror_retention(["a", "b", "c"], 0, set())


def test_restore_candidates_of_both_tiers_merge_newest_step_first() -> None:
    local = ["/l/m-3", "/l/m-2"]
    mirror = ["s3://b/m-5", "s3://b/m-3", "s3://b/m-1"]
    assert ["s3://b/m-5", "/l/m-3", "s3://b/m-3", "/l/m-2", "s3://b/m-1"] == (
        merge_newest_first(local, mirror)
    )


# -- the hook's mirror ------------------------------------------------------------------------


def test_each_committed_checkpoint_is_copied_with_a_state_file_of_its_own(
    tmp_path: pathlib.Path, mem_mirror: str
) -> None:
    local = tmp_path / "run"
    _train(local, mem_mirror, 3)
    assert ["checkpoint", "model.ckpt-0", "model.ckpt-1", "model.ckpt-2", "model.ckpt-3"] == (
        _names(mem_mirror)
    )
    assert f"{mem_mirror}/model.ckpt-3" == tch.latest_checkpoint(mem_mirror)
    for step in range(4):
        assert tch.verify_checkpoint(f"{mem_mirror}/model.ckpt-{step}") is None
        assert (local / f"model.ckpt-{step}").read_bytes() == fsspec.filesystem("memory").cat_file(
            f"{mem_mirror}/model.ckpt-{step}"
        )
    status = read_mirror_status(str(local))
    assert status is not None
    assert mem_mirror == status["mirror_dir"]
    assert {f"model.ckpt-{s}": "mirrored" for s in range(4)} == {
        c["name"]: c["state"] for c in status["checkpoints"]
    }


def test_the_mirror_has_its_own_retention(tmp_path: pathlib.Path, mem_mirror: str) -> None:
    local = tmp_path / "run"
    _train(local, mem_mirror, 5, saver=tch.Saver(max_to_keep=5), mirror_max_to_keep=2)
    assert ["checkpoint", "model.ckpt-4", "model.ckpt-5"] == _names(mem_mirror)
    assert [f"model.ckpt-{s}" for s in range(1, 6)] == sorted(
        p.name for p in local.glob("model.ckpt-*")
    )


def test_the_loop_never_waits_for_the_mirror(tmp_path: pathlib.Path) -> None:
    local = tmp_path / "run"
    model, opt = _model()
    saver = tch.Saver()
    hook = tch.CheckpointSaverHook(str(local), save_steps=1, saver=saver, mirror_dir="tchgated://m")

    def step() -> None:
        opt.zero_grad()
        model(torch.ones(2, 4)).square().sum().backward()
        opt.step()

    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)) as sess:
        for _ in range(4):
            sess.run(step)
        saver.wait_until_finished()  # the local tier only: the hook's would wait for the mirror
        # Four steps trained and saved locally while the mirror is held at its first copy: no
        # copy has finished (no outcome recorded), none is on the mirror.
        assert GatedFS.waiting.wait(30), "the mirror never started copying"
        assert f"{local}/model.ckpt-4" == tch.latest_checkpoint(str(local))
        assert not (local / STATUS_FILENAME).exists()
        assert {} == GatedFS.store
        GatedFS.gate.set()
    assert "tchgated://m/model.ckpt-4" == tch.latest_checkpoint("tchgated://m")
    assert ["checkpoint", *[f"model.ckpt-{s}" for s in range(5)]] == _names("tchgated://m")


def test_an_unreachable_mirror_never_fails_training_and_is_reported(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        _train(local, "tchdown://m", 2)
    assert f"{local}/model.ckpt-2" == tch.latest_checkpoint(str(local))
    status = json.loads((local / STATUS_FILENAME).read_text())
    assert {f"model.ckpt-{s}": "failed" for s in range(3)} == {
        c["name"]: c["state"] for c in status["checkpoints"]
    }
    assert all("mirror endpoint unreachable" in c["detail"] for c in status["checkpoints"])
    assert "the checkpoint stays on the local tier only" in caplog.text


def test_a_failed_copy_is_retried_then_given_up(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tch.Saver().save(tch.Session(*_model()), str(tmp_path / "model.ckpt"), global_step=1)
    mirror = Mirror(
        str(tmp_path), "tchdown://m", None, "model.ckpt", retry=RetryPolicy(3, first_delay=0.01)
    )
    with caplog.at_level(logging.WARNING):
        mirror.submit(path)
        deadline = time.monotonic() + 30
        while "model.ckpt-1" not in mirror.outcomes() and time.monotonic() < deadline:
            time.sleep(0.01)
        mirror.close()
    outcome = mirror.outcomes()["model.ckpt-1"]
    assert ("failed", 3) == (outcome.state, outcome.attempts)
    assert 3 == DownFS.attempts
    assert "failed (attempt 1 of 3), retrying in 0.01 s" in caplog.text
    assert "failed after 3 attempts" in caplog.text


def test_close_holds_an_unreachable_mirror_for_one_attempt_per_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    saver = tch.Saver(max_to_keep=None)
    session = tch.Session(*_model())
    paths = [saver.save(session, str(tmp_path / "model.ckpt"), global_step=s) for s in (1, 2, 3)]
    # A minute between retries: close() returns only because it does not wait for them.
    mirror = Mirror(
        str(tmp_path), "tchdown://m", None, "model.ckpt", retry=RetryPolicy(50, first_delay=60)
    )
    for path in paths:
        mirror.submit(path)
    mirror.close()
    assert {f"model.ckpt-{s}": ("failed", 1) for s in (1, 2, 3)} == {
        name: (o.state, o.attempts) for name, o in mirror.outcomes().items()
    }


def test_mirror_retention_never_deletes_the_local_newest(
    tmp_path: pathlib.Path, mem_mirror: str
) -> None:
    saver = tch.Saver(max_to_keep=None)
    session = tch.Session(*_model())
    paths = {s: saver.save(session, str(tmp_path / "model.ckpt"), global_step=s) for s in (1, 2)}
    mirror = Mirror(str(tmp_path), mem_mirror, 1, "model.ckpt")
    # The local newest (2) is copied first, then an older one (a late retry): keeping one would
    # delete 2, which the local tier still lists as its newest.
    mirror.submit(paths[2])
    mirror.submit(paths[1])
    mirror.drain()
    assert ["checkpoint", "model.ckpt-1", "model.ckpt-2"] == _names(mem_mirror)
    assert f"{mem_mirror}/model.ckpt-2" == tch.latest_checkpoint(mem_mirror)
    paths[3] = saver.save(session, str(tmp_path / "model.ckpt"), global_step=3)
    mirror.submit(paths[3])
    mirror.close()
    assert ["checkpoint", "model.ckpt-3"] == _names(mem_mirror)


def test_mirror_retention_deletes_only_its_own_objects(
    tmp_path: pathlib.Path, mem_mirror: str, caplog: pytest.LogCaptureFixture
) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{mem_mirror}/model.ckpt-0", b"someone else's file" * 10)
    fs.pipe_file(
        f"{mem_mirror}/checkpoint",
        b'model_checkpoint_path: "model.ckpt-0"\nall_model_checkpoint_paths: "model.ckpt-0"\n',
    )
    saver = tch.Saver(max_to_keep=None)
    session = tch.Session(*_model())
    mirror = Mirror(str(tmp_path), mem_mirror, 1, "model.ckpt")
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            mirror.submit(saver.save(session, str(tmp_path / "model.ckpt"), global_step=step))
        mirror.close()
    assert ["checkpoint", "model.ckpt-0", "model.ckpt-2"] == _names(mem_mirror)
    assert "checksum trailer" in caplog.text


# -- restore from both tiers ------------------------------------------------------------------


def test_a_lost_local_dir_resumes_from_the_mirror(tmp_path: pathlib.Path, mem_mirror: str) -> None:
    local = tmp_path / "run"
    trained = _train(local, mem_mirror, 3)
    shutil.rmtree(local)
    model, opt = _model()
    hook = tch.CheckpointSaverHook(str(local), save_steps=1, mirror_dir=mem_mirror)
    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)) as sess:
        assert f"{mem_mirror}/model.ckpt-3" == sess.restored_from
        assert 3 == sess.global_step
        for key, value in trained.model.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
    # Not copied back as such: the creation save wrote the restored state to the local tier.
    assert f"{local}/model.ckpt-3" == tch.latest_checkpoint(str(local))


def test_restore_takes_the_newest_intact_checkpoint_of_either_tier(
    tmp_path: pathlib.Path, mem_mirror: str, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "run"
    _train(local, mem_mirror, 3)
    # The local newest is damaged: the mirror's copy of the same step is restored.
    data = bytearray((local / "model.ckpt-3").read_bytes())
    data[200] ^= 0xFF
    (local / "model.ckpt-3").write_bytes(bytes(data))
    model, opt = _model()
    hook = tch.CheckpointSaverHook(str(local), save_steps=1, mirror_dir=mem_mirror)
    with (
        caplog.at_level(logging.WARNING),
        tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)) as sess,
    ):
        assert f"{mem_mirror}/model.ckpt-3" == sess.restored_from
    assert f"Skipping checkpoint {local}/model.ckpt-3" in caplog.text


def test_mirror_arguments_are_checked(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="mirror_max_to_keep=2 needs a mirror_dir"):
        tch.CheckpointSaverHook(str(tmp_path), save_steps=1, mirror_max_to_keep=2)
    with pytest.raises(ValueError, match="mirror_max_to_keep must be"):
        tch.CheckpointSaverHook(
            str(tmp_path), save_steps=1, mirror_dir="memory://m", mirror_max_to_keep=-1
        )
    with pytest.raises(ValueError, match="mirror_dir must be another location"):
        tch.CheckpointSaverHook(str(tmp_path), save_steps=1, mirror_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mirror_dir needs a local checkpoint_dir to mirror"):
        tch.CheckpointSaverHook("memory://run", save_steps=1, mirror_dir=str(tmp_path))
    with pytest.raises(TypeError, match="mirror_dir must be a path or None, got int"):
        tch.CheckpointSaverHook(str(tmp_path), save_steps=1, mirror_dir=3)  # type: ignore[arg-type]


def test_ls_reports_the_mirror_tier(
    tmp_path: pathlib.Path, mem_mirror: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch_ckpt_hook._cli import main

    _train(tmp_path / "ok", mem_mirror, 1)
    _train(tmp_path / "down", "tchdown://m", 1)
    capsys.readouterr()
    assert 0 == main(["ls", str(tmp_path / "ok")])
    assert f"Mirror {mem_mirror}: 2 mirrored" in capsys.readouterr().out
    assert 0 == main(["ls", str(tmp_path / "down")])
    assert (
        "Mirror tchdown://m: 2 failed; the copy of model.ckpt-1 failed: ConnectionError: "
        "mirror endpoint unreachable"
    ) in capsys.readouterr().out
    assert 0 == main(["ls", "--json", str(tmp_path / "down")])
    assert '"mirror_dir": "tchdown://m"' in capsys.readouterr().out


def test_a_local_directory_can_be_the_mirror(tmp_path: pathlib.Path) -> None:
    local, backup = tmp_path / "run", tmp_path / "backup"
    _train(local, str(backup), 2, mirror_max_to_keep=2)
    assert ["checkpoint", "model.ckpt-1", "model.ckpt-2"] == sorted(
        p.name for p in backup.iterdir()
    )
    assert str(backup / "model.ckpt-2") == tch.latest_checkpoint(str(backup))
    assert (local / "model.ckpt-2").read_bytes() == (backup / "model.ckpt-2").read_bytes()


def test_the_copy_starts_at_the_local_commit_not_at_the_next_hook_call(
    tmp_path: pathlib.Path, mem_mirror: str
) -> None:
    model, opt = _model()
    local = tmp_path / "run"
    hook = tch.CheckpointSaverHook(str(local), save_steps=1, mirror_dir=mem_mirror)
    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)):
        # The creation save, then no hook call at all while the mirror copies it.
        deadline = time.monotonic() + 30
        while tch.latest_checkpoint(mem_mirror) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f"{mem_mirror}/model.ckpt-0" == tch.latest_checkpoint(mem_mirror)


def test_a_failed_local_save_is_not_mirrored(tmp_path: pathlib.Path, mem_mirror: str) -> None:
    from storages import FailingStorage

    saver = tch.Saver(storage=FailingStorage(OSError(errno.EIO, "Input/output error")))
    mirror = Mirror(str(tmp_path), mem_mirror, None, "model.ckpt")
    handle = saver.save(
        tch.Session(*_model()), str(tmp_path / "model.ckpt"), global_step=1, blocking=False
    )
    mirror.submit(handle)
    mirror.close()
    outcome = mirror.outcomes()["model.ckpt-1"]
    assert ("skipped", "its local save failed") == (outcome.state, outcome.detail)
    assert tch.latest_checkpoint(mem_mirror) is None
    with pytest.raises(tch.CheckpointSaveError, match="Input/output error"):
        saver.wait_until_finished()


def test_an_unreadable_mirror_restores_the_local_tier_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "run"
    _train(local, "tchdown://m", 2)
    model, opt = _model()
    hook = tch.CheckpointSaverHook(str(local), save_steps=1, mirror_dir="tchdead://m")
    with (
        caplog.at_level(logging.WARNING),
        tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(local)) as sess,
    ):
        assert f"{local}/model.ckpt-2" == sess.restored_from
        assert 2 == sess.global_step
    assert "The mirror tchdead://m cannot be read (ConnectionError: mirror endpoint" in caplog.text
    assert "the mirror may hold a newer checkpoint" in caplog.text


def test_an_unreadable_mirror_and_an_empty_local_tier_refuse_to_start_over(
    tmp_path: pathlib.Path,
) -> None:
    model, opt = _model()
    before = [p.detach().clone() for p in model.parameters()]
    hook = tch.CheckpointSaverHook(str(tmp_path / "run"), save_steps=1, mirror_dir="tchdead://m")
    with pytest.raises(
        tch.CheckpointError,
        match=r"Cannot tell whether the mirror tchdead://m holds checkpoints to restore: "
        r"ConnectionError: mirror endpoint unreachable\. .* holds none, so a session started now "
        r"could train from step 0 over the run on the mirror\.",
    ):
        tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=str(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
