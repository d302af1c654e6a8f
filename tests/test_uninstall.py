"""`osbuilder uninstall`: install, then uninstall, leaves every file of the runtime's configuration (and the
whole DESTDIR) as it was; a file changed since osbuilder wrote it is refused in one line, exit 1, with
nothing touched; `--dry-run` says what would be done and does nothing. Through the command line, as a user
runs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes import KATA_TOML, kata_qemu, tree_state

from osbuilder import cli

USR = "usr/share/defaults/kata-containers"
OPT = "opt/kata/share/defaults/kata-containers"
CC = "usr/share/defaults/clear-containers/configuration.toml"

CC_TOML = """\
# Clear Containers runtime configuration
[hypervisor.qemu]
path = "/usr/bin/qemu-lite-system-x86_64"   # the hypervisor
kernel = "/usr/share/clear-containers/vmlinux-4.14.container"  # the guest kernel
image = "/usr/share/clear-containers/clear-containers.img"  # the root filesystem

[agent.cc]
"""


def workdir(tmp_path: Path) -> Path:
    wd = tmp_path / "wd"
    wd.mkdir()
    for name, size in (("container.img", 4096), ("container-initrd.img", 2048), ("vmlinuz.container", 1024),
                       ("vmlinux.container", 3072)):
        (wd / name).write_bytes(os.urandom(size))
    return wd


def run(capsys: pytest.CaptureFixture[str], step: str, wd: Path, dest: Path, *flags: str) -> tuple[int, str, str]:
    code = cli.main([step, "--workdir", str(wd), "--destdir", str(dest), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def kata_tree(dest: Path, where: str = USR) -> Path:
    """Kata as packaged: configuration.toml -> configuration-qemu.toml, an earlier drop-in of someone else's."""
    d = dest / where
    (d / "config.d").mkdir(parents=True)
    (d / "configuration-qemu.toml").write_text(KATA_TOML)
    (d / "configuration.toml").symlink_to("configuration-qemu.toml")
    (d / "config.d/10-x.toml").write_text("[hypervisor.qemu]\ndefault_memory = 4096  # theirs\n")
    return d / "configuration.toml"


INSTALLS = [("install-image", "--force"), ("install-kernel", "--force"), ("install-initrd", "--force"),
            ("install-image", "--force")]


@pytest.mark.parametrize("where", [USR, OPT])
def test_install_then_uninstall_leaves_kata_as_it_was(tmp_path: Path, capsys, where: str):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    config = kata_tree(dest, where)
    before = tree_state(dest)
    for step, flag in INSTALLS:
        code, out, err = run(capsys, step, wd, dest, flag)
        assert code == 0, err
    assert kata_qemu(config)["image"].endswith("/container.img") and tree_state(dest) != before
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 0, err
    assert "remove the drop-in" in out
    assert tree_state(dest) == before  # every file, link and directory: the prefix osbuilder made is gone too
    assert kata_qemu(config)["image"] == "/usr/share/kata-containers/kata-containers.img"


def test_install_then_uninstall_leaves_an_edited_file_as_it_was(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    cc = dest / CC
    cc.parent.mkdir(parents=True)
    cc.write_text(CC_TOML)
    os.chmod(cc, 0o640)
    before = tree_state(dest)
    for step, flag in INSTALLS:
        assert run(capsys, step, wd, dest, flag, "--runtime", "clear-containers")[0] == 0
    assert len(list(cc.parent.glob("configuration.toml.bak*"))) == 4  # one backup per change
    code, out, err = run(capsys, "uninstall", wd, dest, "--runtime", "clear-containers")
    assert code == 0, err
    assert f"restore {cc} from {cc}.bak" in out
    assert tree_state(dest) == before  # the backups osbuilder made are gone, the mode is 0640 again


def test_uninstall_keeps_what_was_there_before(tmp_path: Path, capsys):
    """A PREFIX that existed, a container.img link of its own, a drop-in osbuilder did not record: each is
    given back as it was."""
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    kata_tree(dest)
    prefix = dest / "usr/share/kata-containers"
    prefix.mkdir(parents=True)
    (prefix / "kata-containers-2.5.img").write_bytes(b"Kata's own image")
    (prefix / "container.img").symlink_to("kata-containers-2.5.img")
    (dest / USR / "config.d/50-osbuilder.toml").write_text('[hypervisor.qemu]\nkernel = "/old/vmlinux"\n')
    before = tree_state(dest)
    for step, flag in INSTALLS:
        assert run(capsys, step, wd, dest, flag)[0] == 0
    assert os.readlink(prefix / "container.img").startswith("osbuilder-")
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 0, err
    assert tree_state(dest) == before


def test_uninstall_after_a_user_edit_of_the_edited_file_refuses(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    cc = dest / CC
    cc.parent.mkdir(parents=True)
    cc.write_text(CC_TOML)
    assert run(capsys, "install-image", wd, dest, "--force", "--runtime", "clear-containers")[0] == 0
    cc.write_text(cc.read_text().replace('machine_type', 'machine_type') + "[runtime]\nenable_debug = true\n")
    edited = tree_state(dest)
    code, out, err = run(capsys, "uninstall", wd, dest, "--runtime", "clear-containers")
    assert code == 1
    assert err.splitlines()[0] == (f"osbuilder: error: uninstall: {cc} changed since osbuilder wrote it; "
                                   "not restoring it (nothing was changed)")
    assert "Traceback" not in err and tree_state(dest) == edited


def test_uninstall_after_a_user_edit_of_osbuilders_key_refuses(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    kata_tree(dest)
    assert run(capsys, "install-image", wd, dest, "--force")[0] == 0
    drop_in = dest / USR / "config.d/50-osbuilder.toml"
    drop_in.write_text(drop_in.read_text().replace("/usr/share/kata-containers/container.img", "/srv/mine.img"))
    edited = tree_state(dest)
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 1
    assert f"uninstall: {drop_in} changed since osbuilder wrote it: image is '/srv/mine.img'" in err.splitlines()[0]
    assert tree_state(dest) == edited


def test_uninstall_takes_only_osbuilders_keys_from_a_drop_in_someone_added_to(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    config = kata_tree(dest)
    assert run(capsys, "install-image", wd, dest, "--force")[0] == 0
    drop_in = dest / USR / "config.d/50-osbuilder.toml"
    drop_in.write_text(drop_in.read_text() + "enable_debug = true  # mine\n")
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 0, err
    assert "take osbuilder's keys (image, initrd) out of the drop-in" in out
    assert drop_in.read_text().endswith("[hypervisor.qemu]\nenable_debug = true  # mine\n")
    qemu = kata_qemu(config)
    assert qemu["image"] == "/usr/share/kata-containers/kata-containers.img" and qemu["enable_debug"] is True
    assert not (dest / "usr/share/kata-containers").exists()


def test_uninstall_refuses_when_an_installed_link_was_repointed(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    kata_tree(dest)
    assert run(capsys, "install-image", wd, dest, "--force")[0] == 0
    link = dest / "usr/share/kata-containers/container.img"
    link.unlink()
    link.symlink_to("kata-containers.img")
    edited = tree_state(dest)
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 1 and "container.img changed since osbuilder installed it" in err.splitlines()[0]
    assert tree_state(dest) == edited


def test_uninstall_dry_run_changes_nothing(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    kata_tree(dest)
    assert run(capsys, "install-image", wd, dest, "--force")[0] == 0
    installed = tree_state(dest)
    code, out, err = run(capsys, "uninstall", wd, dest, "--dry-run")
    assert code == 0, err
    assert "would remove the drop-in" in out and "would remove the link" in out
    assert tree_state(dest) == installed


def test_uninstall_without_a_record_is_a_usage_error(tmp_path: Path, capsys):
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    kata_tree(dest)
    before = tree_state(dest)
    code, out, err = run(capsys, "uninstall", wd, dest)
    assert code == 2
    assert err.splitlines()[0].startswith("osbuilder: error: PREFIX: no osbuilder install record at ")
    assert tree_state(dest) == before


def test_a_change_by_someone_else_between_installs_is_kept(tmp_path: Path, capsys):
    """The file is edited by hand between two installs: uninstall goes back to that hand-edited state,
    not past it."""
    wd, dest = workdir(tmp_path), tmp_path / "dest"
    cc = dest / CC
    cc.parent.mkdir(parents=True)
    cc.write_text(CC_TOML)
    assert run(capsys, "install-image", wd, dest, "--force", "--runtime", "clear-containers")[0] == 0
    cc.write_text(cc.read_text() + "[runtime]\nenable_debug = true\n")
    hand_edited = cc.read_text()
    assert run(capsys, "install-kernel", wd, dest, "--force", "--runtime", "clear-containers")[0] == 0
    code, out, err = run(capsys, "uninstall", wd, dest, "--runtime", "clear-containers")
    assert code == 0, err
    assert cc.read_text() == hand_edited
