"""Gradient accumulation with automatic mixed precision, an LR schedule, and exact resume.

The global step counts optimizer updates, not micro-batches: ``Session`` counts each
``optimizer.step()``, and a ``GradScaler`` that skips a step (inf/NaN gradients) skips the count
too. The LR scheduler steps only when the optimizer did, so its ``last_epoch`` stays equal to the
global step (with float16 on CUDA, the first few steps are often skipped while the scaler finds
its scale). The LR scheduler and the ``GradScaler`` are stateful: they go in ``extra_state``, so a
resumed run continues the schedule and the loss scale where they were.

On CPU, autocast runs in bfloat16, which needs no loss scaling: the scaler is then kept but
disabled (pass --scaler to enable it anyway); on CUDA it runs float16 with the scaler on.
"""

from __future__ import annotations

import argparse
import logging

import torch

import torch_ckpt_hook as tch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/torch_ckpt_hook_accum", help="checkpoint dir")
    parser.add_argument("--steps", type=int, default=100, help="train up to this many updates")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--scaler", action="store_true", help="enable GradScaler on CPU too")
    parser.add_argument(
        "--init-scale", type=float, default=2.0**16, help="GradScaler's initial loss scale"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A schedule that does not depend on --steps, so a rerun with more steps continues it.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)
    scaler = torch.amp.GradScaler(
        device, init_scale=args.init_scale, enabled=device == "cuda" or args.scaler
    )
    true_w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1)).to(device)

    def micro_batch(step: int, index: int) -> torch.Tensor:
        seed = step * args.accumulate + index  # data depends only on the update and micro-batch
        return torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)).to(device)

    def train_step(step: int) -> dict[str, torch.Tensor]:
        total = torch.zeros((), device=device)
        for index in range(args.accumulate):
            x = micro_batch(step, index)
            with torch.autocast(device, dtype=amp_dtype):
                loss = torch.nn.functional.mse_loss(model(x).float(), x @ true_w)
            scaler.scale(loss / args.accumulate).backward()
            total += loss.detach() / args.accumulate
        scaler.step(optimizer)  # optimizer.step(), unless the gradients hold inf or NaN
        scaler.update()
        optimizer.zero_grad()
        if sess.global_step > step:  # the optimizer stepped: the global step counted it
            scheduler.step()
        return {"loss": total}

    hooks = [tch.StopAtStepHook(last_step=args.steps), tch.NanTensorHook("loss")]
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=args.dir,
        save_checkpoint_steps=25,
        hooks=hooks,
        extra_state={"scheduler": scheduler, "scaler": scaler},
    ) as sess:
        while not sess.should_stop():
            result = sess.run(train_step, sess.global_step)
    print(
        f"global step {sess.global_step}, lr {scheduler.get_last_lr()[0]:.6f}, "
        f"loss {result['loss'].item():.4f}, checkpoints in {args.dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
