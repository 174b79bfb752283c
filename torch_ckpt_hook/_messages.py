"""An exception as one line of text, for messages that quote a cause.

A message that names a cause in passing ("cannot parse them (RuntimeError: ...)", a command's
one-line error) must stay one line: exception texts often run over several (torch's carry
paragraphs of advice), and an empty one says nothing at all.
"""

from __future__ import annotations


def error_line(
    err: BaseException,
    *,
    with_type: bool = True,
    first_line: bool = False,
    limit: int | None = None,
) -> str:
    """``err`` as one line: ``"ZeroDivisionError: division by zero"``.

    Runs of whitespace, line breaks included, become one space. An exception without a message
    is its type's name, with or without ``with_type``.

    Args:
        with_type: lead with the exception's type name.
        first_line: keep only the first non-blank line of the message (for messages whose first
            line says what happened and the rest advise, as torch's do).
        limit: cut the result to this many characters, ending in "...".
    """
    text = str(err)
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = " ".join(text.split())
    name = type(err).__name__
    line = (f"{name}: {text}" if with_type else text) if text else name
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 3, 0)] + "..."
    return line


def os_error_reason(err: OSError) -> str:
    """What went wrong, without the path the caller names already: ``"Permission denied"``.

    The error's ``strerror`` when it has one, else its message as one line.
    """
    return err.strerror or error_line(err, with_type=False)
