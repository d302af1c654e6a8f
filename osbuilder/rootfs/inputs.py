"""Inputs of a rootfs that are not settings: the archive's state, the agent's toolchain, the plugin's code.

They are part of the rootfs cache key (`build.manifest`), so a cached rootfs is rebuilt when the
archive publishes a new Release of a suite the rootfs is built from (a point release, a security or
stable update, any update of a moving suite), when the host's compiler or static C library changes
under osbuilder's agent, or when the distribution plugin's code does. Each is cheap: one ranged HTTP
request for the first bytes of each suite's InRelease per process, two compiler invocations, a hash
of two source files.

The request logs in to a mirror whose URL carries credentials, and the login goes nowhere else: a
redirect to another scheme, host or port is followed without it, and one from https to plain http is
refused (as apt does).
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import logging
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from osbuilder.fs import file_hash, sha256_file, write_atomically
from osbuilder.layout import UserCache
from osbuilder.rootfs.distro import Distro, Suite
from osbuilder.run import tool_version
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

RELEASE_HEAD_BYTES = 4096  # the Date field is in the first lines of InRelease
_SEEN: dict[tuple[str, str], str] = {}  # per process: one request per mirror and release


def plugin_code(distro: Distro) -> str:
    """Hash of the plugin's module and of the interface it implements."""
    return file_hash(Path(inspect.getfile(type(distro))), Path(inspect.getfile(Distro)))


def agent_toolchain() -> str:
    """The compiler (`$CC`, as the agent's build uses it) and the static C library it links in."""
    cc = shlex.split(os.environ.get("CC") or "gcc")
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


def archive_date(settings: Settings, mirror: str, suite: str | None = None) -> str:
    """The Date of `mirror`'s Release file for `suite` (default: OS_VERSION), asked once per process.

    When the mirror cannot be asked, the Date last seen (kept in the per-user cache) stands in, and a
    warning says so: a warm cache keeps working offline."""
    suite = suite or settings.os_version
    bare = _bare(mirror)
    key = (bare, suite)
    if key not in _SEEN:
        remembered = UserCache.of(settings).archive_dates
        known = _read(remembered)
        name = f"{bare} {suite}"
        try:
            _SEEN[key] = fetch_release_date(mirror, suite)
        except (OSError, ValueError) as e:
            _SEEN[key] = known.get(name, "unknown")
            log.warning("rootfs: cannot read the Release of %s at %s (%s); keying the cached rootfs on the "
                        "archive state last seen: %s", suite, bare, e, _SEEN[key])
        else:
            if known.get(name) != _SEEN[key]:
                _remember(remembered, {**known, name: _SEEN[key]})
    return _SEEN[key]


def archive_state(settings: Settings, suites: list[Suite]) -> str:
    """The Dates of the Release files of `suites` (the release's updates and security suites), one
    `suite date` each, for the cache key; 'none' without any."""
    return "; ".join(f"{s.name} {archive_date(settings, s.mirror, s.name)}" for s in suites) or "none"


def fetch_release_date(mirror: str, release: str) -> str:
    """The `Date:` of `<mirror>/dists/<release>/InRelease`, read from its first bytes."""
    parts = urlsplit(mirror)
    url = f"{_bare(mirror).rstrip('/')}/dists/{quote(release)}/InRelease"
    request = Request(url, headers={"Range": f"bytes=0-{RELEASE_HEAD_BYTES - 1}"})
    login = None
    if parts.username is not None:  # the same login apt uses (debian.mirror_access)
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        login = "Basic " + base64.b64encode(secret.encode()).decode()
        request.add_unredirected_header("Authorization", login)  # a redirect decides for itself
    opener = build_opener(LoginStaysHome(urlsplit(url), login))
    with opener.open(request, timeout=10) as response:
        head = response.read(RELEASE_HEAD_BYTES)
    m = re.search(rb"^Date:[ \t]*(\S.*?)[ \t\r]*$", head, re.MULTILINE)
    if not m:
        raise ValueError(f"{url} has no Date field")
    return m.group(1).decode(errors="replace")


def origin(url: SplitResult) -> tuple[str, str, int | None]:
    """Scheme, host and port: where a login may be sent (RFC 6454's origin)."""
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, (url.hostname or "").lower(), url.port or default


class LoginStaysHome(HTTPRedirectHandler):
    """Follows a mirror's redirects, sending its login only to the mirror's own origin (urllib would
    copy the Authorization header to any host); a redirect from https to http is refused."""

    def __init__(self, home: SplitResult, login: str | None) -> None:
        self.home = origin(home)
        self.login = login

    def redirect_request(self, req: Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        target = urlsplit(new.full_url)
        if urlsplit(req.full_url).scheme == "https" and target.scheme != "https":
            raise HTTPError(req.full_url, code, f"refusing a redirect from https to {target.scheme}", headers, fp)
        new.remove_header("Authorization")
        if self.login and origin(target) == self.home:
            new.add_unredirected_header("Authorization", self.login)
        return new


def _bare(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


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
