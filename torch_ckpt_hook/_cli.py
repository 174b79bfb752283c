"""The ``torch-ckpt`` command: list, inspect, verify and export checkpoints, and run the demo.

Exit status: 0 on success; 1 when a checkpoint is corrupted, unloadable, unreadable or not a
regular file (``verify``, ``inspect``, ``export``), ``verify`` found nothing to verify, the
export or the demo failed, or anything else went wrong; 2 for bad arguments or a missing path.
Every error is one line on stderr, never a traceback. The commands themselves live in
``_cli_commands``; this module parses and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
import textwrap
import zipfile
from collections.abc import Callable, Mapping
from typing import NoReturn

from . import __version__
from ._cli_commands import (
    EXIT_FAILED,
    EXIT_USAGE,
    PROG,
    CommandFailed,
    demo,
    inspect,
    ls,
    verify,
)
from ._cli_demo import DEFAULT_DIR, DEFAULT_SAVE_EVERY, DEFAULT_STEPS
from ._cli_export import DTYPES, export
from ._cli_format import ConsoleHandler, PrefixFormatter, printable
from ._cli_remote import RemoteMissing, run_staged
from ._fsutil import file_type
from ._messages import error_line, os_error_reason
from ._paths import is_url
from ._state_file import STATE_FILENAME

_EPILOG = """\
exit status:
  0  success (ls of a directory without checkpoints included)
  1  a checkpoint is corrupted, unloadable, unreadable or not a regular file
     (verify, inspect, export), verify found no checkpoint, the export or the demo
     failed, or another error
  2  bad arguments or a missing path (export: a DST that exists, without --force)
"""


# ---------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block would bury the message)."""

    commands: dict[str, _Parser]
    """The subcommands' parsers, by name (the top-level parser's only)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _existing_dir(value: str) -> str:
    if is_url(value):
        return value  # an fsspec URL: staged (downloaded) when the command runs
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(
            f"expected an existing directory, got {value!r}, which does not exist"
        )
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(
            f"expected an existing directory, got {value!r}, which is not a directory"
        )
    return value


def _checkpoint_or_dir(value: str) -> str:
    """A regular file or a directory: anything else (a FIFO would block the read forever) and
    the state file (it names checkpoints, it is not one) are refused."""
    expected = "expected a checkpoint file or a directory"
    if is_url(value):
        return value  # an fsspec URL: staged (downloaded) when the command runs
    try:
        mode = os.stat(value).st_mode
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(
            f"expected an existing checkpoint file or directory, got {value!r}, "
            "which does not exist"
        ) from None
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"{expected}, got {value!r}, which cannot be read: {os_error_reason(err)}"
        ) from None
    if stat.S_ISDIR(mode):
        return value
    if not stat.S_ISREG(mode):
        raise argparse.ArgumentTypeError(f"{expected}, got {value!r}, which is {file_type(mode)}")
    if os.path.basename(value) == STATE_FILENAME and not zipfile.is_zipfile(value):
        directory = os.path.dirname(value) or os.curdir
        raise argparse.ArgumentTypeError(
            f"{expected}, got {value!r}, which is the checkpoint state file (it lists a "
            f"directory's checkpoints); pass its directory, {directory!r}"
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


def build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description=_wrap(
            "Inspect, verify and export the checkpoints torch_ckpt_hook writes, and run its demo: "
            "a small model "
            "trained with MonitoredTrainingSession, checkpointed, and resumed when rerun."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parser.commands = {}

    def add_command(name: str, help: str, description: str) -> _Parser:
        command: _Parser = subparsers.add_parser(
            name,
            help=help,
            description=_wrap(description),
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.commands[name] = command
        return command

    ls_ = add_command(
        "ls",
        "list a directory's checkpoints: step, size, time, integrity, latest, restored",
        "List the checkpoints in DIR: those its state file names and those on disk; mark the "
        "latest (the state file's) and the one a new session restores (the newest intact); say "
        "when a session would refuse to start (an unloadable or unreadable checkpoint stops it). "
        "Best checkpoints (BestCheckpointSaverHook's best_checkpoint) are listed apart, the best "
        "marked, with their metrics.",
    )
    ls_.add_argument("dir", metavar="DIR", type=_existing_dir, help="a checkpoint directory")
    ls_.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect_ = add_command(
        "inspect",
        "show what one checkpoint holds: tensors, step, optimizer, RNG states",
        "Show one checkpoint's payload: its keys, every tensor's name, shape, dtype and bytes, "
        "totals, the global step, the optimizer type and the RNG states present. A directory "
        "stands for the checkpoint a new session restores: its newest intact one (or the one it "
        "refuses to start at: an unloadable or unreadable one). --no-verify loads a file "
        "without a checksum (plain torch.save).",
    )
    inspect_.add_argument(
        "path", metavar="PATH", type=_checkpoint_or_dir, help="a checkpoint file, or a directory"
    )
    inspect_.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect_.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="load a file without a checksum (plain torch.save), still with weights_only=True",
    )

    verify_ = add_command(
        "verify",
        "check checkpoints' checksums; exit 1 if any has a problem",
        "Check the checksum of a checkpoint file, or of every checkpoint in a directory. Exit 0 "
        "when all are intact, 1 when any is not; each is named with its kind: CORRUPTED "
        "(damaged), unloadable (no checksum: a plain torch.save file), unreadable, or "
        "not-a-file (a directory, FIFO or device).",
    )
    verify_.add_argument(
        "path", metavar="DIR|PATH", type=_checkpoint_or_dir, help="a checkpoint directory or file"
    )

    export_ = add_command(
        "export",
        "write a checkpoint as one verified file, or its model's tensors (a dtype, safetensors)",
        "Write the checkpoint SRC (a file, or a directory: the checkpoint a new session "
        "restores) to DST as one checkpoint file with a checksum, written atomically. "
        "--model-only writes the model's state_dict() alone (torch.load(DST, "
        "weights_only=True) loads it), --safetensors writes it as a safetensors file, and "
        "--dtype casts the model's floating tensors. DST must not exist, unless --force.",
    )
    export_.add_argument(
        "src", metavar="SRC", type=_checkpoint_or_dir, help="a checkpoint file, or a directory"
    )
    export_.add_argument("dst", metavar="DST", help="the file to write")
    export_.add_argument(
        "--model-only",
        action="store_true",
        help="write the model's tensors alone, a {name: tensor} dict (no optimizer, RNG, step)",
    )
    export_.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="cast the model's floating tensors to DTYPE (integer tensors are kept)",
    )
    export_.add_argument(
        "--safetensors",
        action="store_true",
        help="write the model's tensors as a safetensors file (needs the safetensors package)",
    )
    export_.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="load a SRC without a checksum (plain torch.save), still with weights_only=True",
    )
    export_.add_argument("--force", action="store_true", help="replace DST if it exists")

    demo_ = add_command(
        "demo",
        "train a small model with checkpoints; rerun with more --steps to resume",
        "Train a small MLP on synthetic data with MonitoredTrainingSession, checkpointing into "
        "--dir. Run it again with a larger --steps and it resumes from the latest checkpoint. "
        "Ctrl-C stops after the current step and saves.",
    )
    demo_.add_argument(
        "--dir",
        type=_demo_dir,
        default=DEFAULT_DIR,
        help="checkpoint directory, created if missing (default: %(default)s)",
    )
    for flag, default, help_ in (
        ("--steps", DEFAULT_STEPS, "train up to global step N (default: %(default)s)"),
        (
            "--save-every",
            DEFAULT_SAVE_EVERY,
            "save a checkpoint every N steps (default: %(default)s)",
        ),
    ):
        demo_.add_argument(flag, type=_positive_int, default=default, metavar="N", help=help_)
    return parser


# ---------------------------------------------------------------------------------------------
# Running

Command = Callable[[argparse.Namespace], int]
"""A subcommand: called with the parsed arguments, it prints its result and returns the status."""

COMMANDS: Mapping[str, Command] = {
    "ls": lambda args: ls(args.dir, as_json=args.json),
    "inspect": lambda args: inspect(args.path, as_json=args.json, verify=args.verify),
    "verify": lambda args: verify(args.path),
    "export": lambda args: export(
        args.src,
        args.dst,
        model_only=args.model_only,
        dtype=args.dtype,
        safetensors=args.safetensors,
        verify=args.verify,
        force=args.force,
    ),
    "demo": lambda args: demo(args.dir, args.steps, args.save_every),
}


def main(argv: list[str] | None = None, *, commands: Mapping[str, Command] = COMMANDS) -> int:
    """Run ``torch-ckpt`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Args:
        commands: what runs each subcommand, by name (``COMMANDS``); the parser and the error
            reporting stay the same whatever they do.
    """
    # The package's warnings (an unreadable state file, ...) as the command's own lines,
    # "torch-ckpt: warning: ...", each once: several steps of one command read the state file.
    handler = ConsoleHandler(PrefixFormatter(PROG))
    handler.setLevel(logging.WARNING)
    seen: set[str] = set()

    def once(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        new = message not in seen
        seen.add(message)
        return new

    handler.addFilter(once)
    package_logger = logging.getLogger(__package__)
    package_logger.addHandler(handler)
    try:
        return _run(argv, commands)
    finally:
        package_logger.removeHandler(handler)


def _run(argv: list[str] | None, commands: Mapping[str, Command]) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if args.command is None:
            parser.error("expected a command: ls, inspect, verify, export or demo")
        if extras:
            # Reported by the subcommand's parser, whose usage the stray argument belongs to.
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exit_:  # --help, --version, or an argument error already reported
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    command: str = args.command
    try:
        return run_staged(commands[command], args)
    except RemoteMissing as err:
        return _fail(command, str(err))
    except CommandFailed as err:
        return _fail(command, str(err), err.status)
    except BrokenPipeError:
        # The reader left (`| head`): end quietly, as ls and grep do, and keep Python's exit-time
        # flush from writing to the closed pipe.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as err:  # a directory that cannot be listed, a file that vanished
        name = err.filename
        where = printable(os.fsdecode(name)) if isinstance(name, (str, bytes)) else ""
        return _fail(command, f"{where}: {os_error_reason(err)}".lstrip(": "))
    except Exception as err:  # a bug, or a case nobody foresaw: still one line, no traceback
        return _fail("", error_line(err))


def _fail(command: str, message: str, status: int = EXIT_FAILED) -> int:
    prog = f"{PROG} {command}" if command else PROG
    sys.stderr.write(f"{prog}: error: {printable(message)}\n")
    return status
