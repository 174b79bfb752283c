"""Distributed training on CPU with gloo, 2 processes (SPEC.md sections 3 "Distributed", 5.2).

The ranks are ``tests/children/dist_worker.py`` processes meeting through a FileStore. Each
world runs several scenarios in one process start (torch's import dominates the time); every
join has a timeout and the collectives time out after 30 s, so a failing child never hangs the
test. The worlds run once per module; each test asserts on the results one scenario wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "children" / "dist_worker.py"
WORLD_TIMEOUT = 150.0

pytestmark = pytest.mark.slow


class Worlds:
    """Runs the worker's worlds and reads what their scenarios wrote."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.shared = base / "shared"
        self.shared.mkdir()
        self.outcome: dict[str, str] = {}

    def run(self, world: str, size: int) -> None:
        directory = self.base / world
        directory.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DIST_SHARED": str(self.shared)}
        procs = []
        logs = []
        for rank in range(size):
            log = open(directory / f"out-{rank}.txt", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            args = [sys.executable, str(WORKER), world, str(rank), str(size), str(directory)]
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = []
        try:
            for proc in procs:
                try:
                    codes.append(proc.wait(timeout=WORLD_TIMEOUT))
                except subprocess.TimeoutExpired:
                    codes.append(None)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
            for log in logs:
                log.close()
        self.outcome[world] = f"exit codes {codes}"

    def results(self, world: str, scenario: str, size: int = 2) -> list[dict[str, Any]]:
        out = self.base / world / scenario
        results = []
        for rank in range(size):
            path = out / f"result-{rank}.json"
            if not path.exists():
                logs = "\n".join(
                    (self.base / world / f"out-{r}.txt").read_text()[-4000:] for r in range(size)
                )
                errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
                pytest.fail(
                    f"{world}/{scenario} wrote no result for rank {rank} "
                    f"({self.outcome.get(world)}):\n{errors}\n{logs}"
                )
            results.append(json.loads(path.read_text()))
        return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Worlds:
    runner = Worlds(tmp_path_factory.mktemp("dist"))
    # In this order: single_save writes what fsdp restores on 2 ranks; fsdp writes what
    # single_restore restores in one process.
    runner.run("single_save", 1)
    runner.run("fsdp", 2)
    runner.run("single_restore", 1)
    runner.run("ddp", 2)
    runner.run("killed", 2)
    return runner


def _assert_same(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


# -- replicated models (DDP) -----------------------------------------------------------------


def test_ddp_exact_resume_with_per_rank_rng_and_state(worlds: Worlds) -> None:
    results = worlds.results("ddp", "ddp_resume")
    for rank, result in enumerate(results):
        first, resumed, straight = result["first"], result["resumed"], result["straight"]
        assert first["final"] == 4
        assert first["restored"] is None
        assert resumed["restored"].endswith("model.ckpt-4")
        assert resumed["final"] == straight["final"] == 8
        # Bit-identical parameters and RNG streams: each rank's dropout stream was its own.
        _assert_same(resumed["params"], straight["params"])
        assert resumed["rng"] == straight["rng"]
        # rank_state: the counter of this rank came back (saved inside step 4: 3 increments).
        per_step = 1 + 100 * rank
        assert resumed["counter"] == 3 * per_step + 4 * per_step
    # DDP keeps the replicas equal; the ranks' RNG streams stay different.
    _assert_same(results[0]["resumed"]["params"], results[1]["resumed"]["params"])
    assert results[0]["resumed"]["rng"] != results[1]["resumed"]["rng"]
    payload = results[0]["payload"]
    assert payload["model_keys"] == ["first.bias", "first.weight", "second.bias", "second.weight"]
    assert {"rank_rng", "rank_state", "rng"} <= set(payload["keys"])
    assert payload["rank_rng_len"] == 2
    assert payload["rng_is_chiefs"]
    assert payload["ranks_differ"]
    assert payload["rank_state"] == [{"counter": {"seen": 3}}, {"counter": {"seen": 303}}]


def test_skewed_clocks_follow_the_chiefs_decision(worlds: Worlds) -> None:
    results = worlds.results("ddp", "skewed_clocks")
    # The chief's clock: 7 s a step, save_secs=20: steps 3, 6, 9 (and 0 at creation). Rank 1's
    # clock runs 100 times faster and would have saved at every step.
    assert results[0]["saved"] == results[1]["saved"] == [0, 3, 6, 9]
    assert results[0]["latest"] == results[1]["latest"]


@pytest.mark.parametrize("scenario", ["stop_on_one_rank", "sigterm_on_one_rank"])
def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(
    worlds: Worlds, scenario: str
) -> None:
    results = worlds.results("ddp", scenario)
    assert [r["final"] for r in results] == [3, 3]
    for result in results:
        assert result["latest"].endswith("model.ckpt-3")  # the final checkpoint is that step's
        assert result["files"] == ["checkpoint", "model.ckpt-0", "model.ckpt-3"]


def test_a_failed_write_fails_the_save_on_every_rank(worlds: Worlds) -> None:
    for result in worlds.results("ddp", "chief_write_fails"):
        assert result["outcomes"][0] == "committed"
        assert result["outcomes"][1].startswith("failed:")
        assert "rank 0: OSError" in result["outcomes"][1]
        assert result["latest"].endswith("model.ckpt-1")


def test_a_best_checkpoint_hook_on_the_chief_saves_alone(worlds: Worlds) -> None:
    results = worlds.results("ddp", "best_on_the_chief")
    assert [r["final"] for r in results] == [4, 4]
    assert results[0]["best"] is not None
    assert "best.ckpt-" in results[0]["best"]
    assert results[0]["latest"].endswith("model.ckpt-4")


# -- sharded models (FSDP2) ------------------------------------------------------------------


def test_fsdp_save_restore_and_exact_resume(worlds: Worlds) -> None:
    for result in worlds.results("fsdp", "fsdp_resume"):
        assert result["is_dir"]
        assert result["dir_files"] == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "payload.pt",
            "torch_ckpt_manifest.json",
        ]
        resumed, straight = result["resumed"], result["straight"]
        assert resumed["restored"].endswith("model.ckpt-4")
        assert resumed["final"] == straight["final"] == 8
        _assert_same(resumed["params"], straight["params"])
        assert resumed["rng"] == straight["rng"]


def test_fsdp_async_save_holds_the_save_steps_state(worlds: Worlds) -> None:
    for result in worlds.results("fsdp", "fsdp_async_consistency"):
        # Every shard was overwritten with 123 while the write was held; the checkpoint still
        # holds the state of the saving step.
        _assert_same(result["restored"], result["expected"])
        assert all(123.0 not in values for values in result["restored"].values())


def test_fsdp_corrupted_shard_falls_back_to_the_previous_checkpoint(worlds: Worlds) -> None:
    results = worlds.results("fsdp", "fsdp_corruption_and_retention")
    for result in results:
        assert result["restored"].endswith("model.ckpt-4")
        assert result["global_step"] == 4
    assert any(
        "Skipping checkpoint" in w and "model.ckpt-6" in w and "__1_0.distcp" in w
        for w in results[0]["warnings"]
    )


def test_fsdp_retention_deletes_whole_directories(worlds: Worlds) -> None:
    result = worlds.results("fsdp", "fsdp_corruption_and_retention")[0]
    assert result["listed"] == ["model.ckpt-4", "model.ckpt-6"]
    assert result["listing"] == ["checkpoint", "model.ckpt-4", "model.ckpt-6"]


def test_fsdp_a_rank_that_fails_to_write_fails_the_save_everywhere(worlds: Worlds) -> None:
    for result in worlds.results("fsdp", "fsdp_rank_write_fails"):
        assert result["outcomes"][0] == "committed"
        assert result["outcomes"][1].startswith("failed:")
        assert "Input/output error (test)" in result["outcomes"][1]
        assert result["latest"].endswith("model.ckpt-1")


def test_reshard_two_ranks_to_one_process(worlds: Worlds) -> None:
    saved = worlds.results("fsdp", "fsdp_export_full")[0]
    restored = worlds.results("single_restore", "single_restore", size=1)[0]
    assert restored["restored"] == saved["latest"]
    assert restored["global_step"] == 2
    _assert_same(restored["params"], saved["params"])
    assert restored["optimizer_keys"] == ["exp_avg", "exp_avg_sq"]


def test_reshard_one_rank_to_two(worlds: Worlds) -> None:
    saved = worlds.results("single_save", "single_save", size=1)[0]
    for result in worlds.results("fsdp", "fsdp_reshard_up"):
        assert result["restored"] == saved["latest"]
        assert result["global_step"] == 2
        _assert_same(result["params"], saved["params"])


# -- faults ----------------------------------------------------------------------------------


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_latest(worlds: Worlds) -> None:
    assert "17" in worlds.outcome["killed"]  # rank 1's exit code: it died in the save
    survivor = worlds.results("killed", "killed_mid_save", size=1)[0]
    assert survivor["error"] is not None
    assert survivor["latest"].endswith("model.ckpt-2")
    ckpt = worlds.base / "killed" / "killed_mid_save" / "ckpt"
    assert not (ckpt / "model.ckpt-4").exists()


# -- the torchrun example --------------------------------------------------------------------


def test_torchrun_example_trains_with_fsdp_on_two_ranks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_CKPT_HOOK_DIST_TIMEOUT_SECS": "30"}
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "torchrun_ddp.py"),
        "--dir",
        str(tmp_path),
        "--steps",
        "6",
        "--save-steps",
        "3",
        "--fsdp",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=WORLD_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "global step 6, loss " in done.stdout
    assert done.stdout.strip().endswith(f"latest {tmp_path / 'model.ckpt-6'}")
    assert (tmp_path / "model.ckpt-6" / "torch_ckpt_manifest.json").is_file()
