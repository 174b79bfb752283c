"""Child of tests/test_s3.py: trains with a checkpoint every step into an s3:// URL until killed.

Usage: ``s3_train_child.py <checkpoint_dir URL>``. The moto endpoint and dummy credentials come
from the environment the parent test set (``AWS_ENDPOINT_URL``...). s3fs's block size is set to
S3's minimum part size (``FSSPEC_S3_DEFAULT_BLOCK_SIZE``), so each checkpoint of about 18 MB
(over ``SINGLE_PUT_MAX``) is a multipart upload of four parts, and a kill lands inside one. Prints ``start <step>`` once the
session is created (restored, if there was a checkpoint) and ``committed <step>`` each time a
checkpoint is durable; it never stops on its own.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import torch_ckpt_hook as tch

WIDTH = 2100  # a 2100x2100 layer: checkpoints of about 17.7 MB


class ReportCommits(tch.CheckpointSaverListener):
    run_after_commit = True

    def after_save(self, session: tch.Session, global_step_value: int) -> None:
        print(f"committed {global_step_value}", flush=True)


def main(directory: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(WIDTH, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    hook = tch.CheckpointSaverHook(
        directory, save_steps=1, saver=tch.Saver(max_to_keep=2), listeners=[ReportCommits()]
    )
    x = torch.ones(4, WIDTH)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    with tch.MonitoredSession(model, optimizer, hooks=[hook], checkpoint_dir=directory) as sess:
        print(f"start {sess.global_step}", flush=True)
        while True:
            sess.run(step)


if __name__ == "__main__":
    main(sys.argv[1])
