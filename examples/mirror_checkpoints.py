"""A listener that copies each committed checkpoint to a second directory (a backup disk).

``after_save`` runs once the checkpoint is durable, on the training thread: with the default
``async_save=True`` that is at the first hook call after the background write committed, so
the file it copies is always complete. The copy is made durable and renamed into place the same
way, so the mirror never holds a half-written checkpoint either.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

import torch

import torch_ckpt_hook as tch


class MirrorListener(tch.CheckpointSaverListener):
    """Copies ``<checkpoint_dir>/<basename>-<step>`` to ``mirror_dir`` after each save."""

    def __init__(self, checkpoint_dir: str, mirror_dir: str, basename: str = "model.ckpt") -> None:
        self.checkpoint_dir = checkpoint_dir
        self.mirror_dir = mirror_dir
        self.basename = basename
        self.copied: list[str] = []

    def begin(self) -> None:
        os.makedirs(self.mirror_dir, exist_ok=True)

    def after_save(self, session: tch.Session, global_step_value: int) -> bool | None:
        name = f"{self.basename}-{global_step_value}"
        source = os.path.join(self.checkpoint_dir, name)
        fd, tmp = tempfile.mkstemp(dir=self.mirror_dir, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, os.path.join(self.mirror_dir, name))
        except BaseException:
            os.remove(tmp)
            raise
        problem = tch.verify_checkpoint(os.path.join(self.mirror_dir, name))
        if problem is not None:
            raise RuntimeError(f"the mirrored copy of {name} is corrupted: {problem}")
        self.copied.append(name)
        logging.getLogger(__name__).info("Mirrored %s to %s", name, self.mirror_dir)
        return None


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
        loss.backward()
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
