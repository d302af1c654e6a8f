"""Compile the guest agent into a static, stripped, reproducible binary with the host's C compiler."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from osbuilder.agent import AGENT_NAME, AGENT_SOURCE, SOURCE_DIR
from osbuilder.fs import discard, publish, temp_beside
from osbuilder.run import run

CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-s"]


def build_agent(out_dir: Path, *, logfile: Path | None = None) -> Path:
    """Build `out_dir/osbuilder-agent` from agent.c and return its path.

    The compiler is `$CC` (default `gcc`). The binary is written under a temporary name and
    renamed into place, so a failed or interrupted build never leaves a partial binary.
    Raises OsbuilderError (step "agent") when compilation fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / AGENT_NAME
    tmp = temp_beside(target)
    cc = shlex.split(os.environ.get("CC") or "gcc")  # "ccache gcc" works too
    cmd = [
        *cc,
        *CFLAGS,
        f"-ffile-prefix-map={SOURCE_DIR}=.",
        "-o",
        str(tmp),
        str(AGENT_SOURCE),
    ]
    try:
        # SOURCE_DATE_EPOCH pins __DATE__/__TIME__ should they ever be used.
        run(cmd, step="agent", logfile=logfile, env={"SOURCE_DATE_EPOCH": "0", "LC_ALL": "C"})
        os.chmod(tmp, 0o755)
        publish(tmp, target)
    finally:
        discard(tmp)
    return target
