"""An AGENT_INIT=yes image (no systemd, udev or sshd; /sbin/init is osbuilder-agent) passes the whole
boot check: one boot, many checks, in order, powered off through the agent at the end.

The image comes from the `osbuilder_artifacts` factory (built once per set of inputs, cached). The
kernel gets an extra word on its command line, which it hands to init as an argument: the agent, as
PID 1, must ignore it (and log that it does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from boot_tests.imagetools import kernel_release
from osbuilder.agent import AGENT_NAME, AGENT_VERSION, GUEST_BINARY_PATH, PROTOCOL_VERSION
from osbuilder.pytest_plugin import note_logs
from osbuilder.vm import check, phases
from osbuilder.vm.guest import Guest
from osbuilder.vm.profiles import AGENT_INIT, Outcome, Pid1

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("agent-init")]

INIT_ARG = "osbuilder_init_arg"  # no "=" and no ".": the kernel passes it to init as argv[1]


@pytest.fixture(scope="module")
def agent_init_settings(osbuilder_settings):
    return osbuilder_settings.with_values(AGENT_INIT="yes")


@pytest.fixture(scope="module")
def agent_init_guest(agent_init_settings, osbuilder_artifacts, osbuilder_boot_kernel,
                     osbuilder_accel) -> Iterator[Guest]:
    """The image booted through every phase but powerdown (one boot for the module)."""
    image = osbuilder_artifacts.image(agent_init_settings)
    opts = check.guest_options(agent_init_settings, image=image.path, kernel=osbuilder_boot_kernel,
                               accel=osbuilder_accel,
                               name="agent-init-booted", append=INIT_ARG)
    assert opts.profile.pid1 is Pid1.AGENT and opts.profile.skipped == AGENT_INIT.skipped
    with check.booted(opts, agent_init_settings) as guest:
        yield guest


@pytest.fixture
def osbuilder_guest(agent_init_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    note_logs(request.node, agent_init_guest.log_dir)
    return agent_init_guest


def test_phases_before_powerdown(osbuilder_guest: Guest) -> None:
    outcomes = osbuilder_guest.phases
    for p in ("kernel", "root", "init", "agent", "exec"):
        assert outcomes[p] == Outcome.passed(), outcomes
    assert outcomes["running"] == Outcome.skipped("agent is init (no systemd)")
    assert outcomes["ssh"] == Outcome.skipped("agent is init (no sshd)")
    assert osbuilder_guest.ssh_client is None
    for key in ("first_console_byte", "kernel_handoff", "root_mounted", "agent_started", "agent_ready"):
        assert key in osbuilder_guest.timings, (key, osbuilder_guest.timings)


def test_agent_answers_ping_and_is_pid1(osbuilder_guest: Guest) -> None:
    assert osbuilder_guest.agent is not None
    assert osbuilder_guest.agent.ping() == AGENT_VERSION
    info = osbuilder_guest.agent.version()
    assert info["version"] == AGENT_VERSION and info["protocol"] == PROTOCOL_VERSION
    assert info["pid1"] is True


def test_pid1_is_the_agent(osbuilder_guest: Guest) -> None:
    assert osbuilder_guest.exec(["readlink", "/proc/1/exe"]).stdout.strip() == GUEST_BINARY_PATH
    # The kernel names a task after the path it was exec'd by: /sbin/init gives "init"; only an
    # exec by the agent's own name (init=/usr/bin/osbuilder-agent) gives "osbuilder-agent".
    assert osbuilder_guest.exec(["cat", "/proc/1/comm"]).stdout.strip() in ("init", AGENT_NAME[:15])
    argv = osbuilder_guest.exec(["cat", "/proc/1/cmdline"]).stdout.split("\0")
    assert argv[0] in ("/sbin/init", "/usr/sbin/init", GUEST_BINARY_PATH)
    assert INIT_ARG in argv  # the kernel's leftover argument reached init ...
    console = osbuilder_guest.vm.console.tail(2000)
    assert any(f"ignoring argument '{INIT_ARG}'" in line for line in console)  # ... ignored


def test_no_systemd_or_sshd(osbuilder_guest: Guest) -> None:
    r = osbuilder_guest.exec(["ls", "/usr/lib/systemd/systemd", "/usr/sbin/sshd"])
    assert r.status != 0 and r.stderr.count("No such file or directory") == 2, r
    procs = osbuilder_guest.exec(["sh", "-c", "for p in /proc/[0-9]*; do cat $p/comm; done"]).stdout.split()
    assert "systemd" not in procs and "sshd" not in procs and "udevd" not in procs


def test_api_filesystems_and_agent_port(osbuilder_guest: Guest) -> None:
    mounts = osbuilder_guest.exec(["findmnt", "-rn", "-o", "TARGET,FSTYPE"]).stdout.split("\n")
    for target, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs"), ("/run", "tmpfs")):
        assert f"{target} {fstype}" in mounts, mounts
    # the port the agent serves on: udev's symlink (initramfs) or the sysfs-found /dev/vportNpM
    assert any("osbuilder-agent: serving on /dev/" in line for line in osbuilder_guest.vm.console.tail(2000))


def test_exec_returns_status_and_output(osbuilder_guest: Guest) -> None:
    r = osbuilder_guest.exec(["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    assert (r.status, r.stdout, r.stderr, r.timed_out) == (7, "hello\n", "oops\n", False)
    assert osbuilder_guest.exec(["uname", "-r"]).stdout.strip() == kernel_release(osbuilder_guest.opts.kernel.kernel)


def test_root_filesystem_is_read_only(osbuilder_guest: Guest) -> None:
    assert "ro" in phases.root_mount_options(osbuilder_guest)
    r = osbuilder_guest.exec(["touch", "/osbuilder-write-test"])
    assert r.status != 0 and "Read-only file system" in r.stderr


def test_powers_off_through_the_agent_and_records_the_pass(osbuilder_guest: Guest) -> None:
    # One test, not two: the record depends on the powerdown (xdist decides test order).
    event = phases.run(osbuilder_guest, "powerdown")
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert osbuilder_guest.powerdown_seconds is not None and osbuilder_guest.powerdown_seconds < 60
    assert "power_down" in osbuilder_guest.vm.console.milestones
    assert any("osbuilder-agent: powering off" in line for line in osbuilder_guest.vm.console.tail(2000))
    assert osbuilder_guest.vm.proc.poll() is not None  # QEMU exited by itself (-no-reboot)
    assert osbuilder_guest.passed, osbuilder_guest.phases

    record = json.loads(osbuilder_guest.write_boot_json().read_text())
    assert record["passed"] is True and record["failure"] == ""
    assert record["phases"] == {"kernel": "passed", "root": "passed", "init": "passed", "agent": "passed",
                                "running": "skipped: agent is init (no systemd)", "exec": "passed",
                                "ssh": "skipped: agent is init (no sshd)", "powerdown": "passed"}
    assert any('"SHUTDOWN"' in line for line in (osbuilder_guest.log_dir / "qmp.jsonl").read_text().splitlines())
