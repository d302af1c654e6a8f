"""Debian's boot kernel comes from its package with osbuilder's initrd, whatever the release ships.

trixie's cloud kernel compresses its modules (`.ko.xz`, in /usr/lib/modules): the initrd holds them
decompressed, its init loads them, and the session image boots through every phase with that
kernel, the guest keeping the modules the initrd loaded (its disk or NVDIMM, agent port, network).
"""

from __future__ import annotations

import pytest

from osbuilder.pytest_plugin import note_logs
from osbuilder.readback import read_newc
from osbuilder.vm import check, phases
from osbuilder.vm.guest import Guest

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("debian-kernel")]


def test_a_release_that_compresses_its_modules_boots_the_image(osbuilder_settings, osbuilder_image, osbuilder_accel,
                                                               osbuilder_ssh_key, request):
    settings = osbuilder_settings.with_values(OS_VERSION="trixie", BOOT_KERNEL="debian")
    kernel = check.boot_kernel(settings)
    assert kernel.name == "debian" and kernel.initrd is not None
    config = (kernel.kernel.parent / "config").read_text()
    assert "CONFIG_MODULE_COMPRESS_XZ=y" in config  # the package's modules are .ko.xz
    entries = read_newc(kernel.initrd.read_bytes())
    modules = [e for e in entries if e.name.startswith("lib/modules/")]
    assert modules and all(e.name.endswith(".ko") and e.data.startswith(b"\x7fELF") for e in modules)
    in_initrd = {e.name.rpartition("/")[2].split("-", 1)[1].removesuffix(".ko") for e in modules}
    assert {"virtio_blk", "nd_pmem"} <= in_initrd, in_initrd
    opts = check.guest_options(osbuilder_settings, image=osbuilder_image.path, kernel=kernel, accel=osbuilder_accel,
                               name="debian-kernel-trixie", ssh_key=osbuilder_ssh_key)
    note_logs(request.node, opts.log_dir)
    with Guest.start(opts) as guest:
        check.boot_to_ready(guest)
        release = guest.exec(["uname", "-r"]).stdout.strip()
        loaded = {line.split()[0] for line in guest.exec(["cat", "/proc/modules"]).stdout.splitlines()}
        phases.run(guest, "powerdown")
    assert guest.passed, guest.record()["phases"]
    assert release == kernel.version.split()[0] and "+deb13" in release
    assert in_initrd <= loaded, in_initrd - loaded  # every module the initrd loaded is still there
