"""A started guest: its lifecycle, the evidence of its boot, and the errors a boot fails with.

A `Guest` is only ever handed out started (`Guest.start(opts)`, or `check.start_guest`), so its
`vm` is always there. The phases (phases.py) wait through `wait_until` and `guard`, which end a
boot within seconds when the console shows a fatal line or QEMU dies or stops, and fail through
`fail`, which records the phase's failed Outcome and gathers the evidence (the matched console
lines, the console tail, QEMU's stderr) into the error.

Closing a guest stops QEMU (politely first, unless the boot failed) and writes boot.json
(timings, phases, verdict) next to console.log, qemu.log, qmp.jsonl and command.txt.

The image and kernel are hashed before QEMU starts and held open (`records.pin`): a boot record
carries those hashes, and none is written when a file was replaced or written to during the boot.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from osbuilder import fs
from osbuilder.agent.client import AgentConnectionClosed, AgentError, AgentTimeout, ExecResult
from osbuilder.agent.protocol import AgentProtocol, Ready
from osbuilder.errors import InfrastructureError, OsbuilderError, seconds
from osbuilder.layout import Workdir
from osbuilder.vm import records
from osbuilder.vm import ssh as ssh_mod
from osbuilder.vm.console import format_tail
from osbuilder.vm.options import BootOptions, Budgets
from osbuilder.vm.profiles import PHASES, Outcome, Profile
from osbuilder.vm.qemu import QmpError, Vm, VmSpec

log = logging.getLogger("osbuilder")

BOOT_JSON = "boot.json"

# Console milestone -> the timing it gives (seconds since QEMU started).
CONSOLE_TIMINGS = {"first_byte": "first_console_byte", "linux_version": "kernel_handoff",
                   "init_started": "init_started", "root_mounted": "root_mounted",
                   "systemd_started": "systemd_started", "agent_started": "agent_started",
                   "multi_user": "multi_user_target"}


Launcher = Callable[[VmSpec, Path], Vm]  # makes the Vm a guest runs in (qemu.Vm; tests give a stand-in)


class BootFailure(OsbuilderError):
    """The artifact failed a boot check (exit 1). `phase` names the phase."""

    def __init__(self, phase: str, reason: str, detail: str = "", log_dir: Path | None = None) -> None:
        where = f" (logs: {log_dir})" if log_dir else ""
        super().__init__(f"boot check failed in phase '{phase}': {reason}{where}", detail)
        self.phase = phase
        self.reason = reason
        self.log_dir = log_dir


class BootInfrastructureError(InfrastructureError):
    """The boot failed for a reason that is not the artifact's (exit 125)."""

    def __init__(self, phase: str, reason: str, detail: str = "", log_dir: Path | None = None) -> None:
        where = f" (logs: {log_dir})" if log_dir else ""
        super().__init__(f"boot infrastructure failure in phase '{phase}': {reason}{where}", detail)
        self.phase = phase
        self.reason = reason


class Guest:
    """One started guest and what its boot showed. Use as a context manager to close it."""

    def __init__(self, opts: BootOptions, vm: Vm, started_at: float | None = None) -> None:
        self.opts = opts
        self.vm = vm
        self.started_at = time.time() if started_at is None else started_at
        self.agent: Any = None  # the agent protocol's client (an AgentClient for osbuilder's own agent)
        self.agent_ready: Ready | None = None  # what proved the agent up (phases.agent)
        self.command_ssh: paramiko.SSHClient | None = None  # commands, when the agent cannot run them
        self.ssh_client: paramiko.SSHClient | None = None
        self.timings: dict[str, float] = {}
        self.phases: dict[str, Outcome] = {}
        self.guest_startup: dict[str, float] = {}
        self.failure = ""
        self.powerdown_seconds: float | None = None
        self.pins: list[records.Pinned] = []  # image and kernel, hashed before QEMU started
        self.digests: tuple[str, str] | None = None
        self.unearned: str | None = None  # why this boot proves nothing about the pinned files
        self.root_mount: dict[str, Any] = {}  # what the guest said of its root (phases.exec): source, options, DAX
        self._watch_root_pattern()

    def _watch_root_pattern(self) -> None:
        """For an attachment whose root mount console.MILESTONES does not know (its `root_pattern`):
        record its `root_milestone` at the first console line that matches."""
        attach = self.profile.attach
        if not attach.root_pattern:
            return
        pattern = re.compile(attach.root_pattern)
        watcher = self.vm.console

        def look(lines: int = 5) -> None:
            if attach.root_milestone not in watcher.milestones and any(
                    pattern.search(line) for line in watcher.tail(lines)):
                watcher.milestones.setdefault(attach.root_milestone, round(time.monotonic() - watcher.t0, 3))

        watcher.on_change(look)
        look(len(watcher.lines))  # what arrived before the watch began

    # -- lifetime -------------------------------------------------------------------------

    @classmethod
    def start(cls, opts: BootOptions, launch: Launcher = Vm) -> Guest:
        """Launch QEMU for `opts` (paused, QMP and console attached, then running; `launch` makes the
        `Vm`). If the launch fails, nothing is left running and the error says why."""
        try:
            pins = records.pin(opts.image, opts.kernel.kernel)  # hashed before QEMU reads them
        except OSError as e:
            raise OsbuilderError(f"boot: cannot read {e.filename}: {e.strerror}") from None
        started_at = time.time()
        try:
            vm = launch(opts.spec(), opts.log_dir).launch()
        except BaseException:
            for p in pins:
                p.close()
            raise
        guest = cls(opts, vm, started_at)
        guest.pins, guest.digests = pins, (pins[0].digest, pins[1].digest)
        guest.unearned = next(filter(None, (p.replaced() for p in pins)), None)  # QEMU has read them now
        guest.timings["qemu_start"] = 0.0
        log.info("boot: %s: QEMU pid %s (%s), logs in %s", opts.name, vm.pid, opts.accel.name, opts.log_dir)
        return guest

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(graceful=0 if exc_type is not None else None)

    def close(self, graceful: float | None = None) -> None:
        """Stop the guest (power it off first, unless it failed or `graceful` is 0) and write boot.json."""
        for client in (self.ssh_client, self.command_ssh):
            if client is not None:
                client.close()
        grace = graceful if graceful is not None else (0 if self.failure else 10)
        if (self.profile.agent_is_init and grace > 0 and self.agent is not None and self.vm.alive()
                and self.vm.shutdown_event is None):
            try:  # nothing in the guest handles the ACPI button: ask the agent (PID 1) instead
                self.agent_poweroff(grace)
            except (AgentError, QmpError):
                pass
            grace = 0  # no point pressing the power button afterwards
        if self.agent is not None:
            self.agent.close()
        self.vm.stop(graceful=grace)
        self.release_pins()
        self.collect_console_timings()
        self.write_boot_json()

    def release_pins(self) -> None:
        """Note whether a pinned file was written to during the boot, then let go of it."""
        if self.pins and self.unearned is None:
            self.unearned = next(filter(None, (p.changed() for p in self.pins)), None)
        for p in self.pins:
            p.close()
        self.pins = []

    def agent_poweroff(self, timeout: float) -> dict[str, Any] | None:
        """Send `poweroff` to the agent (PID 1) and wait for QEMU's SHUTDOWN event (None on timeout).

        The reply may be lost if the guest is faster than the socket: a timeout or a closed
        connection is not an error here, the SHUTDOWN event decides. ok:false raises AgentError."""
        if self.agent is None:
            raise AgentError("the agent is not connected")
        deadline = time.monotonic() + timeout
        mark = len(self.vm.qmp.events)
        try:
            self.agent.poweroff(timeout=min(10.0, timeout))
        except (AgentTimeout, AgentConnectionClosed) as e:
            log.info("boot: %s: no reply to poweroff (%s); waiting for SHUTDOWN", self.opts.name, e)
        return self.vm.wait_shutdown(max(0.0, deadline - time.monotonic()), since=mark)

    @property
    def profile(self) -> Profile:
        return self.opts.profile

    @property
    def budgets(self) -> Budgets:
        return self.opts.budgets

    @property
    def log_dir(self) -> Path:
        return self.opts.log_dir

    def now(self) -> float:
        """Seconds since QEMU started."""
        return round(time.monotonic() - self.vm.t0, 3)

    # -- waiting and failing ----------------------------------------------------------------

    def fail(self, phase: str, reason: str, extra: str = "", infrastructure: bool = False) -> OsbuilderError:
        """Build (and record) the error for a failed phase, with the console evidence."""
        self.phases[phase] = Outcome.failed(reason)
        self.failure = f"{phase}: {reason}"
        parts = [extra] if extra else []
        failed = self.vm.console.failed_lines
        if failed:
            parts.append(format_tail(failed[:15], "failures shown on the console"))
        parts.append(format_tail(self.vm.console.tail(), "console tail"))
        qemu_tail = [line for line in self.vm.stderr.tail(10) if line.strip()]
        if qemu_tail:
            parts.append(format_tail(qemu_tail, "QEMU stderr"))
        detail = "\n".join(parts)
        cls = BootInfrastructureError if infrastructure else BootFailure
        return cls(phase, reason, detail, self.log_dir)

    def guard(self, phase: str) -> None:
        """Raise at once if the console showed a fatal pattern or QEMU is gone or stopped."""
        vm = self.vm
        for watcher in (vm.stderr, vm.console):
            hit = watcher.fatal
            if hit is not None:
                vm.console.wait(lambda: vm.console.closed, 1.5)  # let the evidence arrive
                raise self.fail(phase, hit.reason, f"matched ({hit.source}, {hit.at:.1f}s): {hit.line}",
                                hit.infrastructure)
        if not vm.alive():
            vm.console.join(2)
            vm.stderr.join(2)
            for watcher in (vm.stderr, vm.console):  # the last lines may hold the cause
                if watcher.fatal is not None:
                    return self.guard(phase)
            events = vm.qmp.event_names()
            code = vm.proc.returncode if vm.proc else "?"
            raise self.fail(phase, f"QEMU exited unexpectedly (exit {code}; events: {', '.join(events) or 'none'})")
        if "STOP" in vm.qmp.event_names():
            raise self.fail(phase, "the VM stopped (QEMU paused it: internal error?)", infrastructure=True)

    def settle(self, phase: str, seconds: float = 3.0) -> None:
        """After a lost connection: give QEMU and the console a moment to show why, then guard."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.vm.alive() and self.vm.console.fatal is None:
            time.sleep(0.1)
        self.guard(phase)

    def wait_until(self, phase: str, done: Callable[[], bool], budget: float, what: str) -> None:
        """Wait for `done()` while guarding; BootFailure naming the phase on timeout. Once `done()`, the
        phase has passed: a fatal line that came after what it waited for (an initrd's init failing
        right after the root was mounted) belongs to the next phase, whose guard reports it."""
        console = self.vm.console
        deadline = time.monotonic() + budget
        while True:
            if done():
                return
            self.guard(phase)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail(phase, f"timed out after {seconds(budget)} waiting for {what}")
            console.wait(lambda: done() or console.fatal is not None, min(1.0, left))

    @property
    def protocol(self) -> AgentProtocol:
        return self.opts.agent.protocol

    def exec(self, argv: list[str], timeout: float = 30, phase: str = "exec") -> ExecResult:
        """Run argv in the guest through the agent, or over SSH when the agent's protocol cannot run
        commands (a failure fails `phase`)."""
        if not self.protocol.can_exec:
            return self.ssh_exec(argv, timeout, phase)
        if self.agent is None:
            raise self.fail(phase, "the agent is not connected")
        try:
            return self.agent.exec(argv, timeout)
        except AgentError as e:
            self.settle(phase)
            raise self.fail(phase, f"agent exec {argv[0]!r} failed: {e}")

    def try_exec(self, argv: list[str], timeout: float = 20) -> ExecResult | None:
        """Best effort (timings, diagnostics): argv's result, or None; never fails a phase."""
        try:
            if self.protocol.can_exec:
                return self.agent.exec(argv, timeout) if self.agent is not None else None
            if self.command_ssh is None:
                return None
            status, out, err = ssh_mod.run_command(self.command_ssh, shlex.join(argv), timeout=timeout)
            return ExecResult(status, None, out, err, False)
        except (AgentError, OSError, paramiko.SSHException):
            return None

    def ssh_exec(self, argv: list[str], timeout: float = 30, phase: str = "exec") -> ExecResult:
        """Run argv over SSH as root with the session key (connecting once, while sshd comes up within
        the phase's budget), killed after `timeout` seconds by the guest's `timeout`."""
        if self.opts.ssh_key is None:
            raise self.fail(phase, f"the {self.protocol.name} agent cannot run commands and this guest has no "
                            "session key for SSH")
        try:
            if self.command_ssh is None:
                self.command_ssh = ssh_mod.connect(self.vm.host_port(22), self.opts.ssh_key, self.budgets.ssh,
                                                   keep_going=lambda: self.guard(phase))
            command = f"timeout -s KILL {max(1, round(timeout))} {shlex.join(argv)}"
            status, out, err = ssh_mod.run_command(self.command_ssh, command, timeout=timeout + 15)
        except (ssh_mod.SshError, OsbuilderError, OSError, paramiko.SSHException) as e:
            if isinstance(e, (BootFailure, BootInfrastructureError)):
                raise
            self.settle(phase)
            raise self.fail(phase, f"{argv[0]!r} over SSH failed: {e}")
        timed_out = status in (124, 137)
        return ExecResult(None if timed_out else status, 9 if timed_out else None, out, err, timed_out)

    # -- evidence ---------------------------------------------------------------------------

    @property
    def passed(self) -> bool:
        """Every phase passed, or was skipped by this guest's profile."""
        return all(self.profile.counts(p, self.phases.get(p)) for p in PHASES)

    def collect_console_timings(self) -> None:
        for milestone, key in CONSOLE_TIMINGS.items():
            at = self.vm.console.milestones.get(milestone)
            if at is not None:
                self.timings.setdefault(key, round(at, 3))

    def kernel_info(self) -> dict[str, Any]:
        k = self.opts.kernel
        return {"kind": k.name, "path": str(k.kernel), "initrd": str(k.initrd) if k.initrd else None,
                "version": k.version, "cmdline": self.opts.cmdline}

    def record(self) -> dict[str, Any]:
        """What boot.json holds."""
        self.collect_console_timings()
        return {
            "name": self.opts.name,
            "image": str(self.opts.image),
            "kernel": self.kernel_info(),
            "accel": {"name": self.opts.accel.name, "reason": self.opts.accel.reason},
            "memory_mib": self.opts.memory,
            "cpus": self.opts.cpus,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "timings": dict(sorted(self.timings.items(), key=lambda kv: kv[1])),
            "guest_startup": self.guest_startup,
            "powerdown_seconds": self.powerdown_seconds,
            "phases": {p: str(self.phases[p]) if p in self.phases else "not run" for p in PHASES},
            "profile": self.profile.name,
            "agent": self.agent_info(),
            "root": self.root_mount,
            "passed": self.passed,
            "failure": self.failure,
            "qemu_pid": self.vm.pid,
            "command": self.vm.command,
            "log_dir": str(self.log_dir),
        }

    def agent_info(self) -> dict[str, Any]:
        """The agent as boot.json records it: the protocol it was proven over, its own version and the
        proof (once `agent` passed), its binary and unit, and how commands reached the guest."""
        a = self.opts.agent
        info: dict[str, Any] = {"protocol": a.protocol.name, "name": a.name, "service": a.service,
                                "commands": "agent" if a.protocol.can_exec else "ssh"}
        if self.agent_ready is not None:
            info.update(version=self.agent_ready.version, proof=self.agent_ready.proof)
        return info

    def write_boot_json(self) -> Path:
        return fs.write_atomically(self.log_dir / BOOT_JSON, json.dumps(self.record(), indent=2) + "\n")

    def write_passing_records(self, workdir: Path | Workdir) -> list[Path]:
        """Boot records for the image and the kernel, with their hashes from before the boot, only
        when every phase passed and neither file was replaced or written to during the boot."""
        if not self.passed:
            return []
        if self.digests is None:
            raise RuntimeError("boot records need a guest started by Guest.start (it hashes the files first)")
        self.release_pins()
        if self.unearned:
            log.warning("boot: %s: %s during the boot check; no boot record written", self.opts.name, self.unearned)
            return []
        return records.write_records(workdir, self.opts.image, self.opts.kernel.kernel, passed=True,
                                     kernel=self.kernel_info(), timings=self.timings, digests=self.digests,
                                     extra={"accel": self.opts.accel.name, "log_dir": str(self.log_dir),
                                            "profile": self.opts.profile.name,
                                            "attachment": self.opts.profile.attach.name,
                                            "agent": self.agent_info()})
