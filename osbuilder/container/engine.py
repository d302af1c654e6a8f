"""The container engine of USE_DOCKER: which one (CONTAINER_ENGINE), and proof that it can run a step.

`select()` finds the engine (auto: the first of podman and docker that can run a container) and
probes it before anything is written: it must answer, and run a container that may do what
mmdebstrap needs (unshare a mount and a PID namespace). Some hosts refuse what an engine asks for by
default (podman's open-file limit above the host's hard limit: "setrlimit RLIMIT_NOFILE: Operation
not permitted"; crun on hybrid cgroups), so the probe tries the engine as configured, then with the
host's own limits, then with runc; the first that works is kept in the per-user cache (keyed by the
engine, its version and the host's boot, for PROBE_TTL seconds), so later steps start at once.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osbuilder import fs
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import UserCache
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

ENGINES = ("podman", "docker")
PROBE_TTL = 3600.0
# What every step's container gets: the host's network (mirrors, QEMU's forwarded SSH port) and
# processes (the step locks name their holders, the sweeps of leftovers see every live osbuilder),
# and what mmdebstrap needs to unshare its namespaces and mount /proc in them.
PRIVILEGES = ("--network=host", "--pid=host", "--cap-add=SYS_ADMIN", "--security-opt=seccomp=unconfined",
              "--security-opt=apparmor=unconfined", "--security-opt=label=disable")
PROBE_COMMAND = ("unshare", "--mount", "--pid", "--fork", "--mount-proc", "true")


@dataclass(frozen=True)
class Engine:
    """An engine that was shown to run a container with `run_options` added to every `run`."""

    name: str
    path: str
    run_options: tuple[str, ...] = ()

    def command(self, *args: str) -> list[str]:
        return [self.path, *args]


def wanted(settings: Settings) -> tuple[str, ...]:
    return ENGINES if settings.container_engine == "auto" else (settings.container_engine,)


def installed(settings: Settings) -> list[tuple[str, str]]:
    """(name, path) of each wanted engine on PATH, in order of preference."""
    found = [(name, shutil.which(name)) for name in wanted(settings)]
    return [(name, path) for name, path in found if path]


def select(settings: Settings, probe_image: Callable[[Engine], str]) -> Engine:
    """The engine to run steps with. `probe_image(engine)` names a Debian image to probe it with (and
    raises a UsageError when there is none, which no other engine changes)."""
    engines = installed(settings)
    if not engines:
        names = " or ".join(wanted(settings))
        raise UsageError(f"CONTAINER_ENGINE: {names} not found on PATH; install one (apt-get install podman runc) "
                         "or set USE_DOCKER=no")
    failures: list[OsbuilderError] = []
    for name, path in engines:
        try:
            return probe(settings, Engine(name, path), probe_image)
        except InfrastructureError as e:
            failures.append(e)
    raise failures[0]


def answers(engine: Engine) -> None:
    """Raise a one-line error when the engine cannot be asked anything (a Docker daemon that is down)."""
    try:
        run(engine.command("info"), step="container", capture=True, timeout=60)
    except OsbuilderError as e:
        raise cannot_run(engine, e) from None


def candidates(engine: Engine) -> list[tuple[str, tuple[str, ...]]]:
    """Run options to try, most faithful to the engine's own configuration first."""
    limits = host_limits()
    found = [("as configured", ()), ("with the host's resource limits", limits)]
    if engine.name == "podman" and shutil.which("runc", path="/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin"):
        found.append(("with runc and the host's resource limits", ("--runtime", "runc", *limits)))
    return found


def host_limits() -> tuple[str, ...]:
    """--ulimit options within the host's hard limits: an engine's defaults (nofile=1048576) may exceed
    them, and some hosts refuse a process limit above pid_max even when their hard limit is higher."""
    options = []
    for name, which, cap in (("nofile", resource.RLIMIT_NOFILE, _read_int("/proc/sys/fs/nr_open")),
                             ("nproc", resource.RLIMIT_NPROC, _read_int("/proc/sys/kernel/pid_max"))):
        hard = resource.getrlimit(which)[1]
        bounds = [v for v in (None if hard == resource.RLIM_INFINITY else hard, cap) if v]
        if bounds:
            options.append(f"--ulimit={name}={min(bounds)}:{min(bounds)}")
    return tuple(options)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def probe(settings: Settings, engine: Engine, probe_image: Callable[[Engine], str]) -> Engine:
    verdict_file = UserCache.of(settings).container_verdict
    key = verdict_key(engine)
    cached = cached_options(verdict_file, key)
    if cached is not None:
        return Engine(engine.name, engine.path, cached)
    answers(engine)
    image = probe_image(engine)
    failures: list[OsbuilderError] = []
    for how, options in candidates(engine):
        try:
            run(engine.command("run", "--rm", *PRIVILEGES, *options, image, *PROBE_COMMAND), step="container",
                capture=True, timeout=120)
        except OsbuilderError as e:
            failures.append(e)
            log.debug("container: %s cannot run a step's container %s", engine.name, how)
            continue
        if how != "as configured":
            log.info("container: %s runs containers here only %s (%s)", engine.name, how, " ".join(options))
        save_options(verdict_file, key, options)
        return Engine(engine.name, engine.path, options)
    raise cannot_run(engine, *failures)


def verdict_key(engine: Engine) -> dict[str, str]:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return {"engine": os.path.realpath(engine.path), "version": tool_version(engine.path), "boot_id": boot_id,
            "uid": str(os.geteuid())}


def cached_options(path: Path, key: dict[str, str]) -> tuple[str, ...] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or time.time() - data.get("time", 0) > PROBE_TTL:
        return None
    return tuple(data.get("run_options", ()))


def save_options(path: Path, key: dict[str, str], options: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.write_atomically(path, json.dumps({"key": key, "time": time.time(), "run_options": list(options)}))


HINTS = (
    ("Cannot connect to the Docker daemon", "start the Docker daemon, or set CONTAINER_ENGINE=podman"),
    ("cgroups in hybrid mode", "install runc (apt-get install runc): crun cannot run containers on this "
                               "host's cgroups"),
    ("RLIMIT_NOFILE", "install runc (apt-get install runc): crun cannot set the open-file limit here"),
    ("unshare failed", "the engine cannot give a container CAP_SYS_ADMIN and unconfined seccomp, which "
                       "mmdebstrap needs; run it as root, or rootless with subordinate ids"),
    ("newuidmap", "give your user subordinate ids (/etc/subuid, /etc/subgid) and install uidmap"),
)


def cannot_run(engine: Engine, *failures: OsbuilderError) -> InfrastructureError:
    """One line: which engine, what it said at the last attempt, and what to change (from every attempt)."""
    detail = "\n".join(e.detail for e in failures)
    lines = [line.strip() for line in failures[-1].detail.splitlines()[1:] if line.strip()]
    said = next((line for line in lines if "rror" in line), lines[-1] if lines else failures[-1].message)
    hint = next((h for needle, h in HINTS if needle in detail), "see its output below, or set USE_DOCKER=no")
    return InfrastructureError(f"CONTAINER_ENGINE: {engine.name} is installed but cannot run a container "
                               f"({said[:200]}); {hint}", detail)
