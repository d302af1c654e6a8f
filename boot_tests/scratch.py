"""Removing a test's own scratch trees without making the next test wait for it.

A boot test's scratch directory holds gigabytes of trees (WORKDIRs with a rootfs, images and a kernel object
tree; a kernel git history). Removing one took a worker 20-30 s in a full run while the other worker's builds
kept the disk busy (about a second alone). `remove_later` hands it to an `rm` of its own that nothing waits for.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def remove_later(path: Path) -> None:
    """Start removing `path` (a tree no one else uses) in the background: `rm` runs on, detached, after this
    returns (a shell starts it and exits, so no child of this process is left to reap)."""
    subprocess.run(["sh", "-c", 'rm -rf --one-file-system -- "$1" </dev/null >/dev/null 2>&1 &', "remove-later",
                    str(path)], check=True)
