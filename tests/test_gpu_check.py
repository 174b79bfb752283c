"""benchmarks/gpu_check.py in its CPU mode: the GPU proof's code path runs, and says it skipped.

On a machine with CUDA the same script measures the GPU; here (and in CI) it must still run end
to end at a tiny size, write its report, and say plainly that no GPU was measured.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "peers",
    [
        pytest.param(False, id="package-only"),
        # torch.save, DCP and Lightning too: their imports alone take seconds.
        pytest.param(True, id="with-peers", marks=pytest.mark.slow),
    ],
)
def test_gpu_check_runs_in_cpu_mode_and_says_it_skipped_the_gpu(
    tmp_path: pathlib.Path, peers: bool
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_check.py"),
        "--cpu",
        "--skip-tests",
        "--sizes",
        "0.001",
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "results"),
        "--dir",
        str(tmp_path),
        "--peer-max-gb",
        "1" if peers else "0",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert 0 == done.returncode, done.stdout[-2000:] + done.stderr[-4000:]
    reports = sorted((tmp_path / "results").glob("*-gpu-*.json"))
    assert 1 == len(reports), sorted(p.name for p in (tmp_path / "results").iterdir())
    report = json.loads(reports[0].read_text())
    assert "--cpu given" == report["info"]["gpu_skipped"]
    assert report["consistency"]["consistent"], report["consistency"]["mismatched"]
    [size] = report["sizes"]
    ours = size["systems"]["torch_ckpt_hook Saver"]
    assert {"block_ms", "stall_ms", "save_step", "next_step", "durable_s", "syncs"} <= set(ours)
    assert size["pinned_floor"]["gbps"] > 0
    if peers:
        assert isinstance(size["systems"]["torch.save + fsync"], dict)
        assert isinstance(size["systems"]["DCP async_save (pinned DefaultStager)"], dict)
    markdown = reports[0].with_suffix(".md").read_text()
    assert "**GPU skipped: --cpu given.**" in markdown
    assert "## Consistency under BatchNorm and AMP" in markdown
