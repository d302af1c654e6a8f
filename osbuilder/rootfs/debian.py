"""Debian (and derivatives with an apt archive): the rootfs is made by mmdebstrap.

mmdebstrap runs in `unshare` mode: its own user and mount namespaces, no loop devices, no mounts
on the host. apt verifies every package against the archive keyring. Settings reach mmdebstrap as
positionals after `--` or quoted in its hooks; credentials in the mirror URL reach only apt, through
an auth.conf that exists in the tree while mmdebstrap runs (`mirror_access`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from osbuilder.apt import auth_entry
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, temp_beside
from osbuilder.rootfs.distro import Distro
from osbuilder.run import run

# Documentation, manual pages and translations are not needed in a container guest.
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
            "/usr/share/lintian/*")


class Debian(Distro):
    name = "debian"
    releases = ("bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")
    default_mirror = "http://deb.debian.org/debian"
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")  # debian-archive-keyring
    tool = "mmdebstrap"

    def default_packages(self, agent_init: bool) -> list[str]:
        base = ["coreutils", "iptables", "kmod", "iproute2"]
        if agent_init:
            return base
        return ["systemd", "systemd-sysv", "udev", *base, "openssh-server"]

    def build(self, release, mirror, packages, overlay, dest, *, logfile, verbose, source_date_epoch):
        if '"' in str(dest):  # mmdebstrap refuses it: apt's configuration cannot hold one
            raise UsageError(f"WORKDIR: {dest.parent} has a double quote (\"), which apt cannot handle; "
                             "choose another WORKDIR")
        cmd = ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
               "--include=" + ",".join(packages)]
        cmd += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDES]
        cmd += ["--dpkgopt=path-include=/usr/share/doc/*/copyright",
                # no host keys in the image: each boot makes its own
                '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
                f"--customize-hook=tar-in {hook_word(str(overlay))} /"]
        env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)} if source_date_epoch is not None else None
        with mirror_access(mirror, temp_beside(dest.parent / "apt-auth.conf")) as (url, hooks):
            try:
                run([*cmd, *hooks, "--", release, str(dest), url], step="rootfs", logfile=logfile, env=env,
                    verbose=verbose)
            except OsbuilderError as e:
                raise classify_failure(e, release, url, packages) from None


def hook_word(text: str) -> str:
    """`text` as one word of an mmdebstrap special hook (`tar-in`, `upload`, ...), which mmdebstrap
    splits like a shell (Perl's shellwords): every character but a few safe ones is backslash-escaped."""
    return re.sub(r"([^A-Za-z0-9_./-])", r"\\\1", text)


@contextmanager
def mirror_access(mirror: str, scratch: Path) -> Iterator[tuple[str, list[str]]]:
    """The mirror URL to give mmdebstrap, and the hooks that let apt log in to it.

    Credentials in `mirror` (http://user:password@host/...) stay out of the command line, the log,
    the tree's sources.list and the finished tree: they are written to `scratch` (mode 0600), which
    mmdebstrap itself reads (`upload`: a rootless build's namespace could not) into the tree's
    /etc/apt/auth.conf (made 0600 first) for apt, and a customize hook removes it.
    """
    bare, entry = auth_entry(mirror)
    if entry is None:
        yield mirror, []
        return
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(entry)
    try:
        yield bare, ['--setup-hook=umask 077 && : > "$1/etc/apt/auth.conf"',
                     f"--setup-hook=upload {hook_word(str(scratch))} /etc/apt/auth.conf",
                     '--customize-hook=rm -f "$1/etc/apt/auth.conf"']
    finally:
        discard(scratch)


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

