"""The kinds of error osbuilder reports: a user's mistake (exit 2), a step that failed (exit 1), and an
infrastructure failure that says nothing about the artifact (exit 125).

Every error has a one-line message that names the setting or input at fault, and an optional
multi-line detail (a command's stderr tail, the lines of a console log) printed after it. Times in
messages are written by `seconds()`, so a budget under a second is not "0s".
"""

from __future__ import annotations


class OsbuilderError(Exception):
    """A step failed. `message` is one line; `detail` is the evidence."""

    exit_code = 1

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message if not self.detail else f"{self.message}\n{self.detail}"


class UsageError(OsbuilderError):
    """The user asked for something invalid: bad setting value, unknown key, missing input."""

    exit_code = 2


class InfrastructureError(OsbuilderError):
    """Not the artifact's fault: a broken accelerator, an unreachable mirror, a full disk.

    Bisection maps this to "skip" (exit 125), never to "bad".
    """

    exit_code = 125


def seconds(value: float) -> str:
    """A duration for a message: whole seconds from 10 s on, else two significant digits (0.25s, 7.5s)."""
    return f"{value:.0f}s" if value >= 10 else f"{value:.2g}s"
