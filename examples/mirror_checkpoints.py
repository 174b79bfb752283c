"""A listener that copies each committed checkpoint to a second directory (a backup disk).

The package now has this built in: ``CheckpointSaverHook(..., mirror_dir=...)`` (and
``MonitoredTrainingSession(..., mirror_dir=...)``) copies each committed checkpoint on a thread
of its own, to a local directory or an ``s3://`` / ``gs://`` URL, with retries, a retention and
a state file of its own, and restores from it when the local directory is lost (README, "Remote
storage and a mirror tier"). This example stays as the way to write such a listener yourself.

``after_save`` runs once the checkpoint is durable, on the training thread, so the file it
copies is always complete. The listener only needs the file, not the state of the step it was
saved at, so it sets ``run_after_commit = True``: the save stays asynchronous (training does not
wait for the disk at the save step) and ``after_save`` runs at the first hook call after the
background write committed. The copy is made durable and renamed into place the same way
(temporary file, fsync, rename, fsync of the directory), so the mirror never holds a
half-written checkpoint either; it keeps the source file's permissions.

Training waits while ``after_save`` copies. That is fine for a small model and a local disk; a
large checkpoint or a remote destination belongs on a thread of its own (a
``concurrent.futures.ThreadPoolExecutor`` with one worker, say), with ``end()`` waiting for it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile

import torch

import torch_ckpt_hook as tch

# Temporary copies start with this, so a copy cut short by a crash is recognised and removed.
_TEMP_PREFIX = ".mirror-tmp-"


class MirrorListener(tch.CheckpointSaverListener):
    """Copies each checkpoint saved into ``checkpoint_dir`` to ``mirror_dir`` after the save."""

    # Uses the file only: no need to hold training at the save step until the write commits.
    run_after_commit = True

    def __init__(self, checkpoint_dir: str, mirror_dir: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.mirror_dir = mirror_dir
        self.copied: list[str] = []

    def begin(self) -> None:
        os.makedirs(self.mirror_dir, exist_ok=True)
        with os.scandir(self.mirror_dir) as entries:  # copies a killed run left behind
            for entry in entries:
                if entry.name.startswith(_TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                    os.remove(entry.path)

    def after_save(self, session: tch.Session, global_step_value: int) -> bool | None:
        # The state file names the checkpoint just committed (whatever the hook's basename).
        source = tch.latest_checkpoint(self.checkpoint_dir)
        if source is None or not source.endswith(f"-{global_step_value}"):
            raise RuntimeError(
                f"expected the checkpoint of step {global_step_value} in {self.checkpoint_dir}, "
                f"the latest is {source}"
            )
        name = os.path.basename(source)
        target = os.path.join(self.mirror_dir, name)
        fd, tmp = tempfile.mkstemp(dir=self.mirror_dir, prefix=f"{_TEMP_PREFIX}{name}.")
        try:
            with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            shutil.copymode(source, tmp)  # mkstemp creates the file 0600
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_dir(self.mirror_dir)  # the rename itself survives a power loss
        problem = tch.verify_checkpoint(target)
        if problem is not None:
            raise RuntimeError(f"the mirrored copy of {name} is corrupted: {problem}")
        self.copied.append(name)
        logging.getLogger(__name__).info("Mirrored %s to %s", name, self.mirror_dir)
        return None


def _fsync_dir(directory: str) -> None:
    if os.name == "nt":  # Windows cannot open a directory; NTFS journals the rename
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/torch_ckpt_hook_mirror/main", help="checkpoint dir")
    parser.add_argument("--mirror", default="/tmp/torch_ckpt_hook_mirror/backup", help="copies")
    parser.add_argument("--steps", type=int, default=100, help="train up to this global step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step() -> dict[str, torch.Tensor]:
        x = torch.randn(32, 8)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return {"loss": loss.detach()}

    mirror = MirrorListener(args.dir, args.mirror)
    hooks = [
        tch.CheckpointSaverHook(args.dir, save_steps=25, listeners=[mirror]),
        tch.StopAtStepHook(last_step=args.steps),
    ]
    with tch.MonitoredSession(model, optimizer, hooks=hooks, checkpoint_dir=args.dir) as sess:
        while not sess.should_stop():
            sess.run(train_step)
    print(f"global step {sess.global_step}; mirrored to {args.mirror}: {', '.join(mirror.copied)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
