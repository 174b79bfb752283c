"""Distributed checkpointing on 2 gloo ranks (CPU): the per-step agreement, and sharded saves.

Measures, per rank 0 (both ranks run the same loops):

- agreement: the per-step cost of the trigger and stop agreement (one all-reduce of a few
  int64 on the package's own gloo group): ``MonitoredSession`` with a ``CheckpointSaverHook``
  that never fires, over the same loop in one process without ``torch.distributed``, and the
  bare all-reduce alone (µs per step);
- sharded: a model of ``--mb`` MB of parameters sharded with FSDP2 ``fully_shard`` (plus
  Adam state, about 3x that), saved and restored by this package (``Saver.save`` blocking and
  non-blocking: the call and until durable; ``Saver.restore``) beside
  ``torch.distributed.checkpoint`` alone (``save``, ``async_save``, ``load`` into the
  ``get_state_dict`` state). Lightning's FSDP strategy is measured only when ``import
  lightning`` works.

Run from the repository root::

    python benchmarks/bench_distributed.py --steps 2000 --mb 64 --repeats 3

Results go to ``benchmarks/results/distributed-<date>-<time>-cpu.{md,json}``. Nothing here
asserts anything about time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import torch_ckpt_hook as tch  # noqa: E402


def _loop_secs(runner: Any, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.run(lambda: None)
    return time.perf_counter() - start


def agreement(steps: int, directory: str) -> dict[str, float]:
    model = torch.nn.Linear(1, 1)
    hook = tch.CheckpointSaverHook(directory, save_steps=10**9)
    with tch.MonitoredSession(model, hooks=[hook]) as sess:
        _loop_secs(sess, 50)  # warm up
        dist.barrier()
        distributed = _loop_secs(sess, steps)
    from torch_ckpt_hook._distributed import open_checkpoint_group

    group = open_checkpoint_group()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        group.max_all([0, 0, 0])
    bare = time.perf_counter() - start
    group.close()
    return {"runner_dist_us": distributed / steps * 1e6, "allreduce_us": bare / steps * 1e6}


def local_loop(steps: int, directory: str) -> float:
    model = torch.nn.Linear(1, 1)
    hook = tch.CheckpointSaverHook(directory, save_steps=10**9)
    with tch.MonitoredSession(model, hooks=[hook]) as sess:
        _loop_secs(sess, 50)
        return _loop_secs(sess, steps) / steps * 1e6


def _sharded_model(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    width = 1024
    layers = max(1, mb * (1 << 20) // (4 * width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _timed(fn: Any) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def sharded(mb: int, repeats: int, directory: str) -> dict[str, list[float]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torch_ckpt_hook._distributed import open_checkpoint_group

    model, optimizer = _sharded_model(mb)
    session = tch.Session(model, optimizer)
    group = open_checkpoint_group()
    session.set_checkpoint_group(group)
    saver = tch.Saver(max_to_keep=None)
    dcp_group = dist.new_group(backend="gloo")
    rows: dict[str, list[float]] = {}

    def add(name: str, secs: float) -> None:
        rows.setdefault(name, []).append(secs)

    for repeat in range(repeats):
        base = os.path.join(directory, f"r{repeat}")
        if dist.get_rank() == 0:
            os.makedirs(base, exist_ok=True)
        dist.barrier()
        add("ours save (blocking)", _timed(lambda b=base: saver.save(session, f"{b}/ours", 1)))
        handle: list[Any] = []
        add(
            "ours save (async): call",
            _timed(
                lambda b=base, h=handle: h.append(
                    saver.save(session, f"{b}/ours", 2, blocking=False)
                )
            ),
        )
        start = time.perf_counter()
        handle[0].result()
        dist.barrier()
        add(
            "ours save (async): durable",
            rows["ours save (async): call"][-1] + time.perf_counter() - start,
        )
        add("ours restore", _timed(lambda b=base: saver.restore(session, f"{b}/ours-1")))

        def dcp_save(b: str = base) -> None:
            msd, osd = get_state_dict(model, optimizer)
            dcp.save(
                {"model": msd, "optimizer": osd}, checkpoint_id=f"{b}/dcp", process_group=dcp_group
            )

        add("DCP save", _timed(dcp_save))
        future: list[Any] = []

        def dcp_async(b: str = base, f: list[Any] = future) -> None:
            msd, osd = get_state_dict(model, optimizer)
            f.append(
                dcp.async_save(
                    {"model": msd, "optimizer": osd},
                    checkpoint_id=f"{b}/dcp-async",
                    process_group=dcp_group,
                )
            )

        add("DCP async_save: call", _timed(dcp_async))
        start = time.perf_counter()
        future[0].result()
        dist.barrier()
        add(
            "DCP async_save: durable",
            rows["DCP async_save: call"][-1] + time.perf_counter() - start,
        )

        def dcp_load(b: str = base) -> None:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optimizer": osd}
            dcp.load(state, checkpoint_id=f"{b}/dcp", process_group=dcp_group)
            set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)

        add("DCP load", _timed(dcp_load))
    group.close()
    return rows


def worker(rank: int, args: argparse.Namespace, store: str, out: str) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch_ckpt_hook").setLevel(logging.WARNING)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    directory = os.path.join(os.path.dirname(store), "ckpt")
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    result: dict[str, Any] = {"agreement": agreement(args.steps, os.path.join(directory, "agree"))}
    result["sharded"] = sharded(args.mb, args.repeats, directory)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-dist-")
    try:
        out = os.path.join(scratch, "result.json")
        local_dir = os.path.join(scratch, "local")
        os.makedirs(local_dir)
        local_us = local_loop(args.steps, local_dir)
        mp.spawn(worker, args=(args, os.path.join(scratch, "store"), out), nprocs=2, join=True)
        with open(out) as f:
            result = json.load(f)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        import lightning  # noqa: F401

        lightning_note = "Lightning is installed but its FSDP strategy is not measured here."
    except ImportError:
        lightning_note = "Lightning is not installed (import lightning fails): not measured."
    agree = result["agreement"]
    lines = [
        "# Distributed checkpointing, 2 gloo ranks on CPU "
        f"({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.steps} steps; "
        f"FSDP2 model of {args.mb} MB parameters (+ Adam state), {args.repeats} repeats (median).",
        "",
        "| per step | µs |",
        "|---|---|",
        f"| MonitoredSession + CheckpointSaverHook, one process | {local_us:.1f} |",
        f"| the same, 2 ranks (with the agreement) | {agree['runner_dist_us']:.1f} |",
        f"| agreement cost (difference) | {agree['runner_dist_us'] - local_us:.1f} |",
        f"| the bare all-reduce of the agreement | {agree['allreduce_us']:.1f} |",
        "",
        "| sharded save / restore | seconds (median) |",
        "|---|---|",
    ]
    for name, values in result["sharded"].items():
        lines.append(f"| {name} | {statistics.median(values):.3f} |")
    lines += ["", lightning_note, ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    base = os.path.join(args.out, f"distributed-{stamp}-cpu")
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({"local_us": local_us, **result, "lightning": lightning_note}, f, indent=1)


if __name__ == "__main__":
    main()
