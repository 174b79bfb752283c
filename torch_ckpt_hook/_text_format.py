"""The protobuf text format of TensorFlow's ``CheckpointState`` message, both ways.

``format_checkpoint_state`` writes, byte for byte, what ``text_format.MessageToString`` writes;
``parse_checkpoint_state`` reads what ``text_format.Merge`` reads. The state file's I/O is
``_state_file``'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

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
