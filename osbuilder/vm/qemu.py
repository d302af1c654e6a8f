"""One way to run a guest: the QEMU command line, the launch, QMP, and a cleanup that always happens.

Mechanism only: what to check in the guest is phases.py's business, and how the artifact is attached
is its `Attachment`'s (attachments.py): `build_command()` asks the spec's attachment for its devices,
machine options, memory and initramfs, and `Vm` enters the attachment's `running()` context (an
overlay, a helper process) before QEMU starts and leaves it after QEMU stopped. Around that it adds
what every guest gets: the virtio-serial ports the agent protocol needs, each on a UNIX socket,
user-mode networking with SSH forwarded to a free host port, the serial console on a UNIX socket, QMP
on another. `Vm` starts QEMU paused (-S), connects QMP and the console drain, then lets the CPUs run,
so the console log holds every byte from the first.

No QEMU outlives us: `Vm` is a context manager whose exit powers the guest down (bounded), then
`quit`s, then kills; QEMU runs in its own process group under osbuilder's watchdog (procs.py), so a
crashed or killed osbuilder takes it along. Its run directory is named for this process; the next
guest removes those of processes that are gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from osbuilder import fs, procs
from osbuilder.agent import PORT_NAME
from osbuilder.arch import X86_64, Arch
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.run import format_command, run
from osbuilder.vm.console import ConsoleWatcher

log = logging.getLogger("osbuilder")
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its disconnect tracebacks are noise here

QEMU = X86_64.qemu  # the host's emulator for the KVM probe (accel.py); a guest's is its ARCH's (arch.py)
KVM_CPU = "host,-arch-capabilities,-kvmclock"  # plain `-cpu host` aborts on MSR 0x10a when nested
# After the root parameters (a boot profile's) and the serial console (its ARCH's device): no hang on
# panic, unit status shown.
CONSOLE_PARAMS = "panic=-1 systemd.show_status=1"
# Boot-check only: the rootfs overlay gives the NIC QEMU user-net's address when it sees this.
BOOT_CHECK_PARAMS = "osbuilder.net=slirp"
RUNDIR_PREFIX = "osbvm-"
SERIAL_PORT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def port_id(name: str) -> str:
    """The chardev and device id of the virtio-serial port `name` ("agent" for osbuilder's agent port):
    QMP's VSERPORT_CHANGE events name the port by it when the guest opens or closes it."""
    return "agent" if name == PORT_NAME else "port-" + name
MAX_MEMORY_MIB = 1 << 20  # 1 TiB, the most QEMU's default x86 CPU (40 address bits) can address


class Attaching(Protocol):
    """What QEMU needs of the way an artifact is attached (attachments.Attachment implements it)."""

    def machine_options(self) -> list[str]: ...

    def memory(self, memory_mib: int, image: Path | None) -> str: ...

    def devices(self, image: Path | None, paths: VmPaths | None) -> list[str]: ...

    def initramfs(self, image: Path | None) -> Path | None: ...

    def running(self, image: Path | None, paths: VmPaths, logfile: Path) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class VmSpec:
    """What to boot and how: `image` reaches the guest the way `attachment` says (never written by it;
    nothing is attached without one), and the guest gets a virtio-serial port, on a UNIX socket, for
    each name in `serial_ports`."""

    kernel: Path
    cmdline: str
    initrd: Path | None = None
    image: Path | None = None
    attachment: Attaching | None = None
    accel: str = "tcg"
    memory: int = 1024
    cpus: int = 1
    arch: Arch = X86_64  # the guest's architecture: QEMU's binary, machine, CPU and firmware (arch.py)
    credentials: dict[str, str] = field(default_factory=dict)  # systemd credentials via SMBIOS
    serial_ports: tuple[str, ...] = (PORT_NAME,)
    vsock_cid: int | None = None  # a vhost-vsock device with this guest address (the host needs /dev/vhost-vsock)
    network: bool = True
    qemu: str = ""  # the emulator binary ("": the architecture's)

    def __post_init__(self) -> None:
        if self.attachment is not None and self.attachment.initramfs(self.image) and self.initrd is not None:
            raise ValueError("an image attached as the initrd leaves no room for the kernel's own initrd")
        if len(set(self.serial_ports)) != len(self.serial_ports):
            raise ValueError(f"serial port named twice: {self.serial_ports}")
        for name in self.serial_ports:
            if not SERIAL_PORT_NAME.fullmatch(name):
                raise ValueError(f"serial port name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")

    @property
    def initramfs(self) -> Path | None:
        """What QEMU loads with -initrd: the image itself when it is attached as the initrd, else the
        kernel's own initrd (Debian's)."""
        attached = self.attachment.initramfs(self.image) if self.attachment else None
        return attached or self.initrd


@dataclass(frozen=True)
class VmPaths:
    """Sockets and the overlay of one guest, in a short temporary directory (sun_path <= 107 bytes)."""

    rundir: Path

    @property
    def qmp(self) -> Path:
        return self.rundir / "qmp"

    @property
    def console(self) -> Path:
        return self.rundir / "con"

    def port(self, name: str) -> Path:
        """The socket of the virtio-serial port `name`."""
        return self.rundir / port_id(name)

    @property
    def agent(self) -> Path:
        """The socket of osbuilder's agent port (agent.channel.0)."""
        return self.port(PORT_NAME)

    @property
    def overlay(self) -> Path:
        return self.rundir / "disk.qcow2"


def qemu_escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def kernel_cmdline(root_params: str, extra: str = "", guest: Arch = X86_64) -> str:
    """The kernel command line: how to find the root (from the boot profile), the console (`guest`'s
    serial device), then `extra` (last, so its parameters win)."""
    return f"{root_params} console={guest.console} {CONSOLE_PARAMS} {BOOT_CHECK_PARAMS} {extra}".strip()


def accel_args(accel: str, cpus: int, guest: Arch = X86_64) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", KVM_CPU]
    if accel == "tcg":
        cpu = ["-cpu", guest.tcg_cpu] if guest.tcg_cpu else []
        return ["-accel", "tcg,thread=multi" if cpus > 1 else "tcg", *cpu]
    raise ValueError(f"unknown accelerator {accel!r}")


def build_command(spec: VmSpec, paths: VmPaths | None, *, interactive: bool = False) -> list[str]:
    """QEMU's argv. `paths` None (interactive only): no QMP, no sockets, console on stdio."""
    attachment = spec.attachment
    guest = spec.arch
    machine = ",".join([guest.qemu_machine, *(attachment.machine_options() if attachment else [])])
    memory = attachment.memory(spec.memory, spec.image) if attachment else str(spec.memory)
    cmd = [spec.qemu or guest.qemu, "-name", "osbuilder", "-nodefaults", "-no-user-config", "-display", "none",
           "-no-reboot", "-machine", machine, *accel_args(spec.accel, spec.cpus, guest),
           "-m", memory, "-smp", str(spec.cpus)]
    if guest.firmware:  # UEFI: it loads -kernel from QEMU's fw_cfg, and gives the guest ACPI and SMBIOS
        cmd += ["-bios", guest.firmware]
    cmd += ["-kernel", str(spec.kernel)]
    if spec.initramfs:
        cmd += ["-initrd", str(spec.initramfs)]
    cmd += ["-append", spec.cmdline]
    if attachment:
        cmd += attachment.devices(spec.image, paths)
    cmd += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    if interactive or paths is None:
        cmd += ["-serial", "mon:stdio"]
    else:
        cmd += ["-chardev", f"socket,id=con0,path={qemu_escape(str(paths.console))},server=on,wait=off",
                "-serial", "chardev:con0"]
    if spec.serial_ports and paths is not None:
        cmd += ["-device", "virtio-serial-pci,id=vser0"]
        for name in spec.serial_ports:
            ident = port_id(name)
            cmd += ["-chardev", f"socket,id={ident},path={qemu_escape(str(paths.port(name)))},server=on,wait=off",
                    "-device", f"virtserialport,chardev={ident},name={name},id={ident}"]
    if spec.vsock_cid is not None:
        cmd += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={spec.vsock_cid}"]
    if spec.network:
        cmd += ["-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22", "-device", "virtio-net-pci,netdev=net0"]
    for name, value in spec.credentials.items():
        cmd += ["-smbios", f"type=11,value={qemu_escape(f'io.systemd.credential:{name}={value}')}"]
    if paths is not None:
        cmd += ["-qmp", f"unix:{qemu_escape(str(paths.qmp))},server=on,wait=off", "-S"]
    return cmd


USERNET_FORWARD = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+(?P<host>\S+)\s+(?P<hport>\d+)\s+(?P<guest>\S+)\s+(?P<gport>\d+)")


def parse_usernet(text: str) -> dict[int, tuple[str, int]]:
    """`info usernet` output -> {guest port: (host address, host port)} of the TCP forwards."""
    return {int(m["gport"]): (m["host"], int(m["hport"])) for m in USERNET_FORWARD.finditer(text)}


def make_overlay(image: Path, overlay: Path, logfile: Path | None = None) -> None:
    """A qcow2 copy-on-write overlay over the raw image, so the guest never writes the image."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()), str(overlay)],
        step="boot", logfile=logfile)


# -- process lifetime ----------------------------------------------------------------------

def spawn(cmd: list[str], *, stdout: Any, stderr: Any, stdin: Any = subprocess.DEVNULL,
          own_group: bool = True) -> subprocess.Popen:
    """Start QEMU so that it dies with this process (`own_group` False: it stays in the terminal's
    foreground process group, for an interactive console)."""
    log.info("boot: + %s", format_command(cmd))
    try:
        return procs.spawn(cmd, stdin=stdin, stdout=stdout, stderr=stderr, own_group=own_group)
    except FileNotFoundError:
        raise OsbuilderError(f"boot: program '{cmd[0]}' not found; run `osbuilder check-deps --install`") from None


def make_rundir() -> Path:
    """A fresh run directory named for this process (leftovers of dead processes swept)."""
    return fs.pid_tempdir(RUNDIR_PREFIX, Path(_short_tmp()))


# -- QMP ------------------------------------------------------------------------------------

class QmpError(OsbuilderError):
    """A QMP command failed or the connection is gone."""


class QmpSession:
    """A QMP client on its own event-loop thread: callable from any thread, events kept as they come.

    Every command, reply and event is appended to a JSON-lines transcript with the host time
    (seconds since t0); QEMU's own event timestamps are kept in the event.
    """

    def __init__(self, transcript: Path, t0: float) -> None:
        self.transcript = transcript
        self.t0 = t0
        self.events: list[dict[str, Any]] = []
        self.arrived: list[float] = []  # seconds since t0 at which each event arrived
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._client: Any = None
        self._reader: Any = None

    def _record(self, direction: str, msg: Any) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 3), "dir": direction, "msg": msg}
        with open(self.transcript, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, path: Path, timeout: float, proc: subprocess.Popen) -> None:
        """Connect to QEMU's QMP socket, retrying while QEMU starts up."""
        from qemu.qmp import QMPClient

        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise QmpError(f"boot: QEMU exited ({proc.returncode}) before QMP was ready")
            try:
                self._client = self._run(self._connect(QMPClient, str(path)), 5)
                break
            except Exception as e:  # noqa: BLE001 - socket not there yet, refused, ...
                if time.monotonic() > deadline:
                    raise QmpError(f"boot: cannot connect to QMP at {path} within {timeout:g}s: {e}") from None
                time.sleep(0.05)
        greeting = self._client.greeting
        self._record("greeting", greeting._asdict() if greeting is not None else None)

    async def _connect(self, factory: Any, path: str) -> Any:
        client = factory("osbuilder")
        await client.connect(path)
        self._reader = asyncio.ensure_future(self._read_events(client))
        return client

    @staticmethod
    async def _cancel(task: Any) -> None:
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - CancelledError
            pass

    async def _read_events(self, client: Any) -> None:
        while True:
            event = dict(await client.events.get())
            self._record("event", event)
            with self._cond:
                self.events.append(event)
                self.arrived.append(round(time.monotonic() - self.t0, 3))
                self._cond.notify_all()

    def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        if self._client is None:
            raise QmpError(f"QMP {cmd}: not connected")
        self._record("->", {"execute": cmd, "arguments": args or {}})
        try:
            reply = self._run(self._client.execute(cmd, args or {}), timeout)
        except Exception as e:  # noqa: BLE001 - ExecuteError, disconnect, timeout
            self._record("<-", {"error": f"{type(e).__name__}: {e}"})
            raise QmpError(f"QMP {cmd} failed: {type(e).__name__}: {e}") from None
        self._record("<-", {"return": reply})
        return reply

    def wait_event(self, names: set[str], timeout: float, since: int = 0) -> dict[str, Any] | None:
        """The first event named in `names` at index >= `since`, waiting up to `timeout`."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[since:] if e.get("event") in names), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout)
            return found()

    def event_names(self) -> list[str]:
        with self._cond:
            return [e.get("event", "") for e in self.events]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None:
            try:
                self._run(self._client.disconnect(), 5)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._reader is not None:
            try:
                self._run(self._cancel(self._reader), 5)
            except Exception:  # noqa: BLE001
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()


# -- the guest ------------------------------------------------------------------------------

class Vm:
    """A running guest. Use as a context manager: `with Vm(spec, log_dir) as vm: ...`."""

    def __init__(self, spec: VmSpec, log_dir: Path, *, start_timeout: float = 30) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self.paths = VmPaths(make_rundir())
        self.t0 = time.monotonic()
        self.proc: subprocess.Popen | None = None
        self.console = ConsoleWatcher(log_dir / "console.log", self.t0, "console")
        self.stderr = ConsoleWatcher(log_dir / "qemu.log", self.t0, "qemu")
        self.qmp = QmpSession(log_dir / "qmp.jsonl", self.t0)
        self.command: list[str] = []
        self._console_sock: socket.socket | None = None
        self.shutdown_event: dict[str, Any] | None = None
        self.stopped = False
        self._attached = ExitStack()  # the attachment's running() context: left after QEMU stopped

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> Vm:
        return self.launch()

    def launch(self) -> Vm:
        """`start()`, and if that fails, stop and clean up everything before raising."""
        try:
            self.start()
        except BaseException:
            self.stop(graceful=0)
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(graceful=0 if exc_type is not None else 10)

    def start(self) -> None:
        """Launch QEMU paused, attach QMP and the console drain, then run the CPUs."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in ("console.log", "qemu.log", "qmp.jsonl"):
            (self.log_dir / name).unlink(missing_ok=True)
        if self.spec.attachment is not None:
            self._attached.enter_context(self.spec.attachment.running(self.spec.image, self.paths,
                                                                      self.log_dir / "qemu.log"))
        self.command = build_command(self.spec, self.paths)
        (self.log_dir / "command.txt").write_text(format_command(self.command) + "\n")
        self.t0 = self.console.t0 = self.stderr.t0 = self.qmp.t0 = time.monotonic()
        self.proc = spawn(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.stderr.start(self.proc.stdout)  # type: ignore[arg-type]
        try:
            self.qmp.connect(self.paths.qmp, self.start_timeout, self.proc)
        except QmpError as e:
            self.stderr.join(2)
            raise self._start_failure(str(e)) from None
        self._attach_console()
        self.qmp.execute("cont")

    def _start_failure(self, message: str) -> OsbuilderError:
        detail = "\n".join(self.stderr.tail(20))
        if "Could not access KVM" in detail or "failed to initialize kvm" in detail.lower():
            return InfrastructureError(f"boot: QEMU cannot use KVM: {message}", detail)
        return OsbuilderError(message, detail)

    def _attach_console(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.paths.console))
        sock.settimeout(None)
        self._console_sock = sock
        self.console.start(lambda: sock.recv(65536))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def port_opened_at(self, name: str) -> float | None:
        """Seconds since QEMU started at which the guest first opened the virtio-serial port `name`
        (QMP's VSERPORT_CHANGE), or None."""
        ident = port_id(name)
        with self.qmp._cond:
            for event, at in zip(self.qmp.events, self.qmp.arrived, strict=False):
                data = event.get("data", {})
                if event.get("event") == "VSERPORT_CHANGE" and data.get("id") == ident and data.get("open"):
                    return at
        return None

    def status(self) -> str:
        return self.qmp.execute("query-status")["status"]

    def host_port(self, guest_port: int) -> int:
        """The host port QEMU's user-mode network forwards to `guest_port` (read back over QMP)."""
        text = self.qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        forwards = parse_usernet(text)
        if guest_port not in forwards:
            raise OsbuilderError(f"boot: no host forward to guest port {guest_port} in `info usernet`", text)
        return forwards[guest_port][1]

    def powerdown(self, timeout: float) -> dict[str, Any] | None:
        """ACPI power button; the SHUTDOWN event (or None if none came within `timeout`)."""
        return self.wait_shutdown(timeout, since=self.press_power_button())

    def press_power_button(self) -> int:
        """ACPI power button; the index of QMP's next event (where to look for SHUTDOWN)."""
        mark = len(self.qmp.events)
        self.qmp.execute("system_powerdown")
        return mark

    def wait_shutdown(self, timeout: float, since: int = 0) -> dict[str, Any] | None:
        """The SHUTDOWN event at index >= `since` (None if none came within `timeout`); then let QEMU exit.

        For a power-off the guest starts by itself (e.g. its init calling reboot(RB_POWER_OFF)):
        take `since = len(vm.qmp.events)` before asking for it."""
        event = self.qmp.wait_event({"SHUTDOWN"}, timeout, since=since)
        if event:
            self.shutdown_event = event
            self._wait_exit(10)
        return event

    def _wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, graceful: float = 10) -> None:
        """Power down (up to `graceful` s), quit, kill; close everything; remove the run dir."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.alive() and graceful > 0 and self.shutdown_event is None:
                try:
                    if self.status() == "running":
                        self.powerdown(graceful)
                except QmpError:
                    pass
            if self.alive():
                try:
                    self.qmp.execute("quit", timeout=5)
                except QmpError:
                    pass
                self._wait_exit(5)
        finally:
            if self.proc is not None:
                procs.finish(self.proc)
            self.qmp.close()
            if self._console_sock is not None:
                self._console_sock.close()
            self.console.join(5)
            self.stderr.join(5)
            try:
                self._attached.close()
            finally:
                shutil.rmtree(self.paths.rundir, ignore_errors=True)


def _short_tmp() -> str:
    """A temp dir whose paths fit a UNIX socket address even with a long $TMPDIR."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) < 60 else "/tmp"


def run_interactive(spec: VmSpec) -> int:
    """Boot on the terminal (serial on stdio; Ctrl-A X quits). The image is opened snapshot=on."""
    cmd = build_command(spec, None, interactive=True)
    print(f"osbuilder: booting {spec.image} — quit with Ctrl-A X", flush=True)
    proc = spawn(cmd, stdin=None, stdout=None, stderr=None, own_group=False)
    try:
        return proc.wait()
    finally:
        procs.finish(proc)
