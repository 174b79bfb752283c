"""The README's loop: train a small regression model, checkpointing and resuming.

Run it twice: the second run resumes from the newest checkpoint in --dir and trains on to --steps.
"""

from __future__ import annotations

import argparse
import logging

import torch

import torch_ckpt_hook as tch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/torch_ckpt_hook_example", help="checkpoint dir")
    parser.add_argument("--steps", type=int, default=200, help="train up to this global step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    true_w = torch.randn(8, 1)

    def train_step() -> dict[str, torch.Tensor]:
        x = torch.randn(64, 8)
        loss = torch.nn.functional.mse_loss(model(x), x @ true_w)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return {"loss": loss.detach()}

    # The loop of the README:
    hooks = [tch.StopAtStepHook(last_step=args.steps), tch.NanTensorHook("loss")]
    with tch.MonitoredTrainingSession(
        model, optimizer, checkpoint_dir=args.dir, save_checkpoint_steps=50, hooks=hooks
    ) as sess:
        while not sess.should_stop():
            result = sess.run(train_step)
    loss = result["loss"].item()
    print(f"global step {sess.global_step}, loss {loss:.4f}, checkpoints in {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
