"""Debian (and derivatives with an apt archive): the rootfs is made by mmdebstrap.

mmdebstrap runs in `unshare` mode: its own user and mount namespaces, no loop devices, no mounts
on the host. apt verifies every package against the archive keyring. Settings reach mmdebstrap as
positionals after `--` or quoted in its hooks; credentials in the mirror URL reach only apt, through
an auth.conf that exists in the tree while mmdebstrap runs (`mirror_access`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from osbuilder import errors
from osbuilder.deps import Tool
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, temp_beside
from osbuilder.rootfs.distro import Distro
from osbuilder.run import run
from osbuilder.urls import read_head, without_credentials

# Documentation, manual pages and translations are not needed in a container guest.
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
            "/usr/share/lintian/*")


RELEASE_HEAD_BYTES = 4096  # the Date field is in the first lines of InRelease


class Debian(Distro):
    name = "debian"
    releases = ("bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")
    default_release = "bookworm"
    default_mirror = "http://deb.debian.org/debian"
    tools = (
        Tool("mmdebstrap", "mmdebstrap", "creates the Debian rootfs without mounts or loop devices"),
        Tool("gpgv", "gpgv", "checks the archive's signatures"),
    )
    packages = ("debian-archive-keyring", "ca-certificates")
    architectures = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x"}

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
                f"--customize-hook=tar-in {hook_word(str(overlay))} /"]
        env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)} if source_date_epoch is not None else None
        with mirror_access(mirror, temp_beside(dest.parent / "apt-auth.conf")) as (url, hooks):
            try:
                run([*cmd, *hooks, "--", release, str(dest), url], step="rootfs", logfile=logfile, env=env,
                    verbose=verbose)
            except OsbuilderError as e:
                raise classify_failure(e, release, url, packages) from None


    def archive_state(self, mirror: str, release: str) -> str:
        """The `Date:` of the suite's InRelease, read from its first bytes."""
        head = read_head(mirror, f"dists/{quote(release)}/InRelease", RELEASE_HEAD_BYTES)
        m = re.search(rb"^Date:[ \t]*(\S.*?)[ \t\r]*$", head, re.MULTILINE)
        if not m:
            raise ValueError(f"dists/{release}/InRelease at {without_credentials(mirror)} has no Date field")
        return m.group(1).decode(errors="replace")

    def package_files(self, tree: Path, package: str) -> list[str]:
        """dpkg's list of the package's files (`var/lib/dpkg/info/<package>[:arch].list`)."""
        info = tree / "var/lib/dpkg/info"
        for candidate in sorted(info.glob(f"{package}.list")) + sorted(info.glob(f"{package}:*.list")):
            return [line for line in candidate.read_text().splitlines() if line and line != "/."]
        return []


    def package_of(self, filename: str) -> str | None:
        """The host's dpkg database, asked which package ships `*/filename` (the guest's archive ships
        the same package names); None where the host has no dpkg or no such file."""
        try:
            out = subprocess.run(["dpkg-query", "-S", f"*/{filename}"], capture_output=True, text=True,
                                 timeout=20, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        first = out.partition(":")[0].strip()
        return first if first and "," not in first and " " not in first else None


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
    url = urlsplit(mirror)
    if "@" not in url.netloc:
        yield mirror, []
        return
    bare = urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2]))
    login, password = unquote(url.username or ""), unquote(url.password or "")
    if re.search(r"\s", login + password):
        raise UsageError("REPO_URL: apt cannot use a user name or password containing white space")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"machine {bare}\nlogin {login}\npassword {password}\n")
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
    if errors.out_of_space(error):
        return errors.full_disk("WORKDIR", "while building the rootfs", error)
    return error

