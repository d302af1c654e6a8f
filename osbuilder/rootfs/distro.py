"""The interface every distribution plugin implements (the registry is distros.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from osbuilder.errors import UsageError


class Distro(ABC):
    """A way to populate a directory with a distribution's packages, without mounts or loop devices."""

    name: str
    releases: tuple[str, ...]
    default_mirror: str
    tool: str  # the program that does the work, for check-deps and cache manifests

    @abstractmethod
    def default_packages(self, agent_init: bool) -> list[str]:
        """The package set for a guest rootfs (systemd, coreutils, iptables, kmod, iproute2, sshd...)."""

    @abstractmethod
    def build(self, release: str, mirror: str, packages: list[str], overlay: Path, dest: Path,
              *, logfile: Path, verbose: bool, source_date_epoch: int | None) -> None:
        """Create the rootfs at `dest` (which must not exist) and unpack `overlay` (a tarball whose
        entries belong to root) over it, keeping the owners in the tarball."""

    def check_release(self, release: str) -> None:
        if release not in self.releases:
            raise UsageError(f"OS_VERSION: unknown {self.name} release {release!r}; known: {', '.join(self.releases)}")
