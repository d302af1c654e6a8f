"""DAX=yes: the image laid out as Kata lays it out for an NVDIMM mounted with DAX, checked byte by byte
against what the kernel reads (drivers/nvdimm/pfn.h, pfn_devs.c: nd_pfn_validate) and what a disk
reader sees; DAX settings that cannot work are one-line usage errors that write nothing.

The image tests use the real sfdisk, mke2fs, e2fsck and debugfs on a small hand-made tree.
"""

from __future__ import annotations

import array
import json
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fakes import make_tree

from osbuilder import image, readback
from osbuilder import settings as S
from osbuilder.errors import UsageError

MiB = 1 << 20
PAGE = 4096
needs_tools = pytest.mark.skipif(
    subprocess.run(["which", "mke2fs", "sfdisk", "debugfs"], capture_output=True).returncode != 0,
    reason="e2fsprogs or fdisk not installed (osbuilder check-deps --install)")


def settings(tmp_path: Path, **env: str) -> S.Settings:
    return S.load({}, env={"WORKDIR": str(tmp_path / "wd"), **env}, cwd=tmp_path)


# -- the nd_pfn info block, as the kernel reads it -------------------------------------------

# struct nd_pfn_sb (drivers/nvdimm/pfn.h), field by field, spelled independently of image.PFN_INFO
ND_PFN_SB = [("signature", 0, "16s"), ("uuid", 16, "16s"), ("parent_uuid", 32, "16s"), ("flags", 48, "<I"),
             ("version_major", 52, "<H"), ("version_minor", 54, "<H"), ("dataoff", 56, "<Q"),
             ("npfns", 64, "<Q"), ("mode", 72, "<I"), ("start_pad", 76, "<I"), ("end_trunc", 80, "<I"),
             ("align", 84, "<I"), ("page_size", 88, "<I"), ("page_struct_size", 92, "<H"),
             ("checksum", 4088, "<Q")]


def parse_sb(block: bytes) -> dict[str, object]:
    assert len(block) == 4096
    return {name: struct.unpack_from(fmt, block, off)[0] for name, off, fmt in ND_PFN_SB}


def kernel_checksum(block: bytes) -> int:
    """nd_sb_checksum: nd_fletcher64 over the 4 KiB block with its checksum field zeroed."""
    words = array.array("I", block[:4088] + bytes(8))
    if sys.byteorder == "big":
        words.byteswap()
    lo, hi = 0, 0
    for w in words:
        lo = (lo + w) % (1 << 32)
        hi = (hi + lo) % (1 << 64)
    return (hi << 32 | lo) % (1 << 64)


def kernel_accepts(sb: dict[str, object], block: bytes, namespace_start: int, namespace_size: int) -> list[str]:
    """The checks nd_pfn_validate (Linux 6.1) makes of an info block for a PFN (fsdax) namespace,
    and __nvdimm_setup_pfn's for RAM mode; the reasons it would refuse, [] if none."""
    problems = []
    if sb["signature"] != b"NVDIMM_PFN_INFO\0":
        problems.append("signature")
    if sb["checksum"] != kernel_checksum(block):
        problems.append("checksum")
    if sb["parent_uuid"] != bytes(16):  # a label-less namespace's uuid is null
        problems.append("parent_uuid")
    if sb["mode"] not in (1, 2):
        problems.append("mode")
    offset, align = sb["dataoff"], sb["align"] or 1 << (sb["dataoff"].bit_length() - 1)
    if align > namespace_size:
        problems.append("align exceeds capacity")
    if offset >= namespace_size:
        problems.append("pfn array size exceeds capacity")
    if (namespace_start + offset + sb["start_pad"]) % align or offset % PAGE:
        problems.append("bad offset")
    end = namespace_start + namespace_size - sb["end_trunc"]
    if (namespace_start + sb["start_pad"]) % (2 * MiB) or end % (2 * MiB):
        problems.append("misaligned resource")
    if sb["mode"] == 1 and offset < 8192:  # RAM mode: the info block's reserve comes first
        problems.append("offset < reserve")
    return problems


@pytest.mark.parametrize("size", [128 * MiB, 1024 * MiB, 640 * MiB])
def test_info_block_is_what_the_kernel_expects(size: int) -> None:
    block = image.pfn_info(size, image.DAX_HEADER, uuid.UUID(int=7).bytes)
    sb = parse_sb(block)
    assert sb["signature"] == b"NVDIMM_PFN_INFO\0" and sb["uuid"] == uuid.UUID(int=7).bytes
    assert (sb["version_major"], sb["version_minor"], sb["flags"]) == (1, 4, 0)
    assert sb["mode"] == 1  # PFN_MODE_RAM: struct pages in guest RAM, nothing written to the read-only image
    assert sb["dataoff"] == 2 * MiB == sb["align"]  # Kata's: the disk behind a 2 MiB header, 2 MiB aligned
    assert sb["npfns"] == (size - 2 * MiB) // PAGE
    assert (sb["start_pad"], sb["end_trunc"], sb["page_size"], sb["page_struct_size"]) == (0, 0, PAGE, 64)
    assert block[96:4088] == bytes(3992)  # padding zero (minor version 3 promises it)
    assert sb["checksum"] == kernel_checksum(block)
    # QEMU places the NVDIMM in device memory aligned to at least 1 GiB on x86
    assert kernel_accepts(sb, block, namespace_start=4 << 30, namespace_size=size) == []
    assert image.PfnInfo.unpack(block).pack() == block


def test_a_damaged_info_block_is_refused_by_the_kernel_and_by_read_dax_header(tmp_path: Path) -> None:
    block = bytearray(image.pfn_info(128 * MiB, image.DAX_HEADER, bytes(16)))
    block[100] = 1  # one byte of padding
    assert "checksum" in kernel_accepts(parse_sb(bytes(block)), bytes(block), 4 << 30, 128 * MiB)
    path = tmp_path / "damaged.img"
    path.write_bytes(bytes(4096) + bytes(block))
    assert image.read_dax_header(path) is None
    path.write_bytes(bytes(4096) + image.pfn_info(128 * MiB, image.DAX_HEADER, bytes(16)))
    assert image.read_dax_header(path).dataoff == 2 * MiB
    path.write_bytes(bytes(100))
    assert image.read_dax_header(path) is None


def test_fletcher64_matches_the_kernels_word_order() -> None:
    data = struct.pack("<4I", 1, 2, 3, 0xFFFFFFFF)
    lo = (1 + 2 + 3 + 0xFFFFFFFF) % (1 << 32)
    hi = 1 + 3 + 6 + (6 + 0xFFFFFFFF) % (1 << 32)
    assert image.fletcher64(data) == (hi << 32 | lo)


def test_mbrs_point_at_the_same_partition_from_both_views() -> None:
    layout = image.ImageLayout(256 * MiB, 3 * MiB, 253 * MiB, 4096, 2 * MiB)
    tables = image.dax_tables(layout, image.stable_ids(7))
    assert sorted(tables) == [0, 4096, 2 * MiB]
    for offset, first in ((0, 3 * MiB // 512), (2 * MiB, MiB // 512)):
        mbr = tables[offset]
        assert len(mbr) == 512 and mbr[510:] == b"\x55\xaa"
        status, ptype, start, sectors = mbr[446], mbr[450], *struct.unpack_from("<II", mbr, 454)
        assert (status, ptype, start, sectors) == (0, 0x83, first, 253 * MiB // 512)
        assert mbr[462:510] == bytes(48)  # one partition only
    assert tables[0][440:444] == tables[2 * MiB][440:444] != bytes(4)  # one disk identifier
    again = image.dax_tables(layout, image.stable_ids(7))
    assert again == tables  # reproducible with SOURCE_DATE_EPOCH


def test_chs_of_the_first_sectors() -> None:
    assert image.chs(2048) == bytes([32, 33, 0])  # 1 MiB: cylinder 0, head 32, sector 33
    assert image.chs(6144) == bytes([97, 34, 0])
    assert image.chs(1 << 30) == b"\xfe\xff\xff"


# -- settings ----------------------------------------------------------------------------------

def test_dax_follows_the_runtime_unless_set() -> None:
    assert image.wants_dax(settings(Path("/")))  # Kata: yes
    assert image.wants_dax(settings(Path("/"), RUNTIME="clear-containers"))  # CC mounted its root with dax too
    assert not image.wants_dax(settings(Path("/"), DAX="no"))
    assert settings(Path("/")).dax is None and settings(Path("/"), DAX="yes").dax is True
    with pytest.raises(UsageError, match="^DAX: expected yes or no, got 'maybe'$"):
        settings(Path("/"), DAX="maybe")


@pytest.mark.parametrize("env, message", [
    ({"DAX": "yes", "BLOCK_SIZE": "1024"}, "BLOCK_SIZE: 1024 cannot do DAX (ext4 DAX needs the block size to equal "
     "the 4096-byte page size); DAX=yes needs BLOCK_SIZE=4096, or set DAX=no"),
    ({"BLOCK_SIZE": "2048"}, "BLOCK_SIZE: 2048 cannot do DAX (ext4 DAX needs the block size to equal the 4096-byte "
     "page size); DAX=auto (yes for RUNTIME=kata) needs BLOCK_SIZE=4096, or set DAX=no"),
    ({"DAX": "yes", "FS_TYPE": "ext2"}, "FS_TYPE: ext2 cannot be mounted with DAX the way the runtime mounts the "
     "root (rootfstype=ext4 rootflags=dax,data=ordered); DAX=yes needs FS_TYPE=ext4, or set DAX=no"),
])
def test_settings_that_cannot_do_dax_are_refused_before_anything_is_written(tmp_path: Path, env: dict[str, str],
                                                                            message: str) -> None:
    rootfs = make_tree(tmp_path / "rootfs")
    dest = tmp_path / "out" / "container.img"
    dest.parent.mkdir()
    with pytest.raises(UsageError) as e:
        image.build_image(settings(tmp_path, **env), rootfs, dest)
    assert e.value.message == message
    assert list(dest.parent.iterdir()) == []  # no image, no temporary file


def test_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osbuilder import cli

    make_tree(tmp_path / "wd" / "rootfs")
    assert cli.main(["image", "--workdir", str(tmp_path / "wd"), "--block-size", "1024"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "BLOCK_SIZE" in line]
    assert len(err) == 1 and "cannot do DAX" in err[0]
    assert not (tmp_path / "wd" / "container.img").exists()


def test_without_dax_the_layout_is_unchanged(tmp_path: Path) -> None:
    rootfs = make_tree(tmp_path / "rootfs")
    plain = image.plan_layout(rootfs, settings(tmp_path, DAX="no", IMG_SIZE="200"))
    assert (plain.total_bytes, plain.fs_offset, plain.dax_offset) == (256 * MiB, MiB, 0)
    dax = image.plan_layout(rootfs, settings(tmp_path, IMG_SIZE="200"))
    assert (dax.total_bytes, dax.fs_offset, dax.dax_offset, dax.fs_bytes) == (256 * MiB, 3 * MiB, 2 * MiB, 253 * MiB)
    # IMG_SIZE is the whole file, header included, rounded up to what the memory backend maps
    assert image.plan_layout(rootfs, settings(tmp_path, IMG_SIZE="256")).total_bytes == 256 * MiB
    assert image.plan_layout(rootfs, settings(tmp_path, IMG_SIZE="257")).total_bytes == 384 * MiB


# -- a real image ------------------------------------------------------------------------------

def sfdisk_json(path: Path) -> dict:
    out = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, check=True).stdout
    return json.loads(out)["partitiontable"]


@needs_tools
def test_dax_image_both_views_and_the_helpers(tmp_path: Path) -> None:
    rootfs = make_tree(tmp_path / "rootfs")
    dest = tmp_path / "container.img"
    layout = image.build_image(settings(tmp_path, IMG_SIZE="130", SOURCE_DATE_EPOCH="1700000000"), rootfs, dest)
    size = dest.stat().st_size
    assert size == 256 * MiB and size % (128 * MiB) == 0  # what the memory backend maps
    assert layout.dax and layout.fs_offset == 3 * MiB and layout.fs_bytes % PAGE == 0

    # a disk reader (virtio-blk, sfdisk, the helpers) sees MBR #1: the partition at 3 MiB
    outer = sfdisk_json(dest)
    assert outer["label"] == "dos" and len(outer["partitions"]) == 1
    (part,) = outer["partitions"]
    assert part["start"] * 512 == 3 * MiB and part["type"] == "83"
    assert (part["start"] + part["size"]) * 512 <= size

    # the kernel's fsdax namespace starts at the info block's dataoff: MBR #2, the same partition
    data = dest.read_bytes()
    block = data[4096:8192]
    sb = parse_sb(block)
    assert kernel_accepts(sb, block, 4 << 30, size) == []
    inner_file = tmp_path / "pmem0.img"
    inner_file.write_bytes(data[sb["dataoff"]:])  # what /dev/pmem0 shows
    inner = sfdisk_json(inner_file)
    assert inner["label"] == "dos" and inner["partitions"][0]["start"] * 512 + sb["dataoff"] == 3 * MiB
    assert inner["partitions"][0]["size"] == part["size"]

    # the filesystem: ext4 with page-sized blocks, clean, readable by the helpers
    back = readback.read_layout(dest)
    assert (back.fs_offset, back.fs_bytes, back.block_size, back.dax_offset) == (3 * MiB, part["size"] * 512, 4096,
                                                                                 2 * MiB)
    assert readback.read_file(dest, "/etc/hostname") == b"guest\n"
    assert readback.stat_path(dest, "/usr/bin/osbuilder-agent").kind == "regular"
    header = subprocess.run(["dumpe2fs", "-h", back.fs_spec(dest)], capture_output=True, text=True, check=True).stdout
    assert "inline_data" not in header  # ext4 refuses DAX on a filesystem that may hold inline data
    assert subprocess.run(["e2fsck", "-fn", back.fs_spec(dest)], capture_output=True).returncode == 0

    again = tmp_path / "again.img"
    image.build_image(settings(tmp_path, IMG_SIZE="130", SOURCE_DATE_EPOCH="1700000000"), rootfs, again)
    assert again.read_bytes() == data  # reproducible, header included


@needs_tools
def test_dax_no_keeps_gpt(tmp_path: Path) -> None:
    dest = tmp_path / "container.img"
    image.build_image(settings(tmp_path, DAX="no", IMG_SIZE="130"), make_tree(tmp_path / "rootfs"), dest)
    table = sfdisk_json(dest)
    assert table["label"] == "gpt" and table["partitions"][0]["start"] * 512 == MiB
    assert image.read_dax_header(dest) is None and readback.read_layout(dest).dax_offset == 0
