"""One rank of tests/test_distributed.py: runs every scenario of one world, in order.

Run as ``python dist_worker.py WORLD RANK WORLD_SIZE DIR``. The ranks meet through a FileStore in
DIR (no port to pick); collectives time out after ``TIMEOUT`` seconds, so a rank whose peer died
fails instead of hanging. Each scenario writes ``DIR/<scenario>/result-<rank>.json`` (what the
test asserts on) or ``error-<rank>.txt`` with its traceback. Scenarios share one process start
(torch's import dominates a test's time).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import torch_ckpt_hook as tch  # noqa: E402
from torch_ckpt_hook._distributed import open_checkpoint_group  # noqa: E402
from torch_ckpt_hook._storage import LocalStorage  # noqa: E402

TIMEOUT = 30.0
os.environ["TORCH_CKPT_HOOK_DIST_TIMEOUT_SECS"] = str(TIMEOUT)


class Warnings(logging.Handler):
    """Collects the package's warnings, for the results."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


WARNINGS = Warnings()
logging.getLogger("torch_ckpt_hook").addHandler(WARNINGS)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    dist.barrier()


# -- a tiny model whose data depends on the global step only ---------------------------------


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 8)
        self.second = torch.nn.Linear(8, 2)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.dropout(torch.relu(self.first(x))))


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank())
    return torch.randn(8, 4, generator=generator)


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session_ref: list[Any]):
    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        # Dropout draws from each rank's own torch RNG: the streams differ per rank.
        loss = model(batch(session_ref[0].global_step)).pow(2).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return step


def ddp_setup() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(100 + rank())  # per-rank dropout streams
    return net, model, optimizer


def params(module: torch.nn.Module) -> dict[str, list[float]]:
    out = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().flatten().tolist()
    return out


def train(
    directory: str,
    last_step: int,
    *,
    save_steps: int | None = 2,
    save_secs: float | None = None,
    hooks: list[tch.SessionRunHook] | None = None,
    during: Callable[[int], None] | None = None,
    setup: Callable[[], tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]] = ddp_setup,
    rank_state: dict[str, Any] | None = None,
    async_save: bool = True,
) -> dict[str, Any]:
    net, model, optimizer = setup()
    counter = rank_state if rank_state is not None else {"seen": 0}
    all_hooks = [tch.StopAtStepHook(last_step=last_step), *(hooks or [])]
    kwargs: dict[str, Any] = (
        {"save_checkpoint_steps": save_steps}
        if save_secs is None
        else {"save_checkpoint_secs": save_secs}
    )
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=directory,
        hooks=all_hooks,
        log_step_count_steps=0,
        rank_state={"counter": counter},
        async_save=async_save,
        **kwargs,
    ) as sess:
        restored = sess.restored_from
        ref = [sess]
        step = make_step(model, optimizer, ref)
        while not sess.should_stop():
            if during is not None:
                during(sess.global_step)
            sess.run(step)
            counter["seen"] += 1 + rank() * 100
        final = sess.global_step
    return {
        "restored": restored,
        "final": final,
        "params": params(net),
        "counter": counter["seen"],
        "rng": torch.rand(3).tolist(),
        "latest": tch.latest_checkpoint(directory),
        "files": sorted(os.listdir(directory)),
    }


# -- DDP scenarios ---------------------------------------------------------------------------


def ddp_resume(directory: str) -> dict[str, Any]:
    """4 steps, then a new session resumes to 8; beside it a straight 8-step run."""
    first = train(os.path.join(directory, "resumed"), 4)
    resumed = train(os.path.join(directory, "resumed"), 8)
    straight = train(os.path.join(directory, "straight"), 8)
    payload = None
    if rank() == 0:
        loaded = tch.load_checkpoint(os.path.join(directory, "resumed", "model.ckpt-4"))
        payload = {
            "keys": sorted(loaded),
            "model_keys": sorted(loaded["model"]),
            "rank_state": loaded["rank_state"],
            "rank_rng_len": len(loaded["rank_rng"]),
            "rng_is_chiefs": bool(
                torch.equal(loaded["rng"]["torch"], loaded["rank_rng"][0]["torch"])
            ),
            "ranks_differ": not torch.equal(
                loaded["rank_rng"][0]["torch"], loaded["rank_rng"][1]["torch"]
            ),
        }
    return {"first": first, "resumed": resumed, "straight": straight, "payload": payload}


def skewed_clocks(directory: str) -> dict[str, Any]:
    """Rank 1's clock runs 100x faster: only the chief's decides, and every rank agrees."""
    base = time.time()
    steps = [0]
    speed = 1.0 if rank() == 0 else 100.0
    real = time.time

    def fake() -> float:
        return base + speed * 7.0 * steps[0]

    saved: list[int] = []

    class Record(tch.CheckpointSaverListener):
        def after_save(self, session: Any, global_step_value: int) -> None:
            saved.append(global_step_value)

    time.time = fake  # type: ignore[assignment]
    try:

        def tick(_step: int) -> None:
            steps[0] += 1

        hook = tch.CheckpointSaverHook(directory, save_secs=20, listeners=[Record()])
        _net, model, optimizer = ddp_setup()
        with tch.MonitoredSession(
            model, optimizer, hooks=[tch.StopAtStepHook(last_step=9), hook]
        ) as sess:
            step = make_step(model, optimizer, [sess])
            while not sess.should_stop():
                tick(sess.global_step)
                sess.run(step)
    finally:
        time.time = real  # type: ignore[assignment]
    return {"saved": saved, "latest": tch.latest_checkpoint(directory)}


def stop_on_one_rank(directory: str) -> dict[str, Any]:
    """Only rank 1 has a StopAtStepHook(last_step=3); rank 0 would train to 10."""
    hooks: list[tch.SessionRunHook] = [tch.StopAtStepHook(last_step=3)] if rank() == 1 else []
    return train(directory, 10, save_steps=100, hooks=hooks)


def sigterm_on_one_rank(directory: str) -> dict[str, Any]:
    """Rank 1 gets SIGTERM during step 3 (global step 2 before it); both stop after it."""

    def during(step: int) -> None:
        if rank() == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    return train(directory, 10, save_steps=100, during=during)


class FailingStorage(LocalStorage):
    """A disk that refuses the checkpoint file after ``allowed`` writes (the chief's)."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed

    def write(self, path: str, payload: Any) -> None:
        if self.allowed <= 0:
            raise OSError(28, "No space left on device (test)")
        self.allowed -= 1
        super().write(path, payload)


def chief_write_fails(directory: str) -> dict[str, Any]:
    """The chief's second write fails: the save fails on every rank, the first stays latest."""
    _net, model, optimizer = ddp_setup()
    saver = tch.Saver(storage=FailingStorage(allowed=1))
    outcomes: list[str] = []
    with tch.SingularMonitoredSession(model, optimizer, hooks=[]) as sess:
        raw = sess.raw_session()  # the runner attached the package's group to it
        step = make_step(model, optimizer, [sess])
        for _ in range(2):
            sess.run(step)
            try:
                saver.save(raw, os.path.join(directory, "model.ckpt"), raw.global_step)
                outcomes.append("committed")
            except tch.CheckpointSaveError as err:
                outcomes.append(f"failed: {err.__cause__}")
    return {"outcomes": outcomes, "latest": tch.latest_checkpoint(directory)}


def best_on_the_chief(directory: str) -> dict[str, Any]:
    """A BestCheckpointSaverHook among chief_only_hooks saves alone, never waiting for rank 1."""
    _net, model, optimizer = ddp_setup()
    best = tch.BestCheckpointSaverHook(directory, "loss")
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=directory,
        save_checkpoint_steps=2,
        log_step_count_steps=0,
        chief_only_hooks=[best],
        hooks=[tch.StopAtStepHook(last_step=4)],
    ) as sess:
        step = make_step(model, optimizer, [sess])
        while not sess.should_stop():
            sess.run(step)
        final = sess.global_step
    return {
        "final": final,
        "best": tch.latest_checkpoint(directory, latest_filename="best_checkpoint"),
        "latest": tch.latest_checkpoint(directory),
    }


DDP_SCENARIOS: list[Callable[[str], dict[str, Any]]] = [
    best_on_the_chief,
    ddp_resume,
    skewed_clocks,
    stop_on_one_rank,
    sigterm_on_one_rank,
    chief_write_fails,
]


# -- FSDP2 scenarios -------------------------------------------------------------------------


def fsdp_setup() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net()
    fully_shard(net.first)
    fully_shard(net.second)
    fully_shard(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    torch.manual_seed(100 + rank())
    return net, net, optimizer


def fsdp_resume(directory: str) -> dict[str, Any]:
    first = train(os.path.join(directory, "resumed"), 4, setup=fsdp_setup)
    resumed = train(os.path.join(directory, "resumed"), 8, setup=fsdp_setup)
    straight = train(os.path.join(directory, "straight"), 8, setup=fsdp_setup)
    ckpt = os.path.join(directory, "resumed", "model.ckpt-4")
    return {
        "first": first,
        "resumed": resumed,
        "straight": straight,
        "dir_files": sorted(os.listdir(ckpt)),
        "is_dir": os.path.isdir(ckpt),
    }


def _gate_fsync(on_fsync: Callable[[], None]) -> Callable[[], None]:
    """Make this rank's os.fsync call ``on_fsync()`` first (once); returns the undo."""
    real = os.fsync
    fired = [False]

    def gated(fd: int) -> None:
        if not fired[0] and threading.current_thread() is not threading.main_thread():
            fired[0] = True
            on_fsync()
        real(fd)

    os.fsync = gated  # type: ignore[assignment]

    def undo() -> None:
        os.fsync = real  # type: ignore[assignment]

    return undo


def fsdp_async_consistency(directory: str) -> dict[str, Any]:
    """The write of step 1's save is held while every shard is overwritten in place."""
    net, model, optimizer = fsdp_setup()
    session = tch.Session(model, optimizer)
    group = open_checkpoint_group()
    session.set_checkpoint_group(group)
    step = make_step(model, optimizer, [session])
    session.run(step)
    expected = params(net)
    release = threading.Event()
    undo = _gate_fsync(lambda: release.wait(TIMEOUT))
    try:
        saver = tch.Saver()
        handle = saver.save(
            session, os.path.join(directory, "model.ckpt"), session.global_step, blocking=False
        )
        with torch.no_grad():
            for tensor in [*net.parameters(), *optimizer.state_dict()["state"][0].values()]:
                if isinstance(tensor, torch.Tensor):
                    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                    local.fill_(123.0)
        release.set()
        path = handle.result()
    finally:
        undo()
        release.set()
    net2, model2, optimizer2 = fsdp_setup()
    restored = tch.Session(model2, optimizer2)
    restored.set_checkpoint_group(group)
    tch.Saver().restore(restored, path)
    group.close()
    return {"expected": expected, "restored": params(net2), "path": path}


def fsdp_corruption_and_retention(directory: str) -> dict[str, Any]:
    """Saves at 2, 4, 6 with max_to_keep=2; then a byte of a shard of 6 is flipped."""
    _net, model, optimizer = fsdp_setup()
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=directory,
        save_checkpoint_steps=2,
        max_to_keep=2,
        log_step_count_steps=0,
        hooks=[tch.StopAtStepHook(last_step=6)],
    ) as sess:
        step = make_step(model, optimizer, [sess])
        while not sess.should_stop():
            sess.run(step)
    listing = sorted(os.listdir(directory))
    state = tch.get_checkpoint_state(directory)
    listed = [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []
    barrier()
    if rank() == 0:
        shard = os.path.join(directory, "model.ckpt-6", "__1_0.distcp")
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    barrier()
    WARNINGS.messages.clear()
    _net2, model2, optimizer2 = fsdp_setup()
    with tch.MonitoredTrainingSession(
        model2,
        optimizer2,
        checkpoint_dir=directory,
        save_checkpoint_steps=100,
        log_step_count_steps=0,
        hooks=[tch.StopAtStepHook(last_step=4)],
    ) as sess:
        restored = sess.restored_from
        global_step = sess.global_step
    return {
        "listing": listing,
        "listed": listed,
        "restored": restored,
        "global_step": global_step,
        "warnings": list(WARNINGS.messages),
    }


def fsdp_rank_write_fails(directory: str) -> dict[str, Any]:
    """Rank 1 cannot write its shards at the second save: it fails on every rank."""
    _net, model, optimizer = fsdp_setup()
    session = tch.Session(model, optimizer)
    group = open_checkpoint_group()
    session.set_checkpoint_group(group)
    saver = tch.Saver()
    step = make_step(model, optimizer, [session])
    outcomes: list[str] = []
    for attempt in range(2):
        session.run(step)
        undo = (lambda: None) if attempt == 0 or rank() == 0 else _gate_fsync(_raise_eio)
        try:
            saver.save(session, os.path.join(directory, "model.ckpt"), session.global_step)
            outcomes.append("committed")
        except tch.CheckpointSaveError as err:
            outcomes.append(f"failed: {err}")
        finally:
            undo()
    group.close()
    return {"outcomes": outcomes, "latest": tch.latest_checkpoint(directory)}


def _raise_eio() -> None:
    raise OSError(5, "Input/output error (test)")


def fsdp_export_full(directory: str) -> dict[str, Any]:
    """2 ranks save one sharded checkpoint for the single-process reshard test."""
    result = train(_shared("down"), 2, setup=fsdp_setup)
    return {"params": result["params"], "latest": result["latest"]}


def _shared(name: str) -> str:
    return os.path.join(os.environ["DIST_SHARED"], name)


def fsdp_reshard_up(directory: str) -> dict[str, Any]:
    """Restore, on 2 ranks, the checkpoint a 1-rank FSDP run saved (single_save)."""
    net, model, optimizer = fsdp_setup()
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=_shared("up"),
        save_checkpoint_steps=100,
        log_step_count_steps=0,
        hooks=[tch.StopAtStepHook(last_step=2)],
    ) as sess:
        restored = sess.restored_from
        global_step = sess.global_step
    return {"restored": restored, "global_step": global_step, "params": params(net)}


FSDP_SCENARIOS: list[Callable[[str], dict[str, Any]]] = [
    fsdp_reshard_up,
    fsdp_resume,
    fsdp_async_consistency,
    fsdp_corruption_and_retention,
    fsdp_rank_write_fails,
    fsdp_export_full,
]


def killed_mid_save(directory: str) -> dict[str, Any]:
    """Rank 1 dies while writing its shards of the second save (step 4)."""
    saves = [0]

    def die() -> None:
        saves[0] += 1
        os._exit(17)

    def during(step: int) -> None:
        if rank() == 1 and step == 3:
            _gate_fsync(die)

    try:
        # Blocking saves: nothing is in flight when the gate is set, so it is step 4's save.
        train(directory, 10, setup=fsdp_setup, during=during, async_save=False)
    except Exception as err:  # rank 0: the peer is gone
        return {"error": f"{type(err).__name__}: {err}", "latest": tch.latest_checkpoint(directory)}
    return {"error": None, "latest": tch.latest_checkpoint(directory)}


def single_save(directory: str) -> dict[str, Any]:
    """One rank with FSDP2 (a world of one) saves a sharded checkpoint for fsdp_reshard_up."""
    result = train(_shared("up"), 2, setup=fsdp_setup)
    return {"params": result["params"], "latest": result["latest"]}


def single_restore(directory: str) -> dict[str, Any]:
    """No process group, a plain model: restore what 2 FSDP ranks saved (fsdp_export_full)."""
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    with tch.MonitoredSession(net, optimizer, checkpoint_dir=_shared("down")) as sess:
        restored = sess.restored_from
        global_step = sess.global_step
        state = {k: v for k, v in optimizer.state_dict()["state"][0].items() if k != "step"}
    return {
        "restored": restored,
        "global_step": global_step,
        "params": params(net),
        "optimizer_keys": sorted(state),
    }


WORLDS = {
    "ddp": DDP_SCENARIOS,
    "fsdp": FSDP_SCENARIOS,
    "killed": [killed_mid_save],
    "single_save": [single_save],
    "single_restore": [single_restore],
}


def main() -> None:
    world, rank_arg, size, directory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if world == "single_restore":
        _run(world, rank_arg, directory)
        return
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(directory, 'store')}",
        rank=rank_arg,
        world_size=size,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    try:
        _run(world, rank_arg, directory)
    finally:
        if world != "killed":
            dist.destroy_process_group()


def _run(world: str, rank_arg: int, directory: str) -> None:
    for scenario in WORLDS[world]:
        out = os.path.join(directory, scenario.__name__)
        os.makedirs(out, exist_ok=True)
        work = os.path.join(out, "ckpt")
        os.makedirs(work, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        try:
            result = scenario(work)
        except BaseException:
            with open(os.path.join(out, f"error-{rank_arg}.txt"), "w") as f:
                f.write(traceback.format_exc())
            raise
        with open(os.path.join(out, f"result-{rank_arg}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
