"""A hand-written loop driven through SingularMonitoredSession, with explicit hooks.

No MonitoredTrainingSession defaults: the loop names every hook it wants, and uses the raw
session (no hooks) for an evaluation pass. Run it twice: the second run resumes from --dir.
"""

from __future__ import annotations

import argparse
import logging

import torch

import torch_ckpt_hook as tch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/torch_ckpt_hook_singular", help="checkpoint dir")
    parser.add_argument("--steps", type=int, default=200, help="train up to this global step")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    true_w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        return x, (x @ true_w).argmax(dim=1)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return {"loss": loss.detach()}

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x).argmax(dim=1) == y).float().mean())

    hooks = [
        tch.CheckpointSaverHook(args.dir, save_steps=args.save_every),
        tch.StopAtStepHook(last_step=args.steps),
        tch.NanTensorHook("loss"),
        tch.LoggingTensorHook({"loss": "loss"}, every_n_iter=args.save_every),
    ]
    with tch.SingularMonitoredSession(
        model, optimizer, hooks=hooks, checkpoint_dir=args.dir
    ) as sess:
        while not sess.should_stop():
            sess.run(train_step, *batch(sess.global_step))
        # The raw session runs the function with no hook: no save, no step counted.
        held_out = sess.raw_session().run(accuracy, *batch(10**6))
    print(f"global step {sess.global_step}, held-out accuracy {held_out:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
