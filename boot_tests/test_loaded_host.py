"""A busy host is not a broken artifact (issue 18): boots while two busy loops per core compete with QEMU.

A good image must pass, or end as the host's failure (HostOverloaded, exit 125, naming the load), never as
a phase's; an image whose init hangs, printing nothing, must still be named hung in `init` within its
silence budget. Default settings (BOOT_TIMEOUT 120: 30 s of silence, a 180 s ceiling), under TCG.

The two guests boot side by side under the same loops, as two jobs share a busy CI host: the hung one in
a thread the module starts, the good one in the test that checks it; each loads the other too. The loops
run once for both (about 50 s, not the 90 s two loaded windows one after the other took).

These tests are about the host, not the kernel: they boot BOOT_KERNEL's kernel once, not once per
--osbuilder-kernel-config, and run on one xdist worker. They carry the `loads_host` marker: other boots on
the machine run slower meanwhile (`-m "not loads_host"`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
    return check.guest_options(settings, image=image, kernel=settings_kernel(settings, request), accel=TCG,
                               name=name, ssh_key=ssh_key)


def assert_no_qemu(pid: int | None) -> None:
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@dataclass
class HungBoot:
    """How the hung-init guest's boot check ended, and when."""

    guest: Guest
    error: BootFailure | None  # None: the check passed, which it must not
    failed_at: float  # guest.now() when the check gave up
    last_progress_at: float  # guest time of the guest's last progress before that


def boot_hung(opts: BootOptions) -> HungBoot:
    with Guest.start(opts) as guest:
        try:
            check.boot_to_ready(guest)
            error = None
        except BootFailure as e:
            error = e
        return HungBoot(guest, error, guest.now(), guest.last_progress().at)


@pytest.fixture(scope="module")
def loops() -> Iterator[list[int]]:
    """Two busy loops per core while the module's tests run."""
    with hostload.busy_loops() as pids:
        yield pids


@pytest.fixture(scope="module")
def hung_boot(loops, osbuilder_settings, osbuilder_image, osbuilder_ssh_key, request,
              tmp_path_factory) -> Iterator[tuple[BootOptions, Future[HungBoot]]]:
    """The hung-init image's boot check, started on the loaded host in a thread of its own: its options
    and its outcome to come."""
    broken = imagetools.copy_image(osbuilder_image.path, tmp_path_factory.mktemp("loaded") / "sleeping-init.img")
    imagetools.replace_init(broken, imagetools.SLEEPING_INIT)
    opts = options(osbuilder_settings, broken, "loaded-host-hung-init", osbuilder_ssh_key, request)
    with ThreadPoolExecutor(1, thread_name_prefix="hung-init") as pool:
        outcome = pool.submit(boot_hung, opts)
        yield opts, outcome
        outcome.exception()  # its guest closed before the loops stop


def test_a_good_image_on_a_loaded_host_passes_or_blames_the_host(loops, hung_boot, osbuilder_settings,
                                                                 osbuilder_image, osbuilder_ssh_key,
                                                                 request) -> None:
    assert len(loops) == 2 * (os.cpu_count() or 1)
    opts = options(osbuilder_settings, osbuilder_image.path, "loaded-host-good", osbuilder_ssh_key, request)
    note_logs(request.node, opts.log_dir)
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


def test_a_hung_init_on_a_loaded_host_is_still_named_hung(loops, hung_boot, request) -> None:
    opts, outcome = hung_boot
    note_logs(request.node, opts.log_dir)
    budget = opts.budgets.boot
    hung = outcome.result(timeout=budget.ceiling + 60)
    note_guest(request.node, hung.guest)
    e = hung.error
    assert e is not None, "the check passed an image whose init sleeps"
    assert not isinstance(e, HostOverloaded), e  # an idle guest is not a starved one
    assert e.exit_code == 1 and e.phase == "init", e
    assert e.reason.startswith(f"timed out after {budget.silence:.0f}s waiting for systemd to start"), e.reason
    assert "no progress from the guest" in e.reason and "host (not starving the guest): load average" in e.detail
    # named within its silence budget of the guest's last progress (checks are at most a second apart)
    assert budget.silence <= hung.failed_at - hung.last_progress_at <= budget.silence + 3, hung
    assert hung.failed_at < budget.ceiling
    assert_no_qemu(hung.guest.vm.pid)
