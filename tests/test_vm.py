"""Fast unit tests of osbuilder.vm: command line, console patterns, profiles and phases on a stub VM,
records, the accelerator verdict, the boot kernel. No guest is booted here (boot_tests/ does that)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from osbuilder import settings as settings_mod
from osbuilder.cache import Cache
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import UserCache, Workdir
from osbuilder.vm import accel, boot_initrd, check, console, debian_kernel, phases, profiles, qemu, records, systemd
from osbuilder.vm import guest as guest_module
from osbuilder.vm.guest import BOOT_JSON, BootFailure, Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions, Budgets
from osbuilder.vm.profiles import AGENT_INIT, PROFILES, SYSTEMD, VIRTIO_BLK, Outcome, Pid1, Profile

USERNET = ("Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
           "  TCP[HOST_FORWARD]   8       127.0.0.1 35717       10.0.2.15    22     0     0\r\n")


def load_settings(tmp_path: Path, **values: str) -> settings_mod.Settings:
    """Settings with the WORKDIR and the per-user cache in tmp_path (never the real ~/.cache)."""
    base = {"WORKDIR": str(tmp_path / "work"), "CACHE_DIR": str(tmp_path / "user-cache")}
    return settings_mod.load({**base, **values}, env={})


def spec(**kw) -> qemu.VmSpec:
    base = dict(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"),
                cmdline=qemu.kernel_cmdline(VIRTIO_BLK.root_params), image=Path("/img/container.img"),
                credentials={"ssh.authorized_keys.root": "ssh-ed25519 AAA a,b"})
    base.update(kw)
    return qemu.VmSpec(**base)


def opt_value(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == flag]


# -- command line ---------------------------------------------------------------------------

def test_command_attaches_overlay_as_virtio_blk() -> None:
    paths = qemu.VmPaths(Path("/tmp/osb-x"))
    cmd = qemu.build_command(spec(), paths)
    assert "if=none,id=image,file=/tmp/osb-x/disk.qcow2,format=qcow2" in opt_value(cmd, "-drive")
    assert "virtio-blk-pci,drive=image" in opt_value(cmd, "-device")
    assert "/img/container.img" not in " ".join(cmd)  # only through the overlay


def test_command_has_console_agent_network_qmp() -> None:
    cmd = qemu.build_command(spec(), qemu.VmPaths(Path("/tmp/osb-x")))
    assert {"-no-reboot", "-nodefaults", "-S"} <= set(cmd)
    assert opt_value(cmd, "-display") == ["none"] and opt_value(cmd, "-machine") == ["q35"]
    assert opt_value(cmd, "-serial") == ["chardev:con0"]
    chardevs = opt_value(cmd, "-chardev")
    assert "socket,id=con0,path=/tmp/osb-x/con,server=on,wait=off" in chardevs
    assert "socket,id=agent,path=/tmp/osb-x/agent,server=on,wait=off" in chardevs
    assert "virtserialport,chardev=agent,name=agent.channel.0" in opt_value(cmd, "-device")
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22" in opt_value(cmd, "-netdev")
    assert opt_value(cmd, "-qmp") == ["unix:/tmp/osb-x/qmp,server=on,wait=off"]
    assert opt_value(cmd, "-initrd") == ["/k/initrd.img"]


def test_credential_commas_are_escaped() -> None:
    cmd = qemu.build_command(spec(), qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(cmd, "-smbios") == [
        "type=11,value=io.systemd.credential:ssh.authorized_keys.root=ssh-ed25519 AAA a,,b"]


def test_accelerators() -> None:
    kvm = qemu.build_command(spec(accel="kvm"), qemu.VmPaths(Path("/r")))
    assert opt_value(kvm, "-accel") == ["kvm"] and opt_value(kvm, "-cpu") == ["host,-arch-capabilities,-kvmclock"]
    tcg = qemu.build_command(spec(accel="tcg", cpus=2), qemu.VmPaths(Path("/r")))
    assert opt_value(tcg, "-accel") == ["tcg,thread=multi"] and "-cpu" not in tcg
    with pytest.raises(ValueError):
        qemu.accel_args("hax", 1)


def test_interactive_command_uses_stdio_and_snapshot() -> None:
    cmd = qemu.build_command(spec(agent=False), None, interactive=True)
    assert opt_value(cmd, "-serial") == ["mon:stdio"]
    assert any("snapshot=on" in d for d in opt_value(cmd, "-drive"))
    assert "-qmp" not in cmd and "-S" not in cmd


@pytest.mark.parametrize("profile", PROFILES.values(), ids=list(PROFILES))
def test_command_line_mounts_the_root_the_console_watches_for(profile: Profile, tmp_path: Path) -> None:
    """The root= a profile boots with is the device whose mount message its root phase waits for,
    read-only; extra parameters come last, so the kernel takes them over the profile's."""
    if profile.skip("root"):
        pytest.skip(f"{profile.name} mounts no root: {profile.skip('root')}")
    (tmp_path / "i.img").touch()
    opts = BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"), log_dir=tmp_path,
                       accel=Accel("tcg", "test", False), append="quiet root=/dev/vdz1", profile=profile)
    words = opts.cmdline.split()
    assert words[-2:] == ["quiet", "root=/dev/vdz1"]
    assert {"ro", "console=ttyS0", "panic=-1", "osbuilder.net=slirp"} <= set(words)
    device = next(w for w in words if w.startswith("root=")).removeprefix("root=/dev/")
    mounted = f"[    1.9] EXT4-fs ({device}): mounted filesystem 9c1e ro with ordered data mode. Quota mode: none."
    for line, seen in ((mounted.replace(device, "vdz1"), False), (mounted, True)):
        guest = stub_guest(tmp_path, profile)  # the console table's milestones, and the attachment's own
        guest.vm.console.feed(line)
        assert (profile.attach.root_milestone in guest.vm.console.milestones) is seen, line
    assert opts.spec().cmdline == opts.cmdline


def test_socket_paths_are_short() -> None:
    vm_paths = qemu.VmPaths(Path(qemu.tempfile.mkdtemp(prefix="osbvm-", dir=qemu._short_tmp())))
    try:
        assert len(str(vm_paths.agent).encode()) < 108
    finally:
        vm_paths.rundir.rmdir()


def test_parse_usernet() -> None:
    assert qemu.parse_usernet(USERNET) == {22: ("127.0.0.1", 35717)}
    assert qemu.parse_usernet("Hub -1 (net0):\r\n") == {}


# -- console --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ("[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs", "kernel panic"),
    ("Kernel panic - not syncing: No working init found.  Try passing init= option", "no init to run"),
    ("Target filesystem doesn't have requested /sbin/init.", "no init to run"),
    ("[    3.0] Requested init /sbin/init failed (error -2).", "no init to run"),
    ("Gave up waiting for root file system device.  Common problems:", "initramfs shell"),
    ("ALERT!  /dev/vdz1 does not exist.  Dropping to a shell!", "initramfs shell"),
    ("(initramfs) ", "initramfs shell"),
    ("You are in emergency mode. After logging in, type \"journalctl -xb\"", "emergency mode"),
    ("Cannot open access to console, the root account is locked.", "emergency mode"),
    ("[  5.0] systemd[1]: Freezing execution.", "freezing execution"),
])
def test_fatal_patterns(line: str, reason: str) -> None:
    pat = console.match_fatal(line)
    assert pat is not None and reason in pat.reason and not pat.infrastructure


def test_kvm_internal_error_is_infrastructure() -> None:
    pat = console.match_fatal("KVM internal error. Suberror: 1")
    assert pat is not None and pat.infrastructure


@pytest.mark.parametrize("line", [
    "[  OK  ] Reached target multi-user.target - Multi-User System.",
    "Begin: Running /scripts/local-block ... done.",
    "[    0.000000] Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org)",
    "panic=-1 in the command line",
])
def test_harmless_lines(line: str) -> None:
    assert console.match_fatal(line) is None


def test_milestones() -> None:
    assert console.match_milestones("[    0.000000] Linux version 6.1.0") == ["linux_version"]
    assert console.match_milestones("[    3.7] Run /init as init process") == ["init_started"]
    assert console.match_milestones("[ 5.1] EXT4-fs (vda1): mounted filesystem 9c1e-4 ro with ordered data mode."
                                    " Quota mode: none.") == ["root_mounted"]
    assert console.match_milestones("EXT4-fs (vda1): mounted filesystem with ordered data mode.") == ["root_mounted"]
    assert console.match_milestones("EXT4-fs (vdb): mounted filesystem with ordered data mode.") == []
    assert "systemd_started" in console.match_milestones("Welcome to Debian GNU/Linux 12 (bookworm)!")
    assert "multi_user" in console.match_milestones("[  OK  ] Reached target multi-user.target - Multi-User System.")
    # the agent as init says so; started by systemd it does not claim PID 1
    assert console.match_milestones("[    2.0] osbuilder-agent: version 0.1.0 starting as PID 1") == ["agent_started"]
    assert console.match_milestones("osbuilder-agent[231]: osbuilder-agent: version 0.1.0 starting") == []


def test_clean_strips_colours() -> None:
    assert console.clean(b"[\x1b[0;32m  OK  \x1b[0m] Started x.\r") == "[  OK  ] Started x."


def test_watcher_drains_to_log_and_finds_evidence(tmp_path: Path) -> None:
    stream = io.BytesIO(b"[    0.0] Linux version 6.1\n[\x1b[0;1;31mFAILED\x1b[0m] Failed to start a.service\n"
                        b"Kernel panic - not syncing: Attempted to kill init!\nvm login: ")
    w = console.ConsoleWatcher(tmp_path / "console.log", time.monotonic())
    w.start(stream)
    assert w.wait(lambda: w.closed, 5)
    assert (tmp_path / "console.log").read_bytes() == stream.getvalue()
    assert {"first_byte", "linux_version", "login_prompt"} <= set(w.milestones)
    assert w.fatal is not None and w.fatal.reason == "kernel panic" and "Attempted to kill init" in w.fatal.line
    assert w.failed_lines == ["[FAILED] Failed to start a.service"]
    assert w.tail(1) == ["vm login:"]


def test_a_panic_line_is_named_by_its_cause():
    from osbuilder.vm.console import match_fatal

    assert match_fatal("Kernel panic - not syncing: No working init found.  Try passing init=").reason \
        == "no init to run"
    assert "root filesystem not found" in match_fatal(
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)").reason
    assert match_fatal("Kernel panic - not syncing: Attempted to kill init!").reason == "kernel panic"
    assert match_fatal("[    0.938013] Run /etc/init as init process").reason == "no init to run"
    assert match_fatal("[    0.934979] Run /sbin/init as init process") is None


# -- systemd output and budgets -------------------------------------------------------------

def test_parse_span_and_startup() -> None:
    assert systemd.parse_span("1min 2.500s") == 62.5
    assert systemd.parse_span("865ms") == 0.865
    out = ("Startup finished in 5.626s (kernel) + 2.1s (initrd) + 1min 11.253s (userspace) = 1min 18.979s \n"
           "graphical.target reached after 10.962s in userspace.\n")
    assert systemd.parse_startup(out) == {"kernel": 5.626, "initrd": 2.1, "userspace": 71.253, "total": 78.979}
    assert systemd.parse_startup("Bootup is not yet finished") == {}


def test_parse_failed_units() -> None:
    text = ("osbuilder-test-fails.service loaded failed failed osbuilder test\n"
            "● ssh.service loaded failed failed OpenBSD Secure Shell server\n")
    assert systemd.parse_failed_units(text) == ["osbuilder-test-fails.service", "ssh.service"]


def test_budgets_scale_with_timeout_down_to_floors() -> None:
    b = Budgets.from_timeout(120)
    assert b.kernel == 30 and b.root == 60 and b.agent == 120 and b.running == 60 and b.powerdown == 30
    assert b.agent_grace == 18 and b.ssh == 60
    short = Budgets.from_timeout(40)  # a short BOOT_TIMEOUT still leaves the agent and the power-off time
    assert short.kernel == 10 and short.agent == 40 and short.agent_grace == 15 and short.powerdown == 20


# -- profiles and outcomes ------------------------------------------------------------------

def test_outcomes_are_recorded_as_boot_json_spells_them() -> None:
    assert str(Outcome.passed()) == "passed"
    assert str(Outcome.failed("kernel panic")) == "failed: kernel panic"
    assert str(Outcome.skipped("agent is init (no systemd)")) == "skipped: agent is init (no systemd)"
    assert Outcome.skipped("x") != Outcome.failed("x") and Outcome.passed() == Outcome.passed()


def test_a_skip_counts_only_for_its_own_profile_and_phase() -> None:
    no_sshd = Outcome.skipped("agent is init (no sshd)")
    assert AGENT_INIT.counts("ssh", no_sshd) and AGENT_INIT.counts("ssh", Outcome.passed())
    assert not SYSTEMD.counts("ssh", no_sshd)  # a systemd image must log in
    assert not AGENT_INIT.counts("running", no_sshd)  # the skip must be the phase's own
    for phase in ("kernel", "root", "init", "agent", "exec", "powerdown"):  # never skipped by agent-init
        assert AGENT_INIT.skip(phase) is None and not AGENT_INIT.counts(phase, no_sshd)
    assert not AGENT_INIT.counts("ssh", None) and not AGENT_INIT.counts("ssh", Outcome.failed("x"))


def test_the_profile_follows_agent_init(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="virtio-blk")
    assert profiles.for_settings(s) is SYSTEMD and profiles.for_settings(s.with_values(AGENT_INIT="yes")) is AGENT_INIT
    auto = load_settings(tmp_path)  # the runtime's attachment: Kata and Clear Containers map an NVDIMM
    assert profiles.for_settings(auto, dax=True) is profiles.NVDIMM_DAX_SYSTEMD
    assert profiles.for_settings(auto.with_values(RUNTIME="clear-containers", AGENT_INIT="yes"), dax=True) \
        is profiles.NVDIMM_DAX_AGENT_INIT
    assert {"systemd": SYSTEMD, "agent-init": AGENT_INIT}.items() <= PROFILES.items()
    with pytest.raises(ValueError, match="no such phase: sshd"):
        Profile("typo", VIRTIO_BLK, Pid1.SYSTEMD, skipped={"sshd": "no"})


def test_guest_options_come_from_the_settings(tmp_path: Path) -> None:
    s = load_settings(tmp_path, VM_MEMORY="2048", VM_CPUS="2", BOOT_TIMEOUT="90", BOOT_APPEND="quiet",
                      AGENT_INIT="yes")
    kernel = BootKernel(tmp_path / "k", None, "path")
    opts = check.guest_options(s, image=tmp_path / "i.img", kernel=kernel, accel=Accel("tcg", "t", False),
                               name="my test[1]", append="loglevel=7")
    assert (opts.memory, opts.cpus, opts.timeout, opts.append) == (2048, 2, 90, "quiet loglevel=7")
    assert opts.profile is profiles.NVDIMM_AGENT_INIT and opts.ssh_key is None  # no image yet: no DAX header
    assert opts.log_dir == Workdir.of(s).boot_log("my test[1]") and opts.log_dir.is_relative_to(s.workdir)
    assert check.guest_options(s, image=opts.image, kernel=kernel, accel=opts.accel, name="x", timeout=30).timeout == 30


# -- phases on a stub VM --------------------------------------------------------------------

class FakeVm:
    """What a Guest uses of qemu.Vm, without QEMU: a console to feed, QMP events, a power button."""

    def __init__(self, tmp_path: Path, alive: bool = True) -> None:
        self.t0 = time.monotonic()
        self.console = console.ConsoleWatcher(tmp_path / "c.log", self.t0)
        self.stderr = console.ConsoleWatcher(tmp_path / "q.log", self.t0, "qemu")
        self.console.closed = True  # every line it will show is fed by the test
        self.qmp = SimpleNamespace(event_names=lambda: ["RESUME"], events=[])
        self.proc = SimpleNamespace(returncode=0)
        self.pid, self.command = 4242, ["qemu-system-x86_64", "-fake"]
        self.is_alive = alive
        self.shutdown_event: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.stopped_with: float | None = None

    def alive(self) -> bool:
        return self.is_alive

    def powerdown(self, timeout: float) -> dict[str, Any]:
        self.calls.append("system_powerdown")
        return self.wait_shutdown(timeout)

    def wait_shutdown(self, timeout: float, since: int = 0) -> dict[str, Any]:
        self.shutdown_event = {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}}
        self.is_alive = False
        return self.shutdown_event

    def stop(self, graceful: float = 10) -> None:
        self.stopped_with = graceful


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def poweroff(self, timeout: float) -> None:
        self.calls.append("poweroff")

    def wait_ready(self, *args: Any, **kw: Any) -> str:
        raise AssertionError("the guard should have stopped the wait first")

    def close(self) -> None:
        self.calls.append("close")


def stub_guest(tmp_path: Path, profile: Profile = SYSTEMD, *, alive: bool = True, stderr_line: str = "",
               console_line: str = "", timeout: float = 120) -> Guest:
    vm = FakeVm(tmp_path, alive)
    if console_line:
        vm.console.feed(console_line)
    if stderr_line:
        vm.stderr.feed(stderr_line)
    opts = BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"), log_dir=tmp_path,
                       accel=Accel("kvm", "test", True), profile=profile, timeout=timeout)
    return Guest(opts, vm)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("profile, has_key, ran, skipped", [
    (SYSTEMD, True, ["kernel", "root", "init", "agent", "running", "exec", "ssh"], []),
    (SYSTEMD, False, ["kernel", "root", "init", "agent", "running", "exec"], []),  # no key: ssh "not run"
    (AGENT_INIT, False, ["kernel", "root", "init", "agent", "exec"], ["running", "ssh"]),
    (Profile("no-root-check", VIRTIO_BLK, Pid1.SYSTEMD, skipped={"root": "no disk"}), True,
     ["kernel", "init", "agent", "running", "exec", "ssh"], ["root"]),
], ids=["systemd", "systemd-no-key", "agent-init", "a-new-profile-is-an-entry"])
def test_boot_to_ready_runs_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: Profile,
                                        has_key: bool, ran: list[str], skipped: list[str]) -> None:
    calls: list[str] = []

    def check_for(name: str):
        def record(guest: Guest) -> None:
            calls.append(name)
            guest.phases[name] = Outcome.passed()
        return record

    monkeypatch.setattr(phases, "CHECKS", {name: check_for(name) for name in profiles.PHASES})
    guest = stub_guest(tmp_path, profile)
    if has_key:
        guest.opts = dataclasses.replace(guest.opts, ssh_key=SimpleNamespace(public="ssh-ed25519 AAAA"))
    check.boot_to_ready(guest)
    assert calls == ran
    assert [p for p, o in guest.phases.items() if o == profile.skip(p)] == skipped
    phases.run(guest, "powerdown")
    assert guest.passed is (has_key or profile.skip("ssh") is not None)  # no key, no login, no pass


def test_missing_init_fails_in_init_phase(tmp_path: Path) -> None:
    line = "Target filesystem doesn't have requested /sbin/init."
    for profile in (SYSTEMD, AGENT_INIT):
        guest = stub_guest(tmp_path, profile, console_line=line)
        with pytest.raises(BootFailure) as info:
            phases.init(guest)
        assert info.value.phase == "init" and "no init to run" in info.value.message and line in info.value.detail
        assert guest.phases["init"] == Outcome.failed("no init to run")


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
        assert info.value.phase == "agent" and "no answer from the agent on agent.channel.0" in info.value.reason
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
    assert list(record) == ["name", "image", "kernel", "accel", "memory_mib", "cpus", "started_at", "timings",
                            "guest_startup", "powerdown_seconds", "phases", "profile", "root", "passed", "failure",
                            "qemu_pid", "command", "log_dir"]
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


def test_kvm_failure_falls_back_to_tcg(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    opts = stub_guest(tmp_path).opts
    calls = []

    def fn(o: BootOptions) -> str:
        calls.append((o.accel.name, o.log_dir.name))
        if o.accel.name == "kvm":
            raise InfrastructureError("KVM internal error")
        return "ok"

    assert check.with_kvm_fallback(opts, s, fn) == "ok"
    assert calls == [("kvm", tmp_path.name), ("tcg", tmp_path.name + "-tcg")]
    assert json.loads(UserCache.of(s).accel_verdict.read_text())["kvm"] is False  # KVM distrusted from now on
    calls.clear()
    with pytest.raises(InfrastructureError):  # KVM asked for by name: no fallback
        check.with_kvm_fallback(dataclasses.replace(opts, accel=Accel("kvm", "ACCEL=kvm", False)), s, fn)
    assert calls == [("kvm", tmp_path.name)]


def test_qemu_that_fails_to_start_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(qemu, "QEMU", str(fake))
    vm = qemu.Vm(spec(image=None), tmp_path / "logs", start_timeout=5)
    with pytest.raises(OsbuilderError) as info:
        with vm:
            pass
    assert "could not load kernel" in info.value.detail
    assert vm.proc is not None and vm.proc.poll() is not None
    assert not vm.paths.rundir.exists()


def test_child_dies_with_parent() -> None:
    code = ("import os, sys; from osbuilder.vm.qemu import spawn; "
            "p = spawn(['sleep', '60'], stdout=None, stderr=None); print(p.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


# -- records --------------------------------------------------------------------------------

def test_records_round_trip(tmp_path: Path) -> None:
    image, kernel = tmp_path / "container.img", tmp_path / "vmlinuz"
    image.write_bytes(b"image")
    kernel.write_bytes(b"kernel")
    assert records.passing_record(tmp_path, image) is None
    paths = records.write_records(tmp_path, image, kernel, passed=True, kernel={"kind": "debian"},
                                  timings={"agent_ready": 1.0})
    digest = "6105d6cc76af400325e94d588ce511be5bfdbb73b437dc51eca43917d7a43e3d"  # sha256 of b"image"
    assert paths[0] == Workdir(tmp_path).boot_record(digest)
    rec = records.passing_record(Workdir(tmp_path), image)
    assert rec is not None and rec["sha256"] == digest and rec["role"] == "image"
    assert records.passing_record(tmp_path, kernel)["role"] == "kernel"
    os.utime(image, ns=(1, 1))
    image.write_bytes(b"changed")
    assert records.passing_record(tmp_path, image) is None
    assert records.passing_record(tmp_path, tmp_path / "missing") is None


def test_failing_record_never_replaces_passing(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x")
    digest = records.sha256_file(f)
    records.write_record(tmp_path, records.make_record(f, digest, "image", True, {}, {}))
    records.write_record(tmp_path, records.make_record(f, digest, "image", False, {}, {}))
    assert records.passing_record(tmp_path, f) is not None



# -- the record carries the hash taken before the boot -------------------------------------------

def _boot_with_fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, at_launch=lambda: None,
                         during=lambda: None) -> tuple[BootOptions, settings_mod.Settings]:
    """Options for a boot of real files on a fake QEMU: every phase passes; `at_launch()` runs as
    QEMU starts, `during()` in the middle of the boot (the exec phase)."""
    def check_for(name: str):
        def check_phase(guest: Guest) -> None:
            if name == "exec":
                during()
            guest.phases[name] = Outcome.passed()
        return check_phase

    def vm(spec: qemu.VmSpec, log_dir: Path) -> SimpleNamespace:
        return SimpleNamespace(launch=lambda: at_launch() or FakeVm(tmp_path))

    monkeypatch.setattr(phases, "CHECKS", {name: check_for(name) for name in profiles.PHASES})
    monkeypatch.setattr(guest_module, "Vm", vm)
    image, kernel = tmp_path / "container.img", tmp_path / "vmlinuz"
    image.write_bytes(b"the image that was booted")
    kernel.write_bytes(b"the kernel")
    opts = BootOptions(image=image, kernel=BootKernel(kernel, None, "path"), log_dir=tmp_path / "logs",
                       accel=Accel("tcg", "test", False), ssh_key=SimpleNamespace(public="ssh-ed25519 AAAA"),
                       name="pinned")
    return opts, load_settings(tmp_path)


def _replace(path: Path, data: bytes) -> None:
    """What a build does to its output: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_record_carries_the_hash_taken_before_the_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts, s = _boot_with_fake_qemu(tmp_path, monkeypatch,
                                   during=lambda: _replace(tmp_path / "container.img", b"replaced mid-boot"))
    record = check.run_check(opts, s)
    assert record["passed"]
    booted = json.loads(Workdir.of(s).boot_record(_sha(b"the image that was booted")).read_text())
    assert booted["role"] == "image" and booted["passed"]
    assert not Workdir.of(s).boot_record(_sha(b"replaced mid-boot")).exists()  # never booted: no record
    assert records.passing_record(s.workdir, opts.image) is None
    assert Workdir.of(s).boot_record(_sha(b"the kernel")).exists()


@pytest.mark.parametrize("when", ["before-qemu-read-it", "written-in-place-during-the-boot"])
def test_no_record_when_the_booted_bytes_are_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, when: str) -> None:
    image = tmp_path / "container.img"
    if when == "before-qemu-read-it":  # hashed, then replaced before QEMU opened it
        opts, s = _boot_with_fake_qemu(tmp_path, monkeypatch, at_launch=lambda: _replace(image, b"other"))
    else:  # QEMU read a mix of both
        opts, s = _boot_with_fake_qemu(tmp_path, monkeypatch, during=lambda: image.write_bytes(b"other bytes"))
    record = check.run_check(opts, s)
    assert record["passed"]
    assert not list(Workdir.of(s).boot_records.glob("*.json"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    what = "was replaced" if when == "before-qemu-read-it" else "was written to"
    assert warnings == [f"boot: pinned: {image} {what} during the boot check; no boot record written"]


def test_a_file_replaced_by_one_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    f = tmp_path / "container.img"
    f.write_bytes(b"first")
    first = records.sha256_file(f)
    st = f.stat()
    _replace(f, b"other")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p, rsync -t: size and mtime as before
    assert records.sha256_file(f) == _sha(b"other") != first

# -- accelerator ----------------------------------------------------------------------------

def test_probe_verdict_cache(tmp_path: Path) -> None:
    path = tmp_path / "verdict.json"
    assert accel.cached_verdict(path) is None
    accel.save_verdict(path, False, "no output")
    assert accel.cached_verdict(path)["kvm"] is False
    assert accel.cached_verdict(path, now=time.time() + accel.PROBE_TTL + 1) is None
    other_qemu = {**accel.host_key(), "qemu": "QEMU emulator version 99.0.0"}
    assert accel.cached_verdict(path, host=other_qemu) is None


def test_host_key_names_kernel_boot_qemu_and_cpu() -> None:
    key = accel.host_key()
    assert key["kernel"] == os.uname().release
    assert key["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert key["qemu"].startswith("QEMU emulator version")
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    assert key["cpu"] == (cpu[1].strip() if cpu else "unknown")


def test_kvm_verdict_is_shared_by_every_workdir_of_one_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_settings(tmp_path, WORKDIR=str(tmp_path / "first"), ACCEL="auto")
    fresh = first.with_values(WORKDIR=str(tmp_path / "fresh"))
    probes: list[Path] = []
    verdicts = iter([(True, "ran in 0.3s"), (False, "did not finish within 1.5s")])

    def probe(log_dir: Path) -> tuple[bool, str]:
        probes.append(log_dir)
        return next(verdicts)

    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b1", "qemu": "7.2", "cpu": "x"})
    assert accel.choose(first).name == "kvm" and len(probes) == 1
    assert accel.choose(fresh).name == "kvm" and len(probes) == 1  # a fresh WORKDIR does not probe
    assert not (tmp_path / "fresh").exists()
    assert UserCache.of(fresh).accel_verdict.is_file()
    # after a reboot (another boot id) the verdict no longer holds: probed again, in that WORKDIR's logs
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b2", "qemu": "7.2", "cpu": "x"})
    chosen = accel.choose(fresh)
    assert chosen.name == "tcg" and "did not finish" in chosen.reason and len(probes) == 2
    assert probes[1].parent == Workdir.of(fresh).boot_logs


def test_choose_accel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(tmp_path, ACCEL="tcg")
    assert accel.choose(s).name == "tcg"
    monkeypatch.setattr(accel, "kvm_usable", lambda: "no /dev/kvm")
    auto = accel.choose(s.with_values(ACCEL="auto"))
    assert auto.name == "tcg" and "no /dev/kvm" in auto.reason
    with pytest.raises(InfrastructureError):
        accel.choose(s.with_values(ACCEL="kvm"))
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    accel.save_verdict(UserCache.of(s).accel_verdict, True, "probe passed")
    assert accel.choose(s.with_values(ACCEL="auto")).name == "kvm"


def procs_of(path: Path) -> list[int]:
    """Processes whose command line names `path`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_the_probe_guest_runs_to_its_end_under_tcg(tmp_path: Path) -> None:
    """The guest KVM is probed with, run under TCG: it reaches long mode, runs its loop and makes QEMU exit
    with the status the probe expects, so under KVM only the accelerator differs."""
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=30)
    assert ok, detail
    assert (tmp_path / "probe/kvm-probe.bin").stat().st_size == 64 * 1024


def test_the_probe_guest_is_stopped_at_its_deadline(tmp_path: Path) -> None:
    """A guest that does not finish in time (here: TCG given 50 ms) fails the probe, and no QEMU is left."""
    started = time.monotonic()
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=0.05)
    assert not ok and "did not finish within 0.05s under TCG" in detail
    assert time.monotonic() - started < 5
    assert not procs_of(tmp_path)


def test_the_probe_guest_must_give_its_own_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU exiting with another status than the guest's answer is no proof (here the answer expected is
    changed; the guest still gives the real one)."""
    real = accel.expected_status()
    monkeypatch.setattr(accel, "expected_status", lambda: real ^ 0x02)
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=30)
    assert not ok and f"QEMU exited with status {real}, not the probe guest's {real ^ 0x02}" in detail


def test_the_kvm_probe_uses_the_cpu_of_real_boots(tmp_path: Path) -> None:
    cmd = accel.probe_command(tmp_path / "fw.bin", "kvm")
    assert opt_value(cmd, "-accel") == ["kvm"] and opt_value(cmd, "-cpu") == [qemu.KVM_CPU]
    assert opt_value(cmd, "-machine") == ["q35"] and opt_value(cmd, "-bios") == [str(tmp_path / "fw.bin")]
    assert cmd[0] == qemu.QEMU and "-cpu" not in accel.probe_command(tmp_path / "fw.bin", "tcg")


@pytest.mark.skipif(accel.kvm_usable() is not None, reason="no usable /dev/kvm on this host")
def test_the_kvm_probe_answers_within_two_seconds(tmp_path: Path) -> None:
    """Whatever this host's KVM does (here nested KVM runs guests slower than TCG; elsewhere it works),
    the probe has its verdict within 2 s."""
    started = time.monotonic()
    ok, detail = accel.probe_kvm(tmp_path / "probe")
    took = time.monotonic() - started
    assert took <= 2.0, (took, ok, detail)


# -- what `osbuilder boot` boots ------------------------------------------------------------

def test_boot_kernel_and_image_selection(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    with pytest.raises(UsageError, match="BOOT_IMAGE: .* does not exist; run `osbuilder rootfs"):
        check.boot_image(s)
    with pytest.raises(UsageError, match="BOOT_KERNEL=built"):
        check.boot_kernel(s.with_values(BOOT_KERNEL="built"))
    Workdir.of(s).kernel.vmlinuz.parent.mkdir(parents=True)
    Workdir.of(s).kernel.vmlinuz.write_bytes(b"k")
    assert check.boot_kernel(s).name == "built"  # auto prefers the built kernel
    custom = tmp_path / "bzImage"
    custom.write_bytes(b"k")
    assert check.boot_kernel(s.with_values(BOOT_KERNEL=str(custom))).kernel == custom
    assert check.boot_kernel(s, custom) == BootKernel(custom, None, "path")  # --kernel PATH first
    assert check.boot_kernel(s.with_values(BOOT_KERNEL="built"), built=custom).kernel == custom
    with pytest.raises(UsageError):
        check.boot_kernel(s, tmp_path / "nope")


def test_the_kvm_probe_runs_while_the_kernel_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh machine `osbuilder boot` needs both Debian's boot kernel and the KVM verdict: neither waits
    for the other. A kernel that cannot be had is still the error reported."""
    s = load_settings(tmp_path, BOOT_KERNEL="debian", ACCEL="auto")
    overlap = {"probing": False, "seen": False}

    def choose(settings: settings_mod.Settings) -> Accel:
        overlap["probing"] = True
        time.sleep(0.5)
        overlap["probing"] = False
        return Accel("tcg", "probe failed", True)

    def make_kernel(settings: settings_mod.Settings) -> BootKernel:
        time.sleep(0.2)
        overlap["seen"] = overlap["probing"]
        return BootKernel(tmp_path / "vmlinuz", tmp_path / "initrd.img", "debian")

    monkeypatch.setattr(accel, "choose", choose)
    monkeypatch.setattr(check, "debian_kernel", make_kernel)
    kernel, chosen = check.kernel_and_accel(s)
    assert kernel.name == "debian" and chosen.reason == "probe failed" and overlap["seen"]
    with pytest.raises(UsageError, match="BOOT_KERNEL: .* is not a file"):
        check.kernel_and_accel(s, tmp_path / "no-such-kernel")


def test_format_timings() -> None:
    text = check.format_timings({"passed": True, "image": "/i", "log_dir": "/l",
                                 "kernel": {"kind": "debian", "version": "6.1", "path": "/k"},
                                 "accel": {"name": "tcg", "reason": "ACCEL=tcg"}, "profile": "nvdimm-dax",
                                 "timings": {"qemu_start": 0.0, "agent_ready": 9.5},
                                 "guest_startup": {"kernel": 1.25, "total": 17.6}})
    assert text == ("boot check PASSED: /i\n"
                    "  kernel: debian 6.1\n"
                    "  accel:  tcg (ACCEL=tcg)\n"
                    "  profile: nvdimm-dax\n"
                    "  phase timings (seconds since QEMU start):\n"
                    "    qemu_start                 0.00\n"
                    "    agent_ready                9.50\n"
                    "  systemd-analyze: kernel 1.25s, total 17.60s\n"
                    "  logs: /l")


# -- the Debian boot kernel -----------------------------------------------------------------

def test_the_kernel_package_gives_its_one_kernel_and_its_modules(tmp_path: Path) -> None:
    """An unpacked package: its one vmlinuz and modules directory, in /lib/modules (bookworm) or
    /usr/lib/modules (trixie, linked from /lib where depmod looks)."""
    release = "6.1.0-9-cloud-amd64"
    old, new = tmp_path / "bookworm", tmp_path / "trixie"
    for tree, modules in ((old, "lib/modules"), (new, "usr/lib/modules")):
        (tree / "boot").mkdir(parents=True)
        (tree / "boot" / f"vmlinuz-{release}").write_bytes(b"kernel")
        (tree / modules / release / "kernel").mkdir(parents=True)
    for tree in (old, new):
        vmlinuz, modules_dir = debian_kernel.locate(tree)
        assert vmlinuz == tree / "boot" / f"vmlinuz-{release}" and modules_dir.name == release
        assert (modules_dir / "kernel").is_dir() and modules_dir == tree / "lib/modules" / release
    assert (new / "lib").is_symlink() and not (old / "lib").is_symlink()
    (new / "boot/vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"another")
    with pytest.raises(OsbuilderError, match="expected one kernel in the package's /boot, found 2"):
        debian_kernel.locate(new)


def test_debian_kernel_is_built_once_for_every_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(tmp_path)
    builds: list[Path] = []

    def build(settings: settings_mod.Settings, out: Path, **kw: Any) -> None:
        builds.append(out)
        for name in (debian_kernel.KERNEL_NAME, debian_kernel.INITRD_NAME):
            (out / name).write_bytes(b"x")
        (out / debian_kernel.VERSION_NAME).write_text("6.1.0-9-cloud-amd64 linux-image-cloud-amd64 6.1.27-1\n")

    monkeypatch.setattr(debian_kernel, "build", build)
    first = debian_kernel.debian_kernel(s)
    again = debian_kernel.debian_kernel(s.with_values(WORKDIR=str(tmp_path / "another-workdir")))
    assert len(builds) == 1 and again == first
    assert first.kernel.is_relative_to(UserCache.of(s).artifacts) and not s.workdir.exists()
    assert first.version.startswith("6.1.0-9-cloud-amd64") and first.initrd is not None
    assert Cache(UserCache.of(s).artifacts).lookup(debian_kernel.manifest(s)) == first.kernel.parent


# -- the NVDIMM attachment (issue 9) --------------------------------------------------------

MiB = 1 << 20
KATA_DAX_ROOT = "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4"


def test_nvdimm_is_attached_as_kata_attaches_it() -> None:
    """The image as a read-only file memory backend behind an unarmed NVDIMM on an nvdimm=on machine,
    with a hotplug slot and room for it above the RAM: no drive, no overlay (nothing can write it)."""
    nv = spec(attach="nvdimm", image_size=256 * MiB, image=Path("/img/a,b.img"))
    cmd = qemu.build_command(nv, qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(cmd, "-machine") == ["q35,nvdimm=on"]
    assert opt_value(cmd, "-m") == ["1024M,slots=1,maxmem=1280M"]
    assert "memory-backend-file,id=mem0,mem-path=/img/a,,b.img,size=268435456,readonly=on,share=off" in \
        opt_value(cmd, "-object")
    assert "nvdimm,id=nv0,memdev=mem0,unarmed=on" in opt_value(cmd, "-device")
    assert "-drive" not in cmd and not any("virtio-blk" in d for d in opt_value(cmd, "-device"))
    assert nv.disk is None and nv.nvdimm == Path("/img/a,b.img")  # Vm.start makes no overlay
    assert opt_value(cmd, "-initrd") == ["/k/initrd.img"]  # Debian's kernel keeps its initrd
    interactive = qemu.build_command(dataclasses.replace(nv, agent=False), None, interactive=True)
    assert "nvdimm,id=nv0,memdev=mem0,unarmed=on" in opt_value(interactive, "-device")
    disk = qemu.build_command(spec(), qemu.VmPaths(Path("/tmp/osb-x")))
    assert opt_value(disk, "-machine") == ["q35"] and opt_value(disk, "-m") == ["1024"]


def test_boot_profile_setting_chooses_the_attachment(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    assert profiles.for_settings(s) is profiles.NVDIMM_SYSTEMD
    assert profiles.for_settings(s, dax=True) is profiles.NVDIMM_DAX_SYSTEMD
    assert profiles.for_settings(s.with_values(AGENT_INIT="yes"), dax=True) is profiles.NVDIMM_DAX_AGENT_INIT
    assert profiles.NVDIMM_DAX_AGENT_INIT.skip("running") and profiles.NVDIMM_DAX_SYSTEMD.skip("running") is None
    assert profiles.NVDIMM_DAX.root_params == KATA_DAX_ROOT  # the runtime's own root parameters
    assert profiles.NVDIMM_DAX.dax and not profiles.NVDIMM.dax and "dax" not in profiles.NVDIMM.root_params
    virtio = load_settings(tmp_path, BOOT_PROFILE="virtio-blk")
    assert profiles.for_settings(virtio, dax=True) is SYSTEMD  # a disk cannot do DAX
    auto = load_settings(tmp_path)
    assert auto.boot_profile == "auto"
    assert profiles.for_settings(auto).attach.name == profiles.RUNTIME_BOOT_PROFILE["kata"]
    # every BOOT_PROFILE the setting accepts has attachments, and every attachment a name the setting accepts
    assert set(settings_mod.BOOT_PROFILES) - {"auto"} == set(profiles.BOOT_PROFILES)


@pytest.mark.parametrize("value", ["nvdim", "virtio", "initramfs", "x" * 80])
def test_an_unknown_boot_profile_is_a_one_line_usage_error(tmp_path: Path, value: str) -> None:
    assert value not in settings_mod.BOOT_PROFILES
    with pytest.raises(UsageError) as e:
        load_settings(tmp_path, BOOT_PROFILE=value)
    assert e.value.message.startswith("BOOT_PROFILE: no boot profile ") and "\n" not in e.value.message
    assert "nvdimm" in e.value.message and "virtio-blk" in e.value.message


def test_cli_exits_2_on_an_unknown_boot_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osbuilder import cli

    assert cli.main(["boot", "--check", "--workdir", str(tmp_path), "--boot-profile", "pmem"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("osbuilder: BOOT_PROFILE: no boot profile 'pmem'") or
               "BOOT_PROFILE: no boot profile 'pmem'" in line for line in err), err


def dax_image(path: Path, size: int = 128 * MiB, header: bool = True) -> Path:
    """A sparse file of `size` bytes, with an nd_pfn info block when `header`."""
    from osbuilder import image

    with open(path, "wb") as f:
        f.truncate(size)
        if header:
            f.seek(image.PFN_INFO_OFFSET)
            f.write(image.pfn_info(size, image.DAX_HEADER, bytes(range(16))))
    return path


def test_the_image_decides_whether_the_nvdimm_boot_mounts_with_dax(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    kernel, tcg = BootKernel(tmp_path / "k", None, "path"), Accel("tcg", "t", False)
    with_header = check.guest_options(s, image=dax_image(tmp_path / "dax.img"), kernel=kernel, accel=tcg, name="a")
    assert with_header.profile is profiles.NVDIMM_DAX_SYSTEMD and KATA_DAX_ROOT in with_header.cmdline
    assert with_header.spec().image_size == 128 * MiB and with_header.spec().attach == "nvdimm"
    plain = check.guest_options(s, image=dax_image(tmp_path / "plain.img", header=False), kernel=kernel,
                                accel=tcg, name="b")
    assert plain.profile is profiles.NVDIMM_SYSTEMD and "rootflags=data=ordered" in plain.cmdline
    disk = check.guest_options(load_settings(tmp_path, BOOT_PROFILE="virtio-blk"), image=with_header.image,
                               kernel=kernel, accel=tcg, name="c")
    assert disk.profile is SYSTEMD and disk.spec().image_size == 0


def test_an_image_the_memory_backend_cannot_map_is_a_usage_error(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    kernel, tcg = BootKernel(tmp_path / "k", None, "path"), Accel("tcg", "t", False)
    odd = dax_image(tmp_path / "odd.img", 100 * MiB)
    with pytest.raises(UsageError, match=r"^BOOT_IMAGE: .*odd.img is 104857600 bytes, not a multiple of 128 MiB"):
        check.guest_options(s, image=odd, kernel=kernel, accel=tcg, name="x")
    check.guest_options(load_settings(tmp_path, BOOT_PROFILE="virtio-blk"), image=odd, kernel=kernel, accel=tcg,
                        name="y")  # a disk of any size boots
    big = dax_image(tmp_path / "big.img", 1 << 40)
    with pytest.raises(UsageError, match=r"^VM_MEMORY: 1024 MiB plus the 1048576 MiB image"):
        check.guest_options(s, image=big, kernel=kernel, accel=tcg, name="z")


class ExecAgent(FakeAgent):
    """An agent whose `exec` answers from a table: argv's last word -> (status, stdout)."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        super().__init__()
        self.answers = answers

    def exec(self, argv: list[str], timeout: float) -> Any:
        from osbuilder.agent.client import ExecResult

        self.calls.append(" ".join(argv))
        status, out = next((v for k, v in self.answers.items() if k in " ".join(argv)), (0, ""))
        return ExecResult(status, None, out, "err\n" if argv[-1].endswith("exit 3") else "", False)


def dax_guest(tmp_path: Path, probe_output: str) -> tuple[Guest, ExecAgent]:
    guest = stub_guest(tmp_path, profiles.NVDIMM_DAX_SYSTEMD)
    agent = ExecAgent({"exit 3": (3, "out\n"), "queue/dax": (0, probe_output),
                       "OPTIONS /": (0, "ro,relatime,dax=always\n")})
    guest.agent = agent  # type: ignore[assignment]
    return guest, agent


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
def test_a_root_without_dax_fails_the_root_phase(tmp_path: Path, probe: str, why: str) -> None:
    guest, _ = dax_guest(tmp_path, probe)
    with pytest.raises(BootFailure, match="phase 'root'") as e:
        phases.run(guest, "exec")
    assert why in e.value.reason
    assert str(guest.phases["root"]).startswith("failed: ")


def test_no_dax_check_where_the_attachment_has_no_dax(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, profiles.NVDIMM_SYSTEMD)
    agent = ExecAgent({"exit 3": (3, "out\n"), "OPTIONS /": (0, "ro,relatime\n")})
    guest.agent = agent  # type: ignore[assignment]
    phases.run(guest, "exec")
    assert not any("queue/dax" in c for c in agent.calls) and guest.root_mount == {}


def test_the_pmem_root_mount_is_watched_from_the_first_line(tmp_path: Path) -> None:
    """The attachment's own console pattern is matched even for lines that came before the guest
    started watching (QEMU runs before the Guest object exists)."""
    vm = FakeVm(tmp_path)
    vm.console.feed("[    0.9] EXT4-fs (pmem0p1): mounted filesystem with ordered data mode.")
    vm.console.feed("[    1.0] Run /sbin/init as init process")
    opts = BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"), log_dir=tmp_path,
                       accel=Accel("tcg", "t", False), profile=profiles.NVDIMM_DAX_SYSTEMD)
    guest = Guest(opts, vm)  # type: ignore[arg-type]
    assert "root_mounted" in vm.console.milestones
    phases.run(guest, "root")
    assert guest.phases["root"] == Outcome.passed()


def test_debian_initrd_loads_the_nvdimm_stack() -> None:
    for module in ("nfit", "libnvdimm", "nd_pmem"):
        assert module in boot_initrd.INITRD_MODULES
