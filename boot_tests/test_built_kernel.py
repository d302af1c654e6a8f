"""The project's own kernel passes the same boot check as Debian's: no initrd, virtio and ext4 built in.

Booted twice: the compressed `vmlinuz.container` (bzImage) and the uncompressed `vmlinux.container`
directly (PVH entry point), each through every phase (kernel, root, init, agent, systemd running,
exec, SSH, power-off). A pass leaves boot records, which `install-kernel` requires.
"""

from __future__ import annotations

import json

import pytest

from osbuilder.vm import records
from osbuilder.vm.bootcheck import Guest, boot_to_ready
from osbuilder.vm.commands import log_dir_for
from osbuilder.vm.debian_kernel import BootKernel
from osbuilder.vm.fixtures import boot_options, note_logs


@pytest.mark.parametrize("kernel_file", ["vmlinuz.container", "vmlinux.container"])
def test_built_kernel_boots_the_image(kernel_file, kernel, image, osbuilder_settings, boot_accel,
                                      ssh_session_key, request):
    metadata = json.loads((kernel.path / "kernel-metadata.json").read_text())
    built = BootKernel((kernel.path / kernel_file).absolute(), None, "built", metadata["kernel_version"])
    name = f"built-{kernel_file}"
    log_dir = log_dir_for(osbuilder_settings, name)
    note_logs(request.node, log_dir)
    opts = boot_options(osbuilder_settings, image.path, built, boot_accel, ssh_session_key, log_dir, name)
    with Guest(opts) as guest:
        boot_to_ready(guest)
        release = guest.exec(["uname", "-r"]).stdout.strip()
        modules = guest.exec(["cat", "/proc/modules"])
        guest.powerdown()
    assert guest.passed, guest.phases
    assert release == metadata["kernel_version"]  # the kernel we built, not another one
    assert modules.status != 0  # no module support: everything the guest needs is built in
    guest.write_passing_records(osbuilder_settings.workdir)
    assert records.passing_record(osbuilder_settings.workdir, built.kernel) is not None
