"""The ``torch-ckpt`` subcommands: ``ls``, ``inspect``, ``verify`` and ``demo``.

Each prints its result on stdout and returns the exit status, or raises ``CommandFailed`` with
the one line ``main`` reports on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from ._checkpoint_file import load_checkpoint
from ._cli_format import (
    count,
    human_bytes,
    local_time,
    print_fields,
    print_json,
    print_table,
    printable,
)
from ._demo import DEFAULT_SAVE_EVERY, DemoError, demo_logging, run_demo
from ._errors import CheckpointError, NanLossDuringTrainingError
from ._inspection import build_document
from ._inventory import (
    Listed,
    checkpoint_paths,
    display_name,
    list_checkpoints,
    problem_of,
    restore_choice,
)
from ._state_file import latest_checkpoint

PROG = "torch-ckpt"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandFailed(Exception):
    """A command's failure, reported by ``main`` as one line: ``torch-ckpt CMD: error: ...``."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# ls


def ls(directory: str, *, as_json: bool) -> int:
    listed = list_checkpoints(directory)
    if as_json:
        print_json(
            {
                "directory": printable(os.path.abspath(directory)),
                "latest": next((item.path for item in listed if item.latest), None),
                "restore": next((item.path for item in listed if item.restore), None),
                "checkpoints": [dataclasses.asdict(item) for item in listed],
            }
        )
        return EXIT_OK
    if not listed:
        print(f"No checkpoints in {printable(directory)}")
        return EXIT_OK
    table = [["NAME", "STEP", "SIZE", "SAVED", "LATEST", "RESTORE", "INTEGRITY"]]
    for item in listed:
        table.append(
            [
                item.name,
                "-" if item.step is None else str(item.step),
                "-" if item.size_bytes is None else human_bytes(item.size_bytes),
                "-" if item.mtime is None else local_time(item.mtime),
                "latest" if item.latest else "",
                "restore" if item.restore else "",
                _integrity(item),
            ]
        )
    print_table(table, right_aligned={1, 2})
    summary = f"{count(len(listed), 'checkpoint')}, "
    summary += human_bytes(sum(item.size_bytes or 0 for item in listed))
    unreadable = sum(item.unreadable for item in listed)
    corrupted = sum(not item.intact for item in listed) - unreadable
    if corrupted:
        summary += f", {corrupted} corrupted"
    if unreadable:
        summary += f", {unreadable} unreadable"
    print(summary)
    restore = next((item for item in listed if item.restore), None)
    latest = next((item for item in listed if item.latest), None)
    if latest is not None and not latest.intact:
        print(
            f"A new session skips the latest, {latest.name}, and restores "
            f"{'nothing' if restore is None else restore.name}."
        )
    return EXIT_OK


def _integrity(item: Listed) -> str:
    if item.intact:
        return "ok"
    if item.unreadable:
        return str(item.problem)
    return f"CORRUPTED: {item.problem}"


# ---------------------------------------------------------------------------------------------
# inspect


def inspect(path: str, *, as_json: bool) -> int:
    if os.path.isdir(path):
        path = _checkpoint_to_inspect(path)
    try:
        payload = load_checkpoint(path)
    except (CheckpointError, ValueError) as err:
        raise CommandFailed(printable(str(err))) from err
    document = build_document(path, payload)
    if as_json:
        print_json(document)
    else:
        _print_inspection(document)
    return EXIT_OK


def _checkpoint_to_inspect(directory: str) -> str:
    """The checkpoint a new session restores; a warning names the corrupted newer ones."""
    restore, skipped = restore_choice(directory)
    if restore is None:
        latest = latest_checkpoint(directory)
        if latest is None:
            raise CommandFailed(f"no checkpoint in directory '{printable(directory)}'")
        return latest  # none is intact: loading the latest reports what is wrong with it
    if skipped:
        newer = "; ".join(
            f"{display_name(directory, path)}: {printable(problem)}" for path, problem in skipped
        )
        sys.stderr.write(
            f"{PROG} inspect: warning: showing {display_name(directory, restore)}, the checkpoint "
            f"a new session restores; newer ones are corrupted ({newer})\n"
        )
    return restore


def _print_inspection(doc: Mapping[str, Any]) -> None:
    print_fields(
        [
            ("Checkpoint", doc["path"]),
            ("File size", human_bytes(doc["size_bytes"])),
            ("Global step", printable(str(doc["global_step"]))),
            ("Format", printable(str(doc["format_version"]))),
            ("Payload keys", ", ".join(doc["payload_keys"])),
            ("Optimizer", _optimizer_line(doc["optimizer"])),
            ("Extra state", ", ".join(doc["extra_state"]) or "none"),
            ("RNG states", ", ".join(doc["rng_states"]) or "none"),
            *[("Problem", problem) for problem in doc["problems"]],
        ]
    )
    print()
    table = [["TENSOR", "SHAPE", "DTYPE", "BYTES"]]
    for tensor in doc["tensors"]:
        shape = "[" + ", ".join(map(str, tensor["shape"])) + "]"
        dtype = tensor["dtype"]
        if tensor["layout"] != "strided":
            dtype += f" ({tensor['layout']})"
        table.append([tensor["name"], shape, dtype, human_bytes(tensor["bytes"])])
    print_table(table, right_aligned={3})
    print()
    totals = [["PART", "TENSORS", "ELEMENTS", "BYTES"]]
    parts = {part: total for part, total in doc["totals"].items() if part != "all"}
    parts["total"] = doc["totals"].get("all", {"tensors": 0, "elements": 0, "bytes": 0})
    for part, total in parts.items():
        totals.append(
            [
                part,
                str(total["tensors"]),
                f"{total['elements']:,}",
                human_bytes(total["bytes"]),
            ]
        )
    print_table(totals, right_aligned={1, 2, 3})


def _optimizer_line(optimizer: Mapping[str, Any] | None) -> str:
    if optimizer is None:
        return "none"
    line = (
        f"{optimizer['type']} (inferred from its param groups), "
        f"{count(optimizer['param_groups'], 'param group')}"
    )
    if optimizer["lr"] is not None:
        line += f", lr {optimizer['lr']:g}"
    with_state = optimizer["parameters_with_state"]
    return line + (f", state for {count(with_state, 'parameter')}" if with_state else ", no state")


# ---------------------------------------------------------------------------------------------
# verify


def verify(path: str) -> int:
    if os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise CommandFailed(f"no checkpoints in {printable(path)}: nothing to verify")
        names = [display_name(path, p) for p in paths]
    else:
        paths, names = [path], [printable(path)]
    failed: dict[str, list[str]] = {"corrupted": [], "unreadable": []}
    table = []
    for name, p in zip(names, paths, strict=True):
        problem = problem_of(p)
        if problem is None:
            table.append(["ok", name])
            continue
        verdict = "unreadable" if problem.startswith("unreadable") else "corrupted"
        failed[verdict].append(name)
        detail = problem.removeprefix("unreadable: ")
        table.append([verdict if verdict == "unreadable" else "CORRUPTED", f"{name}: {detail}"])
    print_table([[status, printable(text)] for status, text in table])
    bad = failed["corrupted"] + failed["unreadable"]
    if bad:
        what = " or ".join(verdict for verdict, names in failed.items() if names)
        raise CommandFailed(
            f"{len(bad)} of {count(len(paths), 'checkpoint')} {what}: {', '.join(bad)}"
        )
    print(f"{count(len(paths), 'checkpoint')} intact")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# demo


def demo(directory: str, steps: int, save_every: int) -> int:
    with demo_logging(sys.stderr):
        try:
            result = run_demo(directory, steps, save_every=save_every, out=sys.stdout)
        except (DemoError, NanLossDuringTrainingError, CheckpointError, OSError, ValueError) as err:
            raise CommandFailed(printable(str(err))) from err
    command = f"{PROG} demo --dir {shlex.quote(printable(directory))}"
    if save_every != DEFAULT_SAVE_EVERY:
        command += f" --save-every {save_every}"
    if result.final_step < steps:  # stopped early (Ctrl-C): the same command resumes
        hint = f"'{command} --steps {steps}' resumes and trains to step {steps}."
    else:
        more = result.final_step + 100
        hint = f"'{command} --steps {more}' resumes and trains 100 more steps."
    print(f"Next: '{PROG} ls {shlex.quote(printable(directory))}' lists the checkpoints; {hint}")
    return EXIT_OK
