"""A started guest: its lifecycle, the evidence of its boot, and the errors a boot fails with.

A `Guest` is only ever handed out started (`Guest.start(opts)`, or `check.booted`), so its
`vm` is always there. The phases (phases.py) wait through `waiting` (a `Wait`) and `guard`, which end
a boot within seconds when the console shows a fatal line or QEMU dies or stops, and fail through
`fail`, which records the phase's failed Outcome and gathers the evidence (the matched console
lines, the console tail, QEMU's stderr) into the error.

A wait follows the guest's progress (options.Budget). Progress is what only a guest getting somewhere
produces: a complete console line (kernel messages, systemd's unit lines; not its spinner, which rewrites
one line), a QMP event the guest caused (a virtio-serial port opened or closed, a NIC or RTC change, its
SHUTDOWN; not QEMU's answers to our commands), and what a phase notes (`note_progress`: systemd's job
queue changing). A guest silent for the budget's `silence` is hung (BootFailure, exit 1), unless the host
starved QEMU of CPU in that time (host.py); a boot still going at the `ceiling` is the host's failure
(HostOverloaded, exit 125), with the load average and what QEMU got of the CPU as evidence.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paramiko

from osbuilder import fs
from osbuilder.agent.client import AgentConnectionClosed, AgentError, AgentTimeout, ExecResult
from osbuilder.agent.protocol import AgentProtocol, Ready
from osbuilder.errors import InfrastructureError, OsbuilderError, seconds
from osbuilder.layout import Workdir
from osbuilder.vm import host, records
from osbuilder.vm import ssh as ssh_mod
from osbuilder.vm.console import format_tail
from osbuilder.vm.options import CEILING, BootOptions, Budget, Budgets
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


class HostOverloaded(BootInfrastructureError):
    """The host, not the artifact, is why the boot did not finish: it starved the guest of CPU (exit 125;
    no reason to distrust KVM, and nothing a retry under TCG would help)."""


# QMP events QEMU sends of its own accord or on our commands: not the guest's progress.
HOST_EVENTS = frozenset({"RESUME", "STOP", "POWERDOWN", "QUORUM_REPORT_BAD", "JOB_STATUS_CHANGE"})


@dataclass(frozen=True)
class Progress:
    """The guest's latest sign of getting somewhere."""

    at: float  # seconds since QEMU started
    what: str

    def __str__(self) -> str:
        return f"{self.what} at {self.at:.1f}s"


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
        self.host = host.Monitor(None)  # what the host gives QEMU (Guest.start samples the real process)
        self.host_share: host.Share | None = None  # ... over the whole boot, once closed
        self._noted = Progress(0.0, "QEMU started")
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
        guest.host = host.Monitor(vm.pid).start()
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
        if self.host_share is None:
            self.host_share = self.host.share(self.vm.t0)
        self.host.stop()
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
        deadline = time.monotonic() + timeout
        mark = self.request_agent_poweroff(min(10.0, timeout))
        return self.vm.wait_shutdown(max(0.0, deadline - time.monotonic()), since=mark)

    def request_agent_poweroff(self, timeout: float) -> int:
        """Send `poweroff` to the agent; the index of QMP's next event (where to look for SHUTDOWN). A lost
        reply is no error (see `agent_poweroff`); ok:false raises AgentError."""
        if self.agent is None:
            raise AgentError("the agent is not connected")
        mark = len(self.vm.qmp.events)
        try:
            self.agent.poweroff(timeout=timeout)
        except (AgentTimeout, AgentConnectionClosed) as e:
            log.info("boot: %s: no reply to poweroff (%s); waiting for SHUTDOWN", self.opts.name, e)
        return mark

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

    def fail(self, phase: str, reason: str, extra: str = "", infrastructure: bool = False,
             since: float | None = None, overloaded: bool = False) -> OsbuilderError:
        """Build (and record) the error for a failed phase, with the console evidence. `since` (a
        time.monotonic()) marks a failure by waiting (a request the guest did not answer in time): when the
        host starved QEMU since then, the failure is the host's (HostOverloaded), not the phase's."""
        share = self.starved(since) if since is not None else None
        if share is not None:
            return self.overloaded(phase, f"the guest did not answer in time ({reason})", share, extra)
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
        cls = HostOverloaded if overloaded else BootInfrastructureError if infrastructure else BootFailure
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

    def wait_until(self, phase: str, done: Callable[[], bool], budget: Budget, what: str) -> None:
        """Wait for `done()` while guarding and while the guest makes progress (`waiting`). Once `done()`,
        the phase has passed: a fatal line that came after what it waited for (an initrd's init failing
        right after the root was mounted) belongs to the next phase, whose guard reports it."""
        console = self.vm.console
        wait = self.waiting(phase, budget, what)
        while not done():
            wait.check()
            console.wait(lambda: done() or console.fatal is not None, wait.slice())

    def waiting(self, phase: str, budget: Budget, what: str, diagnostics: Callable[[], str] | None = None) -> Wait:
        """A wait of `phase` for `what`, within `budget`, from now (see `Wait`)."""
        return Wait(self, phase, budget, what, diagnostics)

    # -- progress and the host ---------------------------------------------------------------

    def note_progress(self, what: str) -> None:
        """A sign of progress only a phase sees (systemd's job queue changing, say)."""
        self._noted = Progress(self.now(), what)

    def last_progress(self) -> Progress:
        """The guest's latest progress: its latest console line, QMP event or noted progress."""
        latest = [self._noted]
        line = self.vm.console.last_line
        if line is not None:
            latest.append(Progress(round(line[0], 3), f"console line {line[1][:100]!r}"))
        qmp = self.vm.qmp
        n = min(len(qmp.events), len(qmp.arrived))  # both lists only grow (the QMP thread appends to them)
        for event, at in zip(reversed(qmp.events[:n]), reversed(qmp.arrived[:n]), strict=True):
            if event.get("event") not in HOST_EVENTS:
                latest.append(Progress(at, f"QMP event {event.get('event')}"))
                break
        return max(latest, key=lambda p: p.at)

    def starved(self, since: float) -> host.Share | None:
        """What the host gave QEMU since `since` (a time.monotonic()), when that was starving it; else None."""
        share = self.host.share(since)
        return share if share is not None and share.starved else None

    def overloaded(self, phase: str, reason: str, share: host.Share | None, extra: str = "") -> OsbuilderError:
        """The failure of a boot the host starved or slowed down (exit 125): the load and what QEMU got."""
        whole = self.host.share(self.vm.t0)
        load = whole or share
        headline = (f"the host is overloaded (load average {load.load[0]:.2f} on {load.cpus} CPUs): {reason}"
                    if load is not None else f"the host is overloaded: {reason}")
        evidence = [f"host: {s.describe()}" for s in (share, whole) if s is not None]
        evidence.append(f"the guest's last progress: {self.last_progress()}")
        return self.fail(phase, headline, "\n".join([*evidence, *([extra] if extra else [])]), infrastructure=True,
                         overloaded=True)

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
        started = time.monotonic()
        try:
            return self.agent.exec(argv, timeout)
        except AgentError as e:
            self.settle(phase)
            raise self.fail(phase, f"agent exec {argv[0]!r} failed: {e}",
                            since=started if isinstance(e, AgentTimeout) else None)

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
        started = time.monotonic()
        try:
            if self.command_ssh is None:
                wait = self.waiting(phase, replace(self.budgets.boot, from_start=False), "an SSH login")
                self.command_ssh = ssh_mod.connect(self.vm.host_port(22), self.opts.ssh_key, wait.left() + 10,
                                                   keep_going=wait.check)
                started = time.monotonic()
            command = f"timeout -s KILL {max(1, round(timeout))} {shlex.join(argv)}"
            status, out, err = ssh_mod.run_command(self.command_ssh, command, timeout=timeout + 15)
        except (ssh_mod.SshError, OsbuilderError, OSError, paramiko.SSHException) as e:
            if isinstance(e, (BootFailure, BootInfrastructureError)):
                raise
            self.settle(phase)
            raise self.fail(phase, f"{argv[0]!r} over SSH failed: {e}",
                            since=started if isinstance(e, TimeoutError) else None)
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
            "arch": self.opts.arch.name,
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
            "host": self.host_record(),
            "passed": self.passed,
            "failure": self.failure,
            "qemu_pid": self.vm.pid,
            "command": self.vm.command,
            "log_dir": str(self.log_dir),
        }

    def host_record(self) -> dict[str, Any] | None:
        """What the host gave QEMU over the boot (host.py), as boot.json records it."""
        share = self.host_share or self.host.share(self.vm.t0)
        if share is None:
            return None
        return {"seconds": round(share.seconds, 1), "qemu_ran": round(share.ran, 1),
                "qemu_waited": round(share.waited, 1), "stolen": round(share.stolen, 1),
                "load_average": [round(x, 2) for x in share.load], "cpus": share.cpus,
                "cpu_pressure": share.pressure}

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
                                            "arch": self.opts.arch.name,
                                            "profile": self.opts.profile.name,
                                            "attachment": self.opts.profile.attach.name,
                                            "agent": self.agent_info()})


class Wait:
    """One phase's wait for the guest within a Budget, from its creation. Between tries, `check()` raises:

    * what `guard` raises (a fatal console line, QEMU gone or paused), at once;
    * BootFailure, the guest hung, once it has shown no progress for the budget's `silence` (counted from
      the wait's start at the earliest) and the host did not starve QEMU in that time;
    * HostOverloaded at the budget's ceiling: the guest was still making progress, or the host starving it.

    `slice()` is how long to block before the next check; `diagnostics()`, if given, adds to a hung error.
    """

    def __init__(self, guest: Guest, phase: str, budget: Budget, what: str,
                 diagnostics: Callable[[], str] | None = None) -> None:
        self.guest, self.phase, self.budget, self.what = guest, phase, budget, what
        self.diagnostics = diagnostics
        self.started = time.monotonic()
        self.deadline = (guest.vm.t0 if budget.from_start else self.started) + budget.ceiling
        self.starving = False  # the silence ran out while the host was starving QEMU (logged once)

    def quiet_since(self) -> float:
        """Since when (time.monotonic()) the guest has shown no progress, as far as this wait is concerned."""
        return max(self.started, self.guest.vm.t0 + self.guest.last_progress().at)

    def left(self) -> float:
        """Seconds to the ceiling."""
        return max(0.0, self.deadline - time.monotonic())

    def slice(self, cap: float = 1.0) -> float:
        """How long to block for before the next `check()`: at most `cap`, and not past a budget's end."""
        now = time.monotonic()
        ends = [cap, self.deadline - now]
        to_silence = self.quiet_since() + self.budget.silence - now
        if to_silence > 0:
            ends.append(to_silence)
        return max(0.01, min(ends))

    def check(self, guard: bool = True) -> None:
        g = self.guest
        if guard:
            g.guard(self.phase)
        now = time.monotonic()
        silence = self.budget.silence
        at_ceiling = now >= self.deadline
        if now - self.quiet_since() < silence and not at_ceiling:
            return
        if now - g.vm.t0 - g.last_progress().at < silence:
            raise self._ceiling(now)  # at the ceiling, and the guest is still getting somewhere
        share = g.host.share(now - silence)
        if share is None or not share.starved:
            raise self._hung(now, share)
        if at_ceiling:
            raise self._ceiling(now)
        if not self.starving:
            self.starving = True
            log.warning("boot: %s: %s: no progress from the guest for %s, but the host is starving it (%s); "
                        "waiting up to %s after %s", g.opts.name, self.phase, seconds(silence), share.describe(),
                        seconds(self.budget.ceiling), "QEMU's start" if self.budget.from_start else "the phase's")

    def _hung(self, now: float, share: host.Share | None) -> OsbuilderError:
        g = self.guest
        last = g.last_progress()
        reason = (f"timed out after {seconds(self.budget.silence)} waiting for {self.what}: no progress from the "
                  f"guest for {seconds(now - g.vm.t0 - last.at)} (last: {last})")
        extra = [self.diagnostics()] if self.diagnostics else []
        if share is not None:
            extra.append(f"host (not starving the guest): {share.describe()}")
        return g.fail(self.phase, reason, "\n".join(e for e in extra if e))

    def _ceiling(self, now: float) -> OsbuilderError:
        g = self.guest
        last = g.last_progress()
        silent = now - g.vm.t0 - last.at
        since = "QEMU's start" if self.budget.from_start else "the phase's start"
        still = ("while the guest kept making progress" if silent < self.budget.silence else
                 f"while the host starved the guest (no progress for {seconds(silent)})")
        rule = f", {CEILING:g} x BOOT_TIMEOUT" if self.budget.from_start else ""
        reason = (f"still waiting for {self.what} {seconds(self.budget.ceiling)} after {since} "
                  f"(the ceiling{rule}) {still}")
        return g.overloaded(self.phase, reason, g.host.share(self.started))
