"""The project's own kernel passes the same boot check as Debian's: no initrd, virtio and ext4 built in.

Booted twice: the compressed `vmlinuz.container` (bzImage) and the uncompressed `vmlinux.container`
directly (PVH entry point), each through every phase (kernel, root, init, agent, systemd running,
exec, SSH, power-off). A pass leaves boot records, which `install-kernel` requires.
"""

from __future__ import annotations

import json

import pytest

from osbuilder.layout import KernelFiles
from osbuilder.pytest_plugin import note_logs
from osbuilder.vm import check, phases, records
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import BootKernel


@pytest.mark.parametrize("kernel_file", ["vmlinuz", "vmlinux"])
def test_built_kernel_boots_the_image(kernel_file, osbuilder_kernel, osbuilder_image, osbuilder_settings,
                                      osbuilder_accel,
                                      osbuilder_ssh_key, request):
    files = KernelFiles(osbuilder_kernel.path)
    metadata = json.loads(files.metadata.read_text())
    path = getattr(files, kernel_file)
    built = BootKernel(path.absolute(), None, "built", metadata["kernel_version"])
    opts = check.guest_options(osbuilder_settings, image=osbuilder_image.path, kernel=built, accel=osbuilder_accel,
                               name=f"built-{path.name}", ssh_key=osbuilder_ssh_key)
    note_logs(request.node, opts.log_dir)
    with Guest.start(opts) as guest:
        check.boot_to_ready(guest)
        release = guest.exec(["uname", "-r"]).stdout.strip()
        modules = guest.exec(["cat", "/proc/modules"])
        phases.run(guest, "powerdown")
    assert guest.passed, guest.phases
    assert release == metadata["kernel_version"]  # the kernel we built, not another one
    assert modules.status != 0  # no module support: everything the guest needs is built in
    guest.write_passing_records(osbuilder_settings.workdir)
    assert records.passing_record(osbuilder_settings.workdir, built.kernel) is not None
