"""Fixtures several test modules share."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def small_workdir(tmp_path: Path) -> Iterator[Path]:
    """A WORKDIR on a 32 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs WORKDIR needs root to mount it")
    wd = tmp_path / "small"
    wd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(wd)], check=True)
    try:
        yield wd
    finally:
        subprocess.run(["umount", "-l", str(wd)], check=True)


@pytest.fixture
def fresh_archive_reads() -> Iterator[None]:
    """This process reads the archive's state afresh, as a new process that is no xdist worker would (the
    test's `_SEEN.clear()` stands for the next process): the run's shared states play no part."""
    from osbuilder.rootfs import inputs

    shared = inputs._SHARED
    inputs._SEEN.clear()
    inputs.share_archive_states(None)
    try:
        yield
    finally:
        inputs._SEEN.clear()
        inputs.share_archive_states(shared)
