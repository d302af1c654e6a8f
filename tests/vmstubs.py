"""Stand-ins for what a boot check uses of QEMU and the agent, shared by the tests of osbuilder.vm:
settings in a temp dir, a VmSpec, a stub Vm fed console lines by the test, agents that answer from a table."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from osbuilder import settings as settings_mod
from osbuilder.vm import attachments, console, profiles, qemu
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions
from osbuilder.vm.profiles import SYSTEMD, Profile

USERNET = ("Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
           "  TCP[HOST_FORWARD]   8       127.0.0.1 35717       10.0.2.15    22     0     0\r\n")


def load_settings(tmp_path: Path, **values: str) -> settings_mod.Settings:
    """Settings with the WORKDIR and the per-user cache in tmp_path (never the real ~/.cache); the stand-in
    images here record no agent, so they are booted as osbuilder's (AGENT_PROTOCOL)."""
    base = {"WORKDIR": str(tmp_path / "work"), "CACHE_DIR": str(tmp_path / "user-cache"), "AGENT_PROTOCOL": "osbuilder"}
    return settings_mod.load({**base, **values}, env={})


def spec(**kw: Any) -> qemu.VmSpec:
    """A spec of the image as a virtio-blk disk, Debian's kernel and initrd, a credential with a comma."""
    base = dict(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"),
                cmdline=qemu.kernel_cmdline(attachments.VIRTIO_BLK.root_params), image=Path("/img/container.img"),
                attachment=attachments.VIRTIO_BLK, credentials={"ssh.authorized_keys.root": "ssh-ed25519 AAA a,b"})
    base.update(kw)
    return qemu.VmSpec(**base)


def opt_value(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == flag]


class FakeVm:
    """What a Guest uses of qemu.Vm, without QEMU: a console to feed, QMP events, a power button."""

    def __init__(self, tmp_path: Path, alive: bool = True) -> None:
        self.t0 = time.monotonic()
        self.console = console.ConsoleWatcher(tmp_path / "c.log", self.t0)
        self.stderr = console.ConsoleWatcher(tmp_path / "q.log", self.t0, "qemu")
        self.console.closed = True  # every line it will show is fed by the test
        self.qmp = SimpleNamespace(event_names=lambda: ["RESUME"], events=[], arrived=[])
        self.proc = SimpleNamespace(returncode=0)
        self.pid, self.command = 4242, ["qemu-system-x86_64", "-fake"]
        self.is_alive = alive
        self.shutdown_event: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.stopped_with: float | None = None
        self.ports_opened: dict[str, float] = {}  # port name -> when the guest opened it (VSERPORT_CHANGE)

    def alive(self) -> bool:
        return self.is_alive

    def port_opened_at(self, name: str) -> float | None:
        return self.ports_opened.get(name)

    def powerdown(self, timeout: float) -> dict[str, Any]:
        return self.wait_shutdown(timeout, self.press_power_button())

    def press_power_button(self) -> int:
        self.calls.append("system_powerdown")
        return len(self.qmp.events)

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


MiB = 1 << 20


KATA_DAX_ROOT = "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4"


def dax_image(path: Path, size: int = 128 * MiB, header: bool = True) -> Path:
    """A sparse file of `size` bytes, with an nd_pfn info block when `header`."""
    from osbuilder import image

    with open(path, "wb") as f:
        f.truncate(size)
        if header:
            f.seek(image.PFN_INFO_OFFSET)
            f.write(image.pfn_info(size, image.DAX_HEADER, bytes(range(16))))
    return path


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



class FakeHost:
    """What a Guest asks of host.Monitor: the share the test sets (None: no evidence, as without /proc)."""

    def __init__(self, share: Any = None) -> None:
        self.value = share
        self.asked: list[float] = []
        self.samples: list[Any] = []

    def share(self, since: float) -> Any:
        self.asked.append(since)
        return self.value

    def stop(self) -> None:
        pass


def host_share(ran: float, waited: float, seconds: float = 30.0, stolen: float = 0.0) -> Any:
    """A host.Share of `seconds` in which QEMU ran and waited that long, at load average 9 on 2 CPUs."""
    from osbuilder.vm import host

    return host.Share(seconds=seconds, ran=ran, waited=waited, stolen=stolen, load=(9.01, 7.5, 5.25), cpus=2,
                      pressure=87.0)


class Printer:
    """A guest printing a console line every `every` seconds (from a thread) until stopped, then
    `last` if given. Use as a context manager."""

    def __init__(self, guest: Guest, every: float, stop_after: float | None = None, last: str = "") -> None:
        import threading

        self.guest, self.every, self.stop_after, self.last = guest, every, stop_after, last
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.printed = 0

    def _run(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(self.every):
            if self.stop_after is not None and time.monotonic() - started >= self.stop_after:
                if self.last:
                    self.guest.vm.console.feed(self.last)
                return
            self.printed += 1
            self.guest.vm.console.feed(f"[ {self.printed:4d}] systemd[1]: Started unit {self.printed}.")

    def __enter__(self) -> Printer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)
