"""Checkpoints on S3 (SPEC.md §5.4), against moto's S3 server on 127.0.0.1 through s3fs.

The commit on an object store: every checkpoint object published whole (a completed multipart
upload), then the state file object, then deletions of objects proved ours; checksums verified
on read; a SIGKILL during uploads leaves the latest loadable.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from s3_server import S3Server, s3_bucket, s3_server

import torch_ckpt_hook as tch
from torch_ckpt_hook._fsspec_storage import FsspecStorage

__all__ = ["s3_bucket", "s3_server"]  # fixtures, imported for pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CHILD = pathlib.Path(__file__).resolve().parent / "children" / "s3_train_child.py"


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(sess: tch.MonitoredSession, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    def step() -> None:
        opt.zero_grad()
        model(torch.ones(2, 4)).square().sum().backward()
        opt.step()

    sess.run(step)


def _keys(server: S3Server, bucket_url: str) -> list[str]:
    bucket = bucket_url.removeprefix("s3://")
    listing = server.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def test_hook_saves_restores_and_resumes_on_s3(s3_server: S3Server, s3_bucket: str) -> None:
    run = f"{s3_bucket}/run"
    model, opt = _model()
    with tch.MonitoredTrainingSession(
        model, opt, checkpoint_dir=run, save_checkpoint_steps=2, log_step_count_steps=0
    ) as sess:
        for _ in range(3):
            _train(sess, model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    assert f"{run}/model.ckpt-3" == tch.latest_checkpoint(run)
    state = tch.get_checkpoint_state(run)
    assert state is not None
    assert (f"{run}/model.ckpt-0", f"{run}/model.ckpt-2", f"{run}/model.ckpt-3") == (
        state.all_model_checkpoint_paths
    )
    assert ["run/checkpoint", "run/model.ckpt-0", "run/model.ckpt-2", "run/model.ckpt-3"] == (
        _keys(s3_server, s3_bucket)
    )
    assert tch.verify_checkpoint(f"{run}/model.ckpt-3") is None
    assert f"{run}/model.ckpt-3" == tch.restorable_checkpoint(run)
    assert 3 == tch.load_checkpoint(f"{run}/model.ckpt-3")["global_step"]

    fresh, fresh_opt = _model()
    with tch.MonitoredTrainingSession(
        fresh, fresh_opt, checkpoint_dir=run, save_checkpoint_steps=2, log_step_count_steps=0
    ) as sess:
        assert f"{run}/model.ckpt-3" == sess.restored_from
        assert 3 == sess.global_step
        for key, value in expected.items():
            assert torch.equal(value, fresh.state_dict()[key]), key
        _train(sess, fresh, fresh_opt)
    assert f"{run}/model.ckpt-4" == tch.latest_checkpoint(run)


def test_the_object_holds_the_bytes_of_a_local_checkpoint(
    s3_server: S3Server, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    payload = {"format_version": 1, "global_step": 7, "w": torch.arange(10.0)}
    FsspecStorage().write(f"{s3_bucket}/x/model.ckpt-7", payload)
    local = tmp_path / "model.ckpt-7"
    tch.Saver().storage.write(str(local), payload)
    bucket = s3_bucket.removeprefix("s3://")
    body = s3_server.client().get_object(Bucket=bucket, Key="x/model.ckpt-7")["Body"].read()
    assert local.read_bytes() == body


def test_retention_deletes_only_its_own_objects(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = f"{s3_bucket}/run"
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    # Foreign objects: a "checkpoint" of our name without our trailer, listed in a planted state
    # file; an unrelated object; another series' checkpoint.
    client.put_object(Bucket=bucket, Key="run/model.ckpt-1", Body=b"not ours" * 100)
    client.put_object(Bucket=bucket, Key="run/notes.txt", Body=b"hello")
    client.put_object(Bucket=bucket, Key="run/other.ckpt-2", Body=b"x" * 100)
    client.put_object(
        Bucket=bucket,
        Key="run/checkpoint",
        Body=b'model_checkpoint_path: "model.ckpt-1"\nall_model_checkpoint_paths: "model.ckpt-1"\n',
    )
    saver = tch.Saver(max_to_keep=1)
    session = tch.Session(*_model())
    with caplog.at_level(logging.WARNING):
        for step in (10, 11, 12):
            session.global_step = step
            saver.save(session, f"{run}/model.ckpt", global_step=step)

    assert [
        "run/checkpoint",
        "run/model.ckpt-1",
        "run/model.ckpt-12",
        "run/notes.txt",
        "run/other.ckpt-2",
    ] == _keys(s3_server, s3_bucket)
    assert "checksum trailer" in caplog.text
    assert f"{run}/model.ckpt-12" == tch.latest_checkpoint(run)
    assert [f"{run}/model.ckpt-12"] == saver.last_checkpoints


def test_a_damaged_object_is_detected_and_restore_falls_back(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = f"{s3_bucket}/run"
    model, opt = _model()
    with tch.MonitoredTrainingSession(
        model, opt, checkpoint_dir=run, save_checkpoint_steps=1, log_step_count_steps=0
    ) as sess:
        for _ in range(2):
            _train(sess, model, opt)
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    body = bytearray(client.get_object(Bucket=bucket, Key="run/model.ckpt-2")["Body"].read())
    body[100] ^= 0x01
    client.put_object(Bucket=bucket, Key="run/model.ckpt-2", Body=bytes(body))

    problem = tch.verify_checkpoint(f"{run}/model.ckpt-2")
    assert problem is not None
    assert problem.startswith("checksum mismatch")
    with pytest.raises(tch.CheckpointCorruptedError, match=f"Checkpoint {run}/model.ckpt-2 is"):
        tch.load_checkpoint(f"{run}/model.ckpt-2")
    assert f"{run}/model.ckpt-1" == tch.restorable_checkpoint(run)
    fresh, fresh_opt = _model()
    with (
        caplog.at_level(logging.WARNING),
        tch.MonitoredSession(fresh, fresh_opt, checkpoint_dir=run) as sess,
    ):
        assert f"{run}/model.ckpt-1" == sess.restored_from
    assert f"Skipping checkpoint {run}/model.ckpt-2" in caplog.text


def test_a_failed_upload_leaves_no_object_and_no_open_upload(
    s3_server: S3Server, s3_bucket: str
) -> None:
    class Unpicklable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("cannot pickle this")

    url = f"{s3_bucket}/run/model.ckpt-5"
    # 20 MB of tensor data (over SINGLE_PUT_MAX: a multipart upload) goes up in parts before
    # torch.save reaches the object that fails.
    payload = {"w": torch.zeros(5_000_000), "z": Unpicklable()}
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        FsspecStorage({"default_block_size": 5 << 20}).write(url, payload)
    bucket = s3_bucket.removeprefix("s3://")
    assert [] == _keys(s3_server, s3_bucket)
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [] == uploads


def test_a_large_object_is_a_completed_multipart_upload(
    s3_server: S3Server, s3_bucket: str
) -> None:
    url = f"{s3_bucket}/run/model.ckpt-5"
    payload = {"format_version": 1, "global_step": 5, "w": torch.arange(5_000_000.0)}
    FsspecStorage({"default_block_size": 5 << 20}).write(url, payload)
    head = s3_server.client().head_object(
        Bucket=s3_bucket.removeprefix("s3://"), Key="run/model.ckpt-5"
    )
    # A multipart object's ETag ends in -<number of parts>.
    assert int(head["ETag"].strip('"').rsplit("-", 1)[1]) >= 2
    assert tch.verify_checkpoint(url) is None
    assert torch.equal(payload["w"], tch.load_checkpoint(url)["w"])


def _child_env(server: S3Server) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server.env())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["FSSPEC_S3_DEFAULT_BLOCK_SIZE"] = str(5 << 20)  # S3's minimum part: two parts a save
    return env


def _run_child_until(
    server: S3Server, run: str, commits: int, extra_delay: float
) -> subprocess.CompletedProcess[str]:
    """Start the training child, SIGKILL it ``extra_delay`` s after its ``commits``-th commit."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD), run],
        env=_child_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = 0
    lines = []
    assert child.stdout is not None
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("committed"):
                seen += 1
                if seen >= commits:
                    time.sleep(extra_delay)
                    break
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    assert seen >= commits, f"the child stopped early: {''.join(lines)}{err}"
    return subprocess.CompletedProcess(child.args, child.returncode, "".join(lines), err)


@pytest.mark.slow
def test_sigkill_during_uploads_leaves_the_latest_loadable(
    s3_server: S3Server, s3_bucket: str
) -> None:
    run = f"{s3_bucket}/run"
    steps_seen = []
    # Each kill lands at another instant of an upload (between parts, before the completion,
    # before the state file); the next child restores from what the last one committed.
    for commits, delay in ((2, 0.0), (1, 0.1)):
        result = _run_child_until(s3_server, run, commits, delay)
        assert -signal.SIGKILL == result.returncode
        latest = tch.latest_checkpoint(run)
        assert latest is not None
        assert latest == tch.restorable_checkpoint(run)
        assert tch.verify_checkpoint(latest) is None
        payload = tch.load_checkpoint(latest)
        steps_seen.append(payload["global_step"])
        state = tch.get_checkpoint_state(run)
        assert state is not None
        for path in state.all_model_checkpoint_paths:
            assert tch.verify_checkpoint(path) is None, path
    assert steps_seen == sorted(steps_seen)


def test_mirror_to_s3_restores_after_the_local_dir_is_lost(
    s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    local = tmp_path / "local"
    mirror = f"{s3_bucket}/mirror"
    model, opt = _model()
    with tch.MonitoredTrainingSession(
        model,
        opt,
        checkpoint_dir=str(local),
        save_checkpoint_steps=2,
        log_step_count_steps=0,
        mirror_dir=mirror,
    ) as sess:
        for _ in range(3):
            _train(sess, model, opt)
    assert f"{mirror}/model.ckpt-3" == tch.latest_checkpoint(mirror)
    shutil.rmtree(local)

    fresh, fresh_opt = _model()
    with tch.MonitoredTrainingSession(
        fresh,
        fresh_opt,
        checkpoint_dir=str(local),
        save_checkpoint_steps=2,
        log_step_count_steps=0,
        mirror_dir=mirror,
    ) as sess:
        assert f"{mirror}/model.ckpt-3" == sess.restored_from
        assert 3 == sess.global_step
    assert str(local / "model.ckpt-3") == tch.latest_checkpoint(str(local))
