"""The guest agent's C source is formatted as the repository's .clang-format says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from osbuilder.agent import AGENT_SOURCE

ROOT = Path(__file__).resolve().parent.parent


def test_style_file_exists():
    assert (ROOT / ".clang-format").is_file(), "no .clang-format at the repository root"


def test_agent_source_is_clang_formatted():
    clang_format = shutil.which("clang-format")
    # Not a skip: CI installs clang-format, so a missing one must not let formatting drift unnoticed.
    assert clang_format, "clang-format is not installed: run .ci/install-deps (or apt-get install clang-format)"
    out = subprocess.run(
        [clang_format, "--style=file", "--dry-run", "--Werror", str(AGENT_SOURCE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), (
        f"{AGENT_SOURCE.name} is not clang-formatted; run `clang-format -i {AGENT_SOURCE.relative_to(ROOT)}`:\n"
        + out.stderr
    )
