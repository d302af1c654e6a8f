"""Run one osbuilder step inside the tools image, as if it ran on the host.

WORKDIR and CACHE_DIR are bind-mounted at the same paths (read-write), the current directory and
every existing file a setting names (AGENT_SOURCE_BIN, KERNEL_CONFIG, a file:// REPO_URL, ...)
read-only, so paths mean the same inside; the container runs as root of the engine (the invoking
user with rootless podman, root with root's podman), so artifacts belong to whoever ran osbuilder.
The settings the user gave (flag, environment) reach the container as environment variables named by
the settings table, passed by name (`-e NAME`), so no value (a REPO_URL password) is on a command
line; a YAML profile is read again inside from the same path. /dev/kvm is passed through unless
ACCEL=tcg or it cannot be opened. Inside, the step locks, logs and caches as it does on the host.
Ctrl-C, SIGTERM or SIGHUP stop the container; so does osbuilder's watchdog when osbuilder is killed.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from osbuilder import procs
from osbuilder.container import tools_image
from osbuilder.container.engine import PRIVILEGES, Engine
from osbuilder.errors import InfrastructureError, UsageError
from osbuilder.layout import UserCache, Workdir
from osbuilder.run import format_command, redact, run
from osbuilder.settings import TABLE, Settings

log = logging.getLogger("osbuilder")

FORWARDED_SOURCES = ("cli", "env", "override")  # a profile's values are read inside from the same file
# The engine's own exit codes when the container's command could not start (125, the engine's other
# failures, is also the step's "infrastructure" code: it passes through, after the engine's message).
ENGINE_FAILURES = (126, 127)
STOP_SECONDS = 10  # SIGTERM lets the step remove its temporaries; then the engine kills it


def environment(settings: Settings) -> dict[str, str]:
    """The settings for the container, by the table's names: what the user gave, the per-user cache's
    resolved path (HOME differs inside), and USE_DOCKER=no (the step runs there)."""
    env = {s.name: settings.raw[s.name] for s in TABLE if settings.sources.get(s.name) in FORWARDED_SOURCES}
    env["CACHE_DIR"] = str(UserCache.of(settings).root)
    env["USE_DOCKER"] = "no"
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # VM_CPUS=auto shares the cores the same way inside
        env["PYTEST_XDIST_WORKER_COUNT"] = os.environ["PYTEST_XDIST_WORKER_COUNT"]
    return env


@dataclass(frozen=True)
class Invocation:
    """The subcommand to run in the container: its name, its own arguments (paths absolute), and
    whether it gives the user the guest's console."""

    command: str
    argv: tuple[str, ...] = ()
    console: bool = False


def named_paths(settings: Settings, invocation: Invocation) -> list[Path]:
    """Existing files and directories that a setting, the profile or an argument names."""
    words: list[str] = []
    for s in TABLE:
        words += re.split(r"[\s,]+", settings.raw.get(s.name, ""))
    words += [str(settings.profile)] if settings.profile else []
    words += [w for w in invocation.argv if w.startswith("/")]
    found = []
    for word in filter(None, words):
        path = Path(os.path.expanduser(word.removeprefix("file://"))).absolute()
        if mountable(path) and (path.exists() or path.is_symlink()):
            found.append(path)
    return found


# The image's own directories: a setting that names one of them or a parent (PREFIX=/usr) must not
# hide the image's tools behind the host's.
SYSTEM_DIRS = tuple(Path(p) for p in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/var", "/opt", "/tmp"))
VIRTUAL_DIRS = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/run"))  # the engine makes these


def mountable(path: Path) -> bool:
    """Whether `path` may be mounted at its own place in the container."""
    if any(d.is_relative_to(path) for d in SYSTEM_DIRS + VIRTUAL_DIRS):  # the directory or a parent of it
        return False
    return not any(path.is_relative_to(d) for d in VIRTUAL_DIRS)


def mounts(settings: Settings, invocation: Invocation) -> dict[Path, str]:
    """Host path -> 'rw' or 'ro', each mounted at the same path inside."""
    found: dict[Path, str] = {}
    cwd = Path.cwd()
    if mountable(cwd):
        found[cwd] = "ro"
    for path in named_paths(settings, invocation):
        found.setdefault(path, "ro")
    found[Workdir.of(settings).root.absolute()] = "rw"
    found[UserCache.of(settings).root.absolute()] = "rw"
    for path in found:
        if ":" in str(path):
            raise UsageError(f"USE_DOCKER: {path} contains ':', which a container engine cannot mount; "
                             "choose another path or USE_DOCKER=no")
    return found


def container_command(engine: Engine, image: str, settings: Settings, invocation: Invocation,
                      name: str, interactive: bool) -> list[str]:
    cmd = engine.command("run", "--rm", "--name", name, *PRIVILEGES, *engine.run_options)
    if interactive:
        cmd += ["--interactive", "--tty"]
    if settings.accel != "tcg" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        cmd.append("--device=/dev/kvm")
    # parents before children, so that a read-only current directory does not hide WORKDIR inside it
    for path, mode in sorted(mounts(settings, invocation).items(), key=lambda item: len(item[0].parts)):
        cmd += ["-v", f"{path}:{path}:{mode}"]
    for key in environment(settings):
        cmd += ["-e", key]
    # the subcommand and its own options (settings travel in the environment)
    cmd += ["--workdir", str(Path.cwd()), image, invocation.command, *invocation.argv]
    return cmd


def run_step(engine: Engine, settings: Settings, invocation: Invocation) -> int:
    """Run `osbuilder <step>` in the tools image; its exit code (the engine's failures as 125)."""
    image = tools_image.ensure(engine, settings)
    for path, mode in mounts(settings, invocation).items():
        if mode == "rw":
            path.mkdir(parents=True, exist_ok=True)
    interactive = invocation.console and sys.stdin.isatty()
    name = f"osbuilder-{invocation.command}-{os.getpid()}-{secrets.token_hex(3)}"
    cmd = container_command(engine, image, settings, invocation, name, interactive)
    env = {**os.environ, **environment(settings)}
    log.info("%s: + %s", invocation.command, redact(format_command(cmd)))
    procs.terminate_as_interrupt()  # so the container is stopped too
    # the engine's client going away would leave the container running: if osbuilder is killed, its
    # watchdog stops it (SIGTERM: the step inside removes its temporaries), as a Ctrl-C here does
    cleanup = procs.on_death(stop_command(engine, name))
    try:
        proc = procs.spawn(cmd, env=env, own_group=not interactive,
                           stdin=None if interactive else subprocess.DEVNULL)
        try:
            while not procs.wait(proc, 1.0):
                pass
        except KeyboardInterrupt:
            stop(engine, name)
            raise
        finally:
            code = procs.finish(proc)
    finally:
        procs.cancel(cleanup)
    if code in ENGINE_FAILURES:
        raise InfrastructureError(f"CONTAINER_ENGINE: {engine.name} could not run the tools container "
                                  f"(exit {code}; its message is above)")
    return code


def stop_command(engine: Engine, name: str) -> list[str]:
    """How to stop the step's container like a Ctrl-C on the host: SIGTERM, then SIGKILL."""
    return engine.command("stop", "--time", str(STOP_SECONDS), name)


def stop(engine: Engine, name: str) -> None:
    run(stop_command(engine, name), step="container", capture=True, check=False, timeout=STOP_SECONDS + 30)
