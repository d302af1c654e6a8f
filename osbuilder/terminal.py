"""What reaches the user's terminal: text from guests, tools and the environment, made inert.

A guest's serial console, a build tool's output or a value in the environment can carry more than
colours: OSC strings set the window title or write the clipboard (OSC 52), DCS, APC, PM and SOS
strings are executed by some terminals, C1 control characters (U+0080-U+009F) act as ESC on others,
and a carriage return lets a line overwrite what was printed before it. `printable()` removes every
escape sequence and string (terminated or not) and carriage returns, and shows any other control
character, and the bytes of a value that is not UTF-8 (Python's surrogate escapes), as `\\xNN`.
Everything osbuilder prints from such sources goes through it: console lines, the tails of tool
output in errors (`cli.report`), log records (`SafeFormatter`) and `osbuilder help`'s values.
"""

from __future__ import annotations

import logging
import re

# ECMA-48: CSI (ESC [ or U+009B) parameters, intermediates, final byte; the string controls (OSC,
# DCS, SOS, PM, APC, 7-bit or C1) up to BEL or ST, or up to the next ESC when unterminated; any
# other escape sequence (ESC, intermediates, final byte). An unterminated string ends, for us, at the
# end of its line: the lines after it are evidence too.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*+[ -/]*+[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*+(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*+[0-~]?"
    r"|\r"
)
# What is left to show escaped: C0 controls (but tab and new line, unless asked), DEL, C1 controls,
# and the surrogates that stand for bytes that are not UTF-8.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udcff]")
_CONTROL_AND_LAYOUT = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"


def printable(text: str, *, lines: bool = True) -> str:
    """`text` without escape sequences or carriage returns, other control characters shown as \\xNN.
    With `lines` (the default) new lines and tabs stay; without, they are escaped too (one line)."""
    text = _SEQUENCE.sub("", text)
    return (_CONTROL if lines else _CONTROL_AND_LAYOUT).sub(_escaped, text)


def shown(value: str, limit: int = 80) -> str:
    """A value as one printable line of at most about `limit` characters (the rest counted, not shown)."""
    if len(value) > limit:
        return printable(value[:limit], lines=False) + f"... ({len(value)} characters)"
    return printable(value, lines=False)


class SafeFormatter(logging.Formatter):
    """A log formatter whose records reach the terminal through `printable()`."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))
