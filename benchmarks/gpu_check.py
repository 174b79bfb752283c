"""The GPU proof: the CUDA tests and a GPU save benchmark in one command, with one report.

On a machine with CUDA (``benchmarks/gpu_check.sh``, or ``python benchmarks/gpu_check.py``):

1. runs the CUDA tests (the test files holding CUDA-only tests, with ``-rs`` so skips show);
2. for each size of state (default 0.1, 1, 4 and 16 GB: parameters plus AdamW state, the sizes
   that fit in GPU and host memory and in the time budget) measures, for this package's
   ``Saver.save(blocking=False)``:

   - the host block of the save call (target < 5 ms: only enqueueing happens on the host), and
     how many synchronizing CUDA calls ``torch.cuda.set_sync_debug_mode("warn")`` reported
     during it;
   - the stall at the next ``optimizer.step`` (its GPU time in the step after the save, minus a
     normal one: it waits on the device for the copies) against the D2H copy time (staging
     alone, on a quiet GPU);
   - the effective D2H GB/s against a pinned-copy floor measured in the same run (plain
     ``non_blocking`` copies into preallocated pinned buffers, then a synchronize);
   - step-time inflation (GPU time, CUDA events) of the save step and of the next step;

   and the same block / stall / inflation rows for ``torch.save``, DCP ``async_save`` with its
   pinned stager (``DefaultStager``, the caller waiting for staging before the next
   ``optimizer.step``, as torchtitan does) and Lightning ``AsyncCheckpointIO`` where installed,
   at the sizes up to ``--peer-max-gb``;
3. checks consistency under BatchNorm and AMP: a model with BatchNorm, trained under autocast
   with a ``GradScaler``, is saved, trained on at once, and the file must hold, bit for bit, the
   state at the save (parameters, running statistics, AdamW state, the scaler's scale);
4. writes ``benchmarks/results/<date>-gpu-<commit>.{md,json}``.

Without CUDA (or with ``--cpu``) it runs the same code path on the CPU at tiny sizes, with
wall-clock timers instead of CUDA events, and the report says the GPU was skipped. The CI test
``tests/test_gpu_check.py`` runs it that way. Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save import _git, _import_package

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
TARGET_BLOCK_MS = 5.0
# The test files that hold CUDA-only tests (skipped without CUDA).
CUDA_TEST_FILES = [
    "tests/test_staging.py",
    "tests/test_async_save.py",
    "tests/test_exact_resume.py",
    "tests/test_payload_check.py",
    "tests/test_stateful_capture.py",
    "tests/test_parallel_copy.py",
]


# -- timing --------------------------------------------------------------------------------------


class Clock:
    """Marks on the device's timeline: CUDA events on CUDA, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, begin: Any, end: Any) -> float:
        """Milliseconds between two marks (synchronizes on CUDA)."""
        if self.cuda:
            end.synchronize()
            return float(begin.elapsed_time(end))
        return (end - begin) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@contextlib.contextmanager
def counting_syncs(cuda: bool) -> Iterator[list[str]]:
    """The synchronizing CUDA calls made in the block (any thread), as warning messages."""
    found: list[str] = []
    if not cuda:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())


def free_host_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if callable(empty_host):
            empty_host()  # pinned blocks freed by us go back to the OS, not to a cache


# -- the training state --------------------------------------------------------------------------


class State:
    """A Linear stack of about ``payload_bytes / 3`` bytes of parameters, AdamW, one batch."""

    def __init__(self, payload_bytes: float, device: torch.device, batch: int) -> None:
        torch.manual_seed(0)
        param_bytes = payload_bytes / 3
        width = (
            4096 if param_bytes >= 4 * 4096 * 4096 * 4 else max(8, int((param_bytes / 16) ** 0.5))
        )
        layers = max(1, round(param_bytes / ((width * width + width) * 4)))
        self.device = device
        self.model = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, device=device) for _ in range(layers))
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.x = torch.randn(batch, width, device=device)
        self.forward_backward()
        self.optimizer.step()  # materialises exp_avg and exp_avg_sq
        self.payload_bytes = sum(
            t.numel() * t.element_size()
            for t in [*self.model.state_dict().values(), *self._optimizer_tensors()]
        )

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()

    def tensors(self) -> list[torch.Tensor]:
        return [*self.model.state_dict().values(), *self._optimizer_tensors()]


def normal_steps(state: State, clock: Clock, n: int = 3) -> tuple[float, float]:
    """Median GPU ms of a whole step and of its ``optimizer.step`` alone."""
    whole, opt = [], []
    for _ in range(n):
        a = clock.mark()
        state.forward_backward()
        b = clock.mark()
        state.optimizer.step()
        c = clock.mark()
        whole.append(clock.ms(a, c))
        opt.append(clock.ms(b, c))
    return statistics.median(whole), statistics.median(opt)


# -- floors -------------------------------------------------------------------------------------


def pinned_floor(state: State, clock: Clock, repeats: int) -> dict[str, float]:
    """GB/s of plain copies of the state's tensors into pinned buffers allocated once."""
    tensors = state.tensors()
    pin = state.device.type == "cuda"
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
    times = []
    for _ in range(repeats + 1):
        clock.sync()
        start = time.perf_counter()
        for dst, src in zip(buffers, tensors, strict=True):
            dst.copy_(src, non_blocking=pin)
        clock.sync()
        times.append(time.perf_counter() - start)
    del buffers
    free_host_cache()
    seconds = statistics.median(times[1:])
    return {"seconds": seconds, "gbps": state.payload_bytes / seconds / GB}


def staging_copy(state: State, clock: Clock, repeats: int) -> dict[str, float]:
    """The package's staging alone on a quiet device: D2H copy time and GB/s."""
    from torch_ckpt_hook._staging import StagingArea

    area = StagingArea()
    times = []
    for _ in range(repeats + 1):
        clock.sync()
        start = time.perf_counter()
        _, fence = area.stage(state.state_dict())
        fence.wait_on_host()
        times.append(time.perf_counter() - start)
    del area
    free_host_cache()
    seconds = statistics.median(times[1:])
    return {"seconds": seconds, "gbps": state.payload_bytes / seconds / GB}


# -- the systems --------------------------------------------------------------------------------


def save_step_rows(
    state: State,
    clock: Clock,
    save: Callable[[int], Callable[[], None]],
    before_opt_step: Callable[[], None],
    repeats: int,
) -> dict[str, Any]:
    """Block, syncs, stall and inflation for ``save(step)``, which returns its wait.

    ``before_opt_step`` runs right before the next ``optimizer.step`` (DCP's wait for staging).
    """
    full, opt = normal_steps(state, clock)
    rows: dict[str, list[float]] = {
        k: [] for k in ("block_ms", "syncs", "host_wait_ms", "stall_ms", "save_step", "next_step")
    }
    durable = []
    for step in range(1, repeats + 2):
        clock.sync()
        a = clock.mark()
        with counting_syncs(clock.cuda) as syncs:
            start = time.perf_counter()
            wait = save(step)
            block = time.perf_counter() - start
        state.forward_backward()
        host = time.perf_counter()
        before_opt_step()
        host_wait = time.perf_counter() - host
        b = clock.mark()
        state.optimizer.step()
        c = clock.mark()
        state.forward_backward()
        state.optimizer.step()
        d = clock.mark()
        save_step_ms, opt_ms, next_ms = clock.ms(a, c), clock.ms(b, c), clock.ms(c, d)
        wait()
        durable.append(time.perf_counter() - start)
        if step == 1:
            continue  # warm-up: buffers allocated, imports
        rows["block_ms"].append(block * 1000)
        rows["syncs"].append(len(syncs))
        rows["host_wait_ms"].append(host_wait * 1000)
        rows["stall_ms"].append(opt_ms - opt)
        rows["save_step"].append(save_step_ms / full)
        rows["next_step"].append(next_ms / full)
    result: dict[str, Any] = {k: statistics.median(v) for k, v in rows.items()}
    result["durable_s"] = statistics.median(durable[1:])
    result["normal_step_ms"] = full
    result["normal_opt_step_ms"] = opt
    return result


def ours(state: State, workdir: Path, clock: Clock, repeats: int) -> dict[str, Any]:
    tch = _import_package()
    session = tch.Session(state.model, state.optimizer)
    saver = tch.Saver(max_to_keep=1)
    prefix = str(workdir / "model.ckpt")

    def save(step: int) -> Callable[[], None]:
        handle = saver.save(session, prefix, global_step=step, blocking=False)

        def wait() -> None:
            handle.result()

        return wait

    try:
        return save_step_rows(state, clock, save, lambda: None, repeats)
    finally:
        saver.wait_until_finished()
        session.close()


def torch_save(state: State, workdir: Path, clock: Clock, repeats: int) -> dict[str, Any]:
    def save(step: int) -> Callable[[], None]:
        path = workdir / f"torch-{step}.pt"
        with open(path, "wb") as f:
            torch.save(state.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        return lambda: path.unlink()

    return save_step_rows(state, clock, save, lambda: None, repeats)


def dcp_pinned(state: State, workdir: Path, clock: Clock, repeats: int) -> dict[str, Any] | str:
    import torch.distributed.checkpoint as dcp

    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return "this torch has no DefaultStager"
    options = StagingOptions(
        use_pinned_memory=state.device.type == "cuda",
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=state.device.type == "cuda",
    )
    stager = DefaultStager(options)
    staged: list[Any] = []

    def save(step: int) -> Callable[[], None]:
        target = workdir / f"dcp-{step}"
        response = dcp.async_save(
            state.state_dict(), checkpoint_id=str(target), async_stager=stager, no_dist=True
        )
        staged.append(response)

        def wait() -> None:
            upload = getattr(response, "upload_completion", response)
            upload.result()
            shutil.rmtree(target, ignore_errors=True)

        return wait

    def before_opt_step() -> None:
        # DCP does not protect the state: the caller must wait for staging before mutating.
        completion = getattr(staged[-1], "staging_completion", None)
        if completion is not None:
            completion.result()

    try:
        return save_step_rows(state, clock, save, before_opt_step, repeats)
    finally:
        stager.close()


def lightning(state: State, workdir: Path, clock: Clock, repeats: int) -> dict[str, Any] | str:
    try:
        from lightning.fabric.plugins.io import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO
    except ImportError:
        return "not installed (pip install lightning)"
    checkpoint_io = AsyncCheckpointIO(TorchCheckpointIO())

    def save(step: int) -> Callable[[], None]:
        path = workdir / f"lightning-{step}.ckpt"
        checkpoint_io.save_checkpoint(state.state_dict(), str(path))

        def wait() -> None:
            checkpoint_io.teardown()  # its only wait
            path.unlink(missing_ok=True)

        return wait

    return save_step_rows(state, clock, save, lambda: None, repeats)


PEERS: dict[str, Callable[..., dict[str, Any] | str]] = {
    "torch.save + fsync": torch_save,
    "DCP async_save (pinned DefaultStager)": dcp_pinned,
    "Lightning AsyncCheckpointIO": lightning,
}


# -- consistency under BatchNorm and AMP ----------------------------------------------------------


def consistency(device: torch.device, workdir: Path) -> dict[str, Any]:
    """Save, train on at once, and compare the file with the state at the save, bit for bit."""
    tch = _import_package()
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256),
        torch.nn.BatchNorm1d(256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 8),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    x = torch.randn(64, 256, device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    session = tch.Session(model, optimizer, extra_state={"scaler": scaler})
    saver = tch.Saver(max_to_keep=None)
    for _ in range(3):
        session.run(train_step)
    if cuda:
        torch.cuda.synchronize()
    expected_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    expected_opt = {
        (i, k): v.detach().cpu().clone()
        for i, s in optimizer.state_dict()["state"].items()
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    expected_scaler = scaler.state_dict()
    handle = saver.save(session, str(workdir / "amp.ckpt"), global_step=3, blocking=False)
    for _ in range(5):
        session.run(train_step)  # mutates everything the save holds, at once
    path = handle.result()
    loaded = tch.load_checkpoint(path)
    mismatched = [k for k, v in expected_model.items() if not torch.equal(v, loaded["model"][k])]
    state = loaded["optimizer"]["state"]
    mismatched += [
        f"optimizer.{i}.{k}"
        for (i, k), v in expected_opt.items()
        if not torch.equal(v, state[i][k])
    ]
    saved_scaler = {
        k: v.item() if torch.is_tensor(v) else v for k, v in loaded["extra_state"]["scaler"].items()
    }
    if saved_scaler != expected_scaler:
        mismatched.append(f"scaler: saved {saved_scaler}, expected {expected_scaler}")
    session.close()
    return {
        "consistent": not mismatched,
        "mismatched": mismatched,
        "amp_dtype": str(amp_dtype),
        "batchnorm_buffers": sorted(k for k in expected_model if "running" in k or "batches" in k),
    }


# -- the tests ------------------------------------------------------------------------------------


def run_tests(files: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {
            "command": " ".join(command[1:]),
            "returncode": "timeout",
            "summary": f"timed out after {timeout:.0f} s",
            "seconds": timeout,
            "skipped": [],
            "tail": out[-3000:],
        }
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "command": " ".join(command[1:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": time.perf_counter() - start,
        "skipped": [line for line in lines if line.startswith("SKIPPED")],
        "tail": "\n".join(lines[-30:]) + ("\n" + done.stderr[-2000:] if done.stderr else ""),
    }


# -- the run -------------------------------------------------------------------------------------


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def fits(payload: float, device: torch.device) -> str | None:
    """Why a state of ``payload`` bytes does not fit here, or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        # parameters, gradients, two AdamW states: about 4/3 of the payload, plus activations.
        if payload * 1.5 > free:
            return f"needs ~{payload * 1.5 / GB:.0f} GB of GPU memory, {free / GB:.0f} GB free"
    available = _mem_available()
    # The saver's pinned buffers, the staging measurement's, the floor's, and the page cache.
    if payload * 2.5 > available:
        return f"needs ~{payload * 2.5 / GB:.0f} GB of host memory, {available / GB:.0f} GB free"
    disk = shutil.disk_usage(tempfile.gettempdir()).free
    if payload * 2.2 > disk:
        return f"needs ~{payload * 2.2 / GB:.0f} GB of disk, {disk / GB:.0f} GB free"
    return None


def measure_size(
    gb: float, device: torch.device, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    clock = Clock(device)
    state = State(gb * GB, device, args.batch)
    repeats = args.repeats if gb < 8 else max(1, args.repeats - 1)
    size: dict[str, Any] = {"gb": gb, "payload_bytes": state.payload_bytes, "systems": {}}
    size["pinned_floor"] = pinned_floor(state, clock, repeats)
    size["staging"] = staging_copy(state, clock, repeats)
    print(f"[{gb} GB] floor {size['pinned_floor']}, staging {size['staging']}", file=sys.stderr)
    size["systems"]["torch_ckpt_hook Saver"] = ours(state, workdir, clock, repeats)
    print(f"[{gb} GB] ours {size['systems']['torch_ckpt_hook Saver']}", file=sys.stderr)
    for label, peer in PEERS.items():
        if gb > args.peer_max_gb:
            size["systems"][label] = f"skipped above --peer-max-gb {args.peer_max_gb:g}"
            continue
        free_host_cache()
        try:
            size["systems"][label] = peer(state, workdir, clock, repeats)
        except Exception as err:  # a peer's failure is a row, not the end of the run
            size["systems"][label] = f"failed: {type(err).__name__}: {err}"
        print(f"[{gb} GB] {label} {size['systems'][label]}", file=sys.stderr)
    del state
    free_host_cache()
    return size


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    info = report["info"]
    lines = [
        f"# GPU check — commit {info['commit']}",
        "",
        f"- date: {info['date']}; torch {info['torch']}; python {info['python']}",
        f"- device: {info['device_name']}",
    ]
    if info["gpu_skipped"]:
        lines.append(
            f"- **GPU skipped: {info['gpu_skipped']}.** This run exercised the code path on the "
            "CPU at tiny sizes (wall-clock timers instead of CUDA events); its numbers say "
            "nothing about a GPU."
        )
    tests = report.get("tests")
    lines += ["", "## CUDA tests", ""]
    if tests is None:
        lines.append("Not run (--skip-tests).")
    else:
        lines += [
            f"`{tests['command']}`: exit {tests['returncode']}, {tests['summary']}",
            "",
            f"{len(tests['skipped'])} skip line(s)" + (":" if tests["skipped"] else "."),
            *[f"- {line}" for line in tests["skipped"][:20]],
        ]
    lines += [
        "",
        "## Saves",
        "",
        "block: the save call on the host; syncs: synchronizing CUDA calls reported during it "
        "(sync debug mode, any thread); host wait: the caller's wait before the next "
        "optimizer.step (DCP: staging); stall: GPU time of that optimizer.step minus a normal "
        "one; save step / next step: GPU time of [save call + step] and of the step after it, "
        "over a normal step.",
        "",
    ]
    for size in report["sizes"]:
        if "skipped" in size:
            lines.append(f"### {size['gb']:g} GB: skipped ({size['skipped']})")
            lines.append("")
            continue
        floor, staging = size["pinned_floor"], size["staging"]
        lines += [
            f"### {size['gb']:g} GB of state ({size['payload_bytes'] / 2**20:.1f} MiB payload)",
            "",
            f"D2H: staging copy {staging['seconds'] * 1000:.1f} ms = {staging['gbps']:.1f} GB/s; "
            f"pinned-copy floor {floor['seconds'] * 1000:.1f} ms = {floor['gbps']:.1f} GB/s "
            f"(staging at {staging['gbps'] / floor['gbps']:.2f}x the floor).",
            "",
            "| system | block | syncs | host wait | stall at next optimizer.step | D2H copy "
            "| save step | next step | durable |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, row in size["systems"].items():
            if isinstance(row, str):
                lines.append(f"| {label} | {row} |")
                continue
            lines.append(
                f"| {label} | {_f(row['block_ms'], 2, ' ms')} | {row['syncs']:g} "
                f"| {_f(row['host_wait_ms'], 2, ' ms')} | {_f(row['stall_ms'], 2, ' ms')} "
                f"| {staging['seconds'] * 1000:.1f} ms | {_f(row['save_step'], 3, 'x')} "
                f"| {_f(row['next_step'], 3, 'x')} | {_f(row['durable_s'], 2, ' s')} |"
            )
        ours_row = size["systems"].get("torch_ckpt_hook Saver")
        if isinstance(ours_row, dict):
            verdict = "pass" if ours_row["block_ms"] < TARGET_BLOCK_MS else "FAIL"
            lines += ["", f"Target: host block < {TARGET_BLOCK_MS:g} ms: {verdict}."]
        lines.append("")
    c = report["consistency"]
    lines += [
        "## Consistency under BatchNorm and AMP",
        "",
        f"{'pass' if c['consistent'] else 'FAIL'}: saved, then 5 steps at once under autocast "
        f"({c['amp_dtype']}) with a GradScaler; the file holds the state at the save bit for bit "
        f"(parameters, BatchNorm buffers {', '.join(c['batchnorm_buffers'])}, AdamW state, the "
        "scaler)." + (f" Mismatched: {c['mismatched']}" if c["mismatched"] else ""),
        "",
        f"Total time: {info['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists")
    parser.add_argument(
        "--sizes", help="GB of state, comma-separated (default 0.1,1,4,16; CPU 0.002,0.008)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peer-max-gb", type=float, default=4.0)
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="skip the sizes that would end past this"
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", nargs="*", help="test files (default: those with CUDA tests)")
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    skipped = None
    if not cuda:
        skipped = "--cpu given" if args.cpu else "no CUDA here (torch.cuda.is_available() is False)"
    default_sizes = "0.1,1,4,16" if cuda else "0.002,0.008"
    sizes = [float(s) for s in (args.sizes or default_sizes).split(",") if s]
    report: dict[str, Any] = {
        "info": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "--short", "HEAD"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name()
            if cuda
            else f"CPU ({os.cpu_count()} cores)",
            "gpu_skipped": skipped,
        },
        "sizes": [],
    }
    if not args.skip_tests:
        report["tests"] = run_tests(args.tests or CUDA_TEST_FILES, timeout=args.budget_s / 2)
        print(f"tests: {report['tests']['summary']}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.dir))
    try:
        for gb in sizes:
            elapsed = time.perf_counter() - begin
            # Roughly 6 s per GB of state per system (pinning, saves, writes on a fast disk).
            estimate = 6.0 * gb * (1 + (gb <= args.peer_max_gb) * 2)
            reason = fits(gb * GB, device)
            if reason is None and elapsed + estimate > args.budget_s:
                reason = f"past the time budget ({elapsed:.0f} s used, ~{estimate:.0f} s needed)"
            if reason is not None:
                report["sizes"].append({"gb": gb, "skipped": reason})
                continue
            report["sizes"].append(measure_size(gb, device, workdir, args))
        report["consistency"] = consistency(device, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["info"]["seconds"] = time.perf_counter() - begin
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today():%Y-%m-%d}-gpu-{report['info']['commit']}"
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    print(f"wrote {args.out / stem}.md, .json", file=sys.stderr)
    tests_failed = "tests" in report and report["tests"]["returncode"] != 0
    return 1 if tests_failed or not report["consistency"]["consistent"] else 0


if __name__ == "__main__":
    sys.exit(main())
