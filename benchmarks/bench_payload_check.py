"""The save-time payload check next to the staging copy it precedes, on realistic payloads.

``Saver.save`` calls ``check_payload`` on the session's payload before ``StagingArea.stage``. The
check must cost little next to staging. For each payload this measures, in one process:

- state_dict: ``Session.state_dict()``, which every save calls (a reference point);
- check: ``check_payload(payload)``, steady state (its per-process probe cache warm);
- check, first call: the payload's first check; the run's very first one also probes the
  installed torch, once per process, for the few types it cannot decide from the type alone (an
  ``OrderedDict``'s shell, a ``Counter``'s), so only the first payload measured shows that;
- stage: ``StagingArea.stage(payload)`` plus ``fence.wait_on_host()``, steady state (buffers
  allocated by the warm-up, reused: the memcpy every save pays);
- stage, first call: the first stage, which allocates the buffers;
- check / stage: the ratio of the steady-state medians.

Payloads (``--scale`` multiplies the parameter counts):

- mlp16: a 4-layer MLP of about 16 MB of float32 parameters, and its AdamW state;
- transformer512: a GPT-like stack of about 512 MB of parameters in 496 tensors, and AdamW;
- nanogpt: nanoGPT's "shakespeare-char" model (6 layers, 384 wide, about 43 MB), AdamW, and
  the extra state a nanoGPT-style trainer keeps: its config and model_args dicts, iteration and
  best loss, an eval history and a loss list, and an LR scheduler;
- nanogpt+sampler: the same, plus a resumable sampler keeping its shuffled order of the
  dataset's million positions as a Python list (the worst case for a walk: a million objects
  scattered in memory, each of which the check, staging and later pickling all touch).

Run from the repository root::

    python benchmarks/bench_payload_check.py
    python benchmarks/bench_payload_check.py --payloads mlp16,nanogpt --repeats 11
    python benchmarks/bench_payload_check.py --scale 0.25   # a smaller transformer

Results go to ``benchmarks/results/payload-check-<date>-<device>.{md,json}``. Nothing here
asserts anything about time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save import _git

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
GB = 1 << 30
PAYLOADS = ("mlp16", "transformer512", "nanogpt", "nanogpt+sampler")


# --------------------------------------------------------------------------------------------
# Models


class Block(torch.nn.Module):
    """One GPT-2 block: 12 tensors, as in nanoGPT (``bias=True``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.ModuleDict(
            {
                "c_attn": torch.nn.Linear(width, 3 * width),
                "c_proj": torch.nn.Linear(width, width),
            }
        )
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.ModuleDict(
            {
                "c_fc": torch.nn.Linear(width, 4 * width),
                "c_proj": torch.nn.Linear(4 * width, width),
            }
        )


class GPT(torch.nn.Module):
    """nanoGPT's module layout (token and position embeddings, blocks, final LayerNorm)."""

    def __init__(self, n_layer: int, width: int, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.transformer = torch.nn.ModuleDict(
            {
                "wte": torch.nn.Embedding(vocab_size, width),
                "wpe": torch.nn.Embedding(block_size, width),
                "h": torch.nn.ModuleList(Block(width) for _ in range(n_layer)),
                "ln_f": torch.nn.LayerNorm(width),
            }
        )


def _adamw_with_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW after one step, so ``exp_avg`` and ``exp_avg_sq`` exist; gradients dropped."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _mlp(scale: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    # 4 x Linear(1024, 1024) = 4.2 M float32 parameters = 16 MB.
    width = max(8, int(1024 * math.sqrt(scale)))
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers), {}


def _transformer(scale: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    # 41 blocks x 12 tensors + 4 = 496 tensors; 41 x 12 x 512^2 + embeddings = 134 M = 512 MB.
    width = max(16, int(512 * math.sqrt(scale)) // 16 * 16)
    return GPT(n_layer=41, width=width, vocab_size=8192, block_size=1024), {}


class _Sampler:
    """A resumable sampler: its shuffled order and position (a list of ints, as many keep)."""

    def __init__(self, size: int, seed: int) -> None:
        order = list(range(size))
        random.Random(seed).shuffle(order)
        self.state = {"indices": order, "pos": 12345, "epoch": 3, "seed": seed}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class _Trainer:
    """What nanoGPT's train.py stores beside the model: config, model_args, progress."""

    def __init__(self, model_args: dict[str, Any], seed: int) -> None:
        rng = random.Random(seed)
        self.state: dict[str, Any] = {
            "model_args": model_args,
            "config": {
                "out_dir": "out-shakespeare-char",
                "eval_interval": 250,
                "log_interval": 10,
                "eval_iters": 200,
                "eval_only": False,
                "always_save_checkpoint": False,
                "init_from": "scratch",
                "wandb_log": False,
                "wandb_project": "shakespeare-char",
                "wandb_run_name": "mini-gpt",
                "dataset": "shakespeare_char",
                "gradient_accumulation_steps": 1,
                "batch_size": 64,
                "block_size": model_args["block_size"],
                "n_layer": model_args["n_layer"],
                "n_head": model_args["n_head"],
                "n_embd": model_args["n_embd"],
                "dropout": 0.2,
                "bias": False,
                "learning_rate": 1e-3,
                "max_iters": 5000,
                "weight_decay": 0.1,
                "beta1": 0.9,
                "beta2": 0.99,
                "grad_clip": 1.0,
                "decay_lr": True,
                "warmup_iters": 100,
                "lr_decay_iters": 5000,
                "min_lr": 1e-4,
                "backend": "nccl",
                "device": "cpu",
                "dtype": "float32",
                "compile": False,
            },
            "iter_num": 2500,
            "best_val_loss": 1.4697,
            "history": [
                {"iter": i, "train": rng.random(), "val": rng.random()} for i in range(100)
            ],
            "losses": [rng.random() for _ in range(2500)],
        }

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _nanogpt(
    scale: float, seed: int, *, sampler: bool
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    width = max(16, int(384 * math.sqrt(scale)) // 16 * 16)
    model_args = {
        "n_layer": 6,
        "n_head": 6,
        "n_embd": width,
        "block_size": 256,
        "bias": False,
        "vocab_size": 65,
        "dropout": 0.2,
    }
    model = GPT(n_layer=6, width=width, vocab_size=65, block_size=256)
    optimizer = _adamw_with_state(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / 100))
    extra: dict[str, Any] = {"trainer": _Trainer(model_args, seed), "scheduler": scheduler}
    if sampler:
        # shakespeare_char's train split: about a million characters.
        extra["sampler"] = _Sampler(1_003_854, seed)
    return model, optimizer, extra


def build_session(name: str, scale: float, seed: int) -> Any:
    from torch_ckpt_hook import Session

    torch.manual_seed(seed)
    if name.startswith("nanogpt"):
        model, optimizer, extra = _nanogpt(scale, seed, sampler=name == "nanogpt+sampler")
    else:
        model, extra = _mlp(scale) if name == "mlp16" else _transformer(scale)
        optimizer = _adamw_with_state(model)
    return Session(model, optimizer, extra_state=extra)


def payload_stats(payload: Any) -> dict[str, int]:
    """Tensors, their bytes, and the other leaves (the values the check walks one by one)."""
    tensors = nbytes = leaves = containers = 0
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            tensors += 1
            nbytes += value.numel() * value.element_size()
        elif isinstance(value, dict):
            containers += 1
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            containers += 1
            stack.extend(value)
        else:
            leaves += 1
    return {
        "tensors": tensors,
        "tensor_bytes": nbytes,
        "other_leaves": leaves,
        "containers": containers,
    }


# --------------------------------------------------------------------------------------------
# Timing


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, scale: float, seed: int, repeats: int) -> dict[str, Any]:
    from torch_ckpt_hook._payload_check import check_payload
    from torch_ckpt_hook._staging import StagingArea

    session = build_session(name, scale, seed)
    payload = session.state_dict()
    stats = payload_stats(payload)

    def stage_once(area: StagingArea) -> None:
        _, fence = area.stage(payload)
        fence.wait_on_host()

    # First calls (one each per process for the check's probes, per area for the buffers).
    first_check = _time(lambda: check_payload(payload), 1)[0]
    area = StagingArea()
    first_stage = _time(lambda: stage_once(area), 1)[0]
    # Warm-up, then the measured repeats, interleaved so that load from the machine's other
    # users falls on both alike.
    check_payload(payload)
    stage_once(area)
    checks, stages, state_dicts = [], [], []
    for _ in range(repeats):
        checks += _time(lambda: check_payload(payload), 1)
        stages += _time(lambda: stage_once(area), 1)
        state_dicts += _time(session.state_dict, 1)
    check_s, stage_s = statistics.median(checks), statistics.median(stages)
    return {
        "payload": name,
        **stats,
        "staging_buffer_bytes": area.nbytes,
        "first_check_s": first_check,
        "first_stage_s": first_stage,
        "check_s": check_s,
        "stage_s": stage_s,
        "check_over_stage": check_s / stage_s,
        "state_dict_s": statistics.median(state_dicts),
        "samples": {"check": checks, "stage": stages, "state_dict": state_dicts},
    }


# --------------------------------------------------------------------------------------------
# Reporting


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except OSError:
        memory_gib = None
    sources = sorted((REPO / "torch_ckpt_hook").glob("*.py"))
    source_hash = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "package_dirty": bool(_git("status", "--porcelain", "--", "torch_ckpt_hook")),
        "package_source_sha256": source_hash,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def render(info: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    lines = [
        f"# Payload check vs staging — {info['device']}, commit {info['commit']}",
        "",
        f"- date: {info['date']}; commit {info['commit']}"
        f"{' (torch_ckpt_hook/ has uncommitted changes)' if info['package_dirty'] else ''}, "
        f"sources sha256 {info['package_source_sha256']}",
        f"- machine: {info['cpu']}, {info['cpu_count']} cores, {info['memory_gib']} GiB RAM",
        f"- python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads)",
        f"- medians of {args.repeats} repeats after one warm-up; seed {args.seed}; "
        f"scale {args.scale}; 1-min load average {info['load_average']}",
        "- command: `" + " ".join(["python", *sys.argv]) + "`",
        "",
        "*check* = `check_payload(payload)`; *stage* = `StagingArea.stage(payload)` + "
        "`fence.wait_on_host()` into reused buffers (the memcpy every save pays); *check / "
        "stage* = the ratio of those two medians; *first check* = the payload's first check (the "
        "run's very first one also probes the installed torch, once per process); *first stage* "
        "= a new area's first stage (allocates its buffers); *state_dict* = "
        "`Session.state_dict()`, which every save calls; *other leaves* = non-tensor values.",
        "",
        "| payload | tensors | tensor MB | other leaves | state_dict | check | stage | "
        "check / stage | first check | first stage |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['payload']} | {r['tensors']} | {r['tensor_bytes'] / MB:.0f} | "
            f"{r['other_leaves']} | {_fmt_s(r['state_dict_s'])} | {_fmt_s(r['check_s'])} | "
            f"{_fmt_s(r['stage_s'])} | {r['check_over_stage']:.4f}x | "
            f"{_fmt_s(r['first_check_s'])} | {_fmt_s(r['first_stage_s'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payloads", default=",".join(PAYLOADS), help="comma-separated")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies parameter counts")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    payloads = [p for p in args.payloads.split(",") if p]
    unknown = sorted(set(payloads) - set(PAYLOADS))
    if unknown:
        parser.error(f"--payloads: unknown {unknown}; choose from {list(PAYLOADS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    random.seed(args.seed)

    info = machine_info()
    load_before = os.getloadavg()[0]
    results = []
    for name in payloads:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args.scale, args.seed, args.repeats))
    info["load_average"] = f"{load_before:.1f}→{os.getloadavg()[0]:.1f}"

    table = render(info, args, results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"payload-check-{datetime.date.today().isoformat()}-{info['device']}"
    stem.with_suffix(".md").write_text(table)
    document = {
        "info": info,
        "argv": sys.argv,
        "repeats": args.repeats,
        "scale": args.scale,
        "seed": args.seed,
        "results": results,
    }
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
