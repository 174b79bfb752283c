"""The ``torch-ckpt`` subcommands: ``ls``, ``inspect``, ``verify``, ``export`` and ``demo``.

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

from ._checkpoint_dir import RestoreChoice, latest_checkpoint, restore_choice
from ._checkpoint_file import check_checkpoint, load_checkpoint
from ._cli_demo import (
    DEFAULT_SAVE_EVERY,
    Batches,
    DemoError,
    batch_for_step,
    demo_logging,
    run_demo,
)
from ._cli_format import (
    count,
    human_bytes,
    local_time,
    print_fields,
    print_json,
    print_table,
    printable,
)
from ._cli_inspection import build_document, value_text
from ._cli_inventory import (
    BEST_STATE_FILENAME,
    Inventory,
    Listed,
    checkpoint_paths,
    display_name,
    list_checkpoints,
)
from ._cli_remote import mirror_summary
from ._errors import CheckpointError, NanLossDuringTrainingError
from ._integrity import ProblemKind
from ._sharded_read import is_sharded_checkpoint, load_directory

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
    inventory = list_checkpoints(directory)
    listed, best, choice = inventory.listed, inventory.best, inventory.choice
    if as_json:
        print_json(
            {
                "directory": printable(os.path.abspath(directory)),
                "latest": next((item.path for item in listed if item.latest), None),
                "restore": next((item.path for item in [*listed, *best] if item.restore), None),
                "restore_blocked_by": (
                    None
                    if choice.blocked_by is None
                    else printable(os.path.abspath(choice.blocked_by[0]))
                ),
                "checkpoints": [dataclasses.asdict(item) for item in listed],
                "best_checkpoints": _best_json(inventory) if best else None,
                # Only for a directory with a mirror tier (its status file).
                **({"mirror": mirror} if (mirror := mirror_summary(directory)[1]) else {}),
            }
        )
        return EXIT_OK
    if not listed and not best:
        print(f"No checkpoints in {printable(directory)}")
        return EXIT_OK
    if listed:
        table = [["NAME", "STEP", "SIZE", "SAVED", "LATEST", "RESTORE", "INTEGRITY"]]
        for item in listed:
            table.append(
                [
                    *_common_cells(item)[:4],
                    "latest" if item.latest else "",
                    "restore" if item.restore else "",
                    _integrity(item),
                ]
            )
        print_table(table, right_aligned={1, 2})
        print(_summary(listed, "checkpoint"))
    else:
        print(f"No regular checkpoints in {printable(directory)}")
    if best:
        print()
        _print_best(inventory)
    outcome = _restore_outcome(directory, listed, choice, best)
    if outcome is not None:
        print(outcome)
    mirror_line = mirror_summary(directory)[0]
    if mirror_line is not None:
        print(mirror_line)
    return EXIT_OK


def _common_cells(item: Listed) -> list[str]:
    return [
        item.name,
        "-" if item.step is None else str(item.step),
        "-" if item.size_bytes is None else human_bytes(item.size_bytes),
        "-" if item.mtime is None else local_time(item.mtime),
    ]


def _summary(listed: list[Listed], noun: str) -> str:
    summary = f"{count(len(listed), noun)}, "
    summary += human_bytes(sum(item.size_bytes or 0 for item in listed))
    for kind, (one, many) in _KIND_COUNTS.items():
        n = sum(item.kind == kind for item in listed)
        if n:
            summary += f", {n} {one if n == 1 else many}"
    return summary


def _print_best(inventory: Inventory) -> None:
    """The best checkpoints: their own table, the best marked, each one's metrics."""
    best = inventory.best
    restore = any(item.restore for item in best)  # only when no regular checkpoint is left
    print(f"Best checkpoints ({BEST_STATE_FILENAME}):")
    table = [["NAME", "STEP", "SIZE", "SAVED", "BEST", *(["RESTORE"] * restore)]]
    table[0] += ["METRICS", "INTEGRITY"]
    for item in best:
        metrics = inventory.metrics[item.path]
        table.append(
            [
                *_common_cells(item),
                "best" if item.latest else "",
                *(["restore" if item.restore else ""] * restore),
                "-" if metrics is None else metrics_text(metrics) or "-",
                _integrity(item),
            ]
        )
    print_table(table, right_aligned={1, 2})
    summary = _summary(best, "best checkpoint")
    the_best = next((item for item in best if item.latest), None)
    if the_best is not None:
        metrics = inventory.metrics[the_best.path]
        summary += f"; the best: {the_best.name}"
        summary += f" ({metrics_text(metrics)})" if metrics else ""
    print(summary)


def _best_json(inventory: Inventory) -> dict[str, Any]:
    the_best = next((item for item in inventory.best if item.latest), None)
    checkpoints = []
    for item in inventory.best:
        fields = dataclasses.asdict(item)
        fields["best"] = fields.pop("latest")
        fields["metrics"] = inventory.metrics[item.path]
        checkpoints.append(fields)
    return {
        "state_file": BEST_STATE_FILENAME,
        "best": None if the_best is None else the_best.path,
        "metrics": None if the_best is None else inventory.metrics[the_best.path],
        "checkpoints": checkpoints,
    }


# How ls's summary line counts the checkpoints of each problem kind (one, several).
_KIND_COUNTS: dict[ProblemKind, tuple[str, str]] = {
    "corrupted": ("corrupted", "corrupted"),
    "unloadable": ("unloadable", "unloadable"),
    "unreadable": ("unreadable", "unreadable"),
    "not_a_file": ("not a regular file", "not regular files"),
}

# A problem's label where ls and verify show it. Only damage is shouted: a user deletes what is
# called corrupted, and an unloadable file (no checksum) may be a run's only copy of its state.
_LABELS: dict[ProblemKind, str] = {
    "corrupted": "CORRUPTED",
    "unloadable": "unloadable",
    "unreadable": "unreadable",
    "not_a_file": "not-a-file",
}

# What the user can do about an unloadable file, from the command line.
_UNLOADABLE_HINT = "'torch-ckpt inspect --no-verify' loads it if you trust it"


def _either(words: list[str]) -> str:
    """``"a, b or c"``."""
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 2 else words)


def _problem_text(kind: ProblemKind, message: str) -> str:
    """A problem as ls shows it: its label, then what it is and what to do."""
    return f"{_LABELS[kind]}: {_detail(kind, message)}"


def _detail(kind: ProblemKind, message: str) -> str:
    """A problem's message without the cause its label already says, and what to do about it."""
    if kind == "unloadable":
        return f"{message}; {_UNLOADABLE_HINT}"
    # check_checkpoint's messages of these kinds lead with the cause the label names.
    return message.removeprefix("unreadable: ").removeprefix("not a regular file: ")


def _integrity(item: Listed) -> str:
    if item.kind is None or item.problem is None:
        return "ok"
    return _problem_text(item.kind, item.problem)


def _restore_outcome(
    directory: str, listed: list[Listed], choice: RestoreChoice, best: list[Listed] | None = None
) -> str | None:
    """The line that says what a new session does, when that is not restoring the latest.

    ``best`` holds the best checkpoints: never the latest, but what a session restores when it
    falls back to the files on disk.
    """
    latest = next((item for item in listed if item.latest), None)
    if choice.blocked_by is not None:
        path, problem = choice.blocked_by
        return (
            f"A new session refuses to start: it stops at {display_name(directory, path)} "
            f"({_problem_text(problem.kind, printable(problem.message))}) rather than restore "
            "an older checkpoint or train from step 0."
        )
    if choice.path is None and choice.skipped:
        # SPEC 5.1: a directory that holds checkpoints, none of them restorable, is not a
        # directory to start over in.
        kinds = {problem.kind for _path, problem in choice.skipped}
        what = _either([_KIND_COUNTS[kind][0] for kind in _KIND_COUNTS if kind in kinds])
        return (
            f"A new session refuses to start: every checkpoint it would restore is {what}, and "
            "it does not train from step 0 over them."
        )
    if latest is not None and not latest.intact:
        restore = next((item for item in [*listed, *(best or [])] if item.restore), None)
        return (
            f"A new session skips the latest, {latest.name}, and restores "
            f"{'nothing' if restore is None else restore.name}."
        )
    return None


# ---------------------------------------------------------------------------------------------
# inspect


def inspect(path: str, *, as_json: bool, verify: bool = True) -> int:
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        path = checkpoint_to_inspect(path)
    try:
        if is_sharded_checkpoint(path):
            # Shapes and dtypes from the DCP metadata: no tensor is read (a model may not fit).
            payload = load_directory(path, verify=verify, outline=True)
        else:
            payload = load_checkpoint(path, verify=verify)
    except (CheckpointError, ValueError) as err:
        raise CommandFailed(printable(str(err))) from err
    document = build_document(path, payload)
    if as_json:
        print_json(document)
    else:
        _print_inspection(document)
    return EXIT_OK


def checkpoint_to_inspect(directory: str, command: str = "inspect") -> str:
    """The checkpoint a new session restores; a warning names the newer ones it passes over.

    When restore stops at an unloadable or unreadable checkpoint, that one is shown (``--no-verify``
    loads one without a checksum), or its error reported. When none is left, the latest is
    loaded, and its error reported.
    """
    choice = restore_choice(directory)
    newer = _newer_ones(directory, choice)
    if choice.blocked_by is not None:
        path, problem = choice.blocked_by
        sys.stderr.write(
            f"{PROG} {command}: warning: a new session refuses to start: it stops at "
            f"{display_name(directory, path)} "
            f"({_problem_text(problem.kind, printable(problem.message))})"
            f"{'; ' + newer if newer else ''}\n"
        )
        return path
    if choice.path is None:
        latest = latest_checkpoint(directory)
        if latest is None:
            raise CommandFailed(f"no checkpoint in directory '{printable(directory)}'")
        return latest  # none is intact: loading the latest reports what is wrong with it
    if newer:
        sys.stderr.write(
            f"{PROG} {command}: warning: "
            f"{'showing' if command == 'inspect' else 'exporting'} "
            f"{display_name(directory, choice.path)}, the "
            f"checkpoint a new session restores; {newer}\n"
        )
    return choice.path


def _newer_ones(directory: str, choice: RestoreChoice) -> str:
    """ "newer ones are corrupted (NAME: PROBLEM; ...)" for the ones restore skips, or ""."""
    if not choice.skipped:
        return ""
    kinds = {problem.kind for _path, problem in choice.skipped}
    what = _either([_KIND_COUNTS[kind][1] for kind in _KIND_COUNTS if kind in kinds])
    listed = "; ".join(
        f"{display_name(directory, path)}: {printable(problem.message)}"
        for path, problem in choice.skipped
    )
    return f"newer ones are {what} ({listed})"


def _print_inspection(doc: Mapping[str, Any]) -> None:
    optimizer = doc["optimizer"]
    if isinstance(optimizer, list):  # several optimizers (a GAN's two), one line each
        optimizers = [(f"Optimizer {i}", _optimizer_line(o)) for i, o in enumerate(optimizer)]
    else:
        optimizers = [("Optimizer", _optimizer_line(optimizer))]
    metrics = doc["metrics"]
    print_fields(
        [
            ("Checkpoint", doc["path"]),
            ("File size", human_bytes(doc["size_bytes"])),
            ("Global step", printable(str(doc["global_step"]))),
            ("Format", printable(str(doc["format_version"]))),
            ("Payload keys", ", ".join(doc["payload_keys"])),
            *optimizers,
            ("Extra state", ", ".join(doc["extra_state"]) or "none"),
            *([] if metrics is None else [("Metrics", metrics_text(metrics) or "none")]),
            ("RNG states", ", ".join(doc["rng_states"]) or "none"),
            *[("Problem", problem) for problem in doc["problems"]],
        ]
    )
    print()
    values = doc["values"]
    if values:
        table = [["VALUE", "TYPE", "CONTENT"]]
        for value in values[:_VALUE_ROWS]:
            table.append([value["name"], value["type"], value_text(value)])
        print_table(table)
        if len(values) > _VALUE_ROWS:
            more = len(values) - _VALUE_ROWS
            print(f"... and {count(more, 'more value')}; --json lists them all")
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


# The values inspect's text lists; --json lists every one.
_VALUE_ROWS = 100


def metrics_text(metrics: Mapping[str, Any]) -> str:
    """``val_loss 0.2314, accuracy 0.91``: a best checkpoint's metrics on one line."""
    return ", ".join(
        f"{name} {value:.6g}" if isinstance(value, float) else f"{name} {printable(repr(value))}"
        for name, value in metrics.items()
    )


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
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise CommandFailed(f"no checkpoints in {printable(path)}: nothing to verify")
        names = [display_name(path, p) for p in paths]
    else:
        paths, names = [path], [printable(path)]
    bad: list[str] = []
    kinds: set[ProblemKind] = set()
    table = []
    for name, p in zip(names, paths, strict=True):
        problem = check_checkpoint(p)
        if problem is None:
            table.append(["ok", name])
            continue
        bad.append(name)
        kinds.add(problem.kind)
        table.append([_LABELS[problem.kind], f"{name}: {_detail(problem.kind, problem.message)}"])
    print_table([[status, printable(text)] for status, text in table])
    if bad:
        several = len(bad) > 1
        what = _either([_KIND_COUNTS[kind][several] for kind in _KIND_COUNTS if kind in kinds])
        raise CommandFailed(
            f"{len(bad)} of {count(len(paths), 'checkpoint')} {what}: {', '.join(bad)}"
        )
    print(f"{count(len(paths), 'checkpoint')} intact")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# demo


def demo(directory: str, steps: int, save_every: int, *, batches: Batches = batch_for_step) -> int:
    with demo_logging(sys.stderr):
        try:
            result = run_demo(
                directory, steps, save_every=save_every, out=sys.stdout, batches=batches
            )
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
