"""qemu.py: the command line every guest gets, the run directory, QMP forwards, and a QEMU that dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmstubs import (
    USERNET,
    opt_value,
    spec,
)

from osbuilder.errors import OsbuilderError
from osbuilder.vm import qemu


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
    assert "virtserialport,chardev=agent,name=agent.channel.0,id=agent" in opt_value(cmd, "-device")
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22" in opt_value(cmd, "-netdev")
    assert opt_value(cmd, "-qmp") == ["unix:/tmp/osb-x/qmp,server=on,wait=off"]
    assert opt_value(cmd, "-initrd") == ["/k/initrd.img"]


def test_named_serial_ports_each_get_a_socket() -> None:
    """A spec may ask for the ports another agent opens (Clear Containers: sh.hyper.channel.0/.1); the
    agent's port keeps its socket (VmPaths.agent), each port has an id QMP's VSERPORT_CHANGE names."""
    paths = qemu.VmPaths(Path("/tmp/osb-x"))
    cmd = qemu.build_command(spec(serial_ports=("sh.hyper.channel.0", "sh.hyper.channel.1")), paths)
    assert opt_value(cmd, "-device").count("virtio-serial-pci,id=vser0") == 1
    assert paths.port("sh.hyper.channel.0") == Path("/tmp/osb-x/port-sh.hyper.channel.0")
    for name in ("sh.hyper.channel.0", "sh.hyper.channel.1"):
        assert f"socket,id=port-{name},path=/tmp/osb-x/port-{name},server=on,wait=off" in opt_value(cmd, "-chardev")
        assert f"virtserialport,chardev=port-{name},name={name},id=port-{name}" in opt_value(cmd, "-device")
    assert "agent.channel.0" not in " ".join(cmd)
    assert paths.agent == paths.port("agent.channel.0") == Path("/tmp/osb-x/agent")
    both = qemu.build_command(spec(serial_ports=("agent.channel.0", "sh.hyper.channel.0")), paths)
    assert len([d for d in opt_value(both, "-device") if d.startswith("virtserialport,")]) == 2
    none = qemu.build_command(spec(serial_ports=()), paths)
    assert not any("virtio-serial" in d for d in opt_value(none, "-device"))


@pytest.mark.parametrize("ports", [("a", "a"), ("",), ("x,y",), ("../x",), ("x" * 65,)])
def test_bad_serial_port_names_are_refused(ports: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="serial port"):
        spec(serial_ports=ports)


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
    cmd = qemu.build_command(spec(serial_ports=()), None, interactive=True)
    assert opt_value(cmd, "-serial") == ["mon:stdio"]
    assert any("snapshot=on" in d for d in opt_value(cmd, "-drive"))
    assert "-qmp" not in cmd and "-S" not in cmd


def test_socket_paths_are_short() -> None:
    vm_paths = qemu.VmPaths(Path(qemu.tempfile.mkdtemp(prefix="osbvm-", dir=qemu._short_tmp())))
    try:
        assert len(str(vm_paths.agent).encode()) < 108
    finally:
        vm_paths.rundir.rmdir()


def test_parse_usernet() -> None:
    assert qemu.parse_usernet(USERNET) == {22: ("127.0.0.1", 35717)}
    assert qemu.parse_usernet("Hub -1 (net0):\r\n") == {}


def test_qemu_that_fails_to_start_leaves_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel' >&2\nexit 1\n")
    fake.chmod(0o755)
    vm = qemu.Vm(spec(image=None, qemu=str(fake)), tmp_path / "logs", start_timeout=5)
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

