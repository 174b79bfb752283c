"""Remote storage side by side: the local tier, the mirror tier and direct saves to S3.

One process, one training state (a stack of Linear layers, SGD), a moto S3 server on 127.0.0.1
(``moto[server]``, started here; nothing leaves the machine) reached through s3fs. Per system:

- local: ``Saver.save(..., blocking=False)`` into a local directory: the call (*block*) and the
  time until the checkpoint is committed (*durable*);
- mirror: the time from the local commit until the mirror tier has committed the copy on S3
  (its state file names it), and the same from the save call (*durable on the mirror*);
- s3 direct: ``Saver.save`` to an ``s3://`` URL (the object-store commit): block and durable;
- lightning: Lightning's fsspec-based ``TorchCheckpointIO.save_checkpoint`` to the same endpoint
  (synchronous: block = durable), where Lightning is installed;
- plain: ``torch.save`` to a local file plus fsync, the baseline.

And the loop's block with a mirror configured against without one: a ``MonitoredSession`` with
a ``CheckpointSaverHook`` (async, a save every step) whose step function sleeps long enough for
each save to finish (``--step-secs``); *block* is each ``run()`` call's time minus that sleep,
the median over the save steps. They must be equal: the mirror copies on its own thread.

Run from the repository root::

    python benchmarks/bench_remote.py --mb 64 --repeats 3

Results go to ``benchmarks/results/remote-<date>-<time>-cpu.{md,json}``. Nothing here asserts
anything about time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch_ckpt_hook as tch  # noqa: E402
from torch_ckpt_hook._mirror import Mirror  # noqa: E402

MB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this process; yields a new bucket's ``s3://`` URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=endpoint,
        NO_PROXY="127.0.0.1",
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


def build(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    width = 1024
    layers = max(1, mb * MB // (width * width * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_local_and_mirror(
    session: tch.Session, local: str, mirror_url: str, repeats: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"block": [], "durable": [], "mirror_after_commit": []}
    os.makedirs(local, exist_ok=True)
    saver = tch.Saver(max_to_keep=2)
    mirror = Mirror(local, mirror_url, 2, "model.ckpt")
    for step in range(repeats + 1):  # the first is a warm-up
        session.global_step = step
        start = time.perf_counter()
        handle = saver.save(
            session, os.path.join(local, "model.ckpt"), global_step=step, blocking=False
        )
        block = time.perf_counter() - start
        path = handle.result()
        durable = time.perf_counter() - start
        committed = time.perf_counter()
        mirror.submit(path)
        mirror.drain()
        after = time.perf_counter() - committed
        if step:
            out["block"].append(block)
            out["durable"].append(durable)
            out["mirror_after_commit"].append(after)
    mirror.close()
    return out


def bench_s3_direct(session: tch.Session, url: str, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"block": [], "durable": []}
    saver = tch.Saver(max_to_keep=2)
    for step in range(repeats + 1):
        session.global_step = step
        start = time.perf_counter()
        handle = saver.save(session, f"{url}/model.ckpt", global_step=step, blocking=False)
        block = time.perf_counter() - start
        handle.result()
        if step:
            out["block"].append(block)
            out["durable"].append(time.perf_counter() - start)
    return out


def bench_lightning(session: tch.Session, url: str, repeats: int) -> dict[str, list[float]] | None:
    try:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    except ImportError:
        return None
    io = TorchCheckpointIO()
    times = []
    for step in range(repeats + 1):
        state = session.state_dict()
        t = timed(lambda: io.save_checkpoint(state, f"{url}/lightning/step-{step}.ckpt"))  # noqa: B023
        if step:
            times.append(t)
    return {"block": times, "durable": times}


def bench_plain(session: tch.Session, directory: str, repeats: int) -> dict[str, list[float]]:
    times = []
    for step in range(repeats + 1):

        def save() -> None:
            with open(os.path.join(directory, f"plain-{step}.pt"), "wb") as f:  # noqa: B023
                torch.save(session.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())

        t = timed(save)
        if step:
            times.append(t)
    return {"block": times, "durable": times}


def loop_block(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    local: str,
    mirror_url: str | None,
    steps: int,
    step_secs: float,
) -> list[float]:
    hook = tch.CheckpointSaverHook(local, save_steps=1, mirror_dir=mirror_url)
    blocks = []

    def step() -> None:
        opt.step()  # no gradients: only the global step moves
        time.sleep(step_secs)  # "compute" long enough for each save (and copy) to finish

    with tch.MonitoredSession(model, opt, hooks=[hook], checkpoint_dir=local) as sess:
        for _ in range(steps + 1):
            blocks.append(timed(lambda: sess.run(step)) - step_secs)
    return blocks[1:]  # the first run() call follows the creation save


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="parameter megabytes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=5)
    parser.add_argument("--step-secs", type=float, default=None, help="default: 3x a local save")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    model, opt = build(args.mb)
    session = tch.Session(model, opt)
    state_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    rows: dict[str, dict[str, list[float]]] = {}
    with moto_s3() as bucket, tempfile.TemporaryDirectory() as tmp:
        rows["plain torch.save + fsync (local)"] = bench_plain(session, tmp, args.repeats)
        both = bench_local_and_mirror(
            session, os.path.join(tmp, "tier"), f"{bucket}/mirror", args.repeats
        )
        rows["torch_ckpt_hook local tier"] = {"block": both["block"], "durable": both["durable"]}
        rows["torch_ckpt_hook mirror tier (S3)"] = {
            "block": both["block"],
            "durable": [
                d + m for d, m in zip(both["durable"], both["mirror_after_commit"], strict=True)
            ],
            "after_local_commit": both["mirror_after_commit"],
        }
        rows["torch_ckpt_hook direct to S3"] = bench_s3_direct(
            session, f"{bucket}/direct", args.repeats
        )
        lightning = bench_lightning(session, bucket, args.repeats)
        if lightning is not None:
            rows["Lightning TorchCheckpointIO to S3"] = lightning
        step_secs = args.step_secs or max(0.05, 3 * statistics.median(both["durable"]))
        step_secs_mirror = max(
            step_secs, 1.5 * statistics.median(rows["torch_ckpt_hook mirror tier (S3)"]["durable"])
        )
        without = loop_block(
            model, opt, os.path.join(tmp, "loop-a"), None, args.loop_steps, step_secs_mirror
        )
        with_mirror = loop_block(
            model,
            opt,
            os.path.join(tmp, "loop-b"),
            f"{bucket}/loop-mirror",
            args.loop_steps,
            step_secs_mirror,
        )
    lines = [
        f"# bench_remote: {state_mb:.0f} MB of parameters, {args.repeats} repeats (median), "
        f"moto S3 on 127.0.0.1",
        "",
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch "
        f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| system | blocks the loop (ms) | until durable (ms) |",
        "|---|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {median_ms(row['block']):.1f} | {median_ms(row['durable']):.1f} |"
        )
    after = median_ms(rows["torch_ckpt_hook mirror tier (S3)"]["after_local_commit"])
    lines += [
        "",
        f"Mirror copy after the local commit: {after:.1f} ms (median).",
        "",
        "Loop block per save step (hook, save every step, step sleeps "
        f"{1000 * step_secs_mirror:.0f} ms): without a mirror {median_ms(without):.2f} ms, "
        f"with a mirror on S3 {median_ms(with_mirror):.2f} ms (median of {args.loop_steps}).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    (args.out / f"remote-{stamp}-cpu.md").write_text(report)
    doc = {
        "state_mb": state_mb,
        "repeats": args.repeats,
        "rows": rows,
        "loop_block": {
            "without_mirror": without,
            "with_mirror": with_mirror,
            "step_secs": step_secs_mirror,
        },
    }
    (args.out / f"remote-{stamp}-cpu.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
