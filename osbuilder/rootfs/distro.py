"""The interface every distribution plugin implements (the registry is distros.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from osbuilder.errors import UsageError


@dataclass(frozen=True)
class Suite:
    """One suite the rootfs is installed from: its mirror (an http(s) or file URL, credentials and all)
    and its name (bookworm, bookworm-updates, bookworm-security)."""

    mirror: str
    name: str


class Distro(ABC):
    """A way to populate a directory with a distribution's packages, without mounts or loop devices."""

    name: str
    releases: tuple[str, ...]
    default_mirror: str
    tool: str  # the program that does the work, for check-deps and cache manifests

    @abstractmethod
    def default_packages(self, agent_init: bool) -> list[str]:
        """The package set for a guest rootfs (systemd, coreutils, iptables, kmod, iproute2, sshd...)."""

    def suites(self, release: str, mirror: str, updates: bool) -> list[Suite]:
        """The suites to install from, the release first; with `updates` (SECURITY_UPDATES) also those
        that carry its security and stable updates. Raises a UsageError naming the setting when they
        cannot be found. A distribution without such suites keeps this: the release alone."""
        return [Suite(mirror, release)]

    @abstractmethod
    def build(self, suites: list[Suite], packages: list[str], overlay: Path, dest: Path,
              *, logfile: Path, verbose: bool, source_date_epoch: int | None) -> None:
        """Create the rootfs at `dest` (which must not exist) from `suites` (`suites()`: the release
        first, newer versions in the others win) and unpack `overlay` (a tarball whose entries belong
        to root) over it, keeping the owners in the tarball. The tree must not depend on the machine
        that builds it (its host name, its DNS configuration)."""

    def check_release(self, release: str) -> None:
        if release not in self.releases:
            raise UsageError(f"OS_VERSION: unknown {self.name} release {release!r}; known: {', '.join(self.releases)}")
