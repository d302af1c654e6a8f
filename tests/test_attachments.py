"""attachments.py: how each attachment reaches the guest (QEMU arguments, checks of the file, what it
needs while the guest runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from vmstubs import (
    KATA_DAX_ROOT,
    FakeVm,
    MiB,
    dax_image,
    load_settings,
    opt_value,
    spec,
)

from osbuilder.errors import UsageError
from osbuilder.vm import attachments, check, phases, profiles, qemu
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions
from osbuilder.vm.profiles import SYSTEMD, Outcome


def test_nvdimm_is_attached_as_kata_attaches_it(tmp_path: Path) -> None:
    """The image as a read-only file memory backend behind an unarmed NVDIMM on an nvdimm=on machine,
    with a hotplug slot and room for it above the RAM: no drive, no overlay (nothing can write it)."""
    image = dax_image(tmp_path / "a,b.img", 256 * MiB)
    nv = spec(attachment=attachments.NVDIMM_DAX, image=image)
    cmd = qemu.build_command(nv, qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(cmd, "-machine") == ["q35,nvdimm=on"]
    assert opt_value(cmd, "-m") == ["1024M,slots=1,maxmem=1280M"]
    escaped = str(image).replace(",", ",,")
    assert f"memory-backend-file,id=mem0,mem-path={escaped},size=268435456,readonly=on,share=off" in \
        opt_value(cmd, "-object")
    assert "nvdimm,id=nv0,memdev=mem0,unarmed=on" in opt_value(cmd, "-device")
    assert "-drive" not in cmd and not any("virtio-blk" in d for d in opt_value(cmd, "-device"))
    assert opt_value(cmd, "-initrd") == ["/k/initrd.img"]  # Debian's kernel keeps its initrd
    interactive = qemu.build_command(dataclasses.replace(nv, serial_ports=()), None, interactive=True)
    assert "nvdimm,id=nv0,memdev=mem0,unarmed=on" in opt_value(interactive, "-device")
    disk = qemu.build_command(spec(), qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(disk, "-machine") == ["q35"] and opt_value(disk, "-m") == ["1024"]


def test_the_overlay_is_the_virtio_blk_attachments_own(tmp_path: Path) -> None:
    """virtio-blk makes its copy-on-write overlay (real qemu-img) while the guest runs; the NVDIMM makes
    none (QEMU maps the file read-only)."""
    image = dax_image(tmp_path / "disk.img", 128 * MiB, header=False)
    paths = qemu.VmPaths(tmp_path / "run")
    paths.rundir.mkdir()
    with attachments.NVDIMM.running(image, paths, tmp_path / "qemu.log"):
        assert not paths.overlay.exists()
    with attachments.VIRTIO_BLK.running(image, paths, tmp_path / "qemu.log"):
        assert paths.overlay.read_bytes()[:4] == b"QFI\xfb"  # a qcow2 backed by the image
        assert str(image.resolve()).encode() in paths.overlay.read_bytes()[:4096]


def test_the_initrd_attachment_is_the_kernels_initramfs(tmp_path: Path) -> None:
    initrd = tmp_path / "container-initrd.img"
    with_it = spec(attachment=attachments.INITRD, image=initrd, initrd=None)
    cmd = qemu.build_command(with_it, qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(cmd, "-initrd") == [str(initrd)] and "-drive" not in cmd
    with pytest.raises(ValueError, match="no room for the kernel's own initrd"):
        spec(attachment=attachments.INITRD, image=initrd)  # Debian's kernel brings an initrd of its own


def test_the_image_decides_whether_the_nvdimm_boot_mounts_with_dax(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    kernel, tcg = BootKernel(tmp_path / "k", None, "path"), Accel("tcg", "t", False)
    with_header = check.guest_options(s, image=dax_image(tmp_path / "dax.img"), kernel=kernel, accel=tcg, name="a")
    assert with_header.profile == profiles.NVDIMM_DAX_SYSTEMD and KATA_DAX_ROOT in with_header.cmdline
    assert with_header.spec().attachment is attachments.NVDIMM_DAX
    plain = check.guest_options(s, image=dax_image(tmp_path / "plain.img", header=False), kernel=kernel,
                                accel=tcg, name="b")
    assert plain.profile == profiles.NVDIMM_SYSTEMD and "rootflags=data=ordered" in plain.cmdline
    disk = check.guest_options(load_settings(tmp_path, BOOT_PROFILE="virtio-blk"), image=with_header.image,
                               kernel=kernel, accel=tcg, name="c")
    assert disk.profile == SYSTEMD and disk.spec().attachment is attachments.VIRTIO_BLK


def test_an_image_the_memory_backend_cannot_map_is_a_usage_error(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    kernel, tcg = BootKernel(tmp_path / "k", None, "path"), Accel("tcg", "t", False)
    odd = dax_image(tmp_path / "odd.img", 100 * MiB)
    with pytest.raises(UsageError, match=r"^BOOT_IMAGE: .*odd.img is 104857600 bytes, not a multiple of 128 MiB"):
        check.guest_options(s, image=odd, kernel=kernel, accel=tcg, name="x")
    check.guest_options(load_settings(tmp_path, BOOT_PROFILE="virtio-blk"), image=odd, kernel=kernel, accel=tcg,
                        name="y")  # a disk of any size boots
    big = dax_image(tmp_path / "big.img", 1 << 40)
    with pytest.raises(UsageError, match=r"^VM_MEMORY: 1024 MiB plus the 1048576 MiB image"):
        check.guest_options(s, image=big, kernel=kernel, accel=tcg, name="z")


def test_the_pmem_root_mount_is_watched_from_the_first_line(tmp_path: Path) -> None:
    """The attachment's own console pattern is matched even for lines that came before the guest
    started watching (QEMU runs before the Guest object exists)."""
    vm = FakeVm(tmp_path)
    vm.console.feed("[    0.9] EXT4-fs (pmem0p1): mounted filesystem with ordered data mode.")
    vm.console.feed("[    1.0] Run /sbin/init as init process")
    opts = BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"), log_dir=tmp_path,
                       accel=Accel("tcg", "t", False), profile=profiles.NVDIMM_DAX_SYSTEMD)
    guest = Guest(opts, vm)  # type: ignore[arg-type]
    assert "root_mounted" in vm.console.milestones
    phases.run(guest, "root")
    assert guest.phases["root"] == Outcome.passed()

