"""install-image / install-kernel into a DESTDIR: the boot gate, the files, and the runtime's TOML (Kata: a
drop-in, read back as Kata reads it; Clear Containers: the file, edited)."""

import os
import tomllib
from pathlib import Path

import pytest
from fakes import KATA_TOML, kata_qemu, record_kernel_build

from osbuilder import settings as S
from osbuilder.errors import UsageError
from osbuilder.install import install_image, install_kernel
from osbuilder.runtime_config import point_config


@pytest.fixture
def staged(tmp_path: Path):
    wd, dest = tmp_path / "wd", tmp_path / "dest"
    wd.mkdir()
    (wd / "container.img").write_bytes(os.urandom(4096))
    (wd / "vmlinuz.container").write_bytes(os.urandom(1024))
    (wd / "vmlinux.container").write_bytes(os.urandom(2048))
    config = dest / "usr/share/defaults/kata-containers/configuration.toml"
    config.parent.mkdir(parents=True)
    config.write_text(KATA_TOML)
    settings = S.load({}, env={"WORKDIR": str(wd), "DESTDIR": str(dest)}, cwd=tmp_path)
    return settings, wd, dest, config


def test_refuses_an_image_without_a_passing_boot_check(staged):
    settings, wd, dest, config = staged
    with pytest.raises(UsageError, match=r"install-image: .*container.img has no passing boot check .*"
                                         r"run `osbuilder boot --check` first"):
        install_image(settings)
    assert not (dest / "usr/share/kata-containers").exists()
    assert config.read_text() == KATA_TOML


def test_force_installs_and_points_the_runtime_at_it(staged, capsys):
    settings, wd, dest, config = staged
    install_image(settings, force=True)
    link = dest / "usr/share/kata-containers/container.img"
    assert link.is_symlink() and link.read_bytes() == (wd / "container.img").read_bytes()
    qemu = kata_qemu(config)
    assert qemu["image"] == "/usr/share/kata-containers/container.img" and qemu["initrd"] == ""
    assert qemu["machine_type"] == "q35"
    assert config.read_text() == KATA_TOML  # Kata's own file is not touched: a drop-in says it
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.d", "configuration.toml"]
    assert [p.name for p in (config.parent / "config.d").iterdir()] == ["50-osbuilder.toml"]


def test_kernel_install_covers_both_images(staged):
    settings, wd, dest, config = staged
    install_kernel(settings, force=True)
    base = dest / "usr/share/kata-containers"
    assert (base / "vmlinuz.container").read_bytes() == (wd / "vmlinuz.container").read_bytes()
    assert (base / "vmlinux.container").read_bytes() == (wd / "vmlinux.container").read_bytes()
    qemu = kata_qemu(config)
    assert qemu["kernel"] == "/usr/share/kata-containers/vmlinuz.container"
    assert qemu["image"] == "/usr/share/kata-containers/kata-containers.img"  # the kernel's install leaves it


def test_image_and_kernel_installs_share_the_drop_in(staged):
    """Each install merges its keys into what the earlier one put in 50-osbuilder.toml."""
    settings, wd, dest, config = staged
    install_image(settings, force=True)
    install_kernel(settings, force=True)
    qemu = kata_qemu(config)
    assert (qemu["image"], qemu["kernel"]) == ("/usr/share/kata-containers/container.img",
                                               "/usr/share/kata-containers/vmlinuz.container")
    install_image(settings, force=True)  # again: the kernel key stays
    assert kata_qemu(config)["kernel"] == "/usr/share/kata-containers/vmlinuz.container"
    drop_in = tomllib.loads((config.parent / "config.d/50-osbuilder.toml").read_text())
    assert drop_in == {"hypervisor": {"qemu": {"image": "/usr/share/kata-containers/container.img", "initrd": "",
                                               "kernel": "/usr/share/kata-containers/vmlinuz.container"}}}


def test_dry_run_changes_nothing_but_shows_the_drop_in(staged, capsys):
    settings, wd, dest, config = staged
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    install_image(settings, force=True, dry_run=True)
    out = capsys.readouterr().out
    assert "would install" in out and "would write the drop-in" in out and "config.d/50-osbuilder.toml" in out
    assert '+image = "/usr/share/kata-containers/container.img"' in out and '+initrd = ""' in out
    assert config.read_text() == KATA_TOML and sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_dry_run_of_an_edit_shows_the_diff(staged, capsys):
    settings, wd, dest, config = staged
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    install_image(settings.with_values(DROP_IN="no"), force=True, dry_run=True)
    out = capsys.readouterr().out
    assert "would edit" in out
    assert '-image = "/usr/share/kata-containers/kata-containers.img"' in out
    assert '+image = "/usr/share/kata-containers/container.img"' in out
    assert config.read_text() == KATA_TOML and sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_setting_the_image_comments_out_an_initrd():
    text = '[hypervisor.qemu]\ninitrd = "/x/initrd.img"\n'
    result = point_config(text, "image", "/y/container.img", Path("c.toml"))
    assert tomllib.loads(result)["hypervisor"]["qemu"] == {"image": "/y/container.img"}


def test_a_config_without_hypervisor_section_is_refused():
    with pytest.raises(UsageError, match=r"RUNTIME_CONFIG: c.toml has no \[hypervisor.\*\] section"):
        point_config("[agent]\n", "image", "/y", Path("c.toml"))


def test_a_config_that_is_not_toml_is_refused():
    with pytest.raises(UsageError, match=r"^RUNTIME_CONFIG: c.toml is not valid TOML"):
        point_config('[hypervisor.qemu]\nimage = "a"\n[broken\n', "image", "/y", Path("c.toml"))


def test_a_config_with_several_hypervisors_is_refused():
    """Kata configures every [hypervisor.*] table it finds, in no fixed order: osbuilder does not guess."""
    with pytest.raises(UsageError, match=r"configures several hypervisors \(qemu, clh\)"):
        point_config('[hypervisor.qemu]\nimage = "a"\n[hypervisor.clh]\nimage = "b"\n', "image", "/y",
                     Path("c.toml"))


def test_clear_containers_layout(staged):
    settings, wd, dest, _ = staged
    cc = dest / "usr/share/defaults/clear-containers/configuration.toml"
    cc.parent.mkdir(parents=True)
    cc.write_text('[hypervisor.qemu]\nimage = "/usr/share/clear-containers/clear-containers.img"\n')
    install_image(settings.with_values(RUNTIME="clear-containers"), force=True)
    assert (dest / "usr/share/clear-containers/container.img").is_file()
    assert tomllib.loads(cc.read_text())["hypervisor"]["qemu"]["image"] == \
        "/usr/share/clear-containers/container.img"


def test_a_passing_boot_record_for_the_exact_file_allows_install(staged):
    from osbuilder.vm.records import make_record, sha256_file, write_record

    settings, wd, dest, config = staged
    image = wd / "container.img"
    write_record(wd, make_record(image, sha256_file(image), "image", True, {"name": "debian"}, {},
                                 {"passes": {"nvdimm": {"profile": "nvdimm-dax", "with": [],
                                                        "agent_protocol": "kata1"}}}))
    install_image(settings)
    assert (dest / "usr/share/kata-containers/container.img").read_bytes() == image.read_bytes()
    image.write_bytes(os.urandom(4096))  # a different image: the record no longer covers it
    with pytest.raises(UsageError, match="no passing boot check"):
        install_image(settings)


def test_a_failing_boot_record_does_not_count(staged):
    from osbuilder.vm.records import make_record, sha256_file, write_record

    settings, wd, dest, config = staged
    image = wd / "container.img"
    write_record(wd, make_record(image, sha256_file(image), "image", False, {"name": "debian"}, {}))
    with pytest.raises(UsageError, match="no passing boot check"):
        install_image(settings)


def test_the_gate_wants_the_runtimes_own_boot(staged):
    """A pass as a virtio-blk disk does not let an image be installed for a runtime that maps it as an
    NVDIMM; the records of both kinds of pass accumulate; a kernel needs a pass with this image."""
    from osbuilder.vm import records

    settings, wd, dest, config = staged
    image, kernel = wd / "container.img", wd / "vmlinuz.container"
    kernel.write_bytes(os.urandom(4096))
    record_kernel_build(wd)
    records.write_records(wd, image, kernel, passed=True, kernel={}, timings={},
                          extra={"attachment": "virtio-blk", "profile": "systemd", "agent": {"protocol": "kata1"}})
    with pytest.raises(UsageError, match=r"attached as the kata runtime attaches it \(nvdimm\)"):
        install_image(settings)
    with pytest.raises(UsageError, match="with this WORKDIR's image"):
        install_kernel(settings)
    records.write_records(wd, image, kernel, passed=True, kernel={}, timings={},
                          extra={"attachment": "nvdimm", "profile": "nvdimm-dax", "agent": {"protocol": "kata1"}})
    passes = records.passed_attachments(records.passing_record(wd, image))
    assert set(passes) == {"virtio-blk", "nvdimm"} and passes["nvdimm"]["with"] == [records.sha256_file(kernel)]
    install_image(settings)
    install_kernel(settings)
    image.write_bytes(os.urandom(4096))  # another image in the WORKDIR: the kernel never booted it
    with pytest.raises(UsageError, match="with this WORKDIR's image"):
        install_kernel(settings)


@pytest.mark.parametrize("runtime, protocol, refused", [
    ("kata", "osbuilder", True), ("kata", "kata1", False), ("kata", "kata", False),
    ("clear-containers", "hyperstart", False), ("clear-containers", "kata1", True),
])
def test_install_is_honest_about_agents(staged, runtime, protocol, refused):
    """An image whose agent speaks no protocol the runtime speaks (osbuilder's own agent, for Kata) is
    refused in one line saying how to bring the runtime's agent; --force installs it all the same."""
    from osbuilder.vm import records

    settings, wd, dest, config = staged
    settings = settings.with_values(RUNTIME=runtime)
    image, kernel = wd / "container.img", wd / "vmlinuz.container"
    kernel.write_bytes(os.urandom(4096))
    records.write_records(wd, image, kernel, passed=True, kernel={}, timings={},
                          extra={"attachment": "nvdimm", "profile": "nvdimm-dax", "agent": {"protocol": protocol}})
    if not refused:
        install_image(settings, dry_run=True)
        return
    with pytest.raises(UsageError) as e:
        install_image(settings)
    assert f"has no agent the {runtime} runtime can talk to (its agent speaks {protocol}" in e.value.message
    assert "AGENT_SOURCE_BIN=" in e.value.message and e.value.message.endswith("or use --force")
    assert "\n" not in e.value.message
    install_image(settings, force=True)
def test_vmlinux_has_a_gate_of_its_own(staged):
    """vmlinux.container is installed only as the output of the build whose vmlinuz passed the boot check
    (kernel-metadata.json lists both); another file in its place is refused, as the issue found it was not."""
    from osbuilder.vm import records

    settings, wd, dest, config = staged
    image, kernel = wd / "container.img", wd / "vmlinuz.container"
    record_kernel_build(wd)
    records.write_records(wd, image, kernel, passed=True, kernel={}, timings={},
                          extra={"attachment": "nvdimm", "profile": "nvdimm-dax"})
    (wd / "vmlinux.container").write_bytes(os.urandom(2048))  # not what that build made
    with pytest.raises(UsageError, match=r"install-kernel: .*vmlinux.container \(sha256 \w+\) has no record of being "
                                         r"built with the boot-checked vmlinuz.container"):
        install_kernel(settings)
    assert not (dest / "usr/share/kata-containers").exists()
    install_kernel(settings, force=True)  # --force overrides, saying so
    record_kernel_build(wd)
    install_kernel(settings)
    installed = dest / "usr/share/kata-containers/vmlinux.container"
    assert installed.read_bytes() == (wd / "vmlinux.container").read_bytes()
