"""`osbuilder image` on small synthetic trees: layout, tree checks, errors that leave nothing behind.

These use the real sfdisk, mke2fs, e2fsck and debugfs; only the rootfs is small and hand-made.
"""

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fakes import make_tree
from trees import inodes

from osbuilder import settings as S
from osbuilder.errors import UsageError
from osbuilder.image import build_image, check_tree, plan_layout
from osbuilder.readback import read_file, read_layout

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "mke2fs", "sfdisk"], capture_output=True).returncode != 0,
    reason="e2fsprogs or fdisk not installed (osbuilder check-deps --install)")


MiB = 1 << 20  # spelled here, not imported: the sizes below are the README's promises


def settings(tmp_path: Path, **env) -> S.Settings:
    return S.load({}, env={"WORKDIR": str(tmp_path / "wd"), **env}, cwd=tmp_path)


def test_image_layout_partition_and_filesystem(tmp_path: Path):
    s = settings(tmp_path, IMG_SIZE="130", DAX="no")  # the plain GPT layout (tests/test_image_dax.py: DAX)
    rootfs = make_tree(tmp_path / "rootfs")
    dest = tmp_path / "container.img"
    build_image(s, rootfs, dest)
    assert dest.stat().st_size == 256 * MiB  # 130 MiB asked, rounded up to a multiple of 128 MiB
    table = json.loads(subprocess.run(["sfdisk", "-J", str(dest)], capture_output=True, check=True).stdout)
    table = table["partitiontable"]
    assert table["label"] == "gpt" and len(table["partitions"]) == 1
    assert table["partitions"][0]["start"] * table["sectorsize"] == 1 * MiB
    layout = read_layout(dest)
    assert layout.block_size == 4096
    assert read_file(dest, "/etc/hostname") == b"guest\n"
    check = subprocess.run(["e2fsck", "-fn", layout.fs_spec(dest)], capture_output=True)
    assert check.returncode == 0, check.stdout


def test_img_size_is_rounded_up_to_128_mib(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")
    assert plan_layout(rootfs, settings(tmp_path, IMG_SIZE="130")).total_bytes == 256 * MiB
    assert plan_layout(rootfs, settings(tmp_path, IMG_SIZE="128")).total_bytes == 128 * MiB


def test_img_size_smaller_than_rootfs_is_refused(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")
    (rootfs / "big").write_bytes(os.urandom(8 * MiB))
    with pytest.raises(UsageError, match="IMG_SIZE: 60 MiB is too small"):
        plan_layout(rootfs, settings(tmp_path, IMG_SIZE="60"))


def test_automatic_size_leaves_headroom(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")
    (rootfs / "big").write_bytes(b"\0" * 200 * MiB)
    layout = plan_layout(rootfs, settings(tmp_path))
    assert layout.fs_bytes >= 1.2 * 200 * MiB


@pytest.mark.parametrize("broken,message", [
    (dict(init_target=None), "sbin/init is missing"),
    (dict(agent=False), "agent osbuilder-agent is missing"),
    (dict(systemd=False, init_target="../bin/osbuilder-agent"), "systemd is missing"),
])
def test_tree_checks(tmp_path: Path, broken, message):
    rootfs = make_tree(tmp_path / "rootfs", **broken)
    with pytest.raises(UsageError, match=message):
        check_tree(rootfs, settings(tmp_path))


def test_agent_must_be_executable(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")
    (rootfs / "usr/bin/osbuilder-agent").chmod(0o644)
    with pytest.raises(UsageError, match="is not executable"):
        check_tree(rootfs, settings(tmp_path))


def test_agent_as_init_requires_init_to_be_the_agent(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")
    with pytest.raises(UsageError, match="AGENT_INIT=yes but /sbin/init is usr/lib/systemd/systemd"):
        check_tree(rootfs, settings(tmp_path, AGENT_INIT="yes"))
    ok = make_tree(tmp_path / "agent-init", systemd=False, init_target="../bin/osbuilder-agent")
    check_tree(ok, settings(tmp_path, AGENT_INIT="yes"))


def test_failed_image_keeps_the_earlier_image(tmp_path: Path):
    s = settings(tmp_path)
    good = make_tree(tmp_path / "rootfs")
    dest = tmp_path / "container.img"
    build_image(s, good, dest)
    before = dest.read_bytes()
    bad = make_tree(tmp_path / "bad", agent=False)
    with pytest.raises(UsageError):
        build_image(s, bad, dest)
    with pytest.raises(UsageError, match="run `osbuilder rootfs` first"):
        build_image(s, tmp_path / "nothing", dest)
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "container.img", "rootfs", "wd"]


def test_source_date_epoch_makes_the_image_reproducible(tmp_path: Path):
    """Two builds of the same content, whose files were written at different times (two checkouts,
    two rootfs builds), made at different times, give the same bytes."""
    s = settings(tmp_path, SOURCE_DATE_EPOCH="1700000000")
    first = make_tree(tmp_path / "first")
    second = make_tree(tmp_path / "second")
    for p in [second, *second.rglob("*")]:  # written a day later
        st = p.lstat()
        os.utime(p, ns=(st.st_atime_ns + 86400 * 10**9, st.st_mtime_ns + 86400 * 10**9), follow_symlinks=False)
    before = inodes(second)
    build_image(s, first, tmp_path / "a.img")
    time.sleep(1.05 - time.time() % 1)  # the second build starts in a later second than the first ended
    build_image(s, second, tmp_path / "b.img")
    assert inodes(second) == before, "times are clamped in the image; the tree (perhaps a cache entry) is only read"
    for name in ("a.img", "b.img"):  # files newer than SOURCE_DATE_EPOCH have their times clamped to it
        hostname = subprocess.run(["debugfs", "-R", "stat /etc/hostname", read_layout(tmp_path / name).fs_spec(
            tmp_path / name)], capture_output=True, text=True, check=True).stdout
        assert "mtime: 0x6553f100:" in hostname, hostname  # 1700000000
    digests = [hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("a.img", "b.img")]
    assert digests[0] == digests[1], ("the images differ: a build-time timestamp leaks into them (mke2fs -d copies "
                                      "each file's ctime, and the atime of directories, from the tree)")
