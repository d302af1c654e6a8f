"""install-initrd into a DESTDIR: the boot gate, the content-named file and its link, and the runtime pointed
at the initrd with the image unset (Kata: `image = ""` in its drop-in; an edited file: `image =` commented
out), the reverse of install-image."""

import os
import tomllib
from pathlib import Path

import pytest
from fakes import KATA_TOML, kata_qemu

import osbuilder.cli  # noqa: F401 - registers the subcommands
from osbuilder import settings as S
from osbuilder.errors import UsageError
from osbuilder.install import install_image, install_initrd
from osbuilder.runtime_config import point_config
from osbuilder.steps import STEPS as COMMANDS

INSTALLED = "/usr/share/kata-containers/container-initrd.img"


@pytest.fixture
def staged(tmp_path: Path):
    wd, dest = tmp_path / "wd", tmp_path / "dest"
    wd.mkdir()
    (wd / "container-initrd.img").write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4096))
    (wd / "container.img").write_bytes(os.urandom(4096))
    config = dest / "usr/share/defaults/kata-containers/configuration.toml"
    config.parent.mkdir(parents=True)
    config.write_text(KATA_TOML)
    settings = S.load({}, env={"WORKDIR": str(wd), "DESTDIR": str(dest)}, cwd=tmp_path)
    return settings, wd, dest, config


def record_pass(wd: Path, artifact: Path, passed: bool = True) -> None:
    from osbuilder.vm.records import make_record, sha256_file, write_record

    write_record(wd, make_record(artifact, sha256_file(artifact), "image", passed, {"name": "built"}, {},
                                 {"passes": {"initrd": {"profile": "initrd", "with": [], "agent_protocol": "kata1"}}
                                  if passed else {}}))


def test_refuses_an_initrd_without_a_passing_boot_check(staged):
    settings, wd, dest, config = staged
    with pytest.raises(UsageError, match=r"install-initrd: .*container-initrd.img has no passing boot check in "
                                         r"the initrd profile \(sha256 [0-9a-f]{12}\); run `osbuilder boot --check`"):
        install_initrd(settings)
    record_pass(wd, wd / "container-initrd.img", passed=False)  # a failing record does not count
    with pytest.raises(UsageError, match="no passing boot check"):
        install_initrd(settings)
    assert not (dest / "usr/share/kata-containers").exists()
    assert config.read_text() == KATA_TOML


def test_a_missing_initrd_says_build_it_first(staged):
    settings, wd, dest, config = staged
    (wd / "container-initrd.img").unlink()
    with pytest.raises(UsageError, match=r"install-initrd: .*container-initrd.img does not exist; build it first"):
        install_initrd(settings, force=True)
    assert config.read_text() == KATA_TOML


def test_installs_content_named_with_a_stable_link_and_points_initrd_at_it(staged, capsys):
    settings, wd, dest, config = staged
    initrd = wd / "container-initrd.img"
    record_pass(wd, initrd)
    (target,) = install_initrd(settings)
    base = dest / "usr/share/kata-containers"
    link = base / "container-initrd.img"
    assert link.is_symlink() and os.readlink(link) == f"osbuilder-initrd-{target.sha256[:12]}.img"
    assert link.read_bytes() == initrd.read_bytes() and target.installed.stat().st_mode & 0o777 == 0o644
    qemu = kata_qemu(config)
    assert qemu["initrd"] == INSTALLED and qemu["image"] == ""  # "": Kata boots the initrd, never both
    assert qemu["kernel"] == "/usr/share/kata-containers/vmlinux.container" and qemu["machine_type"] == "q35"
    assert config.read_text() == KATA_TOML
    initrd.write_bytes(os.urandom(4096))  # another initrd: the record does not cover it
    with pytest.raises(UsageError, match="no passing boot check"):
        install_initrd(settings)


def test_the_hash_gated_is_the_hash_of_the_copy(staged, monkeypatch):
    """The gate asks for the record of the bytes copied, not of the file as it was looked at first."""
    from osbuilder import install

    settings, wd, dest, config = staged
    initrd = wd / "container-initrd.img"
    record_pass(wd, initrd)
    real_copy = install.copy_hashing

    def swapped_underneath(source: Path, tmp: Path) -> str:
        source.write_bytes(b"replaced after the check")
        return real_copy(source, tmp)

    monkeypatch.setattr(install, "copy_hashing", swapped_underneath)
    with pytest.raises(UsageError, match="no passing boot check"):
        install_initrd(settings)
    assert not (dest / "usr/share/kata-containers/container-initrd.img").exists()
    assert config.read_text() == KATA_TOML
    assert [p.name for p in (dest / "usr/share/defaults/kata-containers").iterdir()] == ["configuration.toml"]


def test_dry_run_shows_the_drop_in_and_changes_nothing(staged, capsys):
    settings, wd, dest, config = staged
    install_initrd(settings, force=True, dry_run=True)
    out = capsys.readouterr().out
    assert f'+initrd = "{INSTALLED}"' in out and '+image = ""' in out
    assert config.read_text() == KATA_TOML and not (dest / "usr/share/kata-containers").exists()
    assert not (config.parent / "config.d").exists()


def test_dry_run_of_an_edit_shows_the_image_commented_out(staged, capsys):
    settings, wd, dest, config = staged
    install_initrd(settings.with_values(DROP_IN="no"), force=True, dry_run=True)
    out = capsys.readouterr().out
    assert f'+initrd = "{INSTALLED}"' in out
    assert '+# image = "/usr/share/kata-containers/kata-containers.img"' in out
    assert config.read_text() == KATA_TOML and not (dest / "usr/share/kata-containers").exists()


def test_force_says_so(staged, caplog):
    settings, wd, dest, config = staged
    install_initrd(settings, force=True)
    assert "install-initrd: --force: installing" in caplog.text
    assert (dest / "usr/share/kata-containers/container-initrd.img").is_file()


def test_image_and_initrd_take_turns(staged):
    """Each install unsets the other: the runtime boots whichever was installed last."""
    settings, wd, dest, config = staged
    install_initrd(settings, force=True)
    install_image(settings, force=True)
    qemu = kata_qemu(config)
    assert qemu["image"] == "/usr/share/kata-containers/container.img" and qemu["initrd"] == ""
    install_initrd(settings, force=True)
    qemu = kata_qemu(config)
    assert qemu["initrd"] == INSTALLED and qemu["image"] == ""
    assert config.read_text() == KATA_TOML


def test_image_and_initrd_take_turns_in_an_edited_file(staged):
    """The same when the file itself is edited (DROP_IN=no): each install comments out the other."""
    settings, wd, dest, config = staged
    settings = settings.with_values(DROP_IN="no")
    install_initrd(settings, force=True)
    install_image(settings, force=True)
    qemu = tomllib.loads(config.read_text())["hypervisor"]["qemu"]
    assert qemu["image"] == "/usr/share/kata-containers/container.img" and "initrd" not in qemu
    install_initrd(settings, force=True)
    qemu = tomllib.loads(config.read_text())["hypervisor"]["qemu"]
    assert qemu["initrd"] == INSTALLED and "image" not in qemu
    assert "# # " not in config.read_text()  # a line commented out once stays commented once


def test_point_config_initrd_comments_out_the_image():
    text = '[hypervisor.qemu]\nimage = "/x/container.img"\ninitrd = "/x/old-initrd.img"\n'
    result = point_config(text, "initrd", "/y/container-initrd.img", Path("c.toml"))
    assert tomllib.loads(result)["hypervisor"]["qemu"] == {"initrd": "/y/container-initrd.img"}
    assert result.splitlines()[1] == '# image = "/x/container.img"'


def test_clear_containers_layout(staged):
    settings, wd, dest, _ = staged
    cc = dest / "usr/share/defaults/clear-containers/configuration.toml"
    cc.parent.mkdir(parents=True)
    cc.write_text('[hypervisor.qemu]\nimage = "/usr/share/clear-containers/clear-containers.img"\n')
    install_initrd(settings.with_values(RUNTIME="clear-containers"), force=True)
    assert (dest / "usr/share/clear-containers/container-initrd.img").is_file()
    assert tomllib.loads(cc.read_text())["hypervisor"]["qemu"] == {
        "initrd": "/usr/share/clear-containers/container-initrd.img"}


def test_it_is_a_subcommand():
    assert "install-initrd" in COMMANDS and "initrd" in COMMANDS
