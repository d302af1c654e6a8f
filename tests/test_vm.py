"""Fast unit tests of osbuilder.vm: command line, console patterns, usernet parsing, records, accel cache,
error handling. No guest is booted here (boot_tests/ does that)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from osbuilder import settings as settings_mod
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.vm import accel, bootcheck, commands, console, qemu, records
from osbuilder.vm.debian_kernel import HOOK, INITRD_MODULES, BootKernel

USERNET = ("Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
           "  TCP[HOST_FORWARD]   8       127.0.0.1 35717       10.0.2.15    22     0     0\r\n")


def spec(**kw) -> qemu.VmSpec:
    base = dict(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"), cmdline=qemu.kernel_cmdline(),
                image=Path("/img/container.img"), credentials={"ssh.authorized_keys.root": "ssh-ed25519 AAA a,b"})
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


def test_kernel_cmdline_is_runtime_style() -> None:
    line = qemu.kernel_cmdline("root=/dev/vdz1").split()
    for p in ("root=/dev/vda1", "rootfstype=ext4", "ro", "console=ttyS0", "panic=-1", "osbuilder.net=slirp"):
        assert p in line
    assert line[-1] == "root=/dev/vdz1"  # extra parameters come last and win


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


# -- boot check parsing ---------------------------------------------------------------------

def test_parse_span_and_startup() -> None:
    assert bootcheck.parse_span("1min 2.500s") == 62.5
    assert bootcheck.parse_span("865ms") == 0.865
    out = ("Startup finished in 5.626s (kernel) + 2.1s (initrd) + 1min 11.253s (userspace) = 1min 18.979s \n"
           "graphical.target reached after 10.962s in userspace.\n")
    assert bootcheck.parse_startup(out) == {"kernel": 5.626, "initrd": 2.1, "userspace": 71.253, "total": 78.979}
    assert bootcheck.parse_startup("Bootup is not yet finished") == {}


def test_parse_failed_units() -> None:
    text = ("osbuilder-test-fails.service loaded failed failed osbuilder test\n"
            "● ssh.service loaded failed failed OpenBSD Secure Shell server\n")
    assert bootcheck.parse_failed_units(text) == ["osbuilder-test-fails.service", "ssh.service"]


def test_budgets_scale_with_timeout() -> None:
    b = bootcheck.Budgets.from_timeout(120)
    assert b.kernel == 30 and b.root == 60 and b.agent == 120 and b.running == 60 and b.powerdown == 30


# -- error handling (stub VM) ---------------------------------------------------------------

def stub_guest(tmp_path: Path, *, alive: bool = True, stderr_line: str = "", console_line: str = "") -> bootcheck.Guest:
    con = console.ConsoleWatcher(tmp_path / "c.log", time.monotonic())
    err = console.ConsoleWatcher(tmp_path / "q.log", time.monotonic(), "qemu")
    if console_line:
        con.feed(console_line)
    if stderr_line:
        err.feed(stderr_line)
    vm = SimpleNamespace(console=con, stderr=err, alive=lambda: alive, proc=SimpleNamespace(returncode=0),
                         qmp=SimpleNamespace(event_names=lambda: ["RESUME", "SHUTDOWN"]), t0=time.monotonic())
    opts = bootcheck.BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"),
                                 log_dir=tmp_path, accel=accel.Accel("kvm", "test", True))
    return bootcheck.Guest(opts, vm=vm)  # type: ignore[arg-type]


def test_phase_ok_skips_count_only_for_agent_init() -> None:
    skip_ssh, skip_running = bootcheck.AGENT_INIT_SKIPS["ssh"], bootcheck.AGENT_INIT_SKIPS["running"]
    assert skip_ssh == "skipped: agent is init (no sshd)"
    assert bootcheck.phase_ok("ssh", "passed", False) and bootcheck.phase_ok("ssh", "passed", True)
    assert bootcheck.phase_ok("ssh", skip_ssh, True) and bootcheck.phase_ok("running", skip_running, True)
    assert not bootcheck.phase_ok("ssh", skip_ssh, False)  # a systemd image must log in
    assert not bootcheck.phase_ok("running", skip_ssh, True)  # the skip must be the phase's own
    for phase in ("kernel", "root", "init", "agent", "exec", "powerdown"):  # never skippable
        assert not bootcheck.phase_ok(phase, "skipped: agent is init (no sshd)", True)
    assert not bootcheck.phase_ok("ssh", None, True) and not bootcheck.phase_ok("ssh", "failed: x", True)


def test_agent_init_skips_running_and_ssh_and_can_pass(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path)
    guest.opts.agent_init = True
    assert guest.wait_running() == "agent-init" and guest.wait_ssh() is None
    assert guest.phases == dict(bootcheck.AGENT_INIT_SKIPS)
    assert not guest.passed
    guest.phases.update({p: "passed" for p in ("kernel", "root", "init", "agent", "exec", "powerdown")})
    assert guest.passed
    guest.opts.agent_init = False  # the same record from a systemd image is not a pass
    assert not guest.passed
    with pytest.raises(bootcheck.BootFailure, match="no session key"):
        guest.wait_ssh()


def test_missing_agent_init_fails_in_init_phase(tmp_path: Path) -> None:
    line = "Target filesystem doesn't have requested /sbin/init."
    guest = stub_guest(tmp_path, console_line=line)
    assert guest._agent_phase() == "agent"
    guest.opts.agent_init = True
    assert guest._agent_phase() == "init"
    with pytest.raises(bootcheck.BootFailure) as info:
        guest.wait_init()
    assert info.value.phase == "init" and "no init to run" in info.value.message and line in info.value.detail


def test_agent_init_diagnostics_do_not_try_ssh(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path)
    guest.opts.agent_init = True
    assert "no sshd" in guest._agent_diagnostics()


def test_kvm_internal_error_raises_infrastructure_error(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, stderr_line="KVM internal error. Suberror: 1")
    with pytest.raises(InfrastructureError) as info:
        guest.guard("agent")
    assert info.value.exit_code == 125 and "phase 'agent'" in info.value.message


def test_fatal_console_line_names_phase_and_evidence(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, console_line="You are in emergency mode. After logging in...")
    with pytest.raises(bootcheck.BootFailure) as info:
        guest.guard("running")
    e = info.value
    assert e.exit_code == 1 and e.phase == "running" and "emergency mode" in e.message
    assert "You are in emergency mode" in e.detail and "console tail" in e.detail and str(tmp_path) in e.message


def test_dead_qemu_is_reported(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, alive=False)
    with pytest.raises(bootcheck.BootFailure, match="QEMU exited unexpectedly"):
        guest.guard("kernel")


def test_kvm_failure_falls_back_to_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_mod.load({"WORKDIR": str(tmp_path)}, env={})
    opts = stub_guest(tmp_path).opts
    calls = []

    def fn(o: bootcheck.BootOptions) -> str:
        calls.append(o.accel.name)
        if o.accel.name == "kvm":
            raise InfrastructureError("KVM internal error")
        return "ok"

    assert bootcheck.with_kvm_fallback(opts, s, fn) == "ok"
    assert calls == ["kvm", "tcg"]
    assert json.loads((tmp_path / "cache" / accel.PROBE_FILE).read_text())["kvm"] is False


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
    assert [p.parent.name for p in paths] == ["boot-records", "boot-records"]
    rec = records.passing_record(tmp_path, image)
    assert rec is not None and rec["sha256"] == records.sha256_file(image) and rec["role"] == "image"
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


# -- accelerator ----------------------------------------------------------------------------

def test_probe_verdict_cache(tmp_path: Path) -> None:
    path = tmp_path / accel.PROBE_FILE
    assert accel.cached_verdict(path) is None
    accel.save_verdict(path, False, "no output")
    assert accel.cached_verdict(path)["kvm"] is False
    assert accel.cached_verdict(path, now=time.time() + accel.PROBE_TTL + 1) is None


def test_choose_accel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = BootKernel(tmp_path / "k", None, "path")
    s = settings_mod.load({"WORKDIR": str(tmp_path), "ACCEL": "tcg"}, env={})
    assert accel.choose(s, kernel).name == "tcg"
    monkeypatch.setattr(accel, "kvm_usable", lambda: "no /dev/kvm")
    auto = accel.choose(s.with_values(ACCEL="auto"), kernel)
    assert auto.name == "tcg" and "no /dev/kvm" in auto.reason
    with pytest.raises(InfrastructureError):
        accel.choose(s.with_values(ACCEL="kvm"), kernel)
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    accel.save_verdict(tmp_path / "cache" / accel.PROBE_FILE, True, "probe passed")
    assert accel.choose(s.with_values(ACCEL="auto"), kernel).name == "kvm"


# -- commands and the Debian kernel artifact ------------------------------------------------

def test_boot_kernel_and_image_selection(tmp_path: Path) -> None:
    s = settings_mod.load({"WORKDIR": str(tmp_path)}, env={})
    with pytest.raises(UsageError, match="BOOT_IMAGE"):
        commands.boot_image(s)
    with pytest.raises(UsageError, match="BOOT_KERNEL=built"):
        commands.boot_kernel(s.with_values(BOOT_KERNEL="built"))
    (tmp_path / "vmlinuz.container").write_bytes(b"k")
    assert commands.boot_kernel(s).name == "built"  # auto prefers the built kernel
    custom = tmp_path / "bzImage"
    custom.write_bytes(b"k")
    assert commands.boot_kernel(s.with_values(BOOT_KERNEL=str(custom))).kernel == custom
    with pytest.raises(UsageError):
        commands.boot_kernel(s, tmp_path / "nope")


def test_initrd_hook_loads_virtio_modules() -> None:
    for module in ("virtio_console", "virtio_net", "virtio_pci", "virtio_blk", "vsock", "ext4", "button"):
        assert module in INITRD_MODULES
    assert "update-initramfs -u -k all" in HOOK


def test_format_timings() -> None:
    text = commands.format_timings({"passed": True, "image": "/i", "log_dir": "/l",
                                    "kernel": {"kind": "debian", "version": "6.1", "path": "/k"},
                                    "accel": {"name": "tcg", "reason": "ACCEL=tcg"},
                                    "timings": {"qemu_start": 0.0, "agent_ready": 9.5},
                                    "guest_startup": {"total": 17.6}})
    assert "PASSED" in text and "agent_ready" in text and "9.50" in text and "logs: /l" in text


def test_a_panic_line_is_named_by_its_cause():
    from osbuilder.vm.console import match_fatal

    assert match_fatal("Kernel panic - not syncing: No working init found.  Try passing init=").reason \
        == "no init to run"
    assert "root filesystem not found" in match_fatal(
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)").reason
    assert match_fatal("Kernel panic - not syncing: Attempted to kill init!").reason == "kernel panic"
    assert match_fatal("[    0.938013] Run /etc/init as init process").reason == "no init to run"
    assert match_fatal("[    0.934979] Run /sbin/init as init process") is None
