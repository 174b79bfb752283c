"""Resident memory over many saves: extra RSS above the live state, over the payload, save by save.

One training state (a Linear stack plus its AdamW state, on the CPU), one ``Saver`` with
``max_to_keep=1``, ``--saves`` asynchronous saves in a row (each waited for before the next, as
a loop saving continuously would), every tensor overwritten in place after each call returns.
Per save: ``VmRSS`` once the save is durable, and the peak (``VmHWM``, reset before each save
through ``/proc/self/clear_refs``; where that is refused, a 2 ms ``VmRSS`` sampler), both minus
the RSS before the first save, over the payload's bytes. The staging buffers are one payload
and stay between saves, so the floor is 1.0x; the target (issue 14) is <= 1.05x, flat.

Run from the repository root::

    python benchmarks/bench_memory.py --param-mb 64 --saves 50

Results go to ``benchmarks/results/<date>-<time>-memory-<commit>.{md,json}`` (Linux only: it
reads ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save import (
    MB,
    PeakRss,
    _git,
    _import_package,
    _status_bytes,
    _trim_heap,
    build_state,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.05


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param-mb", type=int, default=64)
    parser.add_argument("--saves", type=int, default=50)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    tch = _import_package()
    state = build_state(args.param_mb, torch.device("cpu"), args.width, 8)
    session = tch.Session(state.model, state.optimizer)
    saver = tch.Saver(max_to_keep=1)
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.dir))
    payload = state.payload_bytes
    gc.collect()
    _trim_heap()
    base = _status_bytes("VmRSS")
    peak = PeakRss()
    after: list[float] = []
    peaks: list[float] = []
    try:
        for step in range(args.saves):
            peak.start()
            handle = saver.save(
                session, str(workdir / "model.ckpt"), global_step=step, blocking=False
            )
            state.mutate()
            handle.result()
            peaks.append((peak.stop() - base) / payload)
            after.append((_status_bytes("VmRSS") - base) / payload)
    finally:
        saver.wait_until_finished()
        session.close()
        shutil.rmtree(workdir, ignore_errors=True)
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "param_mb": args.param_mb,
        "payload_bytes": payload,
        "saves": args.saves,
        "peak_method": peak.method,
    }
    growth = after[-1] - after[0]
    text = "\n".join(
        [
            f"# Memory over {args.saves} saves — commit {info['commit']}",
            "",
            f"- date: {info['date']}; payload {payload / MB:.0f} MB ({args.param_mb} MB params + "
            f"AdamW); peak via {peak.method}",
            "",
            "| measure | first save | median | max | last save |",
            "|---|---|---|---|---|",
            _row("extra RSS once durable / payload", after),
            _row("extra peak RSS during the save / payload", peaks),
            "",
            f"Growth of the resident extra from the first save to the last: {growth:+.3f}x "
            "payload.",
            f"Target (issue 14): extra <= {TARGET}x payload, flat: peak max {max(peaks):.3f}x "
            f"({'pass' if max(peaks) <= TARGET else 'FAIL'}), growth {growth:+.3f}x "
            f"({'pass' if abs(growth) <= 0.02 else 'FAIL'}, within 0.02x).",
            "",
        ]
    )
    record: dict[str, Any] = {"info": info, "extra_after": after, "extra_peak": peaks}
    write_report(args.out, "memory", info["commit"], text, record)
    print(text)
    return 0


def _row(label: str, values: list[float]) -> str:
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return (
        f"| {label} | {values[0]:.3f}x | {median:.3f}x | {max(values):.3f}x | {values[-1]:.3f}x |"
    )


if __name__ == "__main__":
    sys.exit(main())
