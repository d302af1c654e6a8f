"""The session image booted the way Kata Containers (and Clear Containers) boot it: mapped read-only as
an NVDIMM (memory-backend-file readonly=on behind an unarmed nvdimm), root=/dev/pmem0p1 mounted with
rootflags=dax. With osbuilder's own kernel and with Debian's: systemd running, the agent answering, and
DAX in effect as the guest itself reports it; the image file unchanged.

A damaged DAX header is what a kernel without pfn support (issue 9: `# CONFIG_NVDIMM_PFN is not set`)
makes of every DAX image: a raw namespace, which ext4 refuses to mount with DAX. That boot must fail
fast, in `root`, quoting the console.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boot_tests.imagetools import copy_image
from osbuilder.fs import sha256_file
from osbuilder.image import PFN_INFO_OFFSET, read_dax_header, wants_dax
from osbuilder.layout import KernelFiles
from osbuilder.pytest_plugin import note_logs
from osbuilder.vm import accel, attachments, check, phases, profiles, qemu
from osbuilder.vm.guest import BootFailure, Guest
from osbuilder.vm.options import BootKernel
from osbuilder.vm.profiles import Outcome

pytestmark = [pytest.mark.boot]

KATA_ROOT = "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4".split()


@pytest.fixture(scope="module")
def nvdimm_settings(osbuilder_settings):
    return osbuilder_settings.with_values(BOOT_PROFILE="nvdimm")


def kernel_for(kind: str, settings, request: pytest.FixtureRequest) -> BootKernel:
    """osbuilder's kernel (the `kernel` fixture, BOOT_KERNEL=built) or Debian's (BOOT_KERNEL=debian)."""
    if kind == "built":
        built = KernelFiles(request.getfixturevalue("osbuilder_kernel").path).vmlinuz
        return check.boot_kernel(settings.with_values(BOOT_KERNEL="built"), built=built)
    return check.boot_kernel(settings.with_values(BOOT_KERNEL="debian"))


@pytest.mark.parametrize("kind", ["built", "debian"])
def test_the_image_boots_as_the_runtimes_nvdimm(kind, nvdimm_settings, osbuilder_settings, osbuilder_image,
                                                osbuilder_ssh_key,
                                                request):
    boot_kernel = kernel_for(kind, nvdimm_settings, request)
    opts = check.guest_options(nvdimm_settings, image=osbuilder_image.path, kernel=boot_kernel,
                               accel=accel.choose(nvdimm_settings), name=f"nvdimm-{kind}",
                               ssh_key=osbuilder_ssh_key)
    note_logs(request.node, opts.log_dir)
    dax = wants_dax(osbuilder_settings)
    assert (read_dax_header(osbuilder_image.path) is not None) is dax  # the session image: made with the settings' DAX
    assert opts.profile.attach is (attachments.NVDIMM_DAX if dax else attachments.NVDIMM)
    command = qemu.build_command(opts.spec(), qemu.VmPaths(Path("/run/x")))
    assert "-drive" not in command and any("readonly=on" in o for o in command), command  # no overlay either
    before = sha256_file(osbuilder_image.path)
    with Guest.start(opts) as guest:
        check.boot_to_ready(guest)
        cmdline = guest.exec(["cat", "/proc/cmdline"]).stdout.split()
        nd = guest.exec(["sh", "-c", "ls /sys/bus/nd/devices; findmnt -n -o SOURCE /"]).stdout.split()
        write = guest.exec(["touch", "/osbuilder-write-test"])
        phases.run(guest, "powerdown")
    assert guest.passed, guest.record()["phases"]
    if dax:
        assert all(p in cmdline for p in KATA_ROOT), cmdline
        assert guest.root_mount["dax"] is True and guest.root_mount["source"] == "/dev/pmem0p1", guest.root_mount
        assert any(d.startswith("pfn") for d in nd), nd  # the namespace went through the DAX header
    assert "/dev/pmem0p1" in nd and any(d.startswith("region") for d in nd), nd
    assert guest.phases["agent"] == Outcome.passed() and "agent_ready" in guest.timings
    if not opts.profile.agent_is_init:
        assert guest.phases["running"] == Outcome.passed() and "system_running" in guest.timings
    assert write.status != 0 and "Read-only file system" in write.stderr
    assert guest.record()["profile"] == opts.profile.name
    assert sha256_file(osbuilder_image.path) == before  # the memory backend never wrote the image
    guest.write_passing_records(osbuilder_settings.workdir)


def test_a_namespace_without_dax_fails_fast_with_the_console_evidence(nvdimm_settings, osbuilder_settings,
                                                                      osbuilder_image,
                                                                      tmp_path, request):
    """A damaged info block: the kernel keeps the namespace raw (as a kernel without NVDIMM_PFN does
    with any DAX image), ext4 refuses `dax` on it, the root cannot be mounted."""
    if not wants_dax(osbuilder_settings):
        pytest.skip("the session image has no DAX header (DAX=no)")
    damaged = copy_image(osbuilder_image.path, tmp_path / "damaged.img")
    with open(damaged, "r+b") as f:
        f.seek(PFN_INFO_OFFSET + 200)  # in the padding: only the checksum notices
        f.write(b"\x01")
    boot_kernel = kernel_for("built", nvdimm_settings, request)
    opts = check.guest_options(nvdimm_settings, image=damaged, kernel=boot_kernel,
                               accel=accel.choose(nvdimm_settings), name="nvdimm-no-pfn",
                               profile=profiles.NVDIMM_DAX_SYSTEMD)
    note_logs(request.node, opts.log_dir)
    with Guest.start(opts) as guest, pytest.raises(BootFailure) as failure:
        check.boot_to_ready(guest)
    assert failure.value.phase == "root", failure.value
    assert guest.now() < opts.timeout / 2  # failed fast: the panic, not a budget running out
    assert "DAX unsupported by block device" in failure.value.detail or "VFS" in failure.value.detail, \
        failure.value.detail


def test_the_same_dax_image_boots_as_a_virtio_blk_disk(osbuilder_settings, osbuilder_image, osbuilder_boot_kernel,
                                                       osbuilder_accel,
                                                        osbuilder_ssh_key, request: pytest.FixtureRequest) -> None:
    """The DAX layout keeps an outer partition table, so the image the runtime maps as an NVDIMM also
    boots as a disk (BOOT_PROFILE=virtio-blk): the root is /dev/vda1, mounted without DAX."""
    settings = osbuilder_settings.with_values(BOOT_PROFILE="virtio-blk")
    opts = check.guest_options(settings, image=osbuilder_image.path, kernel=osbuilder_boot_kernel,
                               accel=osbuilder_accel,
                               name="dax-image-as-virtio-blk", ssh_key=osbuilder_ssh_key)
    note_logs(request.node, opts.log_dir)
    assert opts.profile.attach.name == "virtio-blk"
    with check.booted(opts, settings) as guest:
        assert guest.exec(["findmnt", "-no", "SOURCE", "/"]).stdout.strip() == "/dev/vda1"
        assert "dax" not in guest.exec(["findmnt", "-no", "OPTIONS", "/"]).stdout
    assert wants_dax(osbuilder_settings) == (read_dax_header(osbuilder_image.path) is not None)
