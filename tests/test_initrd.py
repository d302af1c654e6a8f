"""`osbuilder initrd` on small hand-made trees, and the `initrd` boot profile's data and QEMU command line.

The archives are made by the real cpio and zstd; only the rootfs is small. What a guest does with
the initrd is boot_tests/test_initrd.py's business.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fakes import make_tree
from trees import inodes

import osbuilder.cli  # noqa: F401 - registers the subcommands
from osbuilder import initrd, steps
from osbuilder import settings as S
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.initrd import Entry, append_entries, build_initrd, encode_entry
from osbuilder.kernel.fragments import merge, resolve_fragments
from osbuilder.readback import list_initrd, read_newc
from osbuilder.vm import attachments, check, profiles
from osbuilder.vm.options import Accel, BootKernel
from osbuilder.vm.qemu import VmPaths, VmSpec, build_command

needs_tools = pytest.mark.skipif(any(shutil.which(p) is None for p in ("cpio", "zstd")),
                                 reason="cpio or zstd not installed (osbuilder check-deps --install)")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the trees here get owners only root can give")

EPOCH = 1700000000


def settings(tmp_path: Path, **env: str) -> S.Settings:
    return S.load({}, env={"WORKDIR": str(tmp_path / "wd"), **env}, cwd=tmp_path)


def agent_tree(root: Path) -> Path:
    """An AGENT_INIT=yes tree: /sbin/init is the agent, no systemd; and a file only root and group 42 read."""
    make_tree(root, init_target="../bin/osbuilder-agent", systemd=False)
    shadow = root / "etc/shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\n")
    shadow.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(shadow, 0, 42)
    (root / "dev").mkdir()
    return root


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# -- refusals: one line naming the setting, nothing written ------------------------------------


def test_refuses_a_systemd_rootfs_naming_agent_init(tmp_path: Path):
    rootfs = make_tree(tmp_path / "rootfs")  # systemd as init
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError) as e:
        build_initrd(settings(tmp_path), rootfs, out / "container-initrd.img")
    assert e.value.message.startswith("AGENT_INIT: an initrd runs the agent as init")
    assert "\n" not in e.value.message and e.value.exit_code == 2
    with pytest.raises(UsageError, match=r"rootfs: AGENT_INIT=yes but /sbin/init is usr/lib/systemd/systemd, not"):
        build_initrd(settings(tmp_path, AGENT_INIT="yes"), rootfs, out / "container-initrd.img")
    assert list(out.iterdir()) == []


def test_the_command_refuses_before_writing_anything(tmp_path: Path):
    wd = tmp_path / "wd"
    env = {k: v for k, v in os.environ.items() if k not in ("WORKDIR", "AGENT_INIT")}
    result = subprocess.run([sys.executable, "-m", "osbuilder", "initrd", "--workdir", str(wd)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("osbuilder: error:")]
    assert errors == ["osbuilder: error: AGENT_INIT: an initrd runs the agent as init (no systemd, no root disk); "
                      "set AGENT_INIT=yes and build that rootfs (`AGENT_INIT=yes osbuilder rootfs`)"]
    assert not wd.exists()


@needs_tools
def test_refuses_a_missing_or_unrunnable_agent(tmp_path: Path):
    s = settings(tmp_path, AGENT_INIT="yes")
    rootfs = agent_tree(tmp_path / "rootfs")
    (rootfs / "usr/bin/osbuilder-agent").chmod(0o644)
    with pytest.raises(UsageError, match="rootfs: agent .*osbuilder-agent is not executable"):
        build_initrd(s, rootfs, tmp_path / "container-initrd.img")
    (rootfs / "usr/bin/osbuilder-agent").unlink()
    with pytest.raises(UsageError, match=r"rootfs: .*/sbin/init is missing"):
        build_initrd(s, rootfs, tmp_path / "container-initrd.img")
    assert not (tmp_path / "container-initrd.img").exists() and leftovers(tmp_path) == []


@needs_tools
def test_an_init_in_the_tree_must_be_the_agent(tmp_path: Path):
    s = settings(tmp_path, AGENT_INIT="yes")
    rootfs = agent_tree(tmp_path / "rootfs")
    (rootfs / "init").write_text("#!/bin/sh\nexec /bin/sh\n")
    (rootfs / "init").chmod(0o755)
    with pytest.raises(UsageError, match=r"rootfs: .*/init is not the agent; the kernel runs /init"):
        build_initrd(s, rootfs, tmp_path / "container-initrd.img")
    (rootfs / "init").unlink()
    (rootfs / "init").symlink_to("/usr/bin/osbuilder-agent")  # the agent already: kept, not doubled
    names = [e.name for e in list_initrd(build_initrd(s, rootfs, tmp_path / "container-initrd.img"))]
    assert names.count("init") == 1


# -- the archive ----------------------------------------------------------------------------------


@needs_tools
@as_root
def test_the_archive_lists_the_tree_with_its_owners_and_init(tmp_path: Path):
    rootfs = agent_tree(tmp_path / "rootfs")
    dest = build_initrd(settings(tmp_path, AGENT_INIT="yes"), rootfs, tmp_path / "container-initrd.img")
    assert dest.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd: what RD_ZSTD unpacks
    entries = {e.name: e for e in list_initrd(dest)}
    on_disk = {".", *(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))}
    assert set(entries) == on_disk | {"init"}
    init = entries["init"]
    assert (init.kind, init.data, init.uid, init.gid) == ("symlink", b"sbin/init", 0, 0)
    for name, e in entries.items():
        if name != "init":
            st = os.lstat(rootfs / name)
            assert (e.mode, e.uid, e.gid) == (st.st_mode, st.st_uid, st.st_gid), name
    assert (entries["etc/shadow"].uid, entries["etc/shadow"].gid, entries["etc/shadow"].mode & 0o777) == (0, 42, 0o640)
    assert entries["usr/bin/osbuilder-agent"].data == b"\x7fELF agent"
    names = [e.name for e in list_initrd(dest)]
    assert names[0] == "." and names[1:-1] == sorted(names[1:-1], key=os.fsencode)  # byte order; /init last
    # one archive, as cpio itself reads it: /init is listed, not hidden behind a second trailer
    listing = subprocess.run(f"zstd -dc {dest} | cpio -it --quiet", shell=True, capture_output=True, check=True)
    assert "init" in listing.stdout.decode().split("\n")
    assert dest.stat().st_mode & 0o777 == 0o644 and leftovers(tmp_path) == []


@needs_tools
def test_reproducible_with_source_date_epoch_across_seconds(tmp_path: Path):
    s = settings(tmp_path, AGENT_INIT="yes", SOURCE_DATE_EPOCH=str(EPOCH))
    rootfs = agent_tree(tmp_path / "rootfs")
    before = inodes(rootfs)
    first = build_initrd(s, rootfs, tmp_path / "one.img").read_bytes()
    assert inodes(rootfs) == before, "times are clamped in the archive; the tree (perhaps a cache entry) is only read"
    time.sleep(1.1)
    (rootfs / "etc/hostname").write_text("guest\n")  # rewritten now: a newer mtime, the same content
    (rootfs / "etc").touch()
    second = build_initrd(s, rootfs, tmp_path / "two.img").read_bytes()
    assert first == second
    entries = read_newc(subprocess.run(["zstd", "-dc"], input=first, capture_output=True, check=True).stdout)
    assert max(e.mtime for e in entries) == EPOCH  # clamped, and /init dated by it too
    assert next(e for e in entries if e.name == "init").mtime == EPOCH


@needs_tools
def test_a_failed_build_leaves_the_earlier_initrd_and_no_temporaries(tmp_path: Path, monkeypatch):
    s = settings(tmp_path, AGENT_INIT="yes")
    rootfs = agent_tree(tmp_path / "rootfs")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "container-initrd.img"
    dest.write_bytes(b"the earlier initrd")
    monkeypatch.setattr(initrd, "ZSTD", ("false",))  # the compressor fails after the archive was written
    with pytest.raises(OsbuilderError, match=r"initrd: `false` failed"):
        build_initrd(s, rootfs, dest)
    assert dest.read_bytes() == b"the earlier initrd"
    assert sorted(p.name for p in out.iterdir()) == ["container-initrd.img"]

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(initrd, "append_entries", interrupted)  # Ctrl-C between the archive and the compressor
    with pytest.raises(KeyboardInterrupt):
        build_initrd(s, rootfs, dest)
    assert dest.read_bytes() == b"the earlier initrd"
    assert sorted(p.name for p in out.iterdir()) == ["container-initrd.img"]


def test_append_entries_keeps_one_archive_padded_to_blocks(tmp_path: Path):
    archive = tmp_path / "a.cpio"
    first = Entry("a", 0o100644, 0, 0, 1, b"hello")
    trailer = Entry("TRAILER!!!", 0, 0, 0, 0, b"")
    body = encode_entry(first) + encode_entry(trailer)
    archive.write_bytes(body + bytes(-len(body) % 512))
    append_entries(archive, [initrd.symlink_entry("init", "sbin/init", 7)])
    data = archive.read_bytes()
    assert len(data) % 512 == 0 and data.count(b"TRAILER!!!") == 1
    assert [(e.name, e.kind, e.data, e.mtime) for e in read_newc(data)] == [
        ("a", "regular", b"hello", 1), ("init", "symlink", b"sbin/init", 7)]
    archive.write_bytes(b"not an archive" * 10)
    with pytest.raises(OsbuilderError, match="does not end with a newc trailer"):
        append_entries(archive, [first])


def test_manifest_follows_the_rootfs_and_the_epoch(tmp_path: Path):
    s = settings(tmp_path, AGENT_INIT="yes")
    base = initrd.initrd_manifest(s, "rootfs-a")
    assert base.kind == "initrd" and base.inputs["compression"].startswith("zstd")
    assert initrd.initrd_manifest(s, "rootfs-b").key != base.key
    assert initrd.initrd_manifest(s.with_values(SOURCE_DATE_EPOCH=str(EPOCH)), "rootfs-a").key != base.key


def test_the_step_names_its_programs(tmp_path: Path):
    programs = {t.program for t in steps.get("initrd").needs(settings(tmp_path))}
    assert {"cpio", "zstd"} <= programs


# -- what boots it ----------------------------------------------------------------------------------


def test_the_project_kernel_can_unpack_it(tmp_path: Path):
    requests = merge(resolve_fragments(settings(tmp_path))).requests
    assert requests["BLK_DEV_INITRD"].value == "y"
    assert requests["RD_ZSTD"].value == "y"  # the compression initrd.ZSTD makes
    assert initrd.ZSTD[0] == "zstd"


def test_initrd_profile():
    p = profiles.INITRD
    assert p.attach is attachments.get("initrd") and p.agent_is_init
    assert p.attach.root_params == "" and p.attach.boots_initrd and not p.attach.root_read_only
    assert {phase for phase in profiles.PHASES if p.skip(phase)} == {"root", "running", "ssh"}
    assert p.skip("root").reason.startswith("initrd")
    assert p.attach.own_kernel_only


def test_qemu_boots_the_initrd_without_a_disk(tmp_path: Path):
    art = tmp_path / "container-initrd.img"
    opts = check.guest_options(settings(tmp_path, AGENT_INIT="yes"), image=art,
                               kernel=BootKernel(tmp_path / "vmlinuz", None, "built"),
                               accel=Accel("tcg", "test", False), name="t", profile=profiles.INITRD)
    spec = opts.spec()
    assert (spec.attachment, spec.initramfs) == (attachments.INITRD, art)
    cmd = build_command(spec, VmPaths(tmp_path))
    assert cmd[cmd.index("-initrd") + 1] == str(art)
    assert "-drive" not in cmd and "virtio-blk-pci,drive=image" not in cmd
    append = cmd[cmd.index("-append") + 1]
    assert "root=" not in append and "rdinit=" not in append and append.startswith("console=ttyS0")
    disk = VmSpec(kernel=Path("/k"), cmdline="", image=Path("/i.img"), attachment=attachments.VIRTIO_BLK)
    assert disk.initramfs is None  # the other attachments: unchanged
    with pytest.raises(ValueError):
        VmSpec(kernel=Path("/k"), cmdline="", image=art, initrd=Path("/debian-initrd"), attachment=attachments.INITRD)


def test_debian_kernel_cannot_boot_the_initrd_profile(tmp_path: Path):
    debian = BootKernel(tmp_path / "vmlinuz", tmp_path / "initrd.img", "debian")
    with pytest.raises(UsageError) as e:
        check.guest_options(settings(tmp_path), image=tmp_path / "x.img", kernel=debian,
                            accel=Accel("tcg", "test", False), name="t", profile=profiles.INITRD)
    assert e.value.message.startswith("BOOT_KERNEL=debian: the initrd boot profile needs osbuilder's own kernel")
    assert "\n" not in e.value.message and e.value.exit_code == 2
    check.guest_options(settings(tmp_path), image=tmp_path / "x.img", kernel=debian,  # other profiles: fine
                        accel=Accel("tcg", "test", False), name="t", profile=profiles.SYSTEMD)


# -- rootless: the owners a root build gives --------------------------------------------------------

ROOTLESS_USER = os.environ.get("OSBUILDER_ROOTLESS_USER", "")


@pytest.mark.skipif(not ROOTLESS_USER, reason="set OSBUILDER_ROOTLESS_USER to a user with /etc/subuid and "
                                              "/etc/subgid entries to test a rootless initrd (.ci/run does)")
@pytest.mark.skipif(os.geteuid() != 0, reason="acts as OSBUILDER_ROOTLESS_USER: needs root")
@needs_tools
def test_a_rootless_build_carries_the_real_owners():
    """An ordinary user's tree belongs to their subordinate ids on the host (100000:100042 for
    root:shadow); the archive, written in the tree's namespace, says root:shadow (0:42)."""
    home = Path(tempfile.mkdtemp(prefix="osbuilder-rootless-initrd-", dir="/var/tmp"))  # reachable by the user
    try:
        rootless_initrd(home)
    finally:
        shutil.rmtree(home)


def rootless_initrd(home: Path) -> None:
    import pwd

    import filelock
    import yaml

    import osbuilder

    pw = pwd.getpwnam(ROOTLESS_USER)
    base = {kind: int(next(line.split(":")[1] for line in Path(f"/etc/sub{kind}id").read_text().splitlines()
                           if line.split(":")[0] in (ROOTLESS_USER, str(pw.pw_uid))))
            for kind in ("u", "g")}
    py = home / "python"
    for module in (osbuilder, yaml, filelock):
        src = Path(module.__file__).parent
        shutil.copytree(src, py / src.name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    wd = home / "wd"
    rootfs = agent_tree(wd / "rootfs")  # root:root, etc/shadow root:42 ...
    for path in [home, *home.rglob("*")]:
        st = os.lstat(path)
        if path.is_relative_to(rootfs):  # ... as the user's namespace made it: subordinate ids on the host
            os.lchown(path, base["u"] + st.st_uid, base["g"] + st.st_gid)
        else:
            os.lchown(path, pw.pw_uid, pw.pw_gid)
    home.chmod(0o755)  # the namespace sees the user's directories as nobody's
    env = ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", f"HOME={home}", f"PYTHONPATH={py}",
           "LC_ALL=C.UTF-8", "AGENT_INIT=yes", f"SOURCE_DATE_EPOCH={EPOCH}"]
    r = subprocess.run(["runuser", "-u", ROOTLESS_USER, "--", "env", "-i", *env, "/usr/bin/python3", "-m",
                        "osbuilder", "initrd", "--workdir", str(wd)], cwd=home, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dest = wd / "container-initrd.img"
    assert (dest.stat().st_uid, dest.stat().st_mode & 0o777) == (pw.pw_uid, 0o644)
    entries = {e.name: e for e in list_initrd(dest)}
    assert (entries["etc/shadow"].uid, entries["etc/shadow"].gid) == (0, 42)
    assert {(e.uid, e.gid) for name, e in entries.items() if name != "etc/shadow"} == {(0, 0)}
    assert leftovers(wd) == []
