"""Debian (and derivatives with an apt archive): the rootfs is made by mmdebstrap.

mmdebstrap runs in `unshare` mode: its own user and mount namespaces, no loop devices, no mounts
on the host. apt verifies every package against the archive keyring. Settings reach mmdebstrap as
positionals after `--` or quoted in its hooks; credentials in the mirror URL reach only apt, through
an auth.conf that exists in the tree while mmdebstrap runs (`mirror_access`).

The rootfs is installed from the release and, unless SECURITY_UPDATES=no, from its `-updates` suite
and the security archive's `-security` suite (beside the mirror: `.../debian-security`), so it carries
the fixes published since the last point release. When EXTRA_PKGS names packages, apt checks before
anything is downloaded beyond the package lists that every package can be installed
(`check_packages_hook`), so a misspelt one fails in seconds. The tree carries nothing of the machine
that built it: mmdebstrap's copies of the host's /etc/hostname and /etc/resolv.conf are replaced
(`HOST_INDEPENDENT_HOOK`); nor of where it was built: apt's download directories belong to _apt
whoever could reach the tree (`give_apt_its_partial_dirs`). The tree is the base that osbuilder caches
and copies for each rootfs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from osbuilder import userns
from osbuilder.apt import auth_entry
from osbuilder.deps import Tool
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, temp_beside
from osbuilder.rootfs import policy
from osbuilder.rootfs.distro import Distro, Suite
from osbuilder.run import redact, run
from osbuilder.urls import read_head, without_credentials

# Documentation, manual pages and translations are not needed in a container guest.
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
            "/usr/share/lintian/*")
ROLLING = ("sid", "unstable")  # updated in place: no -updates or -security suite
# /etc/hostname: `localhost`, whoever builds (the runtime names the sandbox; systemd's fallback is the
# same). /etc/resolv.conf: an empty file, which a runtime's agent bind-mounts the sandbox's DNS
# configuration onto (Kata's agent does); a guest without one falls back to a resolver on localhost.
# Both written before any package is installed, so a package that manages them (systemd-resolved)
# still may, and never with the host's modes.
HOST_INDEPENDENT_HOOK = ('rm -f "$1/etc/hostname" "$1/etc/resolv.conf" && echo localhost > "$1/etc/hostname" '
                         '&& : > "$1/etc/resolv.conf" && chmod 0644 "$1/etc/hostname" "$1/etc/resolv.conf"')
# dpkg's filter for the excludes, in the file and with the lines that mmdebstrap's --dpkgopt would write.
# Not given as --dpkgopt: mmdebstrap then pipes every essential package through mmtarfilter, a tar filter
# in Python, when it extracts them (a tenth of the build here). An extract hook writes the file after
# that raw extraction instead, and removes what the filter would have kept out (the image policy's own
# rules), so dpkg installs the essential set over the same tree and the result is the one --dpkgopt made.
DPKG_CONFIG = "etc/dpkg/dpkg.cfg.d/99mmdebstrap"
DPKG_FILTER = (*(f"path-exclude={p}" for p in EXCLUDES), "path-include=/usr/share/doc/*/copyright")
EXCLUDES_HOOK = (f'printf "%s\\n" {" ".join(shlex.quote(line) for line in DPKG_FILTER)} > "$1/{DPKG_CONFIG}" '
                 f'&& sh -c {shlex.quote(policy.APPLY)} policy "$1"')
APT_OUTSIDE = 'env --chdir="$1" APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"'  # apt on the chroot's lists, as
# mmdebstrap's own setup hooks run it (/usr/share/mmdebstrap/hooks/maybe-merged-usr)
# Package scripts need the chroot's /dev and /proc: without them (mmdebstrap skips mounting when it
# cannot mount) `> /dev/null` leaves a regular file and systemd-tmpfiles creates nothing (/etc/mtab,
# /var/lib/private, ...), silently (`|| true`). While the mounts still stand, after the packages:
MOUNTS_HOOK = ('if ! [ -c "$1/dev/null" ] || ! [ -e "$1/proc/self/mounts" ]; then echo "E: osbuilder: the chroot had '
               'no /dev/null device or no /proc while packages were installed" >&2; exit 1; fi')


APT_PARTIAL = ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial")  # apt's download directories

RELEASE_HEAD_BYTES = 4096  # the Date field is in the first lines of InRelease


class Debian(Distro):
    name = "debian"
    releases = ("bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")
    default_release = "bookworm"
    default_mirror = "http://deb.debian.org/debian"
    tools = (
        Tool("mmdebstrap", "mmdebstrap", "creates the Debian rootfs without mounts or loop devices"),
        Tool("gpgv", "gpgv", "checks the archive's signatures"),
        # mmdebstrap only recommends it, and without it silently skips mounting the chroot's /dev and
        # /proc: package scripts then leave /dev/null a file and systemd-tmpfiles creates nothing
        Tool("mount", "mount", "mounts /dev and /proc in mmdebstrap's chroot for the package scripts"),
    )
    packages = ("debian-archive-keyring", "ca-certificates")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")  # debian-archive-keyring
    architectures = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x"}

    def default_packages(self, agent_init: bool) -> list[str]:
        base = ["coreutils", "iptables", "kmod", "iproute2"]
        if agent_init:
            return base
        return ["systemd", "systemd-sysv", "udev", *base, "openssh-server"]

    def suites(self, release: str, mirror: str, updates: bool) -> list[Suite]:
        if not updates or release in ROLLING:
            return [Suite(mirror, release)]
        return [Suite(mirror, release), Suite(mirror, f"{release}-updates"),
                Suite(security_mirror(mirror), f"{release}-security")]

    def build(self, suites, packages, dest, *, logfile, verbose, source_date_epoch, architecture):
        if '"' in str(dest):  # mmdebstrap refuses it: apt's configuration cannot hold one (settings check it)
            raise UsageError(f"rootfs: {dest.parent} has a double quote (\"), which apt cannot handle (WORKDIR and "
                             "CACHE_DIR may not have one)")
        cmd = ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
               f"--architectures={architecture}", "--include=" + ",".join(packages)]
        cmd += self.filter_options()
        cmd += [f"--customize-hook={hook}" for hook in self.customize_hooks()]
        env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)} if source_date_epoch is not None else None
        mirrors = [s.mirror for s in suites]
        with mirror_access(mirrors, temp_beside(dest.parent / "apt-auth.conf")) as (urls, hooks):
            hooks = [*hooks, f"--setup-hook={HOST_INDEPENDENT_HOOK}"]
            if self.extra(packages):  # osbuilder's own set needs no check (apt's solver: 2 s of every build)
                hooks.append(f"--setup-hook={check_packages_hook(packages)}")
            sources = [urls[0], *(f"deb {url} {s.name} main" for s, url in zip(suites[1:], urls[1:], strict=True))]
            try:
                run([*cmd, *hooks, "--", suites[0].name, str(dest), *sources], step="rootfs", logfile=logfile,
                    env=env, verbose=verbose)
            except OsbuilderError as e:
                bare = [Suite(url, s.name) for s, url in zip(suites, urls, strict=True)]
                raise classify_failure(e, bare, packages, self.extra(packages)) from None
        check_dev(dest)
        give_apt_its_partial_dirs(dest, logfile)

    def filter_options(self) -> list[str]:
        """How mmdebstrap is told to leave out what EXCLUDES names (see EXCLUDES_HOOK)."""
        return [f"--extract-hook={EXCLUDES_HOOK}"]

    def customize_hooks(self) -> list[str]:
        """mmdebstrap's customize hooks, run in order after the packages are installed, while the chroot's
        /dev and /proc are still mounted (a subclass may add its own after osbuilder's)."""
        return [MOUNTS_HOOK]

    def extra(self, packages: list[str]) -> list[str]:
        """The packages that are not one of the plugin's defaults (those EXTRA_PKGS asked for)."""
        defaults = {*self.default_packages(True), *self.default_packages(False)}
        return [p for p in packages if p not in defaults]

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


def give_apt_its_partial_dirs(tree: Path, logfile: Path) -> None:
    """apt's download directories as apt leaves them when it downloads as `_apt`, its sandbox user: owned
    by _apt (group root, mode 0700). mmdebstrap lets apt download as _apt only when _apt can reach the
    tree, else as root, which leaves them root's: so that the tree does not depend on where it was built
    (a cache below root's 0700 home, a WORKDIR others can reach), they are given to _apt either way."""
    passwd = tree / "etc/passwd"
    lines = passwd.read_text().splitlines() if passwd.is_file() and not passwd.is_symlink() else []
    uid = next((fields[2] for line in lines if len(fields := line.split(":")) > 2 and fields[0] == "_apt"), None)
    dirs = [str(tree / d) for d in APT_PARTIAL if (tree / d).is_dir() and not (tree / d).is_symlink()]
    if uid is None or not uid.isdigit() or not dirs:
        return
    run(userns.in_tree_namespace(["chown", "--no-dereference", f"{uid}:0", "--", *dirs]), step="rootfs",
        logfile=logfile)
    run(userns.in_tree_namespace(["chmod", "0700", "--", *dirs]), step="rootfs", logfile=logfile)


def check_dev(tree: Path) -> None:
    """mmdebstrap leaves /dev empty (each boot's devtmpfs fills it); anything else there is a bind-mount
    target it could not undo, or what a package script wrote while /dev was missing."""
    dev = tree / "dev"
    left = sorted(p.name for p in dev.iterdir() if not p.is_dir() or p.is_symlink()) if dev.is_dir() else []
    if left:
        raise OsbuilderError(f"rootfs: mmdebstrap left {', '.join('/dev/' + n for n in left)} in the tree (a mount "
                             "it could not undo, or package scripts that ran without /dev); not publishing it")


def security_mirror(mirror: str) -> str:
    """Where the security archive is, beside `mirror`: `<parent>/debian-security` (deb.debian.org's
    layout, which Debian's mirrors and apt proxies follow), with the mirror's credentials."""
    url = urlsplit(mirror)
    parent, _, last = url.path.rstrip("/").rpartition("/")
    if last != "debian":
        raise UsageError(f"SECURITY_UPDATES: REPO_URL {redact(mirror)} does not end in /debian, so where its "
                         "security archive (.../debian-security) is cannot be told; mirror it there, or set "
                         "SECURITY_UPDATES=no to build from the release alone")
    return urlunsplit(url._replace(path=f"{parent}/debian-security"))


def check_packages_hook(packages: list[str]) -> str:
    """A setup hook that asks apt, right after the package lists arrive, whether every package can be
    installed: a name that is not in the archive fails the build in seconds, not after the essential
    set was installed (mmdebstrap then skips its own update). Run when EXTRA_PKGS names packages: with
    osbuilder's own set alone, a release that lacks one fails later with the same one-line error."""
    names = " ".join(shlex.quote(p) for p in packages)
    return (f"{APT_OUTSIDE} apt-get update -q --error-on=any > /dev/null && "
            f"{APT_OUTSIDE} apt-get install --simulate -q --no-install-recommends {names} > /dev/null")


def hook_word(text: str) -> str:
    """`text` as one word of an mmdebstrap special hook (`tar-in`, `upload`, ...), which mmdebstrap
    splits like a shell (Perl's shellwords): every character but a few safe ones is backslash-escaped."""
    return re.sub(r"([^A-Za-z0-9_./-])", r"\\\1", text)


@contextmanager
def mirror_access(mirrors: list[str], scratch: Path) -> Iterator[tuple[list[str], list[str]]]:
    """The mirror URLs to give mmdebstrap (without credentials), and the hooks that let apt log in.

    Credentials in a mirror (http://user:password@host/...) stay out of the command line, the log,
    the tree's sources.list and the finished tree: they are written to `scratch` (mode 0600), which
    mmdebstrap itself reads (`upload`: a rootless build's namespace could not) into the tree's
    /etc/apt/auth.conf (made 0600 first) for apt, one `machine` entry per mirror, and a customize hook
    removes it.
    """
    pairs = [auth_entry(m) for m in mirrors]
    bare = [url for url, _ in pairs]
    entries = list(dict.fromkeys(entry for _, entry in pairs if entry is not None))  # one per mirror
    if not entries:
        yield bare, []
        return
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(entries))
    try:
        yield bare, ['--setup-hook=umask 077 && : > "$1/etc/apt/auth.conf"',
                     f"--setup-hook=upload {hook_word(str(scratch))} /etc/apt/auth.conf",
                     '--customize-hook=rm -f "$1/etc/apt/auth.conf"']
    finally:
        discard(scratch)


def classify_failure(error: OsbuilderError, suites: list[Suite], packages: list[str],
                     extra: list[str]) -> OsbuilderError:
    """Turn mmdebstrap's output into a one-line error naming the setting at fault. `suites` are the
    suites as given to apt (no credentials), the release first; `extra` the packages EXTRA_PKGS asked for."""
    text = error.detail
    release, mirror = suites[0].name, suites[0].mirror
    missing = re.findall(r"Unable to locate package (\S+)", text)
    missing += re.findall(r"Package '?(\S+?)'? has no installation candidate", text)
    if missing:
        missing = list(dict.fromkeys(missing))
        ours = [p for p in missing if p not in extra]
        where = ", ".join(s.name for s in suites)
        if ours:
            return UsageError(f"OS_VERSION: {release} has no package {', '.join(ours)} (one osbuilder installs "
                              f"by default; looked in {where})", error.detail)
        return UsageError(f"EXTRA_PKGS: package(s) not found in {where}: {', '.join(missing)}", error.detail)
    unavailable = _missing_suite(text, suites)
    if unavailable is not None and unavailable is not suites[0]:
        return UsageError(f"SECURITY_UPDATES: {unavailable.mirror} has no suite {unavailable.name} (the release's "
                          f"updates); mirror it, or set SECURITY_UPDATES=no to build from {release} alone",
                          error.detail)
    if re.search(r"Could not resolve|Failed to fetch|Could not connect|Connection failed|"
                 r"Temporary failure resolving|Unable to connect", text):
        if unavailable is not None or re.search(r"dists/\S+/(In)?Release\s+404", text):
            return UsageError(f"OS_VERSION: release {release!r} not found at {mirror}", error.detail)
        return InfrastructureError(f"REPO_URL: mirror {mirror} is unreachable", error.detail)
    if unavailable is not None or re.search(r"does not have a Release file|404\s+Not Found", text):
        return UsageError(f"OS_VERSION: release {release!r} not found at {mirror} (check REPO_URL and OS_VERSION)",
                          error.detail)
    if "osbuilder: the chroot had no /dev/null" in text:
        return InfrastructureError("rootfs: mmdebstrap could not mount /dev and /proc in the chroot (see its "
                                   "warnings below: is `mount` installed?); package scripts would run without "
                                   "them and leave a damaged tree", error.detail)
    return error


def _missing_suite(text: str, suites: list[Suite]) -> Suite | None:
    """The suite apt says has no Release file (`The repository 'URL SUITE Release' does not have a
    Release file`, or a 404 for its dists/SUITE/InRelease), if any."""
    for suite in suites:
        named = re.escape(f"{suite.mirror.rstrip('/')} {suite.name} Release")
        fetched = re.escape(f"{suite.mirror.rstrip('/')}/dists/{suite.name}/") + r"(?:In)?Release\s+404"
        if re.search(rf"{named}'? does not have a Release file|{fetched}", text):
            return suite
    return None
