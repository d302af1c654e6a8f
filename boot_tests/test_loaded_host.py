"""A busy host is not a broken artifact (issue 18): boots while two busy loops per core compete with QEMU.

A good image must pass, or end as the host's failure (HostOverloaded, exit 125, naming the load), never as
a phase's; an image whose init hangs, printing nothing, must still be named hung in `init` within its
silence budget. Default settings (BOOT_TIMEOUT 120: 30 s of silence, a 180 s ceiling), under TCG.

These tests are about the host, not the kernel: they boot BOOT_KERNEL's kernel once, not once per
--osbuilder-kernel-config, and run one after the other on one xdist worker (each loads every core). They
carry the `loads_host` marker: other boots on the machine run slower meanwhile (`-m "not loads_host"`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boot_tests import hostload, imagetools
from osbuilder.pytest_plugin import note_guest, note_logs, settings_kernel
from osbuilder.vm import check, phases
from osbuilder.vm.guest import BootFailure, Guest, HostOverloaded
from osbuilder.vm.options import Accel, BootOptions

pytestmark = [pytest.mark.boot, pytest.mark.loads_host, pytest.mark.xdist_group("loaded-host")]

TCG = Accel("tcg", "the loaded-host tests boot under TCG", False)


def options(settings, image: Path, name: str, ssh_key, request: pytest.FixtureRequest) -> BootOptions:
    opts = check.guest_options(settings, image=image, kernel=settings_kernel(settings, request), accel=TCG,
                               name=name, ssh_key=ssh_key)
    note_logs(request.node, opts.log_dir)
    return opts


def assert_no_qemu(pid: int | None) -> None:
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_good_image_on_a_loaded_host_passes_or_blames_the_host(osbuilder_settings, osbuilder_image,
                                                                 osbuilder_ssh_key, request) -> None:
    opts = options(osbuilder_settings, osbuilder_image.path, "loaded-host-good", osbuilder_ssh_key, request)
    with hostload.busy_loops() as loops:
        assert len(loops) == 2 * (os.cpu_count() or 1)
        guest = Guest.start(opts)
        try:
            check.boot_to_ready(guest)
            phases.run(guest, "powerdown")
            outcome = "passed"
        except HostOverloaded as e:  # the host's failure: exit 125, naming the load and what QEMU got
            assert e.exit_code == 125 and "boot check failed" not in str(e)
            assert e.reason.startswith("the host is overloaded (load average ") and "CPUs)" in e.reason
            assert "QEMU ran " in e.detail and "waited " in e.detail, e.detail
            outcome = f"exit 125 in {e.phase}"
        except BootFailure as e:
            pytest.fail(f"a good image failed a phase on a loaded host (load average {os.getloadavg()[0]:.2f}); "
                        f"it must pass or blame the host: {e}")
        finally:
            guest.close(graceful=0)
            note_guest(request.node, guest)
    record = guest.record()
    request.node.user_properties.append(("osbuilder_loaded_host_outcome", outcome))
    assert record["host"]["qemu_waited"] > 0  # the loops really competed with QEMU
    assert outcome != "passed" or record["passed"], record["phases"]
    assert_no_qemu(guest.vm.pid)


def test_a_hung_init_on_a_loaded_host_is_still_named_hung(osbuilder_settings, osbuilder_image, osbuilder_ssh_key,
                                                          request, tmp_path: Path) -> None:
    broken = imagetools.copy_image(osbuilder_image.path, tmp_path / "sleeping-init.img")
    imagetools.replace_init(broken, imagetools.SLEEPING_INIT)
    opts = options(osbuilder_settings, broken, "loaded-host-hung-init", osbuilder_ssh_key, request)
    budget = opts.budgets.boot
    with hostload.busy_loops():
        with Guest.start(opts) as guest:
            with pytest.raises(BootFailure) as info:
                check.boot_to_ready(guest)
            failed_at = guest.now()
            last = guest.last_progress()
        note_guest(request.node, guest)
    e = info.value
    assert not isinstance(e, HostOverloaded), e  # an idle guest is not a starved one
    assert e.exit_code == 1 and e.phase == "init", e
    assert e.reason.startswith(f"timed out after {budget.silence:.0f}s waiting for systemd to start"), e.reason
    assert "no progress from the guest" in e.reason and "host (not starving the guest): load average" in e.detail
    # named within its silence budget of the guest's last progress (checks are at most a second apart)
    assert budget.silence <= failed_at - last.at <= budget.silence + 3, (failed_at, last)
    assert failed_at < budget.ceiling
    assert_no_qemu(guest.vm.pid)
