"""Programs and the Debian packages that provide them: found or missing, reported, installed.

What each step needs is in its record (`steps.Step.tools`, in cli.py; a distribution plugin's in the
plugin); what USE_DOCKER needs on the host is the engine (`ENGINES`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from osbuilder.errors import OsbuilderError, UsageError


@dataclass(frozen=True)
class Tool:
    program: str
    package: str
    why: str
    search: str = ""  # directories looked in besides PATH (an engine finds its runtime there, not on PATH)


def where(tool: Tool) -> str | None:
    return shutil.which(tool.program) or (shutil.which(tool.program, path=tool.search) if tool.search else None)


def missing(tools: tuple[Tool, ...] | list[Tool]) -> list[Tool]:
    """The tools whose program is not found."""
    return [t for t in tools if where(t) is None]


def report(table: dict[str, tuple[Tool, ...]]) -> str:
    """One line per tool of each group (a step, an engine): program, package, where it is, why."""
    lines = []
    for group, tools in table.items():
        lines.append(f"{group}:")
        for t in tools:
            found = where(t)
            state = found if found else "MISSING"
            lines.append(f"  {t.program:<20} {t.package:<18} {state:<32} {t.why}")
    return "\n".join(lines)


def require(step: str, tools: tuple[Tool, ...]) -> None:
    """Raise a one-line error naming the missing programs of `step`."""
    gone = missing(tools)
    if gone:
        names = ", ".join(t.program for t in gone)
        pkgs = " ".join(sorted({t.package for t in gone}))
        raise UsageError(f"{step}: missing program(s) {names}; run `osbuilder check-deps --install` "
                         f"or `apt-get install {pkgs}`")


def install(packages: list[str]) -> list[str]:
    """apt-get install `packages` (root only). Returns them."""
    if not packages:
        return []
    if os.geteuid() != 0:
        raise UsageError("check-deps --install: must run as root (apt-get install " + " ".join(packages) + ")")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise OsbuilderError(f"check-deps --install: `{' '.join(cmd[:2])}` failed")
    return packages


# USE_DOCKER=yes: the host needs only an engine (and Python); the steps' tools are in the tools image.
ENGINES: dict[str, tuple[Tool, ...]] = {
    "podman": (
        Tool("podman", "podman", "runs each step in the tools container (USE_DOCKER)"),
        Tool("runc", "runc", "the runtime podman falls back to where crun cannot run a container",
             search="/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin"),
    ),
    "docker": (
        Tool("docker", "docker.io", "runs each step in the tools container (USE_DOCKER)"),
    ),
}


def engine_table(choice: str) -> dict[str, tuple[Tool, ...]]:
    """What check-deps lists for CONTAINER_ENGINE=`choice` (auto: podman and docker)."""
    return dict(ENGINES) if choice == "auto" else {choice: ENGINES[choice]}


def engine_missing(choice: str) -> list[Tool]:
    """Missing programs of the engine; with auto, nothing when any one engine is complete, else podman's."""
    gaps = [missing(tools) for tools in engine_table(choice).values()]
    if any(not gap for gap in gaps):
        return []
    return gaps[0]
