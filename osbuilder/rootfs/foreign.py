"""Running another architecture's programs while its rootfs is built: qemu-user through binfmt_misc.

mmdebstrap installs an arm64 tree on an x86 host by running the tree's own programs (the package
scripts) in its chroot; the kernel hands them to qemu-user when binfmt_misc has a handler for their
ELF header. The handler needs the F flag (QEMU opened when it is registered), since the chroot has no
QEMU of its own. `ensure` finds such a handler, registers Debian's (qemu-user-static's
/usr/lib/binfmt.d/qemu-<machine>.conf) when it runs as root and none is there, and otherwise says in
one line what to install or enable.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from osbuilder.arch import Arch
from osbuilder.elf import MACHINES
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.run import run

log = logging.getLogger("osbuilder")

BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_D = (Path("/etc/binfmt.d"), Path("/usr/lib/binfmt.d"))  # systemd-binfmt's order: /etc wins
ET_EXEC = 2


@dataclass(frozen=True)
class Handler:
    """One binfmt_misc entry (a file in /proc/sys/fs/binfmt_misc)."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int
    magic: bytes
    mask: bytes

    def matches(self, header: bytes) -> bool:
        part = header[self.offset:self.offset + len(self.magic)]
        mask = self.mask or b"\xff" * len(self.magic)
        return len(part) == len(self.magic) and all(h & m == g & m for h, m, g in zip(part, mask, self.magic,
                                                                                     strict=True))


def elf_header(a: Arch) -> bytes:
    """The first 20 bytes of a 64-bit little-endian executable built for `a`."""
    machine = next(number for number, name in MACHINES.items() if name == a.machine)
    return b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", ET_EXEC, machine)


def read_handler(path: Path) -> Handler | None:
    """The entry in `path`, or None for one that is not a magic-number handler."""
    fields: dict[str, str] = {}
    enabled = False
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line == "enabled":
            enabled = True
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value  # "flags: PF", the others "interpreter /usr/..."
    if "magic" not in fields:
        return None
    return Handler(path.name, enabled, fields.get("interpreter", ""), fields.get("flags", "").rstrip(),
                   int(fields.get("offset", "0")), bytes.fromhex(fields["magic"]),
                   bytes.fromhex(fields.get("mask", "")))


def handler_for(a: Arch, root: Path | None = None) -> Handler | None:
    """The enabled handler that runs `a`'s executables, if any (in `root`, default BINFMT)."""
    root = root or BINFMT
    if not (root / "status").is_file() or (root / "status").read_text().strip() != "enabled":
        return None
    header = elf_header(a)
    for path in sorted(root.iterdir()):
        if path.name in ("register", "status"):
            continue
        found = read_handler(path)
        if found is not None and found.enabled and found.matches(header):
            return found
    return None


def debian_rule(a: Arch) -> str | None:
    """qemu-user-static's registration line for `a` (systemd-binfmt's format), if installed."""
    for directory in BINFMT_D:
        path = directory / f"qemu-{a.machine}.conf"
        if path.is_file():
            return next((line.strip() for line in path.read_text().splitlines()
                         if line.startswith(":")), None)
    return None


def ensure(a: Arch, logfile: Path) -> None:
    """This host can run `a`'s programs in a chroot: natively, or through a qemu-user handler with
    the F flag (registered here when root and missing). One-line UsageError naming ARCH otherwise."""
    if a.native:
        return
    found = handler_for(a)
    if found is not None:
        if "F" not in found.flags:
            raise UsageError(f"ARCH: {a.name}: binfmt_misc's {found.name} runs {a.machine} programs without the F "
                             "flag, so a chroot cannot find its QEMU; register qemu-user-static's handler instead "
                             f"(`update-binfmts --disable {found.name}`, then run osbuilder as root)")
        return
    rule = debian_rule(a)
    fix = (f"as root, install qemu-user-static (`osbuilder check-deps --install`) and run `update-binfmts --enable "
           f"qemu-{a.machine}`")
    if rule is None:
        raise UsageError(f"ARCH: {a.name}: this host cannot run {a.machine} programs (no qemu-user handler in "
                         f"binfmt_misc, no qemu-{a.machine}.conf in /usr/lib/binfmt.d); {fix}")
    if os.geteuid() != 0:
        raise UsageError(f"ARCH: {a.name}: this host cannot run {a.machine} programs (qemu-user-static is "
                         f"installed but its handler is not registered in binfmt_misc); {fix}")
    register(a, rule, logfile)


def register(a: Arch, rule: str, logfile: Path) -> None:
    """Mount binfmt_misc when it is not, and register `rule` (as systemd-binfmt would)."""
    try:
        if not (BINFMT / "register").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], step="rootfs", logfile=logfile)
        log.info("rootfs: registering qemu-%s in binfmt_misc (%s) so the %s tree's programs run", a.machine,
                 BINFMT / "register", a.name)
        (BINFMT / "register").write_text(rule)
    except (OSError, OsbuilderError) as e:
        raise UsageError(f"ARCH: {a.name}: could not register qemu-{a.machine} in binfmt_misc ({e}); run "
                         f"`update-binfmts --enable qemu-{a.machine}` as root") from None
    if handler_for(a) is None:
        raise UsageError(f"ARCH: {a.name}: qemu-{a.machine} was registered, but binfmt_misc does not run "
                         f"{a.machine} programs with it; check {BINFMT}")
