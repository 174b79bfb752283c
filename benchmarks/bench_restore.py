"""Restore cost: ``load_checkpoint`` (verify + load) against ``torch.load`` of the same file.

For each size, one checkpoint of a Linear stack plus its AdamW state is written by this
package's ``Saver``, then read back, in the same process and from the page cache (the file is
read once before timing; dropping the cache needs root, and a restore right after a save is
served from it too), by:

- ``torch.load(path, weights_only=True)``: the reference, no verification;
- ``load_checkpoint(path)``: the package's restore, checksum verified (one pass: the CRC runs
  on a helper thread beside ``torch.load``);
- ``verify_checkpoint + load_checkpoint(verify=False)``: what two passes cost (verify, then load:
  the package's restore before issue 14);
- ``verify_checkpoint(path)``: the CRC pass alone;
- ``torch.load(..., mmap=True)``: for reference (maps the file; the reads happen later).

Run from the repository root::

    python benchmarks/bench_restore.py --sizes 64,512 --repeats 5

Results go to ``benchmarks/results/<date>-<time>-restore-<commit>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save import MB, _git, _import_package, build_state, write_report

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.3


def timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def measure(param_mb: int, repeats: int, workdir: Path, width: int) -> dict[str, Any]:
    tch = _import_package()
    state = build_state(param_mb, torch.device("cpu"), width, 8)
    session = tch.Session(state.model, state.optimizer)
    path = tch.Saver(max_to_keep=None).save(session, str(workdir / "model.ckpt"), global_step=1)
    session.close()
    size = os.path.getsize(path)
    del state, session
    gc.collect()
    with open(path, "rb") as f:  # into the page cache
        while f.read(64 * MB):
            pass

    def two_passes() -> Any:
        assert tch.verify_checkpoint(path) is None
        return tch.load_checkpoint(path, verify=False)

    rows = {
        "torch_load": lambda: torch.load(path, map_location="cpu", weights_only=True),
        "load_checkpoint": lambda: tch.load_checkpoint(path),
        "two_passes": two_passes,
        "check_only": lambda: tch.verify_checkpoint(path),
        "torch_load_mmap": lambda: torch.load(path, weights_only=True, mmap=True),
    }
    timed(rows["torch_load"], 1)  # warm-up
    result: dict[str, Any] = {"param_mb": param_mb, "file_bytes": size, "load_average": []}
    for name, fn in rows.items():
        result["load_average"].append(os.getloadavg()[0])
        result[f"{name}_s"] = timed(fn, repeats)
    os.remove(path)
    return result


LABELS = {
    "torch_load": "torch.load(weights_only=True)",
    "load_checkpoint": "load_checkpoint (verified, one pass)",
    "two_passes": "verify_checkpoint + load_checkpoint(verify=False)",
    "check_only": "verify_checkpoint (CRC pass alone)",
    "torch_load_mmap": "torch.load(mmap=True) (no reads yet)",
}


def markdown(info: dict[str, Any], sizes: list[dict[str, Any]]) -> str:
    lines = [
        f"# Restore benchmark — commit {info['commit']}",
        "",
        f"- date: {info['date']}; {info['cpu_count']} cores; torch {info['torch']} "
        f"({info['threads']} threads); medians of {info['repeats']} repeats; page cache warm",
        "",
    ]
    for size in sizes:
        base = size["torch_load_s"]
        lines += [
            f"## Parameters {size['param_mb']} MB, file {size['file_bytes'] / MB:.0f} MB",
            "",
            "| read | seconds | GB/s | vs torch.load |",
            "|---|---|---|---|",
        ]
        for key, label in LABELS.items():
            secs = size[f"{key}_s"]
            rate = size["file_bytes"] / secs / 1e9
            lines.append(f"| {label} | {secs:.3f} | {rate:.2f} | {secs / base:.2f}x |")
        ratio = size["load_checkpoint_s"] / base
        verdict = "pass" if ratio <= TARGET else "FAIL"
        loads = ", ".join(f"{a:.1f}" for a in size["load_average"])
        lines += [
            "",
            f"Target (issue 14): restore <= {TARGET}x torch.load, verification included: "
            f"{ratio:.2f}x, {verdict}. 1-min load average before each row: {loads}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,512", help="parameter MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--dir", type=Path, help="where the checkpoint goes (default: temp)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_restore_", dir=args.dir))
    try:
        sizes = [
            measure(int(mb), args.repeats, workdir, args.width)
            for mb in args.sizes.split(",")
            if mb
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    text = markdown(info, sizes)
    write_report(args.out, "restore", info["commit"], text, {"info": info, "sizes": sizes})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
