"""Compile the guest agent (and other guest C programs) into static, stripped, reproducible binaries
with the host's C compiler, or the cross compiler of the guest's architecture (`compiler_for`)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from osbuilder.agent import AGENT_NAME, AGENT_SOURCE
from osbuilder.arch import Arch
from osbuilder.fs import discard, publish, temp_beside
from osbuilder.run import run

CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-s"]


def host_compiler() -> list[str]:
    """`$CC` (default `gcc`; "ccache gcc" works too): the compiler for the host's own architecture."""
    return shlex.split(os.environ.get("CC") or "gcc")


def compiler_for(a: Arch) -> list[str]:
    """The compiler that makes `a`'s programs here: the host's, or `a`'s cross compiler (checked)."""
    return host_compiler() if a.native else [a.require_compiler("the agent")]


def build_agent(out_dir: Path, *, logfile: Path | None = None, cc: list[str] | None = None) -> Path:
    """Build `out_dir/osbuilder-agent` from agent.c (with `cc`, default the host's) and return its path.

    Raises OsbuilderError (step "agent") when compilation fails.
    """
    return compile_static(AGENT_SOURCE, Path(out_dir) / AGENT_NAME, step="agent", logfile=logfile, cc=cc)


def compile_static(source: Path, target: Path, *, step: str, logfile: Path | None = None,
                   cc: list[str] | None = None) -> Path:
    """Compile one C file into a static, stripped, reproducible executable `target`.

    The compiler is `cc` (default `host_compiler()`). The binary is written under a temporary name
    and renamed into place, so a failed or interrupted build never leaves a partial binary.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    cc = cc or host_compiler()
    cmd = [*cc, *CFLAGS, f"-ffile-prefix-map={source.parent}=.", "-o", str(tmp), str(source)]
    try:
        # SOURCE_DATE_EPOCH pins __DATE__/__TIME__ should they ever be used.
        run(cmd, step=step, logfile=logfile, env={"SOURCE_DATE_EPOCH": "0", "LC_ALL": "C"})
        os.chmod(tmp, 0o755)
        publish(tmp, target)
    finally:
        discard(tmp)
    return target
