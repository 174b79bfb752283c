"""TensorFlow's ``checkpoint`` state file: which checkpoints a directory holds, newest last.

The file is the protobuf text format of TensorFlow's ``CheckpointState`` message, byte for byte
what ``text_format.MessageToString`` writes, so TensorFlow tools read it and we read theirs::

    model_checkpoint_path: "model.ckpt-300"
    all_model_checkpoint_paths: "model.ckpt-200"
    all_model_checkpoint_paths: "model.ckpt-300"

Unlike TensorFlow's ``Saver`` (absolute paths unless ``save_relative_paths=True``), paths are always
written relative to the directory, so a moved or copied directory still resolves (TensorFlow
issues #571, #9146). Paths read back are joined with the directory as given, as TensorFlow does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Sequence

from ._fsutil import atomic_write, is_temp_file, read_small_file, same_path

logger = logging.getLogger(__name__)

STATE_FILENAME = "checkpoint"

# A state file listing a million checkpoints is about 50 MB; anything larger is not one, and is
# refused before it is read (a garbage file, or /dev/zero under the name).
STATE_FILE_LIMIT = 64 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The checkpoints a directory's state file lists.

    Paths are absolute, or relative ones joined with the checkpoint directory as given
    (``os.path.join(checkpoint_dir, p)``, not normalised, as in TensorFlow).
    """

    model_checkpoint_path: str
    """The newest checkpoint."""
    all_model_checkpoint_paths: tuple[str, ...]
    """Every checkpoint the saver manages, oldest first."""


# ---------------------------------------------------------------------------------------------
# Text format


# name -> (is a string field, is repeated). Fields 3 and 4 (doubles) are written only by TF2's
# CheckpointManager: accepted and ignored.
_FIELDS = {
    "model_checkpoint_path": (True, False),
    "all_model_checkpoint_paths": (True, True),
    "all_model_checkpoint_timestamps": (False, True),
    "last_preserved_timestamp": (False, False),
}

# protobuf's C escaping with as_utf8=False (MessageToString's default): printable ASCII as is,
# the named escapes, and every other byte (UTF-8 of non-ASCII characters included) as octal.
_ESCAPE_BYTE = [f"\\{i:03o}" for i in range(32)] + [chr(i) for i in range(32, 127)]
_ESCAPE_BYTE += [f"\\{i:03o}" for i in range(127, 256)]
for _byte, _escaped in {9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 39: "\\'", 92: "\\\\"}.items():
    _ESCAPE_BYTE[_byte] = _escaped
del _byte, _escaped

_SIMPLE_ESCAPES = {
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "v": b"\v",
    "\\": b"\\",
    "?": b"?",
    "'": b"'",
    '"': b'"',
}
_ESCAPE_PIECE = re.compile(
    r"\\(?:(?P<oct>[0-7]{1,3})|x(?P<hex>[0-9a-fA-F]{1,2})|u(?P<u4>[0-9a-fA-F]{4})"
    r"|U(?P<u8>[0-9a-fA-F]{8})|(?P<other>.?))|(?P<raw>[^\\]+)",
    re.DOTALL,
)

# The token classes of protobuf's text_format tokenizer. Strings may not span lines; an
# unterminated one is matched up to the end of its line so the error can say so.
_TOKEN = re.compile(
    r"""
      (?P<skip>(?:\s|\#[^\n]*)+)
    | (?P<ident>[A-Za-z_][0-9A-Za-z_+-]*)
    | (?P<number>(?:[0-9+-]|\.[0-9])[0-9A-Za-z_.+-]*)
    | (?P<string>"(?:[^"\n\\]|\\.)*(?:"|\\?$)|'(?:[^'\n\\]|\\.)*(?:'|\\?$))
    | (?P<punct>[:,;\[\]])
    """,
    re.VERBOSE | re.MULTILINE,
)


def _escape(value: str) -> str:
    # os.fsencode, not .encode("utf-8"): a POSIX file name that is not valid UTF-8 (held in the
    # str as surrogate escapes) round-trips through the file instead of failing.
    return "".join(_ESCAPE_BYTE[b] for b in os.fsencode(value))


def _unescape(body: str) -> bytes:
    out = bytearray()
    for m in _ESCAPE_PIECE.finditer(body):
        if m["raw"] is not None:
            out += m["raw"].encode("utf-8", "surrogateescape")
        elif m["oct"] is not None:
            code = int(m["oct"], 8)
            if code > 0xFF:
                raise ValueError(f"octal escape \\{m['oct']} is out of range")
            out.append(code)
        elif m["hex"] is not None:
            out.append(int(m["hex"], 16))
        elif m["u4"] is not None or m["u8"] is not None:
            code = int(m["u4"] or m["u8"], 16)
            try:
                out += chr(code).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                raise ValueError(f"invalid Unicode escape {m.group()!r}") from None
        else:
            escape = m["other"]
            if escape not in _SIMPLE_ESCAPES:
                raise ValueError(f"invalid escape sequence \\{escape}")
            out += _SIMPLE_ESCAPES[escape]
    return bytes(out)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    # protobuf also accepts a C float suffix: "1.5f", "inff".
    if text[-1:] in ("f", "F"):
        try:
            return float(text[:-1])
        except ValueError:
            pass
    raise ValueError(f"could not parse {text!r} as a number")


class _Tokens:
    """A cursor over the tokens of a text-format message."""

    def __init__(self, text: str) -> None:
        self._tokens = list(self._tokenize(text))
        self._pos = 0

    @staticmethod
    def _tokenize(text: str) -> Iterator[tuple[str, str, int]]:
        pos, line = 0, 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"line {line}: unexpected character {text[pos]!r}")
            kind = m.lastgroup
            assert kind is not None
            if kind != "skip":
                yield kind, m.group(), line
            line += m.group().count("\n")
            pos = m.end()

    def at_end(self) -> bool:
        return self._pos >= len(self._tokens)

    def peek(self) -> tuple[str, str, int] | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def next(self, what: str) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise ValueError(f"unexpected end of input, expected {what}")
        self._pos += 1
        return token

    def try_consume(self, punct: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "punct" and token[1] == punct:
            self._pos += 1
            return True
        return False

    def expect(self, punct: str, after: str) -> None:
        kind, value, line = self.next(f"{punct!r} after {after}")
        if kind != "punct" or value != punct:
            raise ValueError(f"line {line}: expected {punct!r} after {after}, got {value!r}")

    def string(self, field: str) -> str:
        kind, value, line = self.next(f"a string value for {field}")
        if kind != "string":
            raise ValueError(f"line {line}: expected a string value for {field}, got {value!r}")
        parts = [value]
        # Adjacent literals concatenate, as in C and protobuf's text format.
        while (token := self.peek()) is not None and token[0] == "string":
            parts.append(self.next("a string")[1])
        # Escapes give bytes, not characters: a UTF-8 sequence may span adjacent literals.
        data = b""
        for part in parts:
            if len(part) < 2 or part[-1] != part[0]:
                raise ValueError(f"line {line}: string value for {field} lacks its closing quote")
            try:
                data += _unescape(part[1:-1])
            except ValueError as err:
                raise ValueError(f"line {line}: {err} in the value of {field}") from None
        return os.fsdecode(data)

    def value(self, field: str, is_string: bool) -> str | float:
        return self.string(field) if is_string else self.number(field)

    def number(self, field: str) -> float:
        kind, value, line = self.next(f"a number for {field}")
        if kind not in ("number", "ident"):
            raise ValueError(f"line {line}: expected a number for {field}, got {value!r}")
        try:
            return _parse_float(value)
        except ValueError as err:
            raise ValueError(f"line {line}: {err} for {field}") from None


def format_checkpoint_state(
    model_checkpoint_path: str, all_model_checkpoint_paths: Sequence[str]
) -> str:
    """The state file's text for these paths, as TensorFlow's ``text_format`` prints it."""
    lines = []
    # proto3 prints no field that holds its default value, here the empty string.
    if model_checkpoint_path:
        lines.append(f'model_checkpoint_path: "{_escape(model_checkpoint_path)}"\n')
    lines += [f'all_model_checkpoint_paths: "{_escape(p)}"\n' for p in all_model_checkpoint_paths]
    return "".join(lines)


def parse_checkpoint_state(text: str) -> tuple[str, list[str]]:
    """Parse a state file's text into ``(model_checkpoint_path, all_model_checkpoint_paths)``.

    Accepts what ``text_format.Merge`` accepts for ``CheckpointState``: either quote, escapes,
    ``#`` comments, any whitespace, ``,``/``;`` separators, ``[...]`` lists for repeated fields,
    and a repeated singular field (the last value wins). A field never written
    (``model_checkpoint_path``) reads as ``""``.

    Raises:
        ValueError: unknown field or malformed text; the message gives the line.
    """
    tokens = _Tokens(text)
    model = ""
    paths: list[str] = []
    while not tokens.at_end():
        kind, name, line = tokens.next("a field name")
        if kind != "ident":
            raise ValueError(f"line {line}: expected a field name, got {name!r}")
        if name not in _FIELDS:
            raise ValueError(f"line {line}: CheckpointState has no field named {name!r}")
        is_string, repeated = _FIELDS[name]
        tokens.expect(":", f"field name {name!r}")
        values: list[str | float] = []
        if repeated and tokens.try_consume("["):
            if not tokens.try_consume("]"):
                values.append(tokens.value(name, is_string))
                while not tokens.try_consume("]"):
                    tokens.expect(",", f"a value in the list of {name}")
                    values.append(tokens.value(name, is_string))
        else:
            values.append(tokens.value(name, is_string))
        if name == "model_checkpoint_path":
            model = str(values[0])
        elif name == "all_model_checkpoint_paths":
            paths.extend(str(v) for v in values)
        if not tokens.try_consume(","):
            tokens.try_consume(";")
    return model, paths


# ---------------------------------------------------------------------------------------------
# The file on disk


def _state_path(checkpoint_dir: str, latest_filename: str | None) -> str:
    if not latest_filename:
        return os.path.join(checkpoint_dir, STATE_FILENAME)
    head, tail = os.path.split(latest_filename)
    if head or tail in (os.curdir, os.pardir):
        raise ValueError("'latest_filename' must not contain path components")
    return os.path.join(checkpoint_dir, latest_filename)


def _relative_to(checkpoint_dir: str, path: str) -> str:
    try:
        return os.path.relpath(path, checkpoint_dir)
    except ValueError:
        # Windows: a path on another drive has no relative form; an absolute one still resolves.
        return os.path.abspath(path)


def update_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str],
    model_checkpoint_path: str,
    all_model_checkpoint_paths: Sequence[str] | None = None,
    latest_filename: str | None = None,
) -> None:
    """Atomically replace the directory's state file, with every path relative to the directory.

    Relative input paths are relative to the working directory, like the paths ``Saver.save`` and
    ``get_checkpoint_state`` return, so a state read can be written back unchanged. (TensorFlow's
    ``save_relative_paths`` took them as relative to an absolute ``checkpoint_dir`` instead.)
    ``model_checkpoint_path`` is appended to the list when it is not its last entry (TensorFlow's
    ``generate_checkpoint_state_proto``).

    Raises:
        ValueError: ``latest_filename`` has path components, or ``model_checkpoint_path`` is empty.
        RuntimeError: ``model_checkpoint_path`` is the state file's own path.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_path = _state_path(checkpoint_dir, latest_filename)
    if not model_checkpoint_path:
        raise ValueError("model_checkpoint_path must be a non-empty path, got ''")
    if same_path(state_path, model_checkpoint_path):
        raise RuntimeError(
            f"Save path '{model_checkpoint_path}' conflicts with path used for checkpoint state.  "
            "Please use a different save path."
        )
    model = _relative_to(checkpoint_dir, model_checkpoint_path)
    paths = [_relative_to(checkpoint_dir, p) for p in all_model_checkpoint_paths or ()]
    if not paths or paths[-1] != model:
        logger.info(
            "%s is not in all_model_checkpoint_paths. Manually adding it.", model_checkpoint_path
        )
        paths.append(model)
    data = format_checkpoint_state(model, paths).encode("ascii")
    atomic_write(state_path, lambda f: f.write(data))


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> CheckpointState | None:
    """The directory's state file, with the entries that name missing checkpoints dropped.

    Returns None when the state file is missing, unreadable, unparsable, has an empty
    ``model_checkpoint_path``, or names no checkpoint that exists. Where it could not be used, a
    warning names the file. TensorFlow raised ``ValueError`` for an empty
    ``model_checkpoint_path``; treating it as "no usable state" instead lets ``latest_checkpoint``
    fall back to the checkpoints in the directory, which is what a half-written or truncated state
    file from another tool needs.

    Entries naming files that no longer exist are dropped, with a warning naming them. If
    ``model_checkpoint_path`` is one of them, the newest remaining entry takes its place.

    Raises:
        ValueError: ``latest_filename`` has path components.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_path = _state_path(checkpoint_dir, latest_filename)
    try:
        raw = read_small_file(state_path, STATE_FILE_LIMIT)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning(
            "Checkpoint state file %s is unreadable (%s); it is ignored.", state_path, err
        )
        return None
    try:
        model, paths = parse_checkpoint_state(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        logger.warning(
            "Checkpoint state file %s does not parse (%s); it is ignored.", state_path, err
        )
        return None
    if not model:
        logger.warning(
            "Checkpoint state file %s has no model_checkpoint_path; it is ignored.", state_path
        )
        return None

    def resolve(p: str) -> str:
        if not os.path.isabs(p):
            return os.path.join(checkpoint_dir, p)
        # TensorFlow wrote absolute paths, and its state file always lies beside its
        # checkpoints: in a copied or moved run directory, an absolute path naming another
        # directory means the file of that name here. The copy then resumes (and later prunes)
        # its own files, never the original run's.
        local = os.path.join(checkpoint_dir, os.path.basename(p))
        if not same_path(os.path.dirname(p), checkpoint_dir) and os.path.lexists(local):
            return local
        return p

    model = resolve(model)
    all_paths = [resolve(p) for p in paths]
    # exists, not isfile: a checkpoint may be a directory (torch.distributed.checkpoint).
    missing = [p for p in all_paths if not os.path.exists(p)]
    if not os.path.exists(model) and model not in missing:
        missing.append(model)
    if missing:
        logger.warning(
            "Checkpoint state file %s lists checkpoints that do not exist; they are ignored: %s",
            state_path,
            ", ".join(missing),
        )
    kept = tuple(p for p in all_paths if p not in missing)
    if model in missing:
        if not kept:
            return None
        logger.warning(
            "Checkpoint state file %s: model_checkpoint_path %s does not exist; using %s instead.",
            state_path,
            model,
            kept[-1],
        )
        model = kept[-1]
    return CheckpointState(model_checkpoint_path=model, all_model_checkpoint_paths=kept)


_CHECKPOINT_NAME = re.compile(r"(?P<prefix>.+)-(?P<step>[0-9]+)", re.DOTALL)


def find_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """The committed checkpoint files in ``checkpoint_dir``, as ``(step, path)``, oldest first.

    A committed checkpoint is a regular file named ``<prefix>-<step>`` that is a complete zip
    archive (``torch.save``'s format); temporary files of unfinished saves, the state file and
    truncated or foreign files are left out. Sorted by step, then modification time.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        entries = list(os.scandir(checkpoint_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[int, float, str]] = []
    for entry in entries:
        m = _CHECKPOINT_NAME.fullmatch(entry.name)
        if m is None or entry.name == STATE_FILENAME or is_temp_file(entry.name):
            continue
        try:
            if not entry.is_file():
                continue
            mtime = entry.stat().st_mtime
        except OSError:
            # Deleted (retention, another process) since the listing.
            continue
        # is_zipfile finds the zip's end record, which torch.save writes last: a file cut short
        # by a crash mid-write (with no atomic rename) is not taken for a checkpoint.
        if zipfile.is_zipfile(entry.path):
            found.append((int(m["step"]), mtime, entry.path))
    found.sort()
    return [(step, path) for step, _, path in found]


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> str | None:
    """The newest checkpoint in ``checkpoint_dir``, or None when there is none.

    The state file's ``model_checkpoint_path`` when it names a checkpoint that exists; otherwise
    (no state file, or one that is unusable or names only missing files) the newest committed
    checkpoint that ``find_checkpoints`` finds, with a warning when a state file was there.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is not None:
        return state.model_checkpoint_path
    found = find_checkpoints(checkpoint_dir)
    if not found:
        return None
    newest = found[-1][1]
    state_path = _state_path(checkpoint_dir, latest_filename)
    if os.path.lexists(state_path):
        logger.warning(
            "Checkpoint state file %s is unusable; using the newest checkpoint in %s instead: %s",
            state_path,
            checkpoint_dir,
            newest,
        )
    else:
        logger.info(
            "No checkpoint state file in %s; using its newest checkpoint %s.",
            checkpoint_dir,
            newest,
        )
    return newest
