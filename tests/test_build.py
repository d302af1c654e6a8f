"""`pytest -m build`: build the rootfs and image from the real Debian archive and inspect them.

The image is read without mounting: sfdisk -J for the partition table, dumpe2fs for the
filesystem, debugfs for files inside it.
"""

import json
import subprocess

import pytest
import yaml

from osbuilder import __version__, agent
from osbuilder.image import ALIGN, read_file, read_layout, stat_path
from osbuilder.rootfs import METADATA_PATH, packages

pytestmark = pytest.mark.build


def test_partition_table(image):
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image.path)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    (part,) = table["partitions"]
    assert part["start"] * table["sectorsize"] == 1024 * 1024
    assert part["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert image.path.stat().st_size % ALIGN == 0


def test_filesystem_is_clean_ext4_with_4k_blocks(image):
    layout = read_layout(image.path)
    header = subprocess.run(["dumpe2fs", "-h", layout.fs_spec(image.path)], capture_output=True, text=True,
                            check=True).stdout
    assert "has_journal" in header and "extent" in header  # ext4
    assert layout.block_size == 4096
    assert "Filesystem volume name:   rootfs" in header
    fsck = subprocess.run(["e2fsck", "-fn", layout.fs_spec(image.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_init_is_systemd(image):
    init = stat_path(image.path, "/usr/sbin/init")
    assert init is not None and init.kind == "symlink" and init.link.endswith("systemd/systemd")
    systemd = stat_path(image.path, "/usr/lib/systemd/systemd")
    assert systemd.kind == "regular" and systemd.mode & 0o111


def test_agent_installed_executable_and_enabled(image):
    binary = stat_path(image.path, agent.GUEST_BINARY_PATH)
    assert binary.kind == "regular" and binary.mode & 0o111 and binary.uid == 0
    unit = read_file(image.path, agent.GUEST_UNIT_PATH).decode()
    assert f"ExecStart={agent.GUEST_BINARY_PATH}" in unit
    wants = stat_path(image.path, f"/etc/systemd/system/multi-user.target.wants/{agent.SERVICE_NAME}")
    assert wants.kind == "symlink" and wants.link == agent.GUEST_UNIT_PATH


def test_metadata_matches_settings(image, osbuilder_settings):
    meta = yaml.safe_load(read_file(image.path, "/" + METADATA_PATH))
    assert meta["osbuilder"]["version"] == __version__
    assert meta["distro"] == {"name": "debian", "version": osbuilder_settings.os_version,
                              "mirror": osbuilder_settings.repo_url or "http://deb.debian.org/debian"}
    assert meta["packages"]["default"] + meta["packages"]["extra"] == packages(osbuilder_settings)
    assert meta["agent"]["name"] == agent.AGENT_NAME and meta["agent"]["version"] == agent.AGENT_VERSION
    assert meta["agent"]["init"] is False and meta["architecture"] == "amd64"


def test_no_secrets_baked_in(image):
    ssh = read_file(image.path, "/etc/ssh/sshd_config.d/osbuilder.conf").decode()
    assert "/run/osbuilder/ssh/" in ssh
    listing = subprocess.run(["debugfs", "-R", "ls /etc/ssh", read_layout(image.path).fs_spec(image.path)],
                             capture_output=True, text=True).stdout
    assert "sshd_config" in listing and "ssh_host_" not in listing
    shadow = read_file(image.path, "/etc/shadow").decode()
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    assert root.split(":")[1] in ("*", "!", "!*")  # locked: no root password
    assert read_file(image.path, "/root/.ssh/authorized_keys") == b""


def test_installed_packages(rootfs, osbuilder_settings):
    status = (rootfs.path / "var/lib/dpkg/status").read_text()
    installed = {block.split("\n")[0].removeprefix("Package: ") for block in status.split("\n\n")
                 if "Status: install ok installed" in block}
    assert set(packages(osbuilder_settings)) <= installed


def test_trixie_rootfs_and_image(osbuilder_settings, osbuilder_cache):
    """The next Debian release builds too; the image's metadata says so."""
    from osbuilder.image import build_image, image_manifest
    from osbuilder.rootfs import build_rootfs, manifest

    s = osbuilder_settings.with_values(OS_VERSION="trixie")
    m = manifest(s)
    rootfs = osbuilder_cache.get_or_build(m, lambda tmp: build_rootfs(s, tmp / "rootfs")) / "rootfs"
    entry = osbuilder_cache.get_or_build(image_manifest(s, m.key),
                                         lambda tmp: build_image(s, rootfs, tmp / "container.img"))
    image = entry / "container.img"
    meta = yaml.safe_load(read_file(image, "/" + METADATA_PATH))
    assert meta["distro"]["version"] == "trixie"
    assert read_file(image, "/etc/debian_version").decode().startswith(("13", "trixie"))
    assert stat_path(image, agent.GUEST_BINARY_PATH).mode & 0o111
