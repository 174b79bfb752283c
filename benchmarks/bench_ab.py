"""A/B runs of two internal choices of the writer, alternating in one process.

- ``writeback``: a ``Saver.save(..., blocking=False).result()`` of the same state with early
  writeback (``_writeback.EarlyWriteback``, every 32 MiB) and without it (the file handed to the
  serializer as it is), against a raw write+fsync of the same bytes, one after the other in each
  repeat: how much of the durable time the disk's idle start costs.
- ``priority``: ``bench_save.py``'s loaded save (the fixed step on both torch threads while the
  write is in flight, over the same step idle) with the writer thread at nice +10, at 19 and
  under ``SCHED_IDLE``, one after the other in each repeat.

Both swap the package's internals for the run (a benchmark, not a test): the module attributes
``_fsutil.EarlyWriteback`` and ``_writer._lower_this_threads_priority``. Run from the repository
root::

    python benchmarks/bench_ab.py writeback --mb 512 --repeats 4
    python benchmarks/bench_ab.py priority --mb 64 --repeats 3

Results go to ``benchmarks/results/<date>-<time>-ab-<experiment>-<commit>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_save as bench  # the same state, floors and loaded save

REPO = bench.REPO


def writeback(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    package = bench._import_package()
    fsutil = importlib.import_module("torch_ckpt_hook._fsutil")
    early = fsutil.EarlyWriteback
    state = bench.build_state(args.mb, torch.device("cpu"), args.width, 8)
    session = package.Session(state.model, state.optimizer)
    saver = package.Saver(max_to_keep=None)
    raw = bench.raw_write(state, workdir, crc=False)
    prefix = str(workdir / "model.ckpt")
    saver.save(session, prefix, global_step=0)  # warm-up: staging buffers, imports
    times: dict[str, list[float]] = {"early writeback": [], "without": [], "raw write+fsync": []}
    step = 0
    for _ in range(args.repeats):
        for mode in times:
            fsutil.EarlyWriteback = early if mode == "early writeback" else (lambda f: f)
            bench.settle(state.device)
            step += 1
            start = time.perf_counter()
            if mode == "raw write+fsync":
                path = raw.save(step).wait()
            else:
                path = saver.save(session, prefix, global_step=step, blocking=False).result()
            times[mode].append(time.perf_counter() - start)
            os.remove(path)
            print(f"  {mode}: {times[mode][-1]:.2f} s", file=sys.stderr, flush=True)
    fsutil.EarlyWriteback = early
    saver.wait_until_finished()
    session.close()
    return times


def priority(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    bench._import_package()  # from this checkout when it is not installed
    writer = importlib.import_module("torch_ckpt_hook._writer")
    lower = writer._lower_this_threads_priority

    def nice(value: int) -> Callable[[], None]:
        def run() -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)

        return run

    def sched_idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread

    modes = {"nice +10": nice(10), "nice 19": nice(19), "SCHED_IDLE": sched_idle}
    state = bench.build_state(args.mb, torch.device("cpu"), args.width, 8)
    step_fn = bench.make_cpu_step(args.step_ms)
    adapter = bench.ckpt_hook(state, workdir)
    results: dict[str, list[float]] = {f"{m} slowdown": [] for m in modes}
    results.update({f"{m} durable (loop running)": [] for m in modes})
    step = 0
    try:
        for _ in range(args.repeats):
            for mode, setting in modes.items():
                writer._lower_this_threads_priority = setting
                out = bench.Samples()
                bench.settle(state.device)
                step += 1
                bench.loaded_save(adapter, step, step_fn, out)
                results[f"{mode} slowdown"].append(out.slowdown[0])
                results[f"{mode} durable (loop running)"].append(out.durable_loaded[0])
                print(
                    f"  {mode}: slowdown {out.slowdown[0]:.2f}x, "
                    f"durable {out.durable_loaded[0]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        writer._lower_this_threads_priority = lower
        adapter.close()
    return results


def markdown(experiment: str, args: argparse.Namespace, results: dict[str, list[float]]) -> str:
    commit = bench._git("rev-parse", "--short", "HEAD")
    lines = [
        f"# A/B: {experiment} — commit {commit}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{os.cpu_count()} cores; torch {torch.__version__}; {args.mb} MB of parameters "
        f"(about {3 * args.mb} MB with AdamW state); {args.repeats} alternating repeats",
        "",
        "| variant | median | every repeat |",
        "|---|---|---|",
    ]
    for name, values in results.items():
        unit = "x" if "slowdown" in name else " s"
        shown = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {statistics.median(values):.2f}{unit} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=("writeback", "priority"))
    parser.add_argument("--mb", type=int, default=None, help="parameter MB (512 / 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.mb is None:
        args.mb = 512 if args.experiment == "writeback" else 64
    if args.experiment == "priority" and not sys.platform.startswith("linux"):
        print("priority: per-thread nice values are Linux's", file=sys.stderr)
        return 2
    logging.getLogger("torch_ckpt_hook").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    run = writeback if args.experiment == "writeback" else priority
    try:
        results = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(args.experiment, args, results)
    commit = bench._git("rev-parse", "--short", "HEAD")
    stem = bench.write_report(args.out, f"ab-{args.experiment}", commit, text, results)
    print(text)
    print(f"wrote {stem}.md, .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
