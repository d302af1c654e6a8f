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
    search: str = ""  # directories looked in besides PATH (an engine finds its runtime there, not on PATH)


def where(tool: Tool) -> str | None:
    return shutil.which(tool.program) or (shutil.which(tool.program, path=tool.search) if tool.search else None)


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
        Tool("as", "binutils", "assembles the KVM probe guest"),
        Tool("ld", "binutils", "links the KVM probe guest into a firmware image"),
        Tool("apt-get", "apt", "downloads Debian's boot kernel package, verified against the archive keyring"),
        Tool("dpkg-deb", "dpkg", "unpacks Debian's boot kernel package"),
        Tool("depmod", "kmod", "lists the dependencies of the boot kernel's modules (modules.dep)"),
        Tool("zstd", "zstd", "decompresses the boot kernel's .ko.zst modules (releases that ship them)"),
        Tool("cc", "gcc", "compiles the boot kernel initrd's init"),
    ),
}

# Installed alongside, without a program of their own to look for.
EXTRA_PACKAGES = ("libelf-dev", "libssl-dev", "linux-source-6.1", "libc6-dev", "cpio", "zstd",
                  "debian-archive-keyring", "ca-certificates")


def missing(steps: list[str] | None = None) -> list[tuple[str, Tool]]:
    """(step, tool) pairs whose program is not on PATH."""
    wanted = steps or list(STEPS)
    return [(step, t) for step in wanted for t in STEPS[step] if shutil.which(t.program) is None]


def report(steps: list[str] | None = None, table: dict[str, tuple[Tool, ...]] = STEPS) -> str:
    lines = []
    for step in steps or list(table):
        lines.append(f"{step}:")
        for t in table[step]:
            found = where(t)
            state = found if found else "MISSING"
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


def install(steps: list[str] | None = None, gone: list[tuple[str, Tool]] | None = None) -> list[str]:
    """apt-get install the packages of the missing programs (root only; `gone`: these instead of the
    steps' missing ones). Returns the packages."""
    packages = sorted({t.package for _, t in (missing(steps) if gone is None else gone)})
    if not steps and gone is None:
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


# USE_DOCKER=yes: the host needs only an engine (and Python); the steps' tools are in the tools image.
ENGINES: dict[str, tuple[Tool, ...]] = {
    "podman": (
        Tool("podman", "podman", "runs each step in the tools container (USE_DOCKER)"),
        Tool("runc", "runc", "the runtime podman falls back to where crun cannot run a container",
             search="/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin"),
    ),
    "docker": (
        Tool("docker", "docker.io", "runs each step in the tools container (USE_DOCKER)"),
    ),
}


def engine_table(choice: str) -> dict[str, tuple[Tool, ...]]:
    """What check-deps lists for CONTAINER_ENGINE=`choice` (auto: podman and docker)."""
    return dict(ENGINES) if choice == "auto" else {choice: ENGINES[choice]}


def engine_missing(choice: str) -> list[tuple[str, Tool]]:
    """Missing programs of the engine; with auto, nothing when any one engine is complete, else podman's."""
    table = engine_table(choice)
    gaps = {name: [(name, t) for t in tools if where(t) is None] for name, tools in table.items()}
    if any(not gap for gap in gaps.values()):
        return []
    return next(iter(gaps.values()))
