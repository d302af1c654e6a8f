"""apt with a private configuration: index one suite of a mirror and download packages from it, verified.

`PrivateApt(state)` keeps everything apt needs in the directory `state` (its apt.conf, sources.list,
lists, caches, an empty dpkg status), so the host's apt configuration, sources, keys and lock files
play no part, and no root is needed. apt checks the suite's InRelease against the archive keyring
(`signed-by`) and every package against the hashes it lists, as it does for the host.

Credentials in the mirror URL (http://user:password@host/...) reach apt only through an auth.conf
(mode 0600) that exists while apt runs: the sources.list, the command lines and the logs name the
mirror without them. The lists stay in `state` between runs, so the next `update` of an unchanged
suite downloads only the InRelease. One `PrivateApt` is used by one process at a time (`lock()`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock

from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.fs import discard
from osbuilder.run import run

ARCHITECTURE = "amd64"  # the default: a PrivateApt for another guest architecture names its own


def auth_entry(mirror: str) -> tuple[str, str | None]:
    """The mirror URL without its user:password@, and the auth.conf entry that gives apt the credentials
    (None when the URL has none)."""
    url = urlsplit(mirror)
    if "@" not in url.netloc:
        return mirror, None
    bare = urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2]))
    login, password = unquote(url.username or ""), unquote(url.password or "")
    if re.search(r"\s", login + password):
        raise UsageError("REPO_URL: apt cannot use a user name or password containing white space")
    return bare, f"machine {bare}\nlogin {login}\npassword {password}\n"


@dataclass(frozen=True)
class PrivateApt:
    state: Path
    architecture: str = ARCHITECTURE  # Debian's name of the architecture whose packages it fetches

    @property
    def config(self) -> Path:
        return self.state / "apt.conf"

    @property
    def etc(self) -> Path:
        return self.state / "etc"

    @property
    def auth(self) -> Path:
        return self.etc / "auth.conf"

    def lock(self) -> FileLock:
        self.state.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.state) + ".lock")

    def configure(self, mirror: str, suite: str, keyring: Path, components: tuple[str, ...] = ("main",)) -> None:
        """Point apt at one suite of `mirror` (credentials stripped: `access` hands them to apt)."""
        if not keyring.is_file():
            raise OsbuilderError(f"apt: no archive keyring at {keyring}; run `osbuilder check-deps --install`")
        for d in (self.etc / "apt.conf.d", self.etc / "preferences.d", self.etc / "sources.list.d",
                  self.etc / "trusted.gpg.d", self.etc / "auth.conf.d", self.state / "lists/partial",
                  self.state / "cache/archives/partial", self.state / "log"):
            d.mkdir(parents=True, exist_ok=True)
        (self.state / "status").touch()
        bare, _ = auth_entry(mirror)
        (self.etc / "sources.list").write_text(
            f"deb [signed-by={keyring}] {bare} {suite} {' '.join(components)}\n")
        self.config.write_text(apt_conf(self.state, self.architecture))

    @contextmanager
    def access(self, mirror: str) -> Iterator[None]:
        """apt's auth.conf for the mirror's credentials (none without), removed afterwards."""
        _, entry = auth_entry(mirror)
        if entry is None:
            yield
            return
        discard(self.auth)
        fd = os.open(self.auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(entry)
        try:
            yield
        finally:
            discard(self.auth)

    def _run(self, args: list[str], *, step: str, logfile: Path | None, verbose: bool = False,
             capture: bool = False, cwd: Path | None = None) -> str:
        result = run(args, step=step, logfile=logfile, verbose=verbose, capture=capture, cwd=cwd,
                     env={"APT_CONFIG": str(self.config), "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})
        return result.stdout.decode(errors="replace") if capture else ""

    def update(self, *, step: str, logfile: Path | None, verbose: bool = False) -> None:
        """Download the suite's InRelease (checked against the keyring) and its package lists."""
        self._run(["apt-get", "update", "--error-on=any"], step=step, logfile=logfile, verbose=verbose)

    def show(self, package: str, *, step: str, logfile: Path | None) -> dict[str, str]:
        """The fields of the version of `package` apt would install."""
        text = self._run(["apt-cache", "show", "--no-all-versions", package], step=step, logfile=logfile,
                         capture=True)
        return parse_control(text)

    def download(self, package: str, dest: Path, *, step: str, logfile: Path | None, verbose: bool = False) -> Path:
        """`package`'s .deb, verified against the lists, downloaded into `dest`; its path."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._run(["apt-get", "download", package], step=step, logfile=logfile, verbose=verbose, cwd=dest)
        debs = sorted(set(dest.glob(f"{package}_*.deb")) - before)
        if len(debs) != 1:
            raise OsbuilderError(f"{step}: apt-get download {package} left {len(debs)} packages in {dest}")
        return debs[0]


def apt_conf(state: Path, architecture: str = ARCHITECTURE) -> str:
    """apt's configuration: every directory in `state`, nothing of the host's."""
    def q(path: Path) -> str:
        text = str(path)
        if '"' in text or "\n" in text:
            raise OsbuilderError(f"apt: {text!r} has a character apt's configuration cannot hold")
        return f'"{text}"'

    etc = state / "etc"
    lines = [
        f"Dir::Etc {q(etc)};",
        'Dir::Etc::Main "apt.conf";',
        'Dir::Etc::Parts "apt.conf.d";',
        'Dir::Etc::SourceList "sources.list";',
        'Dir::Etc::SourceParts "sources.list.d";',
        'Dir::Etc::Preferences "preferences";',
        'Dir::Etc::PreferencesParts "preferences.d";',
        'Dir::Etc::Trusted "trusted.gpg";',
        'Dir::Etc::TrustedParts "trusted.gpg.d";',
        'Dir::Etc::netrc "auth.conf";',
        'Dir::Etc::netrcparts "auth.conf.d";',
        f"Dir::State {q(state)};",
        f"Dir::State::Lists {q(state / 'lists')};",
        f"Dir::State::status {q(state / 'status')};",
        f"Dir::Cache {q(state / 'cache')};",
        f"Dir::Cache::Archives {q(state / 'cache/archives')};",
        # half the room and no slower: the lists kept compressed, no cache of the sources alone
        'Acquire::GzipIndexes "true";',
        'Dir::Cache::srcpkgcache "";',
        f"Dir::Log {q(state / 'log')};",
        f'APT::Architecture "{architecture}";',
        f'APT::Architectures {{ "{architecture}"; }};',
        'Acquire::Languages "none";',
        # as root, apt would drop to the _apt user, which cannot enter a per-user cache in /root
        'APT::Sandbox::User "root";',
    ]
    return "\n".join(lines) + "\n"


def parse_control(text: str) -> dict[str, str]:
    """The first paragraph of deb822 text as {field: value} (continuation lines joined)."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and last:
            fields[last] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            last = name.strip()
            fields[last] = value.strip()
    return fields


def first_dependency(depends: str) -> str:
    """The package name of the first alternative of the first relation in a Depends field."""
    first = depends.split(",")[0].split("|")[0].strip()
    match = re.match(r"[a-z0-9][a-z0-9.+-]*", first)
    if not match:
        raise OsbuilderError(f"apt: cannot read a package name from Depends: {depends!r}")
    return match.group(0)
