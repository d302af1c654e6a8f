"""Where Kata keeps its configuration, and the drop-in osbuilder writes there: Kata's search order
(/etc, /usr/share/defaults, /opt/kata), config.d beside the file it loads, Kata's precedence read back
(the base file, then config.d in lexical order, the last to set a key wins), and a Clear Containers
configuration edited with its comments kept. Trees are DESTDIRs made by the tests; Kata's reading is
`fakes.kata_reads`, written from Kata's description, not osbuilder's code."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from fakes import KATA_TOML, kata_qemu, kata_reads, tree_state

from osbuilder import cli
from osbuilder import settings as S
from osbuilder.errors import UsageError
from osbuilder.install import install_image, install_initrd, install_kernel

USR = "usr/share/defaults/kata-containers"
OPT = "opt/kata/share/defaults/kata-containers"


def stage(tmp_path: Path, **env: str) -> tuple[S.Settings, Path, Path]:
    """A WORKDIR with random artifacts and an empty DESTDIR; (settings, wd, dest)."""
    wd, dest = tmp_path / "wd", tmp_path / "dest"
    wd.mkdir()
    dest.mkdir()
    for name, size in (("container.img", 4096), ("container-initrd.img", 2048), ("vmlinuz.container", 1024)):
        (wd / name).write_bytes(os.urandom(size))
    return S.load({}, env={"WORKDIR": str(wd), "DESTDIR": str(dest), **env}, cwd=tmp_path), wd, dest


def kata_package(dest: Path, where: str = USR, hypervisor: str = "qemu") -> Path:
    """Kata as its packages and kata-deploy install it: configuration-<hypervisor>.toml, and
    configuration.toml a relative link to it."""
    d = dest / where
    d.mkdir(parents=True, exist_ok=True)
    text = KATA_TOML.replace("hypervisor.qemu", f"hypervisor.{hypervisor}")
    (d / f"configuration-{hypervisor}.toml").write_text(text)
    (d / "configuration.toml").symlink_to(f"configuration-{hypervisor}.toml")
    return d / "configuration.toml"


# -- where Kata's configuration is --------------------------------------------------------------


def test_opt_kata_is_found_when_etc_and_usr_share_are_absent(tmp_path: Path):
    """kata-deploy and the static release: everything under /opt/kata, the images in its share/kata-containers."""
    settings, wd, dest = stage(tmp_path)
    config = kata_package(dest, OPT)
    install_image(settings, force=True)
    install_kernel(settings, force=True)
    drop_in = dest / OPT / "config.d/50-osbuilder.toml"
    assert drop_in.is_file()
    qemu = kata_qemu(config)
    assert qemu["image"] == "/opt/kata/share/kata-containers/container.img"
    assert qemu["kernel"] == "/opt/kata/share/kata-containers/vmlinuz.container"
    installed = dest / "opt/kata/share/kata-containers/container.img"
    assert installed.read_bytes() == (wd / "container.img").read_bytes()
    assert (dest / OPT / "configuration-qemu.toml").read_text() == KATA_TOML
    assert not (dest / "usr").exists() and not (dest / "etc").exists()


@pytest.mark.parametrize("first", ["etc/kata-containers", USR])
def test_kata_order_decides_which_file_gets_the_drop_in(tmp_path: Path, first: str):
    """/etc overrides the defaults, the package's defaults come before /opt/kata's: the drop-in goes beside
    the file Kata loads, and the others are left alone."""
    settings, wd, dest = stage(tmp_path)
    kata_package(dest, OPT)
    if first == USR:
        kata_package(dest, USR)
    else:
        kata_package(dest, USR)
        (dest / first).mkdir(parents=True)
        (dest / first / "configuration.toml").write_text(KATA_TOML)
    install_image(settings, force=True)
    assert (dest / first / "config.d/50-osbuilder.toml").is_file()
    assert [p for p in dest.rglob("config.d")] == [dest / first / "config.d"]
    assert kata_qemu(dest / first / "configuration.toml")["image"] == "/usr/share/kata-containers/container.img"


def test_the_drop_in_names_the_hypervisor_of_the_loaded_file(tmp_path: Path, caplog):
    """configuration.toml -> configuration-clh.toml: the drop-in sets [hypervisor.clh] (a [hypervisor.qemu]
    table would give Kata two hypervisors), with a warning that the boot checks prove QEMU."""
    settings, wd, dest = stage(tmp_path)
    config = kata_package(dest, USR, "clh")
    install_image(settings, force=True)
    assert set(kata_reads(config)["hypervisor"]) == {"clh"}
    assert kata_reads(config)["hypervisor"]["clh"]["image"] == "/usr/share/kata-containers/container.img"
    assert "configures the clh hypervisor" in caplog.text


def test_runtime_config_chooses_the_file(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    kata_package(dest, USR)
    mine = dest / "srv/kata/configuration-qemu-snp.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text(KATA_TOML)
    install_image(settings.with_values(RUNTIME_CONFIG="/srv/kata/configuration-qemu-snp.toml"), force=True)
    assert kata_qemu(mine)["image"] == "/usr/share/kata-containers/container.img"
    assert not (dest / USR / "config.d").exists()


# -- Kata's precedence ----------------------------------------------------------------------------


def test_the_drop_in_reads_back_with_katas_precedence(tmp_path: Path):
    """A base file, an earlier drop-in 10-x.toml (ours overrides it), ours, and a later 90-y.toml that
    overrides the base file, 10-x and what ours does not set."""
    settings, wd, dest = stage(tmp_path)
    config = kata_package(dest, USR)
    config_d = dest / USR / "config.d"
    config_d.mkdir()
    (config_d / "10-x.toml").write_text('[hypervisor.qemu]\nimage = "/x/image.img"\nkernel = "/x/vmlinux"\n'
                                        'default_memory = 1024\nkernel_params = "x=1"\n')
    (config_d / "90-y.toml").write_text('[hypervisor.qemu]\ndefault_memory = 4096\nmachine_type = "virt"\n'
                                        '[agent.kata]\ndebug = true\n')
    others = {p.name: p.read_bytes() for p in (*config_d.iterdir(), config.resolve())}
    install_image(settings, force=True)
    install_kernel(settings, force=True)
    assert sorted(os.listdir(config_d)) == ["10-x.toml", "50-osbuilder.toml", "90-y.toml"]
    qemu = kata_qemu(config)
    assert qemu["image"] == "/usr/share/kata-containers/container.img"  # ours, over 10-x and the base
    assert qemu["kernel"] == "/usr/share/kata-containers/vmlinuz.container"
    assert qemu["initrd"] == ""
    assert (qemu["default_memory"], qemu["machine_type"]) == (4096, "virt")  # 90-y wins
    assert qemu["kernel_params"] == "x=1"  # 10-x's own key stays
    assert kata_reads(config)["agent"]["kata"]["debug"] is True
    assert {p.name: p.read_bytes() for p in (*config_d.iterdir(), config.resolve()) if p.name in others} == others


def test_a_later_drop_in_that_overrides_osbuilders_key_is_refused(tmp_path: Path):
    """90-y.toml sets image: Kata would boot that, not what osbuilder installs; one line naming it, nothing
    written."""
    settings, wd, dest = stage(tmp_path)
    kata_package(dest, USR)
    config_d = dest / USR / "config.d"
    config_d.mkdir()
    (config_d / "90-y.toml").write_text('[hypervisor.qemu]\nimage = "/y/image.img"\n')
    before = tree_state(dest)
    with pytest.raises(UsageError, match=r"^RUNTIME_CONFIG: .*config.d/90-y.toml sets image = '/y/image.img' "
                                         r"after .*50-osbuilder.toml"):
        install_image(settings, force=True)
    assert tree_state(dest) == before
    with pytest.raises(UsageError, match="90-y.toml sets image"):  # an initrd would meet Kata's "both" error
        install_initrd(settings, force=True)
    assert tree_state(dest) == before


def test_a_broken_drop_in_is_refused_before_anything_is_written(tmp_path: Path):
    """Kata reads every entry of config.d; one that is not TOML stops it loading its configuration at all."""
    settings, wd, dest = stage(tmp_path)
    kata_package(dest, USR)
    config_d = dest / USR / "config.d"
    config_d.mkdir()
    (config_d / "20-debug.toml.swp").write_bytes(b"\x00\x01 not toml [")
    before = tree_state(dest)
    with pytest.raises(UsageError, match=r"^RUNTIME_CONFIG: .*20-debug.toml.swp is not"):
        install_image(settings, force=True)
    assert tree_state(dest) == before


def test_a_non_file_named_like_the_drop_in_is_not_replaced(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    kata_package(dest, USR)
    (dest / USR / "config.d").mkdir()
    (dest / USR / "config.d/50-osbuilder.toml").symlink_to("/etc/passwd")
    with pytest.raises(UsageError, match="is not osbuilder's drop-in"):
        install_image(settings, force=True)


def test_drop_in_yes_for_a_runtime_without_drop_ins_is_a_usage_error(tmp_path: Path, capsys):
    settings, wd, dest = stage(tmp_path)
    cc = dest / "usr/share/defaults/clear-containers/configuration.toml"
    cc.parent.mkdir(parents=True)
    cc.write_text('[hypervisor.qemu]\nimage = "/usr/share/clear-containers/clear-containers.img"\n')
    argv = ["install-image", "--force", "--workdir", str(wd), "--destdir", str(dest),
            "--runtime", "clear-containers", "--drop-in", "yes"]
    assert cli.main(argv) == 2
    assert "DROP_IN: the clear-containers runtime reads no config.d/ drop-ins" in capsys.readouterr().err
    assert not (dest / "usr/share/clear-containers").exists()


# -- an edited file keeps its comments ---------------------------------------------------------------

CC_TOML = """\
# Clear Containers runtime configuration
# (cc-runtime 3.0.23)

[hypervisor.qemu]
path = "/usr/bin/qemu-lite-system-x86_64"   # the hypervisor
kernel = "/usr/share/clear-containers/vmlinux-4.14.22-86.container"
image = "/usr/share/clear-containers/clear-containers.img"  # the root filesystem
# initrd = "/usr/share/clear-containers/clear-containers-initrd.img"
machine_type = "pc"    # pc or q35

  # agent settings
[agent.cc]
pause_root_path = "/var/lib/clear-containers/runtime/bundles/pause_bundle"
"""


def test_an_edited_clear_containers_file_keeps_its_comments(tmp_path: Path):
    settings, wd, dest = stage(tmp_path, RUNTIME="clear-containers")
    cc = dest / "usr/share/defaults/clear-containers/configuration.toml"
    cc.parent.mkdir(parents=True)
    cc.write_text(CC_TOML)
    install_image(settings, force=True)
    assert cc.read_text() == CC_TOML.replace(
        'image = "/usr/share/clear-containers/clear-containers.img"  # the root filesystem',
        'image = "/usr/share/clear-containers/container.img"  # the root filesystem')
    install_kernel(settings, force=True)
    assert 'kernel = "/usr/share/clear-containers/vmlinuz.container"\n' in cc.read_text()
    install_initrd(settings, force=True)
    text = cc.read_text()
    assert '# image = "/usr/share/clear-containers/container.img"  # the root filesystem\n' in text
    assert ('# initrd = "/usr/share/clear-containers/clear-containers-initrd.img"\n'
            'initrd = "/usr/share/clear-containers/container-initrd.img"\n') in text
    for line in CC_TOML.splitlines():
        if not line.startswith(("image", "kernel")):
            assert line in text.splitlines()  # every other line, comments and indents as they were
    qemu = tomllib.loads(text)["hypervisor"]["qemu"]
    assert qemu["initrd"] == "/usr/share/clear-containers/container-initrd.img" and "image" not in qemu
    assert cc.with_name("configuration.toml.bak").read_text() == CC_TOML
    assert not (cc.parent / "config.d").exists()


# -- --dry-run ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["kata", "clear-containers"])
@pytest.mark.parametrize("step", ["install-image", "install-initrd", "install-kernel"])
def test_dry_run_writes_nothing(tmp_path: Path, capsys, runtime: str, step: str):
    settings, wd, dest = stage(tmp_path)
    if runtime == "kata":
        kata_package(dest, USR)
    else:
        cc = dest / "usr/share/defaults/clear-containers/configuration.toml"
        cc.parent.mkdir(parents=True)
        cc.write_text(CC_TOML)
    before = tree_state(dest)
    argv = [step, "--dry-run", "--force", "--workdir", str(wd), "--destdir", str(dest), "--runtime", runtime]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert tree_state(dest) == before
    assert "would install" in out
    assert ("would write the drop-in" if runtime == "kata" else "would edit") in out
    key = {"install-image": "image", "install-initrd": "initrd", "install-kernel": "kernel"}[step]
    assert f"+{key} = " in out
