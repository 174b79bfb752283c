"""fsspec URLs as checkpoint locations (SPEC.md §5.4), on fsspec's in-memory file system.

Also: which storage a location gets, the URL-aware path helpers, and the errors for a URL when
fsspec or the protocol's package is missing (in a child process whose fsspec import fails).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import fsspec
import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook import _paths
from torch_ckpt_hook._fsspec_storage import FsspecStorage
from torch_ckpt_hook._storage import LocalStorage
from torch_ckpt_hook._storage_for import DefaultStorage, storage_for

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def mem_dir() -> Iterator[str]:
    """A fresh ``memory://`` directory, removed afterwards."""
    name = f"run-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _session(step: int = 0) -> tch.Session:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return tch.Session(model, torch.optim.SGD(model.parameters(), lr=0.1), global_step=step)


@pytest.mark.parametrize(
    ("path", "url"),
    [
        ("s3://bucket/run", True),
        ("gs://b/r", True),
        ("memory://run", True),
        ("simplecache::s3://b/r", True),
        ("file:///tmp/run", False),
        ("/tmp/run", False),
        ("relative/run", False),
        ("C:/run", False),
    ],
)
def test_is_url(path: str, url: bool) -> None:
    assert url == _paths.is_url(path)


def test_url_paths_join_and_split_on_slashes() -> None:
    assert "s3://b/run/model.ckpt-3" == _paths.join("s3://b/run/", "model.ckpt-3")
    assert "s3://b/run" == _paths.dirname("s3://b/run/model.ckpt-3")
    assert "model.ckpt-3" == _paths.basename("s3://b/run/model.ckpt-3")
    assert "s3://b/run" == _paths.abspath("s3://b/run/")
    assert _paths.inside("s3://b/run/model.ckpt-3", "s3://b/run/")
    assert not _paths.inside("s3://b/other/model.ckpt-3", "s3://b/run")
    assert not _paths.inside("/b/run/model.ckpt-3", "s3://b/run")
    assert "/tmp/run" == _paths.normalize("file:///tmp/run")
    assert os.path.join("a", "b") == _paths.join("a", "b")


def test_storage_for_a_path_is_local_and_for_a_url_fsspec() -> None:
    assert type(storage_for("/tmp/run")) is LocalStorage
    assert isinstance(storage_for("memory://run"), FsspecStorage)
    assert isinstance(tch.Saver().storage, DefaultStorage)


def test_saver_and_readers_work_on_memory_urls(mem_dir: str) -> None:
    saver = tch.Saver(max_to_keep=2)
    session = _session()
    for step in (1, 2, 3):
        session.global_step = step
        assert f"{mem_dir}/model.ckpt-{step}" == saver.save(
            session, f"{mem_dir}/model.ckpt", global_step=step
        )
    assert f"{mem_dir}/model.ckpt-3" == tch.latest_checkpoint(mem_dir)
    state = tch.get_checkpoint_state(mem_dir)
    assert state is not None
    assert (f"{mem_dir}/model.ckpt-2", f"{mem_dir}/model.ckpt-3") == (
        state.all_model_checkpoint_paths
    )
    fs = fsspec.filesystem("memory")
    assert ["checkpoint", "model.ckpt-2", "model.ckpt-3"] == sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls(mem_dir, detail=False)
    )
    # Relative names in the state object, as in a local state file.
    text = fs.cat_file(f"{mem_dir}/checkpoint").decode()
    assert 'model_checkpoint_path: "model.ckpt-3"' in text
    assert tch.verify_checkpoint(f"{mem_dir}/model.ckpt-3") is None
    assert 3 == tch.load_checkpoint(f"{mem_dir}/model.ckpt-3")["global_step"]
    restored = _session()
    saver.restore(restored, f"{mem_dir}/model.ckpt-2")
    assert 2 == restored.global_step


def test_async_save_to_a_url_commits_in_the_background(mem_dir: str) -> None:
    saver = tch.Saver()
    handle = saver.save(_session(5), f"{mem_dir}/model.ckpt", global_step=5, blocking=False)
    assert f"{mem_dir}/model.ckpt-5" == handle.result()
    saver.wait_until_finished()
    assert f"{mem_dir}/model.ckpt-5" == tch.latest_checkpoint(mem_dir)


def test_missing_and_truncated_objects_are_reported(mem_dir: str) -> None:
    tch.Saver().save(_session(1), f"{mem_dir}/model.ckpt", global_step=1)
    fs = fsspec.filesystem("memory")
    data = fs.cat_file(f"{mem_dir}/model.ckpt-1")
    fs.pipe_file(f"{mem_dir}/model.ckpt-1", data[:-10])
    problem = tch.verify_checkpoint(f"{mem_dir}/model.ckpt-1")
    assert problem is not None
    assert "truncated" in problem
    assert "does not exist" in (tch.verify_checkpoint(f"{mem_dir}/model.ckpt-9") or "")
    with pytest.raises(ValueError, match=f"{mem_dir}/model.ckpt-9 does not exist"):
        tch.load_checkpoint(f"{mem_dir}/model.ckpt-9")
    with pytest.raises(tch.CheckpointCorruptedError, match=f"{mem_dir}/model.ckpt-1 is corrupted"):
        tch.load_checkpoint(f"{mem_dir}/model.ckpt-1")


def test_a_failed_write_leaves_nothing_under_the_final_name(mem_dir: str) -> None:
    class Unpicklable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        FsspecStorage().write(f"{mem_dir}/model.ckpt-1", {"w": torch.zeros(10), "z": Unpicklable()})
    assert not fsspec.filesystem("memory").exists(f"{mem_dir}/model.ckpt-1")


def test_hook_on_a_memory_url_trains_and_resumes(mem_dir: str) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()

    hook = tch.CheckpointSaverHook(mem_dir, save_steps=2)
    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=mem_dir) as sess:
        for _ in range(3):
            sess.run(step)
    assert f"{mem_dir}/model.ckpt-3" == tch.latest_checkpoint(mem_dir)
    hook = tch.CheckpointSaverHook(mem_dir, save_steps=2)
    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=mem_dir) as sess:
        assert f"{mem_dir}/model.ckpt-3" == sess.restored_from
        assert 3 == sess.global_step


def test_a_url_of_an_unknown_protocol_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="checkpoint_dir must be a local path or an fsspec URL"):
        tch.CheckpointSaverHook("nosuchproto://b/run", save_steps=1)


def test_a_url_whose_package_is_missing_names_the_install_command() -> None:
    fsspec.register_implementation(
        "tchmissing", "no_such_module_for_tests.FileSystem", clobber=True, errtxt="Install nope"
    )
    with pytest.raises(
        ImportError,
        match=r"tchmissing://b/run' needs a package for tchmissing:// URLs \(not installed\): Install nope",
    ):
        tch.CheckpointSaverHook("tchmissing://b/run", save_steps=1)


def _child(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_local_run_never_imports_fsspec_and_a_url_without_it_names_the_install(
    tmp_path: pathlib.Path,
) -> None:
    # One child (importing torch is the slow part) for three facts, in order.
    code = f"""
import sys, torch, torch_ckpt_hook as tch
model = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with tch.MonitoredTrainingSession(model, opt, checkpoint_dir={str(tmp_path)!r},
                                  save_checkpoint_steps=1, log_step_count_steps=0) as sess:
    sess.run(lambda: opt.step())
print(tch.latest_checkpoint({str(tmp_path)!r}), tch.restorable_checkpoint({str(tmp_path)!r}))
print("fsspec imported:", "fsspec" in sys.modules)
sys.modules["fsspec"] = None  # import fsspec now raises ImportError, as if not installed
try:
    tch.CheckpointSaverHook("s3://bucket/run", save_steps=1)
except ImportError as err:
    print("ERROR", err)
del sys.modules["fsspec"]
sys.modules["s3fs"] = None  # and now s3fs is the one missing
try:
    tch.MonitoredTrainingSession(model, checkpoint_dir="s3://b/run")
except ImportError as err:
    print("ERROR", err)
"""
    result = _child(code)
    assert 0 == result.returncode, result.stderr
    assert f"{tmp_path / 'model.ckpt-1'} {tmp_path / 'model.ckpt-1'}" in result.stdout
    assert "fsspec imported: False" in result.stdout
    assert (
        "ERROR checkpoint_dir 's3://bucket/run' is an fsspec URL, which needs fsspec (not "
        "installed): pip install 'torch-ckpt-hook[remote]'"
    ) in result.stdout
    assert (
        "ERROR checkpoint_dir 's3://b/run' needs s3fs for s3:// URLs (not installed): "
        "pip install s3fs"
    ) in result.stdout


def test_the_cli_reads_urls(mem_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from torch_ckpt_hook._cli import main

    saver = tch.Saver()
    for step in (1, 2):
        saver.save(_session(step), f"{mem_dir}/model.ckpt", global_step=step)
    assert 0 == main(["ls", mem_dir])
    out = capsys.readouterr().out
    assert "model.ckpt-2" in out
    assert "2 checkpoints" in out
    assert 0 == main(["ls", "--json", mem_dir])
    assert f'"latest": "{mem_dir}/model.ckpt-2"' in capsys.readouterr().out
    assert 0 == main(["verify", f"{mem_dir}/model.ckpt-1"])
    assert f"ok  {mem_dir}/model.ckpt-1" in capsys.readouterr().out
    assert 0 == main(["inspect", mem_dir])
    assert f"Checkpoint    {mem_dir}/model.ckpt-2" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file(f"{mem_dir}/model.ckpt-2"))
    data[150] ^= 1
    fs.pipe_file(f"{mem_dir}/model.ckpt-2", bytes(data))
    assert 1 == main(["verify", mem_dir])
    assert "1 of 2 checkpoints corrupted: model.ckpt-2" in capsys.readouterr().err
    assert 1 == main(["ls", f"{mem_dir}-missing"])
    assert f"torch-ckpt ls: error: {mem_dir}-missing does not exist" in capsys.readouterr().err


def test_checkpoint_filename_with_path_may_be_a_url(mem_dir: str) -> None:
    path = tch.Saver().save(_session(4), f"{mem_dir}/model.ckpt", global_step=4)
    model = torch.nn.Linear(3, 2)
    with tch.SingularMonitoredSession(model, checkpoint_filename_with_path=path) as sess:
        assert path == sess.restored_from
        assert 4 == sess.global_step


def test_file_urls_are_local_paths(tmp_path: pathlib.Path) -> None:
    url = f"file://{tmp_path}"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tch.MonitoredTrainingSession(
        model, opt, checkpoint_dir=url, save_checkpoint_steps=1, log_step_count_steps=0
    ) as sess:
        sess.run(lambda: opt.step())
    assert str(tmp_path / "model.ckpt-1") == tch.latest_checkpoint(url)
    assert str(tmp_path / "model.ckpt-2") == tch.Saver().save(
        _session(2), f"{url}/model.ckpt", global_step=2
    )
    assert tch.verify_checkpoint(f"{url}/model.ckpt-2") is None
