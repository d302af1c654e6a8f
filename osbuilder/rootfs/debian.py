"""Debian (and derivatives with an apt archive): the rootfs is made by mmdebstrap.

mmdebstrap runs in `unshare` mode: its own user and mount namespaces, no loop devices, no mounts
on the host. apt verifies every package against the archive keyring.
"""

from __future__ import annotations

import re

from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.rootfs.distro import Distro
from osbuilder.run import run

# Documentation, manual pages and translations are not needed in a container guest.
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
            "/usr/share/lintian/*")


class Debian(Distro):
    name = "debian"
    releases = ("bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")
    default_mirror = "http://deb.debian.org/debian"
    tool = "mmdebstrap"

    def default_packages(self, agent_init: bool) -> list[str]:
        base = ["coreutils", "iptables", "kmod", "iproute2"]
        if agent_init:
            return base
        return ["systemd", "systemd-sysv", "udev", *base, "openssh-server"]

    def build(self, release, mirror, packages, overlay, dest, *, logfile, verbose, source_date_epoch):
        cmd = ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
               "--include=" + ",".join(packages)]
        cmd += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDES]
        cmd += ["--dpkgopt=path-include=/usr/share/doc/*/copyright",
                # no host keys in the image: each boot makes its own
                '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
                f"--customize-hook=tar-in {overlay} /",
                release, str(dest), mirror]
        env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)} if source_date_epoch is not None else None
        try:
            run(cmd, step="rootfs", logfile=logfile, env=env, verbose=verbose)
        except OsbuilderError as e:
            raise classify_failure(e, release, mirror, packages) from None


def classify_failure(error: OsbuilderError, release: str, mirror: str, packages: list[str]) -> OsbuilderError:
    """Turn mmdebstrap's output into a one-line error naming the setting at fault."""
    text = error.detail
    missing = re.findall(r"Unable to locate package (\S+)", text)
    missing += re.findall(r"Package '?(\S+?)'? has no installation candidate", text)
    if missing:
        return UsageError(f"EXTRA_PKGS: package(s) not found in {release}: {', '.join(dict.fromkeys(missing))}",
                          error.detail)
    if re.search(r"Could not resolve|Failed to fetch|Could not connect|Connection failed|"
                 r"Temporary failure resolving|Unable to connect", text):
        if re.search(r"dists/\S+/(In)?Release\s+404|does not have a Release file|404\s+Not Found", text):
            return UsageError(f"OS_VERSION: release {release!r} not found at {mirror}", error.detail)
        return InfrastructureError(f"REPO_URL: mirror {mirror} is unreachable", error.detail)
    if re.search(r"does not have a Release file|404\s+Not Found", text):
        return UsageError(f"OS_VERSION: release {release!r} not found at {mirror} (check REPO_URL and OS_VERSION)",
                          error.detail)
    if re.search(r"No space left on device", text):
        return InfrastructureError("WORKDIR: no space left on device while building the rootfs", error.detail)
    return error

