"""Which programs each step needs, which Debian package provides each, and `check-deps --install`."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from osbuilder.errors import OsbuilderError, UsageError


@dataclass(frozen=True)
class Tool:
    program: str
    package: str
    why: str


STEPS: dict[str, tuple[Tool, ...]] = {
    "rootfs": (
        Tool("mmdebstrap", "mmdebstrap", "creates the Debian rootfs without mounts or loop devices"),
        Tool("gpgv", "gpgv", "checks the archive's signatures"),
        Tool("cc", "gcc", "compiles osbuilder's agent"),
        Tool("unshare", "util-linux", "runs mmdebstrap in its own namespaces"),
        Tool("newuidmap", "uidmap", "maps subordinate ids when building as an ordinary user"),
    ),
    "image": (
        Tool("sfdisk", "fdisk", "writes and reads the partition table of the image file"),
        Tool("mke2fs", "e2fsprogs", "creates the filesystem from the rootfs directory"),
        Tool("e2fsck", "e2fsprogs", "checks the new filesystem"),
        Tool("debugfs", "e2fsprogs", "reads files inside the image without mounting it"),
        Tool("find", "findutils", "clamps the tree's timestamps for reproducible images"),
    ),
    "initrd": (
        Tool("cpio", "cpio", "writes the rootfs as the initrd's newc archive"),
        Tool("zstd", "zstd", "compresses the initrd (the kernel's RD_ZSTD)"),
        Tool("find", "findutils", "lists the tree for the archive and clamps its timestamps"),
        Tool("bash", "bash", "runs the list-sort-archive pipeline in the tree's namespace"),
    ),
    "kernel-src": (
        Tool("tar", "tar", "unpacks the kernel source"),
        Tool("xz", "xz-utils", "decompresses linux-source tarballs"),
        Tool("git", "git", "fetches kernel trees from git"),
    ),
    "kernel": (
        Tool("make", "make", "drives the kernel build"),
        Tool("gcc", "gcc", "compiles the kernel"),
        Tool("flex", "flex", "kernel build requirement"),
        Tool("bison", "bison", "kernel build requirement"),
        Tool("bc", "bc", "kernel build requirement"),
        Tool("perl", "perl", "kernel build requirement"),
        Tool("ld", "binutils", "links the kernel"),
        Tool("openssl", "openssl", "kernel build requirement (certificates)"),
        Tool("ccache", "ccache", "speeds up rebuilds (optional but installed)"),
    ),
    "boot": (
        Tool("qemu-system-x86_64", "qemu-system-x86", "boots the image for the boot checks"),
        Tool("qemu-img", "qemu-utils", "makes throw-away copy-on-write overlays"),
        Tool("ssh-keygen", "openssh-client", "makes the per-session SSH key"),
    ),
}

# Installed alongside, without a program of their own to look for.
EXTRA_PACKAGES = ("libelf-dev", "libssl-dev", "linux-source-6.1", "libc6-dev", "cpio", "zstd",
                  "debian-archive-keyring", "ca-certificates")


def missing(steps: list[str] | None = None) -> list[tuple[str, Tool]]:
    """(step, tool) pairs whose program is not on PATH."""
    wanted = steps or list(STEPS)
    return [(step, t) for step in wanted for t in STEPS[step] if shutil.which(t.program) is None]


def report(steps: list[str] | None = None) -> str:
    lines = []
    for step in steps or list(STEPS):
        lines.append(f"{step}:")
        for t in STEPS[step]:
            where = shutil.which(t.program)
            state = where if where else "MISSING"
            lines.append(f"  {t.program:<20} {t.package:<18} {state:<32} {t.why}")
    return "\n".join(lines)


def require(step: str) -> None:
    """Raise a one-line error naming the first missing program for `step`."""
    gone = missing([step])
    if gone:
        names = ", ".join(t.program for _, t in gone)
        pkgs = " ".join(sorted({t.package for _, t in gone}))
        raise UsageError(f"{step}: missing program(s) {names}; run `osbuilder check-deps --install` "
                         f"or `apt-get install {pkgs}`")


def install(steps: list[str] | None = None) -> list[str]:
    """apt-get install the packages of the missing programs (root only). Returns the packages."""
    packages = sorted({t.package for _, t in missing(steps)})
    if not steps:
        packages = sorted(set(packages) | set(EXTRA_PACKAGES))
    if not packages:
        return []
    if os.geteuid() != 0:
        raise UsageError("check-deps --install: must run as root (apt-get install " + " ".join(packages) + ")")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise OsbuilderError(f"check-deps --install: `{' '.join(cmd[:2])}` failed")
    return packages
