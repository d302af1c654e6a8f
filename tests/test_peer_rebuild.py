"""The Kata 1.x agent the boot tests bring is reproducible on a fresh machine: its build script, run on
its source tarball with Debian's Go toolchain and no network, makes the very binary in ../shared/peers.
Skipped, saying why, where ../shared/peers is absent (a user's fresh clone) or Go is not installed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "kata-agent-1.x"
SOURCE = PEER / "kata-agent-1.x-0b75b2d-src.tar.gz"

pytestmark = pytest.mark.build


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_kata_agent_rebuilds_byte_identical(tmp_path: Path) -> None:
    if not SOURCE.is_file():
        pytest.skip(f"{SOURCE} is absent: the real agents come with ../shared/peers (see its README)")
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (Debian's golang-go; .ci/install-deps installs it)")
    out = tmp_path / "kata-agent"
    build = subprocess.run([str(PEER / "build-kata-agent.sh"), str(SOURCE), str(out)], capture_output=True,
                           text=True, timeout=1800, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert build.returncode == 0, build.stdout + build.stderr
    assert sha256(out) == sha256(PEER / "kata-agent")
