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
