"""The initrd step: an agent-as-init rootfs as the kernel's initramfs (`container-initrd.img`).

A runtime that boots an initrd (`initrd =` in its configuration.toml instead of `image =`) gives the
guest no disk: the kernel unpacks the archive into its tmpfs root and runs `/init`, with no `rdinit=`
on its command line. So the tree must be one whose init is the agent (AGENT_INIT=yes, refused
otherwise before anything is written), with the agent present and executable (image.check_tree), and
`/init` must be the agent: the archive gets a link `/init -> sbin/init` (as Kata's rootfs builder
makes for its initrd), unless the tree has an `/init` that already leads to the agent.

Format: one newc cpio archive (`cpio -H newc`), compressed with zstd, which osbuilder's kernel
(configs/base.config: BLK_DEV_INITRD, RD_ZSTD) and Debian's (its own initrds are zstd) both unpack.
The archive is written where the tree's owners are the real ones (userns.in_tree_namespace), so a
rootless build carries the owners a root build does. Reproducible: entries in byte order of their
names, inode and device numbers renumbered (`cpio --reproducible`), and with SOURCE_DATE_EPOCH every
modification time clamped to it in the archive (the tree, perhaps a cache entry hard-linked to a
base tree, is only read) and the added `/init` dated by it; zstd runs at a fixed level on one thread.
Written beside the destination and renamed into place (fs.py): a failed or interrupted build leaves
the earlier initrd as it was.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from osbuilder import userns
from osbuilder.cache import Manifest
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.fs import discard, file_hash, publish, resolve_in, temp_beside
from osbuilder.image import (
    check_tree,
    full_disk_in,
    lend_to_tree_namespace,
    take_back_from_tree_namespace,
)
from osbuilder.layout import Workdir
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings

INIT = "init"  # what the kernel runs from an initramfs (its default rdinit=)
INIT_TARGET = "sbin/init"  # where /init leads: the agent, as check_tree proved
# A fixed level on one thread: the same bytes every time. Level 9, not 19: measured on a 149 MiB agent-init
# tree, 35 MiB in 3 s instead of 31 MiB in 55 s, and no slower to unpack under TCG (agent ready in 5-6 s).
ZSTD = ("zstd", "-q", "-9", "--single-thread", "--no-progress")
NEWC_MAGIC = b"070701"
NEWC_HEADER = 110  # magic and 13 eight-digit hex fields
NEWC_MTIME_AT = 6 + 5 * 8  # the mtime field's offset in a header: the magic, then five fields
TRAILER = "TRAILER!!!"
BLOCK = 512  # cpio pads an archive to this

# Runs in the tree's namespace, the tree as $1 and the archive as $2: `.` first (the root directory's
# mode), then every path below it in byte order, newc, inode and device numbers renumbered.
CPIO_SCRIPT = ('set -euo pipefail; cd "$1"; '
               '{ printf ".\\0"; find . -mindepth 1 -printf "%P\\0" | LC_ALL=C sort -z; } '
               '| cpio --quiet --create --null --format=newc --reproducible > "$2"')


def require_agent_init(settings: Settings) -> None:
    """An initrd is booted with no root filesystem: only the agent as init makes sense."""
    if not settings.agent_init:
        raise UsageError("AGENT_INIT: an initrd runs the agent as init (no systemd, no root disk); "
                         "set AGENT_INIT=yes and build that rootfs (`AGENT_INIT=yes osbuilder rootfs`)")


def build_initrd(settings: Settings, rootfs: Path, dest: Path, *, logfile: Path | None = None) -> Path:
    """Make `dest` (a zstd-compressed newc cpio) from `rootfs`. A failure leaves any earlier `dest` untouched."""
    require_agent_init(settings)
    if not (rootfs / "usr").is_dir() and not (rootfs / "sbin").exists():
        raise UsageError(f"initrd: no rootfs at {rootfs}; run `AGENT_INIT=yes osbuilder rootfs` first")
    check_tree(rootfs, settings)
    add_init = needs_init_link(rootfs)
    if userns.rootless():
        userns.check_reachable(rootfs, "WORKDIR")
    logfile = logfile or Workdir.of(settings).log("initrd")
    archive = temp_beside(dest.with_name(dest.name + ".cpio"))
    tmp = temp_beside(dest)
    try:
        with full_disk_in(settings, dest):
            write_archive(settings, rootfs, archive, logfile)
            if add_init:
                mtime = settings.source_date_epoch if settings.source_date_epoch is not None else int(time.time())
                append_entries(archive, [symlink_entry(INIT, INIT_TARGET, mtime)])
            run([*ZSTD, str(archive), "-o", str(tmp)], step="initrd", logfile=logfile)
            tmp.chmod(0o644)  # the runtime reads it; like container.img, it holds no secret
            publish(tmp, dest)
    finally:
        discard(archive)
        discard(tmp)
    return dest


def needs_init_link(rootfs: Path) -> bool:
    """Whether the archive needs its own `/init` (the tree has none); an `/init` in the tree must be the agent."""
    own = rootfs / INIT
    if not os.path.lexists(own):
        return True
    target, agent = resolve_in(rootfs, INIT), resolve_in(rootfs, INIT_TARGET)
    if target is None or agent is None or target != agent:
        raise UsageError(f"rootfs: {own} is not the agent; the kernel runs /init from an initramfs, "
                         "so remove it (osbuilder links /init to /sbin/init)")
    return False


def write_archive(settings: Settings, rootfs: Path, out: Path, logfile: Path) -> None:
    """The newc archive of the tree, written by GNU cpio where the tree's owners are the real ones."""
    with open(out, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)):
        pass  # private until done: it holds the tree's 0600 files
    lend_to_tree_namespace(out, logfile)
    try:
        run(userns.in_tree_namespace(["bash", "-c", CPIO_SCRIPT, "osbuilder-initrd", str(rootfs), str(out)]),
            step="initrd", logfile=logfile)
    finally:
        take_back_from_tree_namespace(out, logfile)
        out.chmod(0o600)
    if settings.source_date_epoch is not None:
        clamp_mtimes(out, settings.source_date_epoch)


# -- newc ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a newc archive."""

    name: str
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes
    rdev: int = 0  # a device node's number (os.makedev)

    @property
    def kind(self) -> str:
        return {0o040000: "directory", 0o100000: "regular", 0o120000: "symlink", 0o020000: "character",
                0o060000: "block", 0o010000: "fifo", 0o140000: "socket"}.get(self.mode & 0o170000, "?")


def _pad4(n: int) -> bytes:
    return bytes(-n % 4)


def encode_entry(entry: Entry, ino: int = 0, nlink: int = 1) -> bytes:
    """`entry` as a newc header, name and data, each padded to 4 bytes."""
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data), 0, 0,
              os.major(entry.rdev), os.minor(entry.rdev), len(name), 0)
    head = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def symlink_entry(name: str, target: str, mtime: int) -> Entry:
    return Entry(name, 0o120777, 0, 0, mtime, target.encode())


def write_newc(archive: Path, entries: list[Entry]) -> None:
    """A newc archive of `entries` (in their order) and its trailer, padded to whole blocks, as cpio writes."""
    with open(archive, "wb") as f:
        for entry in entries:
            f.write(encode_entry(entry))
        f.write(encode_entry(Entry(TRAILER, 0, 0, 0, 0, b"")))
        f.write(bytes(-f.tell() % BLOCK))


@dataclass(frozen=True)
class Header:
    """One newc header as it lies in an archive."""

    at: int  # its offset
    fields: tuple[int, ...]  # the 13 fields after the magic: ino, mode, uid, gid, nlink, mtime, filesize, ...
    name: bytes
    data_at: int  # where the member's data starts


def newc_headers(data: bytes | mmap.mmap) -> Iterator[Header]:
    """The headers of the newc archive(s) in `data`, trailers included, in order; concatenated archives
    too, as the kernel reads them (the zero padding between them skipped). ValueError where a header
    should start and none does."""
    pos = 0
    while pos + NEWC_HEADER <= len(data):
        if data[pos:pos + 4] == b"\0\0\0\0":  # padding between archives
            pos += 4
            continue
        if data[pos:pos + len(NEWC_MAGIC)] != NEWC_MAGIC:
            raise ValueError(f"not a newc header at offset {pos}")
        fields = tuple(int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13))
        filesize, namesize = fields[6], fields[11]
        name_at = pos + NEWC_HEADER
        data_at = name_at + namesize + (-(NEWC_HEADER + namesize) % 4)
        yield Header(pos, fields, bytes(data[name_at:name_at + namesize - 1]), data_at)
        pos = data_at + filesize + (-filesize % 4)


def clamp_mtimes(archive: Path, epoch: int) -> None:
    """Every modification time after `epoch` in the newc archive set to `epoch`, in place (header by
    header, up to the trailer)."""
    with open(archive, "r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        try:
            for header in newc_headers(data):
                if header.name == TRAILER.encode():
                    return
                if header.fields[5] > epoch:
                    data[header.at + NEWC_MTIME_AT:header.at + NEWC_MTIME_AT + 8] = b"%08X" % epoch
        except ValueError as e:
            raise OsbuilderError(f"initrd: {archive}: {e}") from None
    raise OsbuilderError(f"initrd: {archive} ends without a newc trailer")


def append_entries(archive: Path, entries: list[Entry]) -> None:
    """Add `entries` to a newc archive in place: before its trailer, padded to whole blocks again."""
    size = archive.stat().st_size
    with open(archive, "r+b") as f:
        f.seek(max(0, size - 4 * BLOCK))
        tail_at = f.tell()
        tail = f.read()
        name = tail.rfind(TRAILER.encode() + b"\0")
        start = name - NEWC_HEADER
        if name < 0 or start < 0 or tail[start:start + len(NEWC_MAGIC)] != NEWC_MAGIC:
            raise OsbuilderError(f"initrd: {archive} does not end with a newc trailer")
        f.seek(tail_at + start)
        f.truncate()
        body = b"".join(encode_entry(e) for e in entries) + encode_entry(Entry(TRAILER, 0, 0, 0, 0, b""))
        f.write(body + bytes(-(tail_at + start + len(body)) % BLOCK))


def initrd_manifest(settings: Settings, rootfs_key: str) -> Manifest:
    """Every input of an initrd made from a cached rootfs."""
    return Manifest("initrd", {
        "rootfs": rootfs_key,
        "agent_init": str(settings.agent_init),
        "source_date_epoch": str(settings.source_date_epoch),
        "compression": " ".join(ZSTD),
        "code": file_hash(Path(__file__)),
        "cpio": tool_version("cpio", "--version"),
        "zstd": tool_version("zstd", "--version"),
    })
