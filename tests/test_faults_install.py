"""Install under faults: hostile PREFIX/DESTDIR/RUNTIME_CONFIG values, a configuration.toml with its own
mode, owner and symlinks, backups, a full disk, an interrupt, and an artifact replaced mid-install."""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes import KATA_TOML, kata_qemu

from osbuilder import install as inst
from osbuilder import settings as S
from osbuilder.errors import InfrastructureError, UsageError
from osbuilder.install import install_image, install_kernel
from osbuilder.layout import Workdir
from osbuilder.runtime_config import point_config

PREFIX_DIR = "usr/share/kata-containers"
CONFIG = "usr/share/defaults/kata-containers/configuration.toml"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changes owners / mounts: needs root")


def stage(tmp_path: Path, **env: str) -> tuple[S.Settings, Path, Path]:
    """A WORKDIR with random artifacts, a DESTDIR with Kata's configuration.toml; (settings, wd, dest)."""
    wd, dest = tmp_path / "wd", tmp_path / "dest"
    wd.mkdir()
    (wd / "container.img").write_bytes(os.urandom(4096))
    (wd / "vmlinuz.container").write_bytes(os.urandom(1024))
    config = dest / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text(KATA_TOML)
    settings = S.load({}, env={"WORKDIR": str(wd), "DESTDIR": str(dest), **env}, cwd=tmp_path)
    return settings, wd, dest


def everything_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def temp_files(path: Path) -> list[str]:
    return [p for p in everything_under(path) if ".tmp-" in p]


def osbuilder(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The real command line, in tmp_path, with only `env` (plus PATH) for settings."""
    here = str(Path(inst.__file__).parents[1])  # the osbuilder under test
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": here, **env}
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)


# ------------------------------------------------------------------ PREFIX, DESTDIR, RUNTIME_CONFIG


def test_a_relative_prefix_is_a_one_line_usage_error(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    r = osbuilder(tmp_path, "install-image", "--force", WORKDIR=str(wd), DESTDIR=str(dest), PREFIX="opt/kata")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "PREFIX: must be an absolute path" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("name", ["PREFIX", "RUNTIME_CONFIG"])
@pytest.mark.parametrize("value", ["/usr/share/../../../etc", "/opt/kata/..", "/../x"])
def test_dot_dot_cannot_climb_out_of_destdir(name: str, value: str):
    with pytest.raises(UsageError, match=rf"^{name}: must not contain '\.\.'"):
        S.load({}, env={name: value, "DESTDIR": "/tmp/stage"})


@pytest.mark.parametrize("name", ["PREFIX", "RUNTIME_CONFIG", "DESTDIR"])
def test_control_characters_are_refused(name: str):
    with pytest.raises(UsageError, match=rf"^{name}: must not contain control characters"):
        S.load({}, env={name: '/opt/x"\nmalicious = "yes'})


def test_tilde_is_the_home_directory(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = S.load({}, env={"PREFIX": "~/kata", "DESTDIR": "~/stage", "RUNTIME_CONFIG": "~/kata/configuration.toml"})
    assert (s.prefix, s.destdir) == (f"{tmp_path}/home/kata", f"{tmp_path}/home/stage")
    assert s.runtime_config == f"{tmp_path}/home/kata/configuration.toml"
    assert S.load({}, env={"PREFIX": "/opt//kata/./images/"}).prefix == "/opt/kata/images"


def test_quotes_and_backslashes_in_prefix_round_trip_through_the_toml(tmp_path: Path):
    weird = '/opt/we"ird\\dir = "x" # \'k\' \\u0041'
    settings, wd, dest = stage(tmp_path, PREFIX=weird)
    install_image(settings, force=True)
    qemu = kata_qemu(dest / CONFIG)
    assert qemu["image"] == weird + "/container.img"
    assert set(qemu) == {"path", "kernel", "image", "initrd", "machine_type"}
    install_image(settings.with_values(DROP_IN="no"), force=True)  # the same through an edit
    parsed = tomllib.loads((dest / CONFIG).read_text())
    assert parsed["hypervisor"]["qemu"]["image"] == weird + "/container.img"
    assert set(parsed["hypervisor"]["qemu"]) == {"path", "kernel", "image", "machine_type"}
    assert set(parsed) == {"hypervisor", "agent"}
    assert (dest / weird.lstrip("/") / "container.img").read_bytes() == (wd / "container.img").read_bytes()


def test_point_config_escapes_what_it_writes():
    for value in ['a"b', "a\\b", "tab\there", "del\x7f", "naïve/ünïcode"]:
        text = point_config("[hypervisor.qemu]\n", "image", value, Path("c.toml"))
        assert tomllib.loads(text)["hypervisor"]["qemu"]["image"] == value


# ------------------------------------------------------------------ configuration.toml: mode, owner, fsync, backups


@root_only
def test_the_config_keeps_its_mode_and_owner(tmp_path: Path):
    settings, wd, dest = stage(tmp_path, DROP_IN="no")
    config = dest / CONFIG
    gid = grp.getgrnam("nogroup").gr_gid  # stands for the runtime's group (root:kata 0640)
    os.chown(config, 0, gid)
    config.chmod(0o640)
    install_image(settings, force=True)
    st = config.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(0o640), 0, gid)
    bak = config.with_name("configuration.toml.bak").stat()
    assert (oct(bak.st_mode & 0o7777), bak.st_uid, bak.st_gid) == (oct(0o640), 0, gid)


@root_only
def test_the_drop_in_has_the_configs_mode_and_owner(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    config = dest / CONFIG
    gid = grp.getgrnam("nogroup").gr_gid
    os.chown(config, 0, gid)
    config.chmod(0o640)
    install_image(settings, force=True)
    st = (config.parent / "config.d/50-osbuilder.toml").stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(0o640), 0, gid)
    assert (oct(config.stat().st_mode & 0o7777), config.read_text()) == (oct(0o640), KATA_TOML)


def test_a_restrictive_umask_does_not_make_the_config_unreadable(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    config = dest / CONFIG
    config.chmod(0o644)
    old = os.umask(0o077)
    try:
        install_image(settings, force=True)
    finally:
        os.umask(old)
    assert oct(config.stat().st_mode & 0o777) == oct(0o644)
    assert (dest / PREFIX_DIR).stat().st_mode & 0o005 == 0o005, "the install directory is private"
    assert (dest / PREFIX_DIR / "container.img").stat().st_mode & 0o004, "the image is private"


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch):
    settings, wd, dest = stage(tmp_path, DROP_IN="no")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    install_image(settings, force=True)
    config_dir = str(dest / CONFIG).rsplit("/", 1)[0]
    assert any(s.startswith(f"{config_dir}/.configuration.toml.tmp-") for s in synced), synced
    assert config_dir in synced
    assert any(s.startswith(f"{dest / PREFIX_DIR}/.container.img.tmp-") for s in synced), synced
    assert str(dest / PREFIX_DIR) in synced


def test_the_drop_in_is_staged_outside_config_d_and_fsynced(tmp_path: Path, monkeypatch):
    """Kata reads every entry of config.d: a half-written temp file there would be read as a drop-in. The
    drop-in is written beside the configuration file, fsync'd, and renamed into config.d."""
    settings, wd, dest = stage(tmp_path)
    config_dir = (dest / CONFIG).parent
    synced: list[str] = []
    seen_in_config_d: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if (config_dir / "config.d").is_dir():
            seen_in_config_d.append(sorted(os.listdir(config_dir / "config.d")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    install_image(settings, force=True)
    assert any(s.startswith(f"{config_dir}/.config.d-50-osbuilder.toml.tmp-") for s in synced), synced
    assert str(config_dir / "config.d") in synced and str(config_dir) in synced
    assert all(names in ([], ["50-osbuilder.toml"]) for names in seen_in_config_d), seen_in_config_d
    assert sorted(os.listdir(config_dir / "config.d")) == ["50-osbuilder.toml"]


def test_the_first_backup_is_never_overwritten(tmp_path: Path):
    settings, wd, dest = stage(tmp_path, DROP_IN="no")
    config = dest / CONFIG
    install_image(settings, force=True)
    after_image = config.read_text()
    install_kernel(settings, force=True)
    assert config.with_name("configuration.toml.bak").read_text() == KATA_TOML
    assert config.with_name("configuration.toml.bak.1").read_text() == after_image
    install_kernel(settings, force=True)  # nothing to change: no new backup
    assert sorted(p.name for p in config.parent.iterdir()) == [
        "configuration.toml", "configuration.toml.bak", "configuration.toml.bak.1"]


# ------------------------------------------------------------------ symlinks


def test_a_config_symlink_inside_the_runtime_dirs_is_followed_and_kept(tmp_path: Path):
    settings, wd, dest = stage(tmp_path, DROP_IN="no")
    config = dest / CONFIG
    qemu = config.with_name("configuration-qemu.toml")
    config.rename(qemu)
    config.symlink_to(qemu.name)  # what Kata's packages ship
    install_image(settings, force=True)
    assert config.is_symlink() and os.readlink(config) == qemu.name
    assert tomllib.loads(qemu.read_text())["hypervisor"]["qemu"]["image"] == "/usr/share/kata-containers/container.img"
    assert qemu.with_name("configuration-qemu.toml.bak").read_text() == KATA_TOML


def test_the_drop_in_goes_beside_the_file_the_link_leads_to(tmp_path: Path):
    """Kata resolves configuration.toml's symlinks first and reads config.d beside the file it ends at: an
    /etc/kata-containers/configuration.toml linked (absolutely) to /opt/kata's configuration-qemu.toml
    gets its drop-in in /opt/kata, read inside DESTDIR as on the installed system."""
    settings, wd, dest = stage(tmp_path)
    (dest / CONFIG).unlink()
    opt = dest / "opt/kata/share/defaults/kata-containers"
    opt.mkdir(parents=True)
    (opt / "configuration-qemu.toml").write_text(KATA_TOML)
    etc = dest / "etc/kata-containers/configuration.toml"
    etc.parent.mkdir(parents=True)
    etc.symlink_to("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")  # absolute, in DESTDIR
    install_image(settings, force=True)
    assert (opt / "config.d/50-osbuilder.toml").is_file() and not (etc.parent / "config.d").exists()
    assert kata_qemu(opt / "configuration-qemu.toml")["image"] == "/opt/kata/share/kata-containers/container.img"
    assert (dest / "opt/kata/share/kata-containers/container.img").is_file()
    assert etc.is_symlink() and (opt / "configuration-qemu.toml").read_text() == KATA_TOML


def test_a_config_symlink_to_elsewhere_is_refused(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    config = dest / CONFIG
    elsewhere = dest / "home/admin/elsewhere.toml"
    elsewhere.parent.mkdir(parents=True)
    config.rename(elsewhere)
    config.symlink_to("/home/admin/elsewhere.toml")  # on the installed system: DESTDIR/home/admin/...
    with pytest.raises(UsageError, match=r"^RUNTIME_CONFIG: .*configuration.toml is a symlink to .*elsewhere.toml, "
                                         r"outside the runtime's own directories"):
        install_image(settings, force=True)
    assert elsewhere.read_text() == KATA_TOML and config.is_symlink()
    assert not (dest / PREFIX_DIR).exists() and not (elsewhere.parent / "config.d").exists()


def test_a_config_symlink_out_of_destdir_is_read_inside_it(tmp_path: Path):
    """An absolute link names a path of the installed system: one to a file that exists only on this host
    is dangling there, so the runtime would not load it, and osbuilder writes nothing through it."""
    settings, wd, dest = stage(tmp_path)
    config = dest / CONFIG
    host_file = tmp_path / "host-only.toml"
    config.rename(host_file)
    config.symlink_to(host_file)
    install_image(settings, force=True)
    assert host_file.read_text() == KATA_TOML and not (tmp_path / "config.d").exists()
    assert not (config.parent / "config.d").exists()


def test_a_prefix_that_leads_out_of_destdir_is_refused(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    outside = tmp_path / "live-system"
    outside.mkdir()
    (dest / PREFIX_DIR).symlink_to(outside)
    with pytest.raises(UsageError, match=r"^PREFIX: .*kata-containers leads to .*live-system, outside DESTDIR"):
        install_image(settings, force=True)
    assert list(outside.iterdir()) == []
    assert (dest / CONFIG).read_text() == KATA_TOML


def test_an_installed_link_pointing_outside_prefix_is_not_replaced(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    (dest / PREFIX_DIR).mkdir(parents=True)
    foreign = tmp_path / "someone-elses.img"
    foreign.write_bytes(b"theirs")
    (dest / PREFIX_DIR / "container.img").symlink_to(foreign)
    with pytest.raises(UsageError, match=r"^PREFIX: .*container.img is a symlink to .*someone-elses.img, outside"):
        install_image(settings, force=True)
    assert everything_under(dest / PREFIX_DIR) == ["container.img"]


# ------------------------------------------------------------------ failures leave nothing behind


@root_only
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    (wd / "container.img").write_bytes(os.urandom(3 << 20))
    target = dest / PREFIX_DIR
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        with pytest.raises(InfrastructureError, match=r"^PREFIX: installing into .*kata-containers failed "
                                                      r"\(No space left on device\)$"):
            install_image(settings, force=True)
        assert everything_under(target) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (dest / CONFIG).read_text() == KATA_TOML
    assert not [p for p in (dest / CONFIG).parent.iterdir() if p.name != "configuration.toml"]


def test_an_interrupt_during_the_copy_leaves_nothing(tmp_path: Path, monkeypatch):
    settings, wd, dest = stage(tmp_path)
    (wd / "container.img").write_bytes(os.urandom(3 << 20))
    real = inst.hashlib.sha256

    class Interrupted:
        """A hash that is interrupted (Ctrl-C) after the first block was copied."""

        def __init__(self) -> None:
            self.h, self.blocks = real(), 0

        def update(self, data: bytes) -> None:
            self.blocks += 1
            if self.blocks == 2:
                assert temp_files(dest), "the copy should be under way"
                raise KeyboardInterrupt
            self.h.update(data)

    before = everything_under(dest)
    monkeypatch.setattr(inst, "hashlib", SimpleNamespace(sha256=Interrupted))
    with pytest.raises(KeyboardInterrupt):
        install_image(settings, force=True)
    assert everything_under(dest) == before
    assert (dest / CONFIG).read_text() == KATA_TOML


def test_a_refused_install_leaves_nothing(tmp_path: Path):
    settings, wd, dest = stage(tmp_path)
    before = everything_under(dest)
    with pytest.raises(UsageError, match="no passing boot check"):
        install_image(settings)
    assert everything_under(dest) == before


# ------------------------------------------------------------------ hash once, install what was hashed


def write_passing_record(wd: Path, artifact: Path) -> None:
    from osbuilder.vm.records import make_record, sha256_file, write_record

    write_record(wd, make_record(artifact, sha256_file(artifact), "image", True, {"name": "debian"}, {},
                                 {"passes": {"nvdimm": {"profile": "nvdimm-dax", "with": [],
                                                        "agent_protocol": "kata1"}}}))


def test_an_artifact_replaced_after_the_gate_is_not_installed(tmp_path: Path, monkeypatch):
    """The image is replaced just after the gate looked up its boot record: what gets installed is the
    checked content, never the replacement, which has no record."""
    settings, wd, dest = stage(tmp_path)
    image = wd / "container.img"
    checked = image.read_bytes()
    write_passing_record(wd, image)
    real_record = Workdir.boot_record
    replaced: list[bool] = []

    def boot_record(self: Workdir, sha256: str) -> Path:
        if not replaced:
            image.write_bytes(os.urandom(len(checked)))  # same size: only the content differs
            replaced.append(True)
        return real_record(self, sha256)

    monkeypatch.setattr(Workdir, "boot_record", boot_record)
    install_image(settings)
    assert replaced
    installed = (dest / PREFIX_DIR / "container.img").read_bytes()
    assert installed == checked
    import hashlib

    digest = hashlib.sha256(installed).hexdigest()
    assert (dest / PREFIX_DIR / "container.img").resolve().name == f"osbuilder-{digest[:12]}.img"
    assert json.loads(Workdir(wd).boot_record(digest).read_text())["passed"] is True


def test_a_failed_drop_in_write_leaves_no_config_d_and_can_be_undone(tmp_path: Path, monkeypatch, capsys):
    """The disk fills up as the drop-in is written: exit 125 in one line, no config.d made for nothing, no
    temp file; the install record lets `uninstall` take the installed files out again."""
    import errno

    from osbuilder import cli

    settings, wd, dest = stage(tmp_path)
    before = everything_under(dest)
    real = inst.write_like

    def full(dest_path: Path, data: bytes, st: os.stat_result, **kw) -> Path:
        if dest_path.name == "50-osbuilder.toml":
            raise OSError(errno.ENOSPC, "No space left on device", str(dest_path))
        return real(dest_path, data, st, **kw)

    monkeypatch.setattr(inst, "write_like", full)
    argv = ["install-image", "--force", "--workdir", str(wd), "--destdir", str(dest)]
    assert cli.main(argv) == 125
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("osbuilder: error: RUNTIME_CONFIG: writing ")
    assert "No space left on device" in err.splitlines()[0]
    assert not (dest / CONFIG).with_name("config.d").exists() and not temp_files(dest)
    assert (dest / CONFIG).read_text() == KATA_TOML
    monkeypatch.setattr(inst, "write_like", real)
    assert cli.main(["uninstall", "--workdir", str(wd), "--destdir", str(dest)]) == 0, capsys.readouterr().err
    assert everything_under(dest) == before
