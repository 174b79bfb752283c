"""The ``torch-ckpt`` command: list, inspect and verify checkpoints, and run the demo.

Exit status: 0 on success; 1 when a checkpoint is corrupted (``verify``, ``inspect``), ``verify``
found nothing to verify, or the demo failed; 2 for bad arguments or a missing path, reported in
one line on stderr, never with a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect as pyinspect
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch

from . import __version__
from ._checkpoint_file import load_checkpoint, verify_checkpoint
from ._demo import DEFAULT_DIR, DEFAULT_SAVE_EVERY, DEFAULT_STEPS, demo_logging, run_demo
from ._errors import CheckpointError
from ._fsutil import is_temp_file, path_key, same_path
from ._state_file import STATE_FILENAME, find_checkpoints, get_checkpoint_state, latest_checkpoint

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PROG = "torch-ckpt"

_STEP_SUFFIX = re.compile(r"(?P<prefix>.+)-(?P<step>[0-9]+)", re.DOTALL)
_DEFAULT_PREFIX = "model.ckpt"

_EPILOG = """\
exit status:
  0  success (ls of a directory without checkpoints included)
  1  a checkpoint is corrupted (verify, inspect), verify found no checkpoint, or the demo failed
  2  bad arguments or a missing path
"""


# ---------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block would bury the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _existing_dir(value: str) -> str:
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(
            f"expected an existing directory, got {value!r}, which does not exist"
        )
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(
            f"expected an existing directory, got {value!r}, which is not a directory"
        )
    return value


def _existing_path(value: str) -> str:
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(
            f"expected an existing checkpoint file or directory, got {value!r}, "
            "which does not exist"
        )
    return value


def _demo_dir(value: str) -> str:
    if os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(
            f"expected a directory (it is created if missing), got {value!r}, "
            "which is not a directory"
        )
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _wrap(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the epilog table as written, so descriptions wrap here.
    return textwrap.fill(text, width=79)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=_wrap(
            "Inspect the checkpoints torch_ckpt_hook writes, and run its demo: a small model "
            "trained with MonitoredTrainingSession, checkpointed, and resumed when rerun."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    ls = commands.add_parser(
        "ls",
        help="list a directory's checkpoints: step, size, time, integrity, latest",
        description=_wrap(
            "List the checkpoints in DIR: those its state file names and those on disk."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("dir", metavar="DIR", type=_existing_dir, help="a checkpoint directory")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = commands.add_parser(
        "inspect",
        help="show what one checkpoint holds: tensors, step, optimizer, RNG states",
        description=_wrap(
            "Show one checkpoint's payload: its keys, every tensor's name, shape, dtype and "
            "bytes, totals, the global step, the optimizer type and the RNG states present. "
            "A directory stands for its latest checkpoint."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument(
        "path", metavar="PATH", type=_existing_path, help="a checkpoint file, or a directory"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")

    verify = commands.add_parser(
        "verify",
        help="check checkpoints' checksums; exit 1 if any is corrupted",
        description=_wrap(
            "Check the checksum of a checkpoint file, or of every checkpoint in a directory. "
            "Exit 0 when all are intact, 1 when any is corrupted (each is named)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "path", metavar="DIR|PATH", type=_existing_path, help="a checkpoint directory or file"
    )

    demo = commands.add_parser(
        "demo",
        help="train a small model with checkpoints; rerun with more --steps to resume",
        description=_wrap(
            "Train a small MLP on synthetic data with MonitoredTrainingSession, checkpointing "
            "into --dir. Run it again with a larger --steps and it resumes from the latest "
            "checkpoint. Ctrl-C stops after the current step and saves."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--dir",
        type=_demo_dir,
        default=DEFAULT_DIR,
        help="checkpoint directory, created if missing (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        metavar="N",
        help="train up to global step N (default: %(default)s)",
    )
    demo.add_argument(
        "--save-every",
        type=_positive_int,
        default=DEFAULT_SAVE_EVERY,
        metavar="N",
        help="save a checkpoint every N steps (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``torch-ckpt`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or an argument error already reported
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command is None:
        return _fail("", "expected a command: ls, inspect, verify or demo", EXIT_USAGE)
    if args.command == "demo":
        return _demo(args.dir, args.steps, args.save_every)
    try:
        if args.command == "ls":
            return _ls(args.dir, as_json=args.json)
        if args.command == "inspect":
            return _inspect(args.path, as_json=args.json)
        return _verify(args.path)
    except BrokenPipeError:
        # The reader left (`| head`): end quietly, as ls and grep do, and keep Python's exit-time
        # flush from writing to the closed pipe.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as err:  # a directory that cannot be listed, a file that vanished
        return _fail(args.command, f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))


def _fail(command: str, message: str, status: int = EXIT_FAILED) -> int:
    prog = f"{PROG} {command}" if command else PROG
    sys.stderr.write(f"{prog}: error: {message}\n")
    return status


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def _step_of(path: str) -> int | None:
    m = _STEP_SUFFIX.fullmatch(os.path.basename(path))
    return None if m is None else int(m["step"])


def checkpoint_paths(directory: str) -> list[str]:
    """The directory's checkpoints, oldest first: the state file's and those on disk.

    On disk, a file counts when it is a committed checkpoint (``find_checkpoints``), or when it
    is named ``<prefix>-<step>`` with a prefix a checkpoint here uses (``model.ckpt`` by default):
    a damaged checkpoint must be listed, a user's ``notes-2`` must not.
    """
    state = get_checkpoint_state(directory)
    paths = list(state.all_model_checkpoint_paths) if state is not None else []
    if state is not None:
        paths.append(state.model_checkpoint_path)
    paths += [path for _step, path in find_checkpoints(directory)]
    prefixes = {_DEFAULT_PREFIX}
    for path in paths:
        m = _STEP_SUFFIX.fullmatch(os.path.basename(path))
        if m is not None:
            prefixes.add(m["prefix"])
    with os.scandir(directory) as entries:
        for entry in entries:
            m = _STEP_SUFFIX.fullmatch(entry.name)
            if (
                m is not None
                and m["prefix"] in prefixes
                and entry.name != STATE_FILENAME
                and not is_temp_file(entry.name)
                and entry.is_file()
            ):
                paths.append(entry.path)
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(path_key(path), path)

    def order(path: str) -> tuple[int, float]:
        step = _step_of(path)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = 0.0
        return (-1 if step is None else step, mtime)

    return sorted(unique.values(), key=order)


def _display_name(directory: str, path: str) -> str:
    if same_path(os.path.dirname(path) or os.curdir, directory):
        return os.path.basename(path)
    return path


# ---------------------------------------------------------------------------------------------
# ls


@dataclasses.dataclass(frozen=True)
class _Listed:
    path: str
    name: str
    step: int | None
    size_bytes: int | None
    mtime: float | None
    saved_at: str | None
    intact: bool
    problem: str | None
    latest: bool


def _list(directory: str) -> list[_Listed]:
    latest = latest_checkpoint(directory)
    listed = []
    for path in checkpoint_paths(directory):
        problem: str | None
        try:
            stat = os.stat(path)
        except OSError as err:
            size, mtime, problem = None, None, f"unreadable: {err.strerror or err}"
        else:
            size, mtime, problem = stat.st_size, stat.st_mtime, verify_checkpoint(path)
        listed.append(
            _Listed(
                path=os.path.abspath(path),
                name=_display_name(directory, path),
                step=_step_of(path),
                size_bytes=size,
                mtime=mtime,
                saved_at=None if mtime is None else _timestamp(mtime).isoformat(),
                intact=problem is None,
                problem=problem,
                latest=latest is not None and same_path(latest, path),
            )
        )
    return listed


def _ls(directory: str, *, as_json: bool) -> int:
    listed = _list(directory)
    if as_json:
        latest = next((item.path for item in listed if item.latest), None)
        checkpoints = [dataclasses.asdict(item) for item in listed]
        _print_json(
            {"directory": os.path.abspath(directory), "latest": latest, "checkpoints": checkpoints}
        )
        return EXIT_OK
    if not listed:
        print(f"No checkpoints in {directory}")
        return EXIT_OK
    table = [["NAME", "STEP", "SIZE", "SAVED", "LATEST", "INTEGRITY"]]
    for item in listed:
        table.append(
            [
                item.name,
                "-" if item.step is None else str(item.step),
                "-" if item.size_bytes is None else _human_bytes(item.size_bytes),
                "-" if item.mtime is None else _local_time(item.mtime),
                "latest" if item.latest else "",
                "ok" if item.intact else f"CORRUPTED: {item.problem}",
            ]
        )
    _print_table(table, right_aligned={1, 2})
    total = sum(item.size_bytes or 0 for item in listed)
    summary = f"{_count(len(listed), 'checkpoint')}, {_human_bytes(total)}"
    corrupted = sum(not item.intact for item in listed)
    if corrupted:
        summary += f", {corrupted} corrupted"
    print(summary)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# inspect


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    elements: int
    bytes: int


def _inspect(path: str, *, as_json: bool) -> int:
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            return _fail("inspect", f"no checkpoint in directory {path!r}")
        path = latest
    try:
        payload = load_checkpoint(path)
    except (CheckpointError, ValueError) as err:
        return _fail("inspect", str(err))
    tensors = [
        _TensorInfo(
            name=name,
            shape=list(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            elements=tensor.numel(),
            bytes=tensor.numel() * tensor.element_size(),
        )
        for name, tensor in _named_tensors(payload)
    ]
    totals: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        for part in (tensor.name.split(".", 1)[0], "all"):
            total = totals.setdefault(part, {"tensors": 0, "elements": 0, "bytes": 0})
            total["tensors"] += 1
            total["elements"] += tensor.elements
            total["bytes"] += tensor.bytes
    document = {
        "path": os.path.abspath(path),
        "size_bytes": os.path.getsize(path),
        "format_version": payload.get("format_version"),
        "global_step": payload.get("global_step"),
        "payload_keys": [str(key) for key in payload],
        "optimizer": _describe_optimizer(payload.get("optimizer")),
        "extra_state": sorted(map(str, payload.get("extra_state") or {})),
        "rng_states": _rng_states(payload.get("rng")),
        "tensors": [dataclasses.asdict(tensor) for tensor in tensors],
        "totals": totals,
    }
    if as_json:
        _print_json(document)
    else:
        _print_inspection(document)
    return EXIT_OK


def _named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _named_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def _rng_states(rng: Any) -> list[str]:
    """The RNG states present; ``cuda`` (a list, one per device) counts when it is not empty."""
    if not isinstance(rng, Mapping):
        return []
    present = []
    for name, state in rng.items():
        if name == "cuda" and isinstance(state, (list, tuple)):
            if state:
                present.append(f"cuda ({_count(len(state), 'device')})")
        elif state is not None:
            present.append(str(name))
    return present


def _describe_optimizer(state: Any) -> dict[str, Any] | None:
    """The optimizer's type, inferred: the payload holds its ``state_dict()``, not its class."""
    if not isinstance(state, Mapping):
        return None
    groups = state.get("param_groups") or []
    first = groups[0] if groups and isinstance(groups[0], Mapping) else {}
    return {
        "type": _guess_optimizer_type(first),
        "param_groups": len(groups),
        "lr": first.get("lr") if isinstance(first.get("lr"), (int, float)) else None,
        "parameters_with_state": len(state.get("state") or {}),
    }


def _guess_optimizer_type(group: Mapping[str, Any]) -> str:
    """The ``torch.optim`` class whose constructor options the param group holds, or "unknown".

    A param group stores every option of its optimizer's constructor (and LR schedulers add
    theirs), so the class with the most options, all present, is the best guess. ``AdamW`` is
    ``Adam`` with ``decoupled_weight_decay=True`` in its group.
    """
    keys = set(map(str, group))
    best: list[tuple[int, str]] = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (
            isinstance(cls, type)
            and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer
        ):
            continue
        try:
            parameters = pyinspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            continue
        options = set(parameters) - {"self", "params"}
        if options and options <= keys:
            best.append((len(options), name))
    if not best:
        return "unknown"
    most = max(count for count, _name in best)
    names = sorted(name for count, name in best if count == most)
    if names == ["Adam"] and group.get("decoupled_weight_decay") is True:
        return "AdamW"
    return " or ".join(names)


def _print_inspection(doc: Mapping[str, Any]) -> None:
    optimizer = doc["optimizer"]
    if optimizer is None:
        optimizer_line = "none"
    else:
        groups = optimizer["param_groups"]
        optimizer_line = (
            f"{optimizer['type']} (inferred from its param groups), {_count(groups, 'param group')}"
        )
        if optimizer["lr"] is not None:
            optimizer_line += f", lr {optimizer['lr']:g}"
        with_state = optimizer["parameters_with_state"]
        optimizer_line += (
            f", state for {_count(with_state, 'parameter')}" if with_state else ", no state"
        )
    fields = [
        ("Checkpoint", doc["path"]),
        ("File size", _human_bytes(doc["size_bytes"])),
        ("Global step", str(doc["global_step"])),
        ("Format", str(doc["format_version"])),
        ("Payload keys", ", ".join(doc["payload_keys"])),
        ("Optimizer", optimizer_line),
        ("Extra state", ", ".join(doc["extra_state"]) or "none"),
        ("RNG states", ", ".join(doc["rng_states"]) or "none"),
    ]
    width = max(len(label) for label, _value in fields)
    for label, value in fields:
        print(f"{label:<{width}}  {value}")
    print()
    table = [["TENSOR", "SHAPE", "DTYPE", "BYTES"]]
    for tensor in doc["tensors"]:
        shape = "[" + ", ".join(map(str, tensor["shape"])) + "]"
        table.append([tensor["name"], shape, tensor["dtype"], _human_bytes(tensor["bytes"])])
    _print_table(table, right_aligned={3})
    print()
    totals = [["PART", "TENSORS", "ELEMENTS", "BYTES"]]
    for part, total in doc["totals"].items():
        if part != "all":
            totals.append(
                [
                    part,
                    str(total["tensors"]),
                    f"{total['elements']:,}",
                    _human_bytes(total["bytes"]),
                ]
            )
    everything = doc["totals"].get("all", {"tensors": 0, "elements": 0, "bytes": 0})
    totals.append(
        [
            "total",
            str(everything["tensors"]),
            f"{everything['elements']:,}",
            _human_bytes(everything["bytes"]),
        ]
    )
    _print_table(totals, right_aligned={1, 2, 3})


# ---------------------------------------------------------------------------------------------
# verify


def _verify(path: str) -> int:
    if os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            return _fail("verify", f"no checkpoints in {path}: nothing to verify")
        names = [_display_name(path, p) for p in paths]
    else:
        paths, names = [path], [path]
    problems = [verify_checkpoint(p) for p in paths]
    table = [
        ["ok", name] if problem is None else ["CORRUPTED", f"{name}: {problem}"]
        for name, problem in zip(names, problems, strict=True)
    ]
    _print_table(table)
    corrupted = [name for name, problem in zip(names, problems, strict=True) if problem]
    if corrupted:
        return _fail(
            "verify",
            f"{len(corrupted)} of {_count(len(paths), 'checkpoint')} corrupted: "
            f"{', '.join(corrupted)}",
        )
    print(f"{_count(len(paths), 'checkpoint')} intact")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# demo


def _demo(directory: str, steps: int, save_every: int) -> int:
    with demo_logging(sys.stderr):
        try:
            result = run_demo(directory, steps, save_every=save_every, out=sys.stdout)
        except (CheckpointError, OSError, ValueError) as err:
            return _fail("demo", str(err))
    print(
        f"Next: '{PROG} ls {directory}' lists the checkpoints; "
        f"'{PROG} demo --dir {directory} --steps {max(result.final_step, steps) + 100}' "
        "resumes and trains 100 more steps."
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Formatting


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def _print_table(rows: Sequence[Sequence[str]], right_aligned: set[int] | None = None) -> None:
    right_aligned = right_aligned or set()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"


def _timestamp(mtime: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc).astimezone()


def _local_time(mtime: float) -> str:
    return _timestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")
