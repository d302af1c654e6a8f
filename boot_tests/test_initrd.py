"""The initrd (`osbuilder initrd`, the `initrd` fixture) boots with the project's kernel the way a runtime
boots `initrd =`: kernel + initrd, no disk, no root=. The kernel unpacks the archive and runs /init, which
must be the agent: it answers as PID 1 and runs commands; then it powers the guest off and the boot
leaves the record `install-initrd` requires.

One boot for the module (the `initrd` profile: kernel, init proven by the agent reporting pid1, agent,
exec; root, running and ssh skipped), its tests each checking one thing, powered off at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from osbuilder.agent import AGENT_VERSION, GUEST_BINARY_PATH
from osbuilder.layout import KernelFiles
from osbuilder.pytest_plugin import note_logs
from osbuilder.vm import check, phases, profiles, records
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import BootKernel
from osbuilder.vm.profiles import Outcome

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("initrd")]


@pytest.fixture(scope="module")
def initrd_guest(osbuilder_settings, osbuilder_initrd, osbuilder_kernel, osbuilder_accel) -> Iterator[Guest]:
    """The `initrd` fixture booted with the `kernel` fixture's vmlinuz, through every phase but powerdown."""
    files = KernelFiles(osbuilder_kernel.path)
    version = json.loads(files.metadata.read_text())["kernel_version"]
    built = BootKernel(files.vmlinuz.absolute(), None, "built", version)
    opts = check.guest_options(osbuilder_settings, image=osbuilder_initrd.path, kernel=built, accel=osbuilder_accel,
                               name="initrd-booted", profile=profiles.INITRD)
    with check.booted(opts, osbuilder_settings) as guest:
        yield guest


@pytest.fixture
def osbuilder_guest(initrd_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    note_logs(request.node, initrd_guest.log_dir)
    return initrd_guest


def test_booted_from_the_initrd_alone(osbuilder_guest: Guest, osbuilder_initrd) -> None:
    cmd = osbuilder_guest.vm.command
    assert cmd[cmd.index("-initrd") + 1] == str(osbuilder_initrd.path)
    assert "-drive" not in cmd  # no disk at all
    assert "root=" not in cmd[cmd.index("-append") + 1]
    assert any("Run /init as init process" in line for line in osbuilder_guest.vm.console.tail(2000))


def test_phases_before_powerdown(osbuilder_guest: Guest) -> None:
    outcomes = osbuilder_guest.phases
    for p in ("kernel", "init", "agent", "exec"):
        assert outcomes[p] == Outcome.passed(), outcomes
    assert outcomes["root"] == profiles.INITRD.skip("root")
    assert outcomes["running"] == Outcome.skipped("agent is init (no systemd)")
    assert outcomes["ssh"] == Outcome.skipped("agent is init (no sshd)")
    for key in ("kernel_handoff", "init_started", "agent_started", "agent_ready"):
        assert key in osbuilder_guest.timings, (key, osbuilder_guest.timings)


def test_the_agent_answers_as_pid1(osbuilder_guest: Guest) -> None:
    assert osbuilder_guest.agent is not None and osbuilder_guest.agent.ping() == AGENT_VERSION
    assert osbuilder_guest.agent.version()["pid1"] is True
    assert osbuilder_guest.exec(["readlink", "/proc/1/exe"]).stdout.strip() == GUEST_BINARY_PATH
    assert osbuilder_guest.exec(["cat",
                                 "/proc/1/cmdline"]).stdout.split("\0")[0] == "/init"  # the kernel's rdinit default


def test_exec_runs_in_the_unpacked_initramfs(osbuilder_guest: Guest) -> None:
    r = osbuilder_guest.exec(["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    assert (r.status, r.stdout, r.stderr, r.timed_out) == (7, "hello\n", "oops\n", False)
    root = osbuilder_guest.exec(["findmnt", "-n", "-o", "FSTYPE", "/"]).stdout.strip()
    assert root in ("rootfs", "tmpfs", "ramfs"), root  # the kernel's initramfs, not a disk
    assert osbuilder_guest.exec(["ls", "/dev/vda"]).status != 0
    owners = osbuilder_guest.exec(["stat", "-c", "%U:%G %a", "/etc/shadow"]).stdout.strip()
    assert owners == "root:shadow 640"  # the tree's real owners made it through the archive


def test_powers_off_through_the_agent_and_records_the_pass(osbuilder_guest: Guest, osbuilder_initrd,
                                                           osbuilder_settings) -> None:
    # One test, not two: the record depends on the powerdown (xdist decides test order).
    event = phases.run(osbuilder_guest, "powerdown")
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert osbuilder_guest.passed, osbuilder_guest.phases
    assert osbuilder_guest.write_passing_records(osbuilder_settings.workdir)
    assert records.passing_record(osbuilder_settings.workdir,
                                  osbuilder_initrd.path) is not None  # what install-initrd asks
    record = json.loads(osbuilder_guest.write_boot_json().read_text())
    assert record["phases"] == {"kernel": "passed", "root": f"skipped: {profiles.INITRD.skipped['root']}",
                                "init": "passed", "agent": "passed", "running": "skipped: agent is init (no systemd)",
                                "exec": "passed", "ssh": "skipped: agent is init (no sshd)", "powerdown": "passed"}
