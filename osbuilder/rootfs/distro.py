"""The contract every distribution plugin fulfils (the registry is distros.py; debian.py is the first).

A plugin owns every fact about its distribution: its releases and standard mirror, the programs it
runs (with the packages that provide them, for `check-deps` and the USE_DOCKER tools image), its
names for the host's architectures, the packages a guest needs, how to read the state of its archive
(for the rootfs cache key), how to list the files of an installed package, and how to populate a
directory with the packages, without mounts or loop devices (the base tree, which osbuilder caches and
copies for each rootfs before adding its own files). What every image must hold whatever made it (no
SSH host keys, no documentation) is not the plugin's business: `policy.py` enforces it after the plugin
ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from osbuilder.deps import Tool
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
    default_release: str  # OS_VERSION's default
    default_mirror: str
    tools: tuple[Tool, ...]  # the programs `build` runs, each with its package
    packages: tuple[str, ...] = ()  # packages it needs that have no program to look for (a keyring)
    architectures: Mapping[str, str]  # the host's machine name (uname -m) -> the distribution's name

    @abstractmethod
    def default_packages(self, agent_init: bool) -> list[str]:
        """The package set for a guest rootfs (systemd, coreutils, iptables, kmod, iproute2, sshd...)."""

    def suites(self, release: str, mirror: str, updates: bool) -> list[Suite]:
        """The suites to install from, the release first; with `updates` (SECURITY_UPDATES) also those
        that carry its security and stable updates. Raises a UsageError naming the setting when they
        cannot be found. A distribution without such suites keeps this: the release alone."""
        return [Suite(mirror, release)]

    @abstractmethod
    def build(self, suites: list[Suite], packages: list[str], dest: Path,
              *, logfile: Path, verbose: bool, source_date_epoch: int | None, architecture: str) -> None:
        """Create the tree at `dest` (which must not exist) from `suites` (`suites()`: the release first,
        newer versions in the others win) with `packages` installed, for `architecture` (the plugin's
        name for ARCH, `architecture()`'s; base.py has made sure its programs run on this host when it is
        not the host's), and nothing else: osbuilder copies it
        for each rootfs and unpacks its own files over the copy (base.py), so one tree serves every agent.
        The tree must not depend on the machine that builds it (its host name, its DNS configuration) nor
        on where it is built (the directory, who can reach it): it is cached and shared."""

    @abstractmethod
    def archive_state(self, mirror: str, release: str) -> str:
        """A short text that changes whenever `mirror` serves new packages for `release` (a point
        release, an update of a moving suite). Raises OSError or ValueError when it cannot be read."""

    @abstractmethod
    def package_files(self, tree: Path, package: str) -> list[str]:
        """The paths (absolute, as in the guest) the installed `package` put into `tree`."""

    def package_of(self, filename: str) -> str | None:
        """The package that ships a file of this name (a shared library), when the plugin can tell."""
        return None

    def architecture(self, machine: str) -> str:
        """The distribution's name for the machine `uname -m` names (x86_64 -> amd64 for Debian)."""
        try:
            return self.architectures[machine]
        except KeyError:
            raise UsageError(f"DISTRO: {self.name} has no architecture for the guest's {machine!r} (ARCH); "
                             f"known: {', '.join(self.architectures)}") from None

    def check_release(self, release: str) -> None:
        if release not in self.releases:
            raise UsageError(f"OS_VERSION: unknown {self.name} release {release!r}; known: {', '.join(self.releases)}")
