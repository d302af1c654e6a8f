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
def initrd_guest(osbuilder_settings, initrd, kernel, boot_accel) -> Iterator[Guest]:
    """The `initrd` fixture booted with the `kernel` fixture's vmlinuz, through every phase but powerdown."""
    files = KernelFiles(kernel.path)
    version = json.loads(files.metadata.read_text())["kernel_version"]
    built = BootKernel(files.vmlinuz.absolute(), None, "built", version)
    opts = check.guest_options(osbuilder_settings, image=initrd.path, kernel=built, accel=boot_accel,
                               name="initrd-booted", profile=profiles.INITRD)
    with check.booted(opts, osbuilder_settings) as guest:
        yield guest


@pytest.fixture
def guest(initrd_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    note_logs(request.node, initrd_guest.log_dir)
    return initrd_guest


def test_booted_from_the_initrd_alone(guest: Guest, initrd) -> None:
    cmd = guest.vm.command
    assert cmd[cmd.index("-initrd") + 1] == str(initrd.path)
    assert "-drive" not in cmd  # no disk at all
    assert "root=" not in cmd[cmd.index("-append") + 1]
    assert any("Run /init as init process" in line for line in guest.vm.console.tail(2000))


def test_phases_before_powerdown(guest: Guest) -> None:
    outcomes = guest.phases
    for p in ("kernel", "init", "agent", "exec"):
        assert outcomes[p] == Outcome.passed(), outcomes
    assert outcomes["root"] == profiles.INITRD.skip("root")
    assert outcomes["running"] == Outcome.skipped("agent is init (no systemd)")
    assert outcomes["ssh"] == Outcome.skipped("agent is init (no sshd)")
    for key in ("kernel_handoff", "init_started", "agent_started", "agent_ready"):
        assert key in guest.timings, (key, guest.timings)


def test_the_agent_answers_as_pid1(guest: Guest) -> None:
    assert guest.agent is not None and guest.agent.ping() == AGENT_VERSION
    assert guest.agent.version()["pid1"] is True
    assert guest.exec(["readlink", "/proc/1/exe"]).stdout.strip() == GUEST_BINARY_PATH
    assert guest.exec(["cat", "/proc/1/cmdline"]).stdout.split("\0")[0] == "/init"  # the kernel's rdinit default


def test_exec_runs_in_the_unpacked_initramfs(guest: Guest) -> None:
    r = guest.exec(["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    assert (r.status, r.stdout, r.stderr, r.timed_out) == (7, "hello\n", "oops\n", False)
    root = guest.exec(["findmnt", "-n", "-o", "FSTYPE", "/"]).stdout.strip()
    assert root in ("rootfs", "tmpfs", "ramfs"), root  # the kernel's initramfs, not a disk
    assert guest.exec(["ls", "/dev/vda"]).status != 0
    owners = guest.exec(["stat", "-c", "%U:%G %a", "/etc/shadow"]).stdout.strip()
    assert owners == "root:shadow 640"  # the tree's real owners made it through the archive


def test_powers_off_through_the_agent_and_records_the_pass(guest: Guest, initrd, osbuilder_settings) -> None:
    # One test, not two: the record depends on the powerdown (xdist decides test order).
    event = phases.run(guest, "powerdown")
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert guest.passed, guest.phases
    assert guest.write_passing_records(osbuilder_settings.workdir)
    assert records.passing_record(osbuilder_settings.workdir, initrd.path) is not None  # what install-initrd asks
    record = json.loads(guest.write_boot_json().read_text())
    assert record["phases"] == {"kernel": "passed", "root": f"skipped: {profiles.INITRD.skipped['root']}",
                                "init": "passed", "agent": "passed", "running": "skipped: agent is init (no systemd)",
                                "exec": "passed", "ssh": "skipped: agent is init (no sshd)", "powerdown": "passed"}
