"""The image step: a disk image with one ext4 partition filled from the rootfs directory.

No root-only tricks: the partition table is written into a plain file (by sfdisk, or for DAX by
`dax_tables`) and the filesystem by `mke2fs -d` at the partition's byte offset (`-E offset=`). The
tree is checked first (init, systemd, agent), the size is computed from the tree (or IMG_SIZE) and
rounded up to 128 MiB, the result must pass `e2fsck -fn`, and only then does it replace the
destination (WORKDIR's image).

Two layouts. DAX=no: GPT, the partition from 1 MiB. DAX=yes (the default: Kata and Clear
Containers map the image as an NVDIMM and mount it with DAX), Kata's layout:

    0         MBR #1: one partition, from 3 MiB to the end (what a disk, e.g. virtio-blk, sees)
    4 KiB     the nd_pfn info block ("NVDIMM_PFN_INFO", struct nd_pfn_sb): data from 2 MiB, struct
              pages in guest RAM; it turns the NVDIMM's namespace into an fsdax /dev/pmem0
    2 MiB     MBR #2: one partition, from 1 MiB (2 + 1 = 3 MiB of the file) to the end: what
              /dev/pmem0 shows, so /dev/pmem0p1 is the same filesystem as a disk's first partition
    3 MiB     ext4, 4 KiB blocks (DAX maps whole pages)

The total stays a multiple of 128 MiB, the memory-hotplug granularity the memory backend is mapped in.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from osbuilder import arch, elf, errors, runtimes, userns
from osbuilder.cache import Manifest
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.fs import discard, file_hash, publish, resolve_in, temp_beside
from osbuilder.layout import Workdir
from osbuilder.rootfs import distros
from osbuilder.rootfs.build import METADATA_PATH, AgentChoice, check_agent_runs
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings
from osbuilder.terminal import shown
from osbuilder.userns import lend_to_tree_namespace, take_back_from_tree_namespace
from osbuilder.vm.attachments import MEMORY_HOTPLUG_UNIT

MiB = 1024 * 1024
ALIGN = MEMORY_HOTPLUG_UNIT  # the runtimes map the image as an NVDIMM: a multiple of the hotplug unit
PART_START = 1 * MiB
TAIL = 1 * MiB  # room for the backup GPT
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
INODE_SIZE = 256

# DAX (Kata's image_builder.sh and nsdax; the kernel's drivers/nvdimm/pfn.h and pfn_devs.c)
PAGE_SIZE = 4096  # x86-64: ext4 DAX needs blocks of exactly one page
DAX_HEADER = 2 * MiB  # MBR #1 + the info block; /dev/pmem0 starts after it (the info block's dataoff)
DAX_ALIGN = 2 * MiB  # the mapping alignment the info block records (huge pages)
PFN_INFO_OFFSET = 4096  # where the kernel reads a namespace's info block (SZ_4K)
PFN_SIG = b"NVDIMM_PFN_INFO\0"
PFN_MODE_RAM = 1  # struct pages in guest RAM: the image is mapped read-only, nothing may be written to it
PFN_INFO = struct.Struct("<16s16s16sIHHQQIIIIIH3994xQ")  # struct nd_pfn_sb, 4096 bytes
MAX_STRUCT_PAGE_SIZE = 64
MBR_LINUX = 0x83


@dataclass(frozen=True)
class ImageLayout:
    """Where things are in the image file."""

    total_bytes: int
    fs_offset: int
    fs_bytes: int
    block_size: int
    dax_offset: int = 0  # DAX: where the disk /dev/pmem0 shows starts (after the DAX header); 0 without

    @property
    def fs_blocks(self) -> int:
        return self.fs_bytes // self.block_size

    @property
    def dax(self) -> bool:
        return self.dax_offset > 0

    def fs_spec(self, image: Path) -> str:
        """The name e2fsprogs tools accept for the filesystem inside the image file."""
        return f"{image}?offset={self.fs_offset}"


def rootfs_usage(rootfs: Path, block_size: int) -> tuple[int, int]:
    """(bytes the tree needs in blocks, number of inodes) — what mke2fs will have to store."""
    total = inodes = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        inodes += 1 + len(filenames)
        total += block_size  # the directory itself
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += -(-st.st_size // block_size) * block_size
        inodes += sum(1 for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
    return total, inodes


def wants_dax(settings: Settings) -> bool:
    """DAX, with auto resolved to what the RUNTIME does."""
    return runtimes.get(settings.runtime).dax if settings.dax is None else settings.dax


def check_dax(settings: Settings) -> None:
    """DAX=yes needs a filesystem the runtime can mount with DAX: ext4 (rootfstype=ext4, and
    data=ordered needs its journal) with blocks of exactly one page."""
    if not wants_dax(settings):
        return
    why = "DAX=yes" if settings.dax else f"DAX=auto (yes for RUNTIME={settings.runtime})"
    if settings.fs_type != "ext4":
        raise UsageError(f"FS_TYPE: {settings.fs_type} cannot be mounted with DAX the way the runtime mounts the "
                         f"root (rootfstype=ext4 rootflags=dax,data=ordered); {why} needs FS_TYPE=ext4, or set DAX=no")
    if settings.block_size != PAGE_SIZE:
        raise UsageError(f"BLOCK_SIZE: {settings.block_size} cannot do DAX (ext4 DAX needs the block size to equal "
                         f"the {PAGE_SIZE}-byte page size); {why} needs BLOCK_SIZE={PAGE_SIZE}, or set DAX=no")


def plan_layout(rootfs: Path, settings: Settings) -> ImageLayout:
    check_dax(settings)
    bs = settings.block_size
    header, tail = (DAX_HEADER, 0) if wants_dax(settings) else (0, TAIL)  # an MBR has no backup table
    data, inodes = rootfs_usage(rootfs, bs)
    # ext4 overhead: inode tables (a generous inode count), bitmaps, the journal (~16-64 MiB)
    needed = data + inodes * 2 * INODE_SIZE + 64 * MiB
    auto = int(needed * 1.25) + header + PART_START + tail
    if settings.img_size is None:
        total = auto
    else:
        total = settings.img_size * MiB
        minimum = needed + header + PART_START + tail
        if total < minimum:
            raise UsageError(f"IMG_SIZE: {settings.img_size} MiB is too small for the rootfs "
                             f"(needs at least {-(-minimum // MiB)} MiB)")
    total = -(-total // ALIGN) * ALIGN
    fs_bytes = (total - header - PART_START - tail) // bs * bs
    return ImageLayout(total, header + PART_START, fs_bytes, bs, header)


def check_tree(rootfs: Path, settings: Settings) -> None:
    """The sanity checks of the tree that a bootable guest needs. One clear error per problem."""
    init = resolve_in(rootfs, "sbin/init")
    if init is None:
        raise UsageError(f"rootfs: {rootfs}/sbin/init is missing; the guest kernel would have nothing to run")
    guest = settings.guest
    check_init_machine(init, rootfs, guest)
    name = agent_name(rootfs, settings)
    agent_bin = resolve_in(rootfs, f"usr/bin/{name}")
    if agent_bin is None or not agent_bin.is_file():
        raise UsageError(f"rootfs: agent {name} is missing from {rootfs}/usr/bin")
    if not os.access(agent_bin, os.X_OK):
        raise UsageError(f"rootfs: agent {agent_bin} is not executable")
    systemd = resolve_in(rootfs, "usr/lib/systemd/systemd")
    if settings.agent_init:
        if init != agent_bin:
            raise UsageError(f"rootfs: AGENT_INIT=yes but /sbin/init is {init.relative_to(rootfs)}, not the agent")
    elif systemd is None:
        raise UsageError(f"rootfs: systemd is missing ({rootfs}/usr/lib/systemd/systemd); "
                         "install it or set AGENT_INIT=yes")
    check_agent_runs(rootfs, name, distros.get(settings.distro), guest)


def check_init_machine(init: Path, rootfs: Path, guest: arch.Arch) -> None:
    """/sbin/init is built for ARCH's machine: a tree of another architecture names ARCH, not the agent."""
    try:
        machine = elf.read_elf(init).machine
    except elf.NotElf:
        return  # a script: its interpreter is the tree's business
    if machine != guest.machine:
        built = arch.of_machine(machine)
        fix = f"set ARCH={built.name} (the rootfs's) or rebuild" if built is not None else "rebuild"
        raise UsageError(f"ARCH: the rootfs at {rootfs} is built for {machine} (its /sbin/init), but ARCH is "
                         f"{guest.name}; {fix} the rootfs with `osbuilder rootfs`")


def agent_name(rootfs: Path, settings: Settings) -> str:
    """The agent recorded in the rootfs metadata (read inside the tree), else the one the settings choose."""
    meta = resolve_in(rootfs, METADATA_PATH)
    if meta is None:
        return AgentChoice.from_settings(settings).name
    try:
        name = yaml.safe_load(meta.read_text())["agent"]["name"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        raise UsageError(f"rootfs: {rootfs / METADATA_PATH} is not valid osbuilder metadata") from None
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"rootfs: {rootfs / METADATA_PATH} names the agent {shown(str(name))}, which is not a "
                         "file name in /usr/bin")
    return name


def build_image(settings: Settings, rootfs: Path, dest: Path, *, logfile: Path | None = None) -> ImageLayout:
    """Make `dest` from `rootfs`. A failure leaves any earlier `dest` untouched."""
    if not (rootfs / "usr").is_dir() and not (rootfs / "sbin").exists():
        raise UsageError(f"image: no rootfs at {rootfs}; run `osbuilder rootfs` first")
    check_tree(rootfs, settings)
    if userns.rootless():
        userns.check_reachable(rootfs, "WORKDIR")
    layout = plan_layout(rootfs, settings)
    logfile = logfile or Workdir.of(settings).log("image")
    tmp = temp_beside(dest)
    try:
        with full_disk_in(settings, dest):
            write_image(settings, rootfs, tmp, layout, logfile)
            publish(tmp, dest)
    finally:
        discard(tmp)
    return layout


def full_disk_in(settings: Settings, dest: Path) -> AbstractContextManager[None]:
    """A full disk while making `dest` (an image or initrd in WORKDIR, or in its cache) is exit 125,
    naming WORKDIR (or the directory, when `dest` is elsewhere)."""
    workdir = Workdir.of(settings).root
    where = workdir if dest.is_relative_to(workdir) else dest.parent
    return errors.disk_space("WORKDIR", f"in {where} while making {dest.name} (nothing was replaced)", dest.parent)


def write_image(settings: Settings, rootfs: Path, out: Path, layout: ImageLayout, logfile: Path) -> None:
    with open(out, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as f:  # private until done
        f.truncate(layout.total_bytes)
    epoch = settings.source_date_epoch
    ids = stable_ids(epoch) if epoch is not None else None  # reproducible: identifiers from the epoch
    if layout.dax:
        with open(out, "r+b") as f:
            for offset, data in dax_tables(layout, ids).items():
                f.seek(offset)
                f.write(data)
    else:
        table = "label: gpt\n"
        if ids:
            table += f"label-id: {ids.label}\n"
        table += (f"start={layout.fs_offset // 512}, size={layout.fs_bytes // 512}, type={LINUX_FS}, name=rootfs"
                  + (f", uuid={ids.partition}" if ids else "") + "\n")
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(out)], step="image",
            logfile=logfile, input=table.encode())
    extended = f"offset={layout.fs_offset}"  # mke2fs honours only its last -E: one list
    mke2fs = ["mke2fs", "-q", "-t", settings.fs_type, "-b", str(layout.block_size), "-m", "0",
              "-L", "rootfs", "-d", str(rootfs), "-F"]
    env = None
    if epoch is not None and ids is not None:
        extended += f",hash_seed={ids.hash_seed}"
        mke2fs += ["-U", ids.filesystem]
        env = {"E2FSPROGS_FAKE_TIME": str(epoch)}
    mke2fs += ["-E", extended]
    # mke2fs reads the tree where its owners are the real ones (userns.py); when that is a user
    # namespace, the image file is lent to the namespace's root while mke2fs writes it.
    lend_to_tree_namespace(out, logfile)
    try:
        run(userns.in_tree_namespace([*mke2fs, str(out), str(layout.fs_blocks)]), step="image",
            logfile=logfile, env=env)
    except OsbuilderError as e:
        if "Could not allocate" in e.detail or "No free space in the directory" in e.detail:
            raise UsageError("IMG_SIZE: the rootfs does not fit in the image", e.detail) from None
        raise
    finally:
        take_back_from_tree_namespace(out, logfile)
    if epoch is not None:
        clamp_inode_times(out, layout, epoch, newer_than(rootfs, epoch, "image", logfile), logfile)
    run(["e2fsck", "-fn", layout.fs_spec(out)], step="image", logfile=logfile)


# -- DAX ------------------------------------------------------------------------------------------

def dax_tables(layout: ImageLayout, ids: StableIds | None) -> dict[int, bytes]:
    """What the DAX layout writes in front of the filesystem, by file offset: MBR #1, the nd_pfn info
    block, MBR #2 (module docstring). Disk identifiers and the info block's uuid are stable with
    SOURCE_DATE_EPOCH (`ids`), random otherwise."""
    disk_id = int.from_bytes(uuid.UUID(ids.label).bytes[:4] if ids else os.urandom(4), "little")
    pfn_uuid = uuid.UUID(ids.partition).bytes if ids else uuid.uuid4().bytes
    sectors = layout.fs_bytes // 512
    return {
        0: mbr(layout.fs_offset // 512, sectors, disk_id),
        PFN_INFO_OFFSET: pfn_info(layout.total_bytes, layout.dax_offset, pfn_uuid),
        layout.dax_offset: mbr((layout.fs_offset - layout.dax_offset) // 512, sectors, disk_id),
    }


def mbr(start: int, sectors: int, disk_id: int) -> bytes:
    """A DOS partition table (512 bytes) with one Linux partition of `sectors` sectors from `start`."""
    entry = struct.pack("<B3sB3sII", 0, chs(start), MBR_LINUX, chs(start + sectors - 1), start, sectors)
    return bytes(440) + struct.pack("<IH", disk_id, 0) + entry + bytes(48) + b"\x55\xaa"


def chs(lba: int) -> bytes:
    """The cylinder/head/sector triple of a sector (255 heads, 63 sectors; 1023/254/63 past its reach)."""
    if lba >= 1024 * 255 * 63:
        return b"\xfe\xff\xff"
    cylinder, rest = divmod(lba, 255 * 63)
    head, sector = divmod(rest, 63)
    return bytes([head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


@dataclass(frozen=True)
class PfnInfo:
    """struct nd_pfn_sb, the info block the kernel reads 4 KiB into an NVDIMM namespace."""

    signature: bytes
    uuid: bytes
    parent_uuid: bytes
    flags: int
    version_major: int
    version_minor: int
    dataoff: int  # where the data (/dev/pmem0) starts in the namespace
    npfns: int
    mode: int
    start_pad: int
    end_trunc: int
    align: int
    page_size: int
    page_struct_size: int
    checksum: int

    def pack(self) -> bytes:
        return PFN_INFO.pack(self.signature, self.uuid, self.parent_uuid, self.flags, self.version_major,
                             self.version_minor, self.dataoff, self.npfns, self.mode, self.start_pad,
                             self.end_trunc, self.align, self.page_size, self.page_struct_size, self.checksum)

    @classmethod
    def unpack(cls, data: bytes) -> PfnInfo:
        return cls(*PFN_INFO.unpack(data[:PFN_INFO.size]))


def fletcher64(data: bytes) -> int:
    """The kernel's nd_fletcher64 over little-endian 32-bit words."""
    lo = hi = 0
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFFFFFFFFFF
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


def pfn_checksum(block: bytes) -> int:
    """nd_sb_checksum: fletcher64 of the block with its checksum (the last 8 bytes) zeroed."""
    return fletcher64(block[:-8] + bytes(8))


def pfn_info(namespace_bytes: int, dataoff: int, pfn_uuid: bytes) -> bytes:
    """The info block the kernel's nd_pfn_init would write for a label-less namespace of this size in
    RAM mode (Kata's nsdax writes the same mode, offset and alignment): no parent uuid (the NVDIMM has
    no labels), data from `dataoff`, struct pages in guest RAM, nothing truncated."""
    info = PfnInfo(PFN_SIG, pfn_uuid, bytes(16), 0, 1, 4, dataoff, (namespace_bytes - dataoff) // PAGE_SIZE,
                   PFN_MODE_RAM, 0, 0, DAX_ALIGN, PAGE_SIZE, MAX_STRUCT_PAGE_SIZE, 0)
    block = info.pack()
    return block[:-8] + struct.pack("<Q", pfn_checksum(block))


def read_dax_header(image: Path) -> PfnInfo | None:
    """The image's nd_pfn info block, if it carries a valid one (signature and checksum)."""
    with open(image, "rb") as f:
        f.seek(PFN_INFO_OFFSET)
        block = f.read(PFN_INFO.size)
    if len(block) < PFN_INFO.size or not block.startswith(PFN_SIG):
        return None
    info = PfnInfo.unpack(block)
    return info if info.checksum == pfn_checksum(block) else None


def newer_than(rootfs: Path, epoch: int, step: str, logfile: Path) -> set[bytes]:
    """The tree's paths (relative to it, as find's %P prints them; the top is b"") modified after
    `epoch`. Only read: the tree may be a cache entry whose files are hard links to a base tree's
    (userns.share_tree), so a reproducible build clamps times in what it writes, never in the tree."""
    found = run(userns.in_tree_namespace(["find", str(rootfs), "-newermt", f"@{epoch}", "-printf", "%P\\0"]),
                step=step, capture=True, logfile=logfile).stdout
    return set(found.split(b"\0")[:-1])


DEBUGFS_ENTRY = re.compile(rb"^/(\d+)/(\d+)/\d+/\d+/(.*)/\d*/$")


def clamp_inode_times(image: Path, layout: ImageLayout, epoch: int, newer: set[bytes], logfile: Path) -> None:
    """Set every inode's ctime and atime in the new filesystem to SOURCE_DATE_EPOCH, and the mtime of
    each file the tree has modified after it (`newer`, paths as newer_than gives them) too.

    e2fsprogs 1.47.0's `mke2fs -d` copies each file's times from the tree, whose ctimes are the moment
    of its last change, so without this two builds of one tree differ. Inodes are found by walking the
    new filesystem with debugfs (`ls -p`, one call per directory level, inodes named by number: no path
    quoting; each listing's "." entry names the directory it lists), then set in one `debugfs -w` batch.
    """
    spec = layout.fs_spec(image)
    paths: dict[int, bytes] = {2: b""}  # inode -> one path to it, relative to the top
    clamp_mtime = {2} if b"" in newer else set()
    level = [2]
    while level:
        listing = run(["debugfs", "-f", "-", spec], step="image", capture=True, logfile=logfile,
                      input="".join(f"ls -p <{ino}>\n" for ino in level).encode()).stdout
        level = []
        parent = b""
        for line in listing.splitlines():
            m = DEBUGFS_ENTRY.match(line.strip())
            if not m or m.group(3) == b"..":
                continue
            ino, name = int(m.group(1)), m.group(3)
            if name == b".":
                parent = paths[ino]
                continue
            path = parent + b"/" + name if parent else name
            if path in newer:
                clamp_mtime.add(ino)
            if ino not in paths:
                paths[ino] = path
                if int(m.group(2), 8) & 0o170000 == 0o040000:
                    level.append(ino)
    batch = "".join(f"sif <{ino}> {field} @{epoch}\n" for ino in sorted(paths)
                    for field in ("ctime", "atime", *(("mtime",) if ino in clamp_mtime else ())))
    run(["debugfs", "-w", "-f", "-", spec], step="image", capture=True, logfile=logfile, input=batch.encode(),
        env={"E2FSPROGS_FAKE_TIME": str(epoch)})  # the superblock's write time


class StableIds(NamedTuple):
    """The image's identifiers when SOURCE_DATE_EPOCH asks for reproducibility (else they are random)."""

    label: str  # the partition table's (and the DAX header's disk identifier)
    partition: str  # the partition's (and the nd_pfn info block's uuid)
    filesystem: str
    hash_seed: str  # ext4's directory hash seed


def stable_ids(epoch: int) -> StableIds:
    """Deterministic identifiers derived from SOURCE_DATE_EPOCH."""
    base = f"osbuilder:{epoch}"
    return StableIds(*(str(uuid.uuid5(uuid.NAMESPACE_URL, f"{base}:{what}"))
                       for what in ("label", "partition", "filesystem", "hash")))


def image_manifest(settings: Settings, rootfs_key: str) -> Manifest:
    """Every input of an image made from a cached rootfs."""
    return Manifest("image", {
        "rootfs": rootfs_key,
        "img_size": str(settings.img_size),
        "block_size": str(settings.block_size),
        "fs_type": settings.fs_type,
        "dax": str(wants_dax(settings)),
        "agent_init": str(settings.agent_init),
        "source_date_epoch": str(settings.source_date_epoch),
        "code": file_hash(Path(__file__)),
        "mke2fs": tool_version("mke2fs", "-V"),
        "sfdisk": tool_version("sfdisk", "--version"),
    })
