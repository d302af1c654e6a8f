"""`pytest -m build`: build the rootfs and image from the real Debian archive and inspect them.

The image is read without mounting: sfdisk -J for the partition table, dumpe2fs for the
filesystem, debugfs for files inside it.
"""

import importlib.metadata
import json
import os
import stat
import subprocess

import pytest
import yaml
from trees import inodes

from osbuilder import agent
from osbuilder.readback import read_file, read_layout, stat_path
from osbuilder.rootfs import distros, policy
from osbuilder.rootfs.build import METADATA_PATH, packages

pytestmark = pytest.mark.build

MiB = 1 << 20
# What a systemd guest needs (README: systemd, the agent, SSH) and what agent-as-init keeps.
BASE_PACKAGES = {"coreutils", "iptables", "kmod", "iproute2"}
SYSTEMD_PACKAGES = {"systemd", "systemd-sysv", "udev", "openssh-server"}


def dpkg_status(text: str) -> dict[str, dict[str, str]]:
    """/var/lib/dpkg/status: the fields of every installed package, by name."""
    installed = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status") == "install ok installed":
            installed[fields["Package"]] = fields
    return installed


def test_partition_table(osbuilder_image, osbuilder_settings):
    """The default (DAX, for the runtimes' NVDIMM boot): Kata's layout, an MBR whose partition starts at
    3 MiB behind a 2 MiB DAX metadata header; with DAX=no, GPT from 1 MiB."""
    from osbuilder.image import read_dax_header, wants_dax

    table = json.loads(subprocess.run(["sfdisk", "-J", str(osbuilder_image.path)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    (part,) = table["partitions"]
    if wants_dax(osbuilder_settings):
        assert table["label"] == "dos" and part["type"] == "83"
        assert part["start"] * table["sectorsize"] == 3 * MiB
        header = read_dax_header(osbuilder_image.path)
        assert header is not None and header.dataoff == 2 * MiB
    else:
        assert table["label"] == "gpt" and part["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        assert part["start"] * table["sectorsize"] == 1 * MiB
    assert osbuilder_image.path.stat().st_size % (128 * MiB) == 0


def test_filesystem_is_clean_ext4_with_4k_blocks(osbuilder_image):
    layout = read_layout(osbuilder_image.path)
    header = subprocess.run(["dumpe2fs", "-h", layout.fs_spec(osbuilder_image.path)], capture_output=True, text=True,
                            check=True).stdout
    assert "has_journal" in header and "extent" in header  # ext4
    assert layout.block_size == 4096
    assert "Filesystem volume name:   rootfs" in header
    fsck = subprocess.run(["e2fsck", "-fn", layout.fs_spec(osbuilder_image.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_init_is_systemd(osbuilder_image):
    init = stat_path(osbuilder_image.path, "/usr/sbin/init")
    assert init is not None and init.kind == "symlink" and init.link.endswith("systemd/systemd")
    systemd = stat_path(osbuilder_image.path, "/usr/lib/systemd/systemd")
    assert systemd.kind == "regular" and systemd.mode & 0o111


def test_agent_installed_executable_and_enabled(osbuilder_image):
    binary = stat_path(osbuilder_image.path, agent.GUEST_BINARY_PATH)
    assert binary.kind == "regular" and binary.mode & 0o111 and binary.uid == 0
    unit = read_file(osbuilder_image.path, agent.GUEST_UNIT_PATH).decode()
    assert f"ExecStart={agent.GUEST_BINARY_PATH}" in unit
    wants = stat_path(osbuilder_image.path, f"/etc/systemd/system/multi-user.target.wants/{agent.SERVICE_NAME}")
    assert wants.kind == "symlink" and wants.link == agent.GUEST_UNIT_PATH


def test_metadata_matches_settings(osbuilder_image, osbuilder_settings, tmp_path):
    """/var/lib/osbuilder/osbuilder.yaml tells the truth: each entry is checked against the settings
    and against what is really in the image, not recomputed the way the build computes it."""
    meta = yaml.safe_load(read_file(osbuilder_image.path, "/" + METADATA_PATH))
    assert meta["osbuilder"]["version"] == importlib.metadata.version("osbuilder")  # pyproject.toml's
    mirror = osbuilder_settings.repo_url or "http://deb.debian.org/debian"
    release = osbuilder_settings.os_version
    suites = [release] + ([f"{release}-updates", f"{release}-security"] if osbuilder_settings.security_updates else [])
    assert {k: v for k, v in meta["distro"].items() if k != "suites"} == {"name": "debian", "version": release,
                                                                        "mirror": mirror}
    assert [s["suite"] for s in meta["distro"]["suites"]] == suites
    sources = read_file(osbuilder_image.path, "/etc/apt/sources.list").decode()
    for entry in meta["distro"]["suites"]:  # what mmdebstrap used
        assert f"{entry['mirror']} {entry['suite']} main" in sources, sources
    installed = dpkg_status(read_file(osbuilder_image.path, "/var/lib/dpkg/status").decode())
    listed = meta["packages"]["default"] + meta["packages"]["extra"]
    assert set(listed) <= set(installed) and BASE_PACKAGES | SYSTEMD_PACKAGES <= set(listed)
    assert set(osbuilder_settings.extra_pkgs) <= set(listed)  # every EXTRA_PKGS recorded ...
    assert set(meta["packages"]["extra"]) <= set(osbuilder_settings.extra_pkgs)  # ... and no other "extra"
    binary = tmp_path / "agent"  # the agent in the image says which one it is
    binary.write_bytes(read_file(osbuilder_image.path, f"/usr/bin/{meta['agent']['name']}"))
    binary.chmod(0o755)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()
    assert meta["agent"]["name"] == "osbuilder-agent" and version == ["osbuilder-agent", meta["agent"]["version"]]
    unit = stat_path(osbuilder_image.path, f"/usr/lib/systemd/system/{meta['agent']['service']}")
    assert unit is not None and unit.kind == "regular"
    assert meta["agent"]["init"] is False
    assert meta["architecture"] == installed["coreutils"]["Architecture"]  # dpkg's name for this machine


def test_no_secrets_baked_in(osbuilder_image):
    ssh = read_file(osbuilder_image.path, "/etc/ssh/sshd_config.d/osbuilder.conf").decode()
    assert "/run/osbuilder/ssh/" in ssh
    listing = subprocess.run(["debugfs", "-R", "ls /etc/ssh",
                              read_layout(osbuilder_image.path).fs_spec(osbuilder_image.path)],
                             capture_output=True, text=True).stdout
    assert "sshd_config" in listing and "ssh_host_" not in listing
    shadow = read_file(osbuilder_image.path, "/etc/shadow").decode()
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    assert root.split(":")[1] in ("*", "!", "!*")  # locked: no root password
    assert read_file(osbuilder_image.path, "/root/.ssh/authorized_keys") == b""


def test_installed_packages(osbuilder_rootfs, osbuilder_settings):
    installed = set(dpkg_status((osbuilder_rootfs.path / "var/lib/dpkg/status").read_text()))
    assert BASE_PACKAGES | SYSTEMD_PACKAGES | set(osbuilder_settings.extra_pkgs) <= installed
    assert set(packages(osbuilder_settings)) <= installed


def test_trixie_rootfs_and_image(osbuilder_settings, osbuilder_artifacts):
    """The next Debian release builds too; the image's metadata says so."""
    image = osbuilder_artifacts.image(osbuilder_settings.with_values(OS_VERSION="trixie")).path
    meta = yaml.safe_load(read_file(image, "/" + METADATA_PATH))
    assert meta["distro"]["version"] == "trixie"
    assert read_file(image, "/etc/debian_version").decode().startswith(("13", "trixie"))
    assert stat_path(image, agent.GUEST_BINARY_PATH).mode & 0o111


def test_image_of_the_default_rootfs_is_reproducible(osbuilder_rootfs, osbuilder_settings, tmp_path):
    """README: with SOURCE_DATE_EPOCH set, two images of the same tree are byte-identical — for the
    real default rootfs (thousands of files), built in different seconds. The times are clamped in
    the image, not in the tree: the session's rootfs is a cache entry whose files are hard links to
    the cached base tree's, which later rootfs builds link too, so not one inode of it may change."""
    import hashlib
    import time

    from osbuilder.image import build_image

    tree = osbuilder_rootfs.path
    before = inodes(tree)
    assert any(st.st_nlink > 1 for st in map(os.lstat, list(before)[:200]) if stat.S_ISREG(st.st_mode)), \
        "the session's rootfs shares its files with the base tree (userns.share_tree)"
    s = osbuilder_settings.with_values(SOURCE_DATE_EPOCH="1700000000", WORKDIR=str(tmp_path / "wd"))
    digests = []
    for name in ("a.img", "b.img"):
        build_image(s, tree, tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
        time.sleep(1.05 - time.time() % 1)  # the next build runs in a later second
    assert digests[0] == digests[1]
    passwd = subprocess.run(["debugfs", "-R", "stat /etc/passwd", read_layout(tmp_path / "a.img").fs_spec(
        tmp_path / "a.img")], capture_output=True, text=True, check=True).stdout
    for field in ("ctime", "atime", "mtime"):
        assert f"{field}: 0x6553f100:" in passwd, passwd  # 1700000000, not the build time
    changed = [p for p, meta in inodes(tree).items() if before.get(p) != meta]
    assert changed == [], f"building the image changed {len(changed)} inodes of the tree, e.g. {changed[:3]}"


@pytest.mark.parametrize("name", sorted(distros.DISTROS))
def test_every_plugins_rootfs_keeps_the_image_policy(name, osbuilder_settings, osbuilder_artifacts):
    """Whichever plugin made it, a rootfs has no SSH host keys and no documentation but the licences
    (rootfs/policy.py applies and verifies it after the plugin; the session's rootfs for its own plugin)."""
    settings = osbuilder_settings
    if name != osbuilder_settings.distro:
        settings = settings.with_values(DISTRO=name, OS_VERSION=distros.get(name).releases[0])
    tree = osbuilder_artifacts.rootfs(settings).path
    assert policy.violations(tree) == []
    assert list((tree / "usr/share/doc").rglob("copyright")), "the licences stay"
