"""Inputs of a rootfs that are not settings: the archive's state, the agent's toolchain, the plugin's code.

They are part of the rootfs cache key (`build.manifest`), so a cached rootfs is rebuilt when the
archive publishes a new Release of a suite the rootfs is built from (a point release, a security or
stable update, any update of a moving suite), when the host's compiler or static C library changes
under osbuilder's agent, or when the distribution plugin's code does. Each is cheap: one ranged HTTP
request for the first bytes of each suite's InRelease per process, two compiler invocations, a hash
of two source files. The processes of one test run (pytest-xdist's workers on one machine) share what
the first of them read (`share_archive_states`): a Release published while the run goes on would
otherwise key its workers' rootfs differently, and each would build and boot its own. A Release dated
before one already seen (a mirror or CDN node that lags behind another) does not move the key back.

The request logs in to a mirror whose URL carries credentials, and the login goes nowhere else: a
redirect to another scheme, host or port is followed without it, and one from https to plain http is
refused (as apt does).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shlex
import subprocess
from email.utils import parsedate_to_datetime
from pathlib import Path

from filelock import FileLock

from osbuilder.fs import file_hash, sha256_file, write_atomically
from osbuilder.layout import UserCache
from osbuilder.rootfs.distro import Distro, Suite
from osbuilder.run import tool_version
from osbuilder.settings import Settings
from osbuilder.urls import without_credentials

log = logging.getLogger("osbuilder")

_SEEN: dict[tuple[str, str], str] = {}  # per process: one request per mirror and release
_SHARED: Path | None = None  # the file the processes of this test run share their archive states in


def share_archive_states(path: Path | None) -> None:
    """Key on the archive states recorded in `path` (JSON, `<mirror> <suite>`: state), and record there the
    ones this process reads first, so that every process naming the same `path` keys on the same states.
    None: this process asks for itself."""
    global _SHARED
    _SHARED = path


def plugin_code(distro: Distro) -> str:
    """Hash of the plugin's module and of the interface it implements."""
    return file_hash(Path(inspect.getfile(type(distro))), Path(inspect.getfile(Distro)))


def agent_toolchain(cc: list[str] | None = None) -> str:
    """The compiler (`cc`, default `$CC` as the agent's build uses it) and the static C library it links in."""
    cc = cc or shlex.split(os.environ.get("CC") or "gcc")
    version = tool_version(cc[0], *cc[1:], "--version") or f"{cc[0]}: not found"
    try:
        found = subprocess.run([*cc, "-print-file-name=libc.a"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        found = ""
    libc = Path(found)
    if not libc.is_absolute() or not libc.is_file():
        return f"{version}; libc.a not found"
    st = libc.stat()
    return f"{version}; libc.a {_hash_once(str(libc), st.st_size, st.st_mtime_ns, st.st_ino)[:16]}"


@functools.lru_cache(maxsize=4)
def _hash_once(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(Path(path))


def archive_date(settings: Settings, distro: Distro, mirror: str, suite: str | None = None) -> str:
    """The state of `mirror`'s archive for `suite` (default: OS_VERSION), as the distribution reads it
    (asked once per process, or once per test run: `share_archive_states`): for Debian, the Date of the
    suite's Release file.

    When the mirror cannot be asked, the state last seen (kept in the per-user cache) stands in, and a
    warning says so: a warm cache keeps working offline."""
    suite = suite or settings.os_version
    bare = without_credentials(mirror)
    key = (bare, suite)
    if key not in _SEEN:
        name = f"{bare} {suite}"
        if _SHARED is None:
            _SEEN[key] = _ask(settings, distro, mirror, suite, name)
        else:
            with FileLock(f"{_SHARED}.lock"):
                shared = _read(_SHARED)
                if name not in shared:  # the run's first process to ask
                    shared[name] = _ask(settings, distro, mirror, suite, name)
                    _remember(_SHARED, shared)
                _SEEN[key] = shared[name]
    return _SEEN[key]


def _ask(settings: Settings, distro: Distro, mirror: str, suite: str, name: str) -> str:
    """The archive's state as the mirror says it now, remembered in the per-user cache under `name`
    (`<mirror without credentials> <suite>`); if it cannot be asked, the state last remembered, with a
    warning."""
    remembered = UserCache.of(settings).archive_dates
    known = _read(remembered)
    bare = without_credentials(mirror)
    try:
        state = distro.archive_state(mirror, suite)
    except (OSError, ValueError) as e:
        state = known.get(name, "unknown")
        log.warning("rootfs: cannot read the archive state of %s at %s (%s); keying the cached rootfs on "
                    "the archive state last seen: %s", suite, bare, e, state)
        return state
    seen = known.get(name)
    if seen is not None and _older(state, seen):
        log.info("rootfs: %s at %s says its Release is of %s, older than the %s already seen: a mirror (or a "
                 "node of its CDN) not updated yet; keying on the newer", suite, bare, state, seen)
        return seen
    if seen != state:
        _remember(remembered, {**known, name: state})
    return state


def _older(state: str, seen: str) -> bool:
    """Whether `state` and `seen` are both dates (RFC 2822, as Debian's Release files have them) and `state`
    is the earlier: an archive's Release never goes back in time, a lagging mirror node does."""
    try:
        return parsedate_to_datetime(state) < parsedate_to_datetime(seen)
    except (TypeError, ValueError):
        return False


def archive_state(settings: Settings, distro: Distro, suites: list[Suite]) -> str:
    """The states of `suites` (the release's updates and security suites), one `suite state` each, for
    the cache key; 'none' without any."""
    return "; ".join(f"{s.name} {archive_date(settings, distro, s.mirror, s.name)}" for s in suites) or "none"


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, dates: dict[str, str]) -> None:
    try:
        write_atomically(path, json.dumps(dates, indent=2, sort_keys=True) + "\n")
    except OSError as e:  # a read-only cache only costs the offline fallback
        log.warning("rootfs: cannot remember the archive's date in %s: %s", path, e.strerror)
