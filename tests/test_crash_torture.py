"""Crash torture: a child trains with a checkpoint every step and is SIGKILLed at random instants.

SPEC.md §3, Commit protocol: killing the process at any instant leaves ``latest_checkpoint()``
naming a complete, loadable checkpoint (or nothing before the first commit), the state file never
names a missing file, ``max_to_keep=1`` never leaves zero intact checkpoints, and the next saver
in the directory removes the temporary files of a killed save. Integrity: a corrupted newest
checkpoint is skipped, with a warning naming it, for the newest intact one.

Each sequence kills several children one after the other in one directory, so later children
are killed while restoring, re-saving or resuming retention as well as while training. The kill
instants are drawn from seeded generators; thread scheduling still varies from run to run, which
is the point: every run tortures different instants, and every one must pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._text_format import parse_checkpoint_state

pytestmark = pytest.mark.slow

CHILD = pathlib.Path(__file__).resolve().parent / "children" / "torture_child.py"
CHILD_WIDTH = 256  # torture_child.WIDTH
TEMP_FILE = re.compile(r".+\.tmp-[0-9a-f]{32}")
CHECKPOINT_FILE = re.compile(r"model\.ckpt-([0-9]+)")
BASE_SEED = 20240605


@dataclasses.dataclass(frozen=True)
class Sequence:
    mode: str  # "hook": MonitoredSession + async CheckpointSaverHook; "saver": a bare Saver
    max_to_keep: int
    kills: int
    seed: int
    corrupt: bool = False


@dataclasses.dataclass
class Tally:
    trials: int = 0
    kills: int = 0
    commits_seen: int = 0
    killed_mid_write: int = 0  # a temporary file was left: the kill landed inside a write
    killed_before_first_commit: int = 0
    corruptions: int = 0
    restores: int = 0
    restore_attempts: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)

    def summary(self) -> str:
        return (
            f"{self.trials} trials, {self.kills} SIGKILLs ({self.killed_mid_write} left a "
            f"temporary file, {self.killed_before_first_commit} before the first commit), "
            f"{self.commits_seen} commits reported, {self.corruptions} corruptions injected, "
            f"{self.restores}/{self.restore_attempts} restores succeeded"
        )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._lock_messages = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_messages:
            self.messages.append(record.getMessage())


def _child_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh instance of the child's model, seeded differently so a restore must change it."""
    torch.manual_seed(12345)
    model = torch.nn.Sequential(
        torch.nn.Linear(CHILD_WIDTH, CHILD_WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(CHILD_WIDTH, CHILD_WIDTH),
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step_of(path: str) -> int:
    match = CHECKPOINT_FILE.fullmatch(os.path.basename(path))
    assert match is not None, f"{path} is not named model.ckpt-<step>"
    return int(match[1])


class Zygote:
    """The child process that imports torch once and forks one trainer per trial."""

    def __init__(self, stderr_path: pathlib.Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        # A hung child fails the test rather than hanging CI.
        self.watchdog = threading.Timer(300, self.proc.kill)
        self.watchdog.start()
        self._expect("zygote ready")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the child died:\n{self.stderr_path.read_text()}"
        return line.rstrip("\n")

    def _expect(self, expected: str) -> None:
        line = self._readline()
        assert expected == line, f"{line!r}:\n{self.stderr_path.read_text()}"

    def run_and_kill(self, directory: pathlib.Path, seq: Sequence, delay: float) -> list[str]:
        """Fork a trainer, SIGKILL it ``delay`` seconds after it is ready; its stdout lines."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{directory} {seq.mode} {seq.max_to_keep}\n")
        self.proc.stdin.flush()
        ready = self._readline()
        assert ready.startswith("ready "), f"{ready!r}:\n{self.stderr_path.read_text()}"
        pid = int(ready.removeprefix("ready "))
        try:
            time.sleep(delay)
        finally:
            os.kill(pid, signal.SIGKILL)
        lines = []
        while not (line := self._readline()).startswith("exit "):
            lines.append(line)
        assert f"exit {-signal.SIGKILL}" == line, (
            f"the trainer ended before it was killed:\n{self.stderr_path.read_text()}"
        )
        # The empty line before "exit", and a line cut short by the kill (never flushed whole).
        return lines[:-1]

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.watchdog.cancel()


def _draw_delay(rng: random.Random) -> float:
    # A quarter of the kills land around session creation, the restore and the first commit.
    return rng.uniform(0.0, 0.03) if rng.random() < 0.25 else rng.uniform(0.03, 0.5)


def _stray_temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if TEMP_FILE.fullmatch(name))


def _identity(path: str) -> tuple[int, int]:
    # A save replaces the file (a new inode); an inode number can be reused, a mtime_ns hardly.
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns


def _is_still_corrupted(path: str, corrupted: dict[str, tuple[int, int]]) -> bool:
    """Whether ``path`` is still the very file this test corrupted."""
    try:
        return corrupted.get(path) == _identity(path)
    except FileNotFoundError:
        return False


def _restore(path: str, step: int, tally: Tally) -> None:
    tally.add(restore_attempts=1)
    payload = tch.load_checkpoint(path)
    assert step == payload["global_step"], f"{path} holds step {payload['global_step']}"
    model, optimizer = _child_model()
    session = tch.Session(model, optimizer)
    tch.Saver().restore(session, path)
    assert step == session.global_step
    for name, tensor in model.state_dict().items():
        assert torch.equal(payload["model"][name], tensor), f"{path}: {name} not restored"
    tally.add(restores=1)


def _check_after_kill(
    directory: pathlib.Path,
    seq: Sequence,
    floor: int | None,
    corrupted: dict[str, tuple[int, int]],
    tally: Tally,
) -> tuple[list[str], int | None]:
    """Check the invariants of a directory whose writer was just killed.

    Returns the intact checkpoints the state file lists, and the newest intact checkpoint's step.
    """
    listed: list[str] = []
    state_file = directory / "checkpoint"
    if state_file.exists():
        model_path, all_paths = parse_checkpoint_state(state_file.read_text())
        named = [str(directory / p) for p in [*all_paths, model_path]]
        missing = [p for p in named if not os.path.isfile(p)]
        assert [] == missing, f"the state file names missing files:\n{state_file.read_text()}"
        assert len(all_paths) <= seq.max_to_keep, state_file.read_text()
        for path in named[:-1]:
            if _is_still_corrupted(path, corrupted):
                assert tch.verify_checkpoint(path) is not None
                continue
            payload = tch.load_checkpoint(path)
            assert _step_of(path) == payload["global_step"], path
            listed.append(path)

    latest = tch.latest_checkpoint(str(directory))
    step: int | None = None
    if floor is not None:
        assert latest is not None, "a checkpoint was committed, yet none is left"
    if latest is not None:
        if _is_still_corrupted(latest, corrupted):
            # The killed child died before its first save replaced the state file.
            assert listed, f"only the corrupted {latest} is left"
            latest = listed[-1]
        step = _step_of(latest)
        if floor is not None:
            assert step >= floor, f"step {floor} was reported committed, latest is {latest}"
        _restore(latest, step, tally)
    if seq.max_to_keep == 1 and floor is not None:
        intact = [
            name
            for name in os.listdir(directory)
            if CHECKPOINT_FILE.fullmatch(name)
            and tch.verify_checkpoint(str(directory / name)) is None
        ]
        assert intact, "max_to_keep=1 left no intact checkpoint"
    return listed, step


def _check_a_new_saver_cleans_up(directory: pathlib.Path, seq: Sequence) -> None:
    """A new saver's first save into (a copy of) the directory removes the killed save's leftovers.

    It also takes over the directory's list: the new checkpoint joins it, and what falls off
    ``max_to_keep`` is deleted.
    """
    copy = directory.parent / f"{directory.name}-copy"
    shutil.copytree(directory, copy)
    try:
        before = tch.get_checkpoint_state(str(copy))
        listed = [] if before is None else list(before.all_model_checkpoint_paths)
        step = 10**6
        session = tch.Session(torch.nn.Linear(2, 2), global_step=step)
        path = tch.Saver(max_to_keep=seq.max_to_keep).save(
            session, str(copy / "model.ckpt"), global_step=step
        )

        assert [] == _stray_temp_files(copy)
        assert path == tch.latest_checkpoint(str(copy))
        after = tch.get_checkpoint_state(str(copy))
        assert after is not None
        expected = [*listed, path][-seq.max_to_keep :]
        assert expected == list(after.all_model_checkpoint_paths)
        dropped = [p for p in listed if p not in expected]
        assert [] == [p for p in dropped if os.path.exists(p)], "retention kept dropped files"
    finally:
        shutil.rmtree(copy)


def _corrupt_newest(
    directory: pathlib.Path, listed: list[str], corrupted: dict[str, tuple[int, int]], tally: Tally
) -> int:
    """Flip a byte in the middle of the newest checkpoint; return the step restore falls back to."""
    newest, fallback = listed[-1], listed[-2]
    with open(newest, "r+b") as f:
        f.seek(os.path.getsize(newest) // 2)  # tensor data: torch.load alone would not notice
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    corrupted[newest] = _identity(newest)
    tally.add(corruptions=1)
    assert tch.verify_checkpoint(newest) is not None
    with pytest.raises(tch.CheckpointCorruptedError, match=re.escape(newest)):
        tch.load_checkpoint(newest)

    # Session creation skips it, names it in a warning, and restores the one before.
    records = _Records()
    package_logger = logging.getLogger("torch_ckpt_hook")
    package_logger.addHandler(records)
    tally.add(restore_attempts=1)
    try:
        model, optimizer = _child_model()
        with tch.MonitoredSession(model, optimizer, checkpoint_dir=str(directory)) as sess:
            assert _step_of(fallback) == sess.global_step
    finally:
        package_logger.removeHandler(records)
    assert any(newest in message for message in records.messages), records.messages
    tally.add(restores=1)
    return _step_of(fallback)


def _torture(
    tmp_path: pathlib.Path, index: int, seq: Sequence, zygote: Zygote, tally: Tally
) -> None:
    rng = random.Random(seq.seed)
    directory = tmp_path / f"seq{index}"
    directory.mkdir()
    floor: int | None = None  # the newest step a child reported committed (must survive)
    expected_start: int | None = None  # the step the next child must restore
    corrupted: dict[str, tuple[int, int]] = {}
    for _ in range(seq.kills):
        lines = zygote.run_and_kill(directory, seq, _draw_delay(rng))
        tally.add(trials=1, kills=1)
        starts = [int(line.split()[1]) for line in lines if line.startswith("start ")]
        commits = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
        tally.add(commits_seen=len(commits))
        if floor is None and not commits:
            tally.add(killed_before_first_commit=1)
        if starts and expected_start is not None:
            assert expected_start == starts[0], f"the child restored step {starts[0]}"
        if commits:
            floor = max(commits)
        if _stray_temp_files(directory):
            tally.add(killed_mid_write=1)
        listed, expected_start = _check_after_kill(directory, seq, floor, corrupted, tally)
        _check_a_new_saver_cleans_up(directory, seq)
        if seq.corrupt and len(listed) >= 2 and not _is_still_corrupted(listed[-1], corrupted):
            floor = expected_start = _corrupt_newest(directory, listed, corrupted, tally)


def _run_sequences(tmp_path: pathlib.Path, sequences: list[Sequence]) -> Tally:
    """Run the sequences on two zygotes side by side (the CI machine has two cores)."""
    tally = Tally()

    def worker(first: int) -> None:
        zygote = Zygote(tmp_path / f"zygote{first}.stderr")
        try:
            for index in range(first, len(sequences), 2):
                _torture(tmp_path, index, sequences[index], zygote, tally)
        finally:
            zygote.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(worker, first) for first in (0, 1)]:
            future.result()
    return tally


def test_sigkill_at_random_instants_never_loses_or_breaks_a_committed_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    sequences = [
        *(Sequence("hook", max_to_keep=1, kills=3, seed=BASE_SEED + i) for i in range(4)),
        *(Sequence("hook", max_to_keep=5, kills=3, seed=BASE_SEED + 10 + i) for i in range(3)),
        *(Sequence("saver", max_to_keep=1, kills=3, seed=BASE_SEED + 20 + i) for i in range(2)),
    ]

    tally = _run_sequences(tmp_path, sequences)

    print(f"crash torture: {tally.summary()}")
    assert 27 == tally.trials == tally.kills
    assert tally.restore_attempts == tally.restores
    assert tally.restores > 0, "no kill landed after a commit: the torture proved nothing"


def test_sigkill_then_a_flipped_byte_falls_back_to_the_previous_intact_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    sequences = [
        Sequence("hook", max_to_keep=5, kills=4, seed=BASE_SEED + 30 + i, corrupt=True)
        for i in range(3)
    ]

    tally = _run_sequences(tmp_path, sequences)

    print(f"crash torture with corruption: {tally.summary()}")
    assert 12 == tally.trials == tally.kills
    assert tally.restore_attempts == tally.restores
    assert tally.corruptions > 0, "no corruption was injected: the test proved nothing"
