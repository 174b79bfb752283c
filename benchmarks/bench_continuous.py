"""Checkpointing every step of a real training loop: throughput, checkpoints committed, their age.

One process, one model (an MLP of about ``--model-mb`` MB of float32 parameters, AdamW), one
fixed batch, the same number of steps for every system, all in the same run:

- ``none``: no checkpoints (the reference throughput);
- ``torch_save``: ``torch.save`` + fsync of the model and optimizer state after every step;
- ``dcp``: ``torch.distributed.checkpoint.async_save`` after every step (each waits for the
  previous one's future first, so saves never overlap and memory stays bounded);
- ``ckpt_wait``: ``CheckpointSaverHook(save_steps=1)`` in a ``SingularMonitoredSession`` (each
  trigger waits for the write in flight: the default);
- ``ckpt_skip``: the same with ``if_busy="skip"``: a trigger that finds the writer busy is
  skipped and saved at the next free step (issue 14's continuous checkpointing);
- ``copy_floor``: the loop copying its state into reused buffers on every core at exactly the
  steps the ``ckpt_skip`` run of the same repeat saved at, writing nothing: staging alone at
  that rate, the bound for any checkpoint that commits as often.

They run in the order none, skip, copy floor, torch.save, DCP, wait (the target's pair back
to back), and ``--repeats`` times over; the table gives medians. Reported per system: steps/s
and its ratio to ``none``; checkpoints committed during the loop (the final save of ``end()``
not counted); the age of the newest committed checkpoint, in steps, sampled after every step
(median and max) and at the end of the loop, before the final save.
``torch.set_num_threads(--threads)`` (default 1) is the step's setting, as in the issue; the
package's copy threads and the writer use the other cores.

Run from the repository root::

    python benchmarks/bench_continuous.py
    python benchmarks/bench_continuous.py --steps 200 --model-mb 16 --repeats 3

Results go to ``benchmarks/results/<date>-<time>-continuous-<commit>.{md,json}``. Nothing here
asserts anything about time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save import _git, _import_package, write_report

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
TARGET_THROUGHPUT = 0.95


def build(
    model_mb: float, width: int, batch: int
) -> tuple[torch.nn.Module, Any, Callable[[], Any]]:
    """An MLP of about ``model_mb`` MB of parameters, AdamW, and its training step."""
    torch.manual_seed(0)
    layers = max(1, round(model_mb * MB / ((width * width + width) * 4)))
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width)
    target = torch.randn(batch, width)

    def step() -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return model, optimizer, step


class Ages:
    """The step of the newest committed checkpoint, sampled after every step."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.committed = 0

    def sample(self, step: int, newest: int | None) -> None:
        self.samples.append(step - (newest if newest is not None else -1))

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {
            "committed": self.committed,
            "age_median_steps": statistics.median(s) if s else None,
            "age_max_steps": max(s) if s else None,
            "age_at_end_steps": s[-1] if s else None,
        }


def run_none(step: Callable[[], Any], steps: int, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds": time.perf_counter() - start}


def run_torch_save(
    model: torch.nn.Module, optimizer: Any, step: Callable[[], Any], steps: int, workdir: Path
) -> dict[str, Any]:
    ages = Ages()
    newest: int | None = None
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        path = workdir / f"model-{i}.pt"
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        if newest is not None:
            os.remove(workdir / f"model-{newest}.pt")
        newest = i
        ages.committed += 1
        ages.sample(i, newest)
    return {"seconds": time.perf_counter() - start, **ages.summary()}


def run_dcp(
    model: torch.nn.Module, optimizer: Any, step: Callable[[], Any], steps: int, workdir: Path
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    ages = Ages()
    future: Any = None
    in_flight: int | None = None
    newest: int | None = None
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if future is not None:
            future.result()  # one save at a time (each call starts its own executor)
            if newest is not None:
                shutil.rmtree(workdir / f"step-{newest}", ignore_errors=True)
            newest = in_flight
            ages.committed += 1
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        future = dcp.async_save(state, checkpoint_id=str(workdir / f"step-{i}"), no_dist=True)
        in_flight = i
        ages.sample(i, newest)
    seconds = time.perf_counter() - start
    future.result()
    return {"seconds": seconds, **ages.summary()}


def run_ckpt_hook(
    model: torch.nn.Module,
    optimizer: Any,
    step: Callable[[], Any],
    steps: int,
    workdir: Path,
    if_busy: str,
) -> dict[str, Any]:
    tch = _import_package()
    ages = Ages()
    newest: list[int | None] = [None]

    class Committed(tch.CheckpointSaverListener):
        run_after_commit = True  # file-only: the save stays asynchronous

        def after_save(self, session: Any, global_step_value: int) -> None:
            newest[0] = global_step_value
            if global_step_value > 0:  # not the creation save
                ages.committed += 1

    hook = tch.CheckpointSaverHook(
        str(workdir),
        save_steps=1,
        saver=tch.Saver(max_to_keep=2),
        listeners=[Committed()],
        if_busy=if_busy,
    )
    saved_at: list[int] = []  # the loop's steps (0-based) whose trigger staged a save
    with tch.SingularMonitoredSession(model, optimizer, hooks=[hook]) as sess:
        start = time.perf_counter()
        for i in range(steps):
            before = hook.skipped_saves
            sess.run(step)
            if hook.skipped_saves == before:  # save_steps=1: every step triggers, saves or skips
                saved_at.append(i)
            ages.sample(sess.raw_session().global_step, newest[0])
        seconds = time.perf_counter() - start
        skipped = hook.skipped_saves
    return {"seconds": seconds, "skipped": skipped, "saved_at": saved_at, **ages.summary()}


def run_copy_floor(
    model: torch.nn.Module,
    optimizer: Any,
    step: Callable[[], Any],
    steps: int,
    saved_at: list[int],
) -> dict[str, Any]:
    """The loop copying its state into reused buffers at the steps the 'skip' run saved at.

    A plain copy of the same tensors on every core, as bench_save's copy floor, and nothing
    written: what staging alone costs at that rate, the bound of any checkpoint that commits
    as often.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    tensors = _tensors(state)
    buffers = [torch.empty_like(t) for t in tensors]
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src in zip(buffers, tensors, strict=True):
        if dst.numel() * dst.element_size() < 4 * MB or workers == 1:
            pieces.append((dst.view(-1), src.reshape(-1)))
            continue
        pieces += zip(dst.view(-1).chunk(workers), src.reshape(-1).chunk(workers), strict=True)
    at = set(saved_at)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: p[0].copy_(p[1]), pieces))  # first touch, as a saver's warm-up
        start = time.perf_counter()
        for i in range(steps):
            step()
            if i in at:
                list(pool.map(lambda p: p[0].copy_(p[1]), pieces))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "copies": len(at)}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj.detach()]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


SYSTEMS = ("none", "copy_floor", "torch_save", "dcp", "ckpt_wait", "ckpt_skip")
# The order they run in: the target's pair back to back, so that load from other processes,
# which drifts over minutes on a shared machine, weighs on both alike; the copy floor right
# after the 'skip' run whose save steps it repeats.
RUN_ORDER = ("none", "ckpt_skip", "copy_floor", "torch_save", "dcp", "ckpt_wait")


def measure(
    system: str, args: argparse.Namespace, workdir: Path, saved_at: list[int] | None = None
) -> dict[str, Any]:
    model, optimizer, step = build(args.model_mb, args.width, args.batch)
    for _ in range(args.warmup):
        step()
    sysdir = workdir / system
    sysdir.mkdir()
    load_before = os.getloadavg()[0]
    try:
        if system == "none":
            result = run_none(step, args.steps, sysdir)
        elif system == "torch_save":
            result = run_torch_save(model, optimizer, step, args.steps, sysdir)
        elif system == "dcp":
            result = run_dcp(model, optimizer, step, args.steps, sysdir)
        elif system == "copy_floor":
            # Without a 'skip' run to follow: a copy every third step.
            at = saved_at if saved_at is not None else list(range(0, args.steps, 3))
            result = run_copy_floor(model, optimizer, step, args.steps, at)
        else:
            if_busy = "skip" if system == "ckpt_skip" else "wait"
            result = run_ckpt_hook(model, optimizer, step, args.steps, sysdir, if_busy)
    finally:
        shutil.rmtree(sysdir, ignore_errors=True)
        gc.collect()
        os.sync()
    result["steps_per_s"] = args.steps / result["seconds"]
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return result


LABELS = {
    "none": "no checkpoints",
    "torch_save": "torch.save + fsync every step",
    "dcp": "DCP async_save every step",
    "ckpt_wait": "CheckpointSaverHook(save_steps=1) (if_busy='wait')",
    "ckpt_skip": "CheckpointSaverHook(save_steps=1, if_busy='skip')",
    "copy_floor": "copy floor: the state copied at the 'skip' run's save steps, nothing written",
}


def markdown(info: dict[str, Any], runs: list[dict[str, dict[str, Any]]]) -> str:
    def med(system: str, key: str) -> float | None:
        values = [r[system][key] for r in runs if r.get(system, {}).get(key) is not None]
        return statistics.median(values) if values else None

    lines = [
        f"# Continuous checkpointing — commit {info['commit']}",
        "",
        f"- date: {info['date']}; machine: {info['cpu_count']} cores, python {info['python']}, "
        f"torch {info['torch']} ({info['threads']} thread(s) for the step)",
        f"- model: MLP of {info['model_mb']:.1f} MB of parameters ({info['payload_mb']:.0f} MB "
        f"with AdamW state), batch {info['batch']}, width {info['width']}",
        f"- {info['steps']} steps per system after {info['warmup']} warm-up steps; medians of "
        f"{len(runs)} run(s); load average (1 min) before/after: {info['load']}",
        "",
        "| system | steps/s | throughput vs none | checkpoints committed | skipped triggers "
        "| age of newest (median / max / at end, steps) |",
        "|---|---|---|---|---|---|",
    ]
    base = med("none", "steps_per_s")
    for system in SYSTEMS:
        rate = med(system, "steps_per_s")
        if rate is None:
            continue
        ratio = f"{rate / base:.3f}x" if base else "—"
        committed = med(system, "committed") or med(system, "copies")
        skipped = med(system, "skipped")
        ages = [med(system, k) for k in ("age_median_steps", "age_max_steps", "age_at_end_steps")]
        shown_ages = " / ".join("—" if a is None else f"{a:g}" for a in ages)
        lines.append(
            f"| {LABELS[system]} | {rate:.2f} | {ratio} | "
            f"{'—' if committed is None else f'{committed:g}'} | "
            f"{'—' if skipped is None else f'{skipped:g}'} | {shown_ages} |"
        )
    skip = med("ckpt_skip", "steps_per_s")
    floor = med("copy_floor", "steps_per_s")
    if skip and base:
        verdict = "pass" if skip / base >= TARGET_THROUGHPUT else "FAIL"
        lines += [
            "",
            f"Target (issue 14): if_busy='skip' throughput >= {TARGET_THROUGHPUT}x of no "
            f"checkpoints: {skip / base:.3f}x, {verdict}.",
        ]
        if floor:
            lines.append(
                f"The copy floor at the same save steps (staging alone, nothing written): "
                f"{floor / base:.3f}x of no checkpoints; 'skip' reaches {skip / floor:.3f}x of "
                "it, the rest being the writer's share of the machine while the loop runs."
            )
    lines += [
        "",
        "Age: global step minus the step of the newest checkpoint committed so far, after each "
        "step (for torch.save the step's own, 0; for DCP the previous one once its future "
        "returned). The checkpoints of `end()` and of session creation are not counted.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-mb", type=float, default=16.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every system; medians")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the step")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    chosen = {s for s in args.systems.split(",") if s}
    unknown = sorted(chosen - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    chosen.add("none")  # every ratio is against it
    args.system_list = [s for s in RUN_ORDER if s in chosen]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    # if_busy='wait' at save_steps=1 warns at every step that the interval is shorter than a
    # save: true, and the point of the comparison, but not worth a line per step.
    logging.getLogger("torch_ckpt_hook").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench_continuous_", dir=args.dir))
    model, optimizer, _ = build(args.model_mb, args.width, args.batch)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model, optimizer
    load_start = os.getloadavg()[0]
    runs: list[dict[str, dict[str, Any]]] = []
    try:
        for _ in range(args.repeats):
            run: dict[str, dict[str, Any]] = {}
            for system in args.system_list:
                print(f"{LABELS[system]} ...", file=sys.stderr, flush=True)
                saved_at = run.get("ckpt_skip", {}).get("saved_at")
                run[system] = measure(system, args, workdir, saved_at)
                print(f"    {run[system]}", file=sys.stderr, flush=True)
            runs.append(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    commit = _git("rev-parse", "--short", "HEAD")
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model_mb": param_bytes / MB,
        "payload_mb": 3 * param_bytes / MB,
        "batch": args.batch,
        "width": args.width,
        "steps": args.steps,
        "warmup": args.warmup,
        "load": f"{load_start:.1f} → {os.getloadavg()[0]:.1f}",
    }
    text = markdown(info, runs)
    stem = write_report(args.out, "continuous", commit, text, {"info": info, "runs": runs})
    print(text)
    print(f"wrote {stem}.md, .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
