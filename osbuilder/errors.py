"""The three kinds of error osbuilder reports, and the one place a full disk becomes an error.

- `UsageError` (exit 2): the user asked for something invalid (a bad setting, a missing input);
- `OsbuilderError` (exit 1): a step failed: the artifact, or what it was made from, is at fault;
- `InfrastructureError` (exit 125): not the artifact's fault (a full disk, an unreachable mirror, a
  broken accelerator); bisection maps it to "skip", never to "bad".

Every error has a one-line message that names the setting or input at fault, and an optional
multi-line detail (a command's stderr tail, the lines of a console log) printed after it. Times in
messages are written by `seconds()`, so a budget under a second is not "0s".
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = "No space left on device"  # what tools print (strerror(ENOSPC))


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


def out_of_space(error: BaseException, directory: Path | None = None) -> bool:
    """Whether a failed step ran out of room on the host: ENOSPC or EDQUOT, a tool saying so (in a
    failed command's output), or, when the tool says nothing (sfdisk) and `directory` is given, a
    filesystem there with less than a MiB or no inode left. (Running out of room inside an image is
    the image's business: mke2fs says "Could not allocate block" for that.)"""
    if isinstance(error, UsageError):
        return False
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if NO_SPACE in getattr(error, "detail", ""):
        return True
    if directory is None:
        return False
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    blocks, inodes = (st.f_bfree, st.f_ffree) if os.geteuid() == 0 else (st.f_bavail, st.f_favail)
    return blocks * st.f_frsize < (1 << 20) or (st.f_files > 0 and inodes == 0)


def full_disk(setting: str, where: str, error: BaseException | None = None) -> InfrastructureError:
    """The one-line error for a full disk (exit 125): `<setting>: no space left on device <where>`."""
    detail = getattr(error, "detail", "") or (str(error) if error is not None else "")
    return InfrastructureError(f"{setting}: no space left on device {where}", detail)


@contextmanager
def disk_space(setting: str, where: str, directory: Path | None = None) -> Iterator[None]:
    """Within the block, an error caused by a full disk becomes `full_disk(setting, where)`."""
    try:
        yield
    except (OSError, OsbuilderError) as e:
        if not out_of_space(e, directory):
            raise
        raise full_disk(setting, where, e) from None


def from_os_error(error: OSError, doing: str) -> OsbuilderError:
    """An OSError that escaped a step, as a one-line error naming the path (a full disk is not the
    artifact's fault: exit 125)."""
    paths = " -> ".join(os.fsdecode(p) for p in (error.filename, error.filename2) if p is not None)
    what = f"{doing}: {paths + ': ' if paths else ''}{error.strerror or error}"
    return InfrastructureError(what) if out_of_space(error) else OsbuilderError(what)
def seconds(value: float) -> str:
    """A duration for a message: whole seconds from 10 s on, else two significant digits (0.25s, 7.5s)."""
    return f"{value:.0f}s" if value >= 10 else f"{value:.2g}s"
