"""Data-parallel training under torchrun: every rank runs this same script.

    torchrun --nproc_per_node=2 examples/torchrun_ddp.py --dir /tmp/ddp-run --steps 40
    torchrun --nproc_per_node=2 examples/torchrun_ddp.py --dir /tmp/fsdp-run --fsdp

Run it again with more ``--steps`` to resume. With ``--fsdp`` the model is sharded with FSDP2
(``fully_shard``) and each checkpoint is a directory ``model.ckpt-<step>/`` that every rank
writes its shards into; without it the model is replicated (DDP) and the chief writes one file.
Either way every rank runs ``MonitoredTrainingSession``: rank 0 is the chief (its hooks log and
decide when to save), the others take part in each save, restore what the chief chose, and stop
after the same step (a SIGTERM to any rank stops them all, with a final checkpoint). Each rank's
data position is per-rank state (``rank_state``), and each rank's RNG streams are restored as
its own. On CPU the ranks talk over gloo; with GPUs use ``--backend nccl``: the package's own
checkpoint collectives still run on a gloo group of their own.

Without torchrun (no ``RANK`` in the environment) it runs as a world of one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

import torch_ckpt_hook as tch


class Shard:
    """This rank's position in its stream of batches: state that differs per rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 * self.rank + self.position)
        self.position += 1
        inputs = torch.randn(16, 8, generator=generator)
        return inputs, inputs.sum(dim=1, keepdim=True)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def build(fsdp: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The plain model and what the loop trains (DDP around it, or itself sharded)."""
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )
    if not dist.is_initialized():
        return model, model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
        return model, model
    return model, torch.nn.parallel.DistributedDataParallel(model)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (shared by the ranks)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2")
    parser.add_argument("--backend", default="gloo", help="the training's backend (nccl on GPUs)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        dist.init_process_group(args.backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        _model, trained = build(args.fsdp)
        torch.manual_seed(100 + rank)  # each rank's own dropout stream
        optimizer = torch.optim.Adam(trained.parameters(), lr=0.01)
        shard = Shard(rank)
        with tch.MonitoredTrainingSession(
            trained,
            optimizer,
            checkpoint_dir=args.dir,
            save_checkpoint_steps=args.save_steps,
            log_step_count_steps=0,
            hooks=[tch.StopAtStepHook(last_step=args.steps)],
            rank_state={"data": shard},
        ) as sess:

            def step() -> dict[str, torch.Tensor]:
                inputs, targets = shard.next_batch()
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(trained(inputs), targets)
                loss.backward()
                optimizer.step()
                return {"loss": loss.detach()}

            loss = None
            while not sess.should_stop():
                loss = sess.run(step)["loss"]
            final = sess.global_step
        if rank == 0:
            shown = "n/a" if loss is None else f"{loss.item():.4f}"
            print(f"global step {final}, loss {shown}, latest {tch.latest_checkpoint(args.dir)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
