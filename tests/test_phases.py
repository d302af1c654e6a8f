"""phases.py and guest.py on a stub VM: each phase's check, its failures and their evidence, the guard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from vmstubs import (
    ExecAgent,
    FakeAgent,
    dax_guest,
    stub_guest,
)

from osbuilder.errors import InfrastructureError
from osbuilder.vm import phases, profiles
from osbuilder.vm.guest import BOOT_JSON, BootFailure, Guest
from osbuilder.vm.profiles import AGENT_INIT, SYSTEMD, Outcome, Profile


def test_agent_init_records_running_and_ssh_as_skipped(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, AGENT_INIT)
    assert phases.run(guest, "running") is None and phases.run(guest, "ssh") is None  # nothing asked of the VM
    assert guest.phases == {"running": Outcome.skipped("agent is init (no systemd)"),
                            "ssh": Outcome.skipped("agent is init (no sshd)")}
    assert guest.record()["phases"] == {
        "kernel": "not run", "root": "not run", "init": "not run", "agent": "not run",
        "running": "skipped: agent is init (no systemd)", "exec": "not run",
        "ssh": "skipped: agent is init (no sshd)", "powerdown": "not run"}
    assert not guest.passed
    guest.phases.update({p: Outcome.passed() for p in ("kernel", "root", "init", "agent", "exec", "powerdown")})
    assert guest.passed
    systemd_guest = Guest(dataclasses.replace(guest.opts, profile=SYSTEMD), guest.vm)
    systemd_guest.phases.update(guest.phases)
    assert not systemd_guest.passed  # the same outcomes from a systemd image are not a pass
    with pytest.raises(BootFailure, match="no session key"):
        phases.run(systemd_guest, "ssh")
    assert systemd_guest.record()["phases"]["ssh"] == "failed: no session key was delivered to this guest"


def test_missing_init_fails_in_init_phase(tmp_path: Path) -> None:
    line = "Target filesystem doesn't have requested /sbin/init."
    for profile in (SYSTEMD, AGENT_INIT):
        guest = stub_guest(tmp_path, profile, console_line=line)
        with pytest.raises(BootFailure) as info:
            phases.init(guest)
        assert info.value.phase == "init" and "no init to run" in info.value.message and line in info.value.detail
        assert guest.phases["init"] == Outcome.failed("no init to run")


@pytest.mark.parametrize("profile, phase", [(SYSTEMD, "agent"), (AGENT_INIT, "init")])
def test_no_init_while_waiting_for_the_agent_fails_the_profiles_phase(tmp_path: Path, profile: Profile,
                                                                     phase: str) -> None:
    """When the agent is init, an init that never ran is the init phase's failure, not the agent's."""
    guest = stub_guest(tmp_path, profile, console_line="Kernel panic - not syncing: No working init found.")
    guest.agent = FakeAgent()  # type: ignore[assignment]
    with pytest.raises(BootFailure) as info:
        phases.agent(guest)
    assert info.value.phase == phase and info.value.reason == "no init to run"


def test_a_silent_agent_is_reported_with_the_profiles_diagnostics(tmp_path: Path) -> None:
    details = {}
    for profile in (AGENT_INIT, SYSTEMD):
        guest = stub_guest(tmp_path, profile, timeout=1)
        guest.vm.t0 -= 5  # the agent's budget is spent
        guest.agent = FakeAgent()  # type: ignore[assignment]
        with pytest.raises(BootFailure) as info:
            phases.agent(guest)
        assert info.value.phase == "agent"
        assert "waiting for the agent to answer over the osbuilder protocol" in info.value.reason
        details[profile.name] = info.value.detail
    assert "the agent is init: no systemd unit and no sshd to ask" in details["agent-init"]
    assert "sshd" not in details["systemd"]  # no session key: nothing to ask over SSH, and no pretending


@pytest.mark.parametrize("profile, request_by", [(SYSTEMD, "system_powerdown"), (AGENT_INIT, "agent")])
def test_powerdown_goes_through_the_profiles_pid1(tmp_path: Path, profile: Profile, request_by: str) -> None:
    guest = stub_guest(tmp_path, profile)
    agent = FakeAgent()
    guest.agent = agent  # type: ignore[assignment]
    event = phases.powerdown(guest)
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert (agent.calls, guest.vm.calls) == ((["poweroff"], []) if request_by == "agent" else
                                             ([], ["system_powerdown"]))
    assert guest.phases["powerdown"] == Outcome.passed() and guest.powerdown_seconds is not None


def test_agent_init_powerdown_without_the_agent_fails(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, AGENT_INIT)
    with pytest.raises(BootFailure, match="the agent is not connected"):
        phases.powerdown(guest)
    assert guest.vm.calls == []  # no ACPI button for a guest whose init ignores it


@pytest.mark.parametrize("profile", [SYSTEMD, AGENT_INIT])
def test_close_powers_off_the_profiles_way_and_writes_boot_json(tmp_path: Path, profile: Profile) -> None:
    guest = stub_guest(tmp_path, profile)
    agent = FakeAgent()
    guest.agent = agent  # type: ignore[assignment]
    guest.close()
    if profile.agent_is_init:  # the agent powers the guest off; then QEMU is only told to quit
        assert agent.calls == ["poweroff", "close"] and guest.vm.stopped_with == 0
    else:  # Vm.stop presses the power button itself
        assert agent.calls == ["close"] and guest.vm.stopped_with == 10
    record = json.loads((tmp_path / BOOT_JSON).read_text())
    assert record["qemu_pid"] == 4242 and record["passed"] is False and record["phases"]["kernel"] == "not run"
    assert list(record) == ["name", "image", "kernel", "accel", "arch", "memory_mib", "cpus", "started_at", "timings",
                            "guest_startup", "powerdown_seconds", "phases", "profile", "agent", "root", "host",
                            "passed", "failure", "qemu_pid", "command", "log_dir"]
    assert record["host"] is None  # no QEMU process to sample
    assert record["profile"] == profile.name


def test_kvm_internal_error_raises_infrastructure_error(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, stderr_line="KVM internal error. Suberror: 1")
    with pytest.raises(InfrastructureError) as info:
        guest.guard("agent")
    assert info.value.exit_code == 125 and "phase 'agent'" in info.value.message


def test_fatal_console_line_names_phase_and_evidence(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, console_line="You are in emergency mode. After logging in...")
    with pytest.raises(BootFailure) as info:
        guest.guard("running")
    e = info.value
    assert e.exit_code == 1 and e.phase == "running" and "emergency mode" in e.message
    assert "You are in emergency mode" in e.detail and "console tail" in e.detail and str(tmp_path) in e.message
    assert guest.failure == "running: systemd entered emergency mode"


def test_dead_qemu_is_reported(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, alive=False)
    with pytest.raises(BootFailure, match="QEMU exited unexpectedly"):
        guest.guard("kernel")


def test_exec_proves_dax_from_inside_the_guest(tmp_path: Path) -> None:
    guest, agent = dax_guest(tmp_path, "/dev/pmem0p1 ro,relatime,dax=always\npmem0p1 1\n")
    phases.run(guest, "exec")
    assert guest.phases["exec"] == Outcome.passed() and "root" not in guest.phases
    assert guest.root_mount == {"source": "/dev/pmem0p1", "options": ["ro", "relatime", "dax=always"],
                                "device": "pmem0p1", "queue_dax": "1", "dax": True}
    assert any("queue/dax" in c and "mountpoint -d /" in c for c in agent.calls)
    assert guest.record()["root"]["dax"] is True


@pytest.mark.parametrize("probe, why", [
    ("/dev/pmem0p1 ro,relatime\npmem0 0\n", "not mounted with DAX: mount options ro,relatime"),
    ("/dev/root ro,relatime,dax=always\npmem0p1 0\n",
     "(/dev/root, pmem0p1) is not mounted with DAX: mount options ro,relatime,dax=always, queue/dax of its disk 0"),
    ("/dev/pmem0p1 ro,dax=never\npmem0 1\n", "mount options ro,dax=never"),
    ("", "cannot read the root's mount and disk"),
])
def test_a_root_without_dax_fails_the_exec_phase_that_looked(tmp_path: Path, probe: str, why: str) -> None:
    """`root` passed when the kernel mounted it; `exec`, which looks at the mount from inside, fails
    (it never leaves `root` failed after it passed, nor `exec` passed when it failed)."""
    guest, _ = dax_guest(tmp_path, probe)
    guest.phases["root"] = Outcome.passed()
    with pytest.raises(BootFailure, match="phase 'exec'") as e:
        phases.run(guest, "exec")
    assert why in e.value.reason
    assert str(guest.phases["exec"]).startswith("failed: ") and guest.phases["root"] == Outcome.passed()


def test_no_dax_check_where_the_attachment_has_no_dax(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, profiles.NVDIMM_SYSTEMD)
    agent = ExecAgent({"exit 3": (3, "out\n"), "OPTIONS /": (0, "ro,relatime\n")})
    guest.agent = agent  # type: ignore[assignment]
    phases.run(guest, "exec")
    assert not any("queue/dax" in c for c in agent.calls) and guest.root_mount == {}


def test_a_failure_right_after_the_root_is_mounted_is_the_next_phases(tmp_path: Path) -> None:
    """An initrd's init mounts the root and fails at once (no /sbin/init): both lines may reach the host
    before the root phase looks. The root phase passed; the init phase fails, with the cause."""
    guest = stub_guest(tmp_path, SYSTEMD, console_line="[    4.5] EXT4-fs (vda1): mounted filesystem with ordered data")
    guest.vm.console.feed("osbuilder-init: error: no init to run: the root filesystem doesn't have requested "
                          "/sbin/init (No such file or directory)")
    phases.root(guest)
    assert guest.phases["root"] == Outcome.passed()
    with pytest.raises(BootFailure) as info:
        phases.init(guest)
    assert info.value.phase == "init" and info.value.reason == "no init to run"
    assert "doesn't have requested /sbin/init" in info.value.detail


def test_an_agent_systemd_cannot_run_fails_the_agent_phase_at_once(tmp_path: Path) -> None:
    """systemd's 203/EXEC line for the agent's unit ends the agent phase within its first look, long before any
    budget; the same line for another unit does not."""
    other = "[ 3.9] systemd[1]: other.service: Main process exited, code=exited, status=203/EXEC"
    guest = stub_guest(tmp_path, SYSTEMD, console_line=other)
    guest.agent = FakeAgent()  # type: ignore[assignment]
    phases._check_agent_runs(guest)  # another unit's program: not the agent's business
    line = "[ 3.88] systemd[1]: osbuilder-agent.service: Main process exited, code=exited, status=203/EXEC"
    guest.vm.console.feed(line)
    with pytest.raises(BootFailure) as info:
        phases.agent(guest)
    assert info.value.phase == "agent"
    assert info.value.reason == ("systemd could not run the agent (osbuilder-agent.service, /usr/bin/osbuilder-agent): "
                                 "status 203/EXEC, the program is missing or cannot be executed in the guest")
    assert line in info.value.detail
    assert guest.now() < 5  # no budget waited for


def test_an_agent_that_opened_its_port_and_stays_silent_fails_after_the_grace(tmp_path: Path) -> None:
    """The agent phase gives up SPEAK_GRACE seconds after the guest opened the agent's port, naming the unit
    and the protocol it did not speak, and notes when it gave up (before the diagnostics, which take
    seconds over SSH)."""
    guest = stub_guest(tmp_path, SYSTEMD)
    port = guest.protocol.serial_ports[0]
    guest.vm.ports_opened[port] = guest.now() - phases.SPEAK_GRACE + 2
    phases._check_agent_speaks(guest)  # still within its grace
    assert "agent_gave_up" not in guest.timings
    guest.vm.ports_opened[port] = guest.now() - phases.SPEAK_GRACE - 0.5
    with pytest.raises(BootFailure) as info:
        phases._check_agent_speaks(guest)
    assert info.value.phase == "agent"
    assert f"(osbuilder-agent.service, /usr/bin/osbuilder-agent) opened {port}" in info.value.reason
    assert "did not answer over the osbuilder protocol within 8s" in info.value.reason
    assert guest.now() - guest.timings["agent_gave_up"] < 1
