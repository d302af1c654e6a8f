"""The boot check: boot an image and prove, phase by phase, that it works; fail fast with evidence.

Phases, in order, each with its own time budget (scaled from BOOT_TIMEOUT) and named in errors:
kernel (the kernel prints "Linux version"), agent (answers ping on agent.channel.0), running
(`systemctl is-system-running --wait` says running; degraded lists the failed units with their
journal), exec (the agent runs a command and returns status and output), ssh (paramiko logs in
with the session key delivered as a systemd credential), powerdown (ACPI power button -> the
guest's own SHUTDOWN within a bound). While waiting, the console is watched: a panic, emergency
mode, an initramfs shell, a missing init or a KVM internal error ends the boot within seconds.

With the agent as init (`agent_init`, AGENT_INIT=yes) there is no systemd and no sshd: `init` is
proven by the agent reporting pid1 true, `running` and `ssh` are recorded as
"skipped: agent is init (...)" (and count as passed only for such a guest), and `powerdown`
sends the agent's `poweroff` request instead of pressing the ACPI button.

Each boot leaves console.log, qemu.log, qmp.jsonl, command.txt and boot.json (timings, phases,
verdict) in its log directory. A complete passing check writes the boot records (`records`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osbuilder.agent import AGENT_VERSION, PORT_NAME, SERVICE_NAME
from osbuilder.agent.client import AgentClient, AgentConnectionClosed, AgentError, AgentTimeout, ExecResult
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.settings import Settings
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import records, ssh
from osbuilder.vm.console import format_tail
from osbuilder.vm.debian_kernel import BootKernel
from osbuilder.vm.qemu import DEFAULT_ROOT_CMDLINE, QmpError, Vm, VmSpec, kernel_cmdline

log = logging.getLogger("osbuilder")

PHASES = ("kernel", "root", "init", "agent", "running", "exec", "ssh", "powerdown")
AGENT_GRACE = 0.15  # of BOOT_TIMEOUT: how long the agent may lag behind multi-user.target
EXPECTED_STATES = ("running",)
# Phases that do not apply when the agent is PID 1, with the status recorded for them.
AGENT_INIT_SKIPS = {
    "running": "skipped: agent is init (no systemd)",
    "ssh": "skipped: agent is init (no sshd)",
}
AGENT_STARTED = re.compile(r"osbuilder-agent: version \S+ starting as PID 1")


def phase_ok(phase: str, status: str | None, agent_init: bool) -> bool:
    """Whether a phase's recorded status counts towards a pass: "passed", or (only when the agent
    is init) the not-applicable skip recorded for `running` and `ssh`."""
    if status == "passed":
        return True
    return agent_init and status is not None and status == AGENT_INIT_SKIPS.get(phase)


@dataclass(frozen=True)
class Budgets:
    """Seconds each phase may take (kernel and agent count from QEMU's start)."""

    kernel: float
    root: float
    agent: float
    agent_grace: float
    running: float
    ssh: float
    powerdown: float

    @classmethod
    def from_timeout(cls, timeout: float) -> Budgets:
        return cls(kernel=timeout * 0.25, root=timeout * 0.5, agent=timeout,
                   agent_grace=max(15.0, timeout * AGENT_GRACE), running=timeout * 0.5, ssh=timeout * 0.5,
                   powerdown=max(20.0, timeout * 0.25))


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


@dataclass
class BootOptions:
    image: Path
    kernel: BootKernel
    log_dir: Path
    accel: accel_mod.Accel
    memory: int = 1024
    cpus: int = 1
    timeout: float = 120
    append: str = ""
    root_cmdline: str = DEFAULT_ROOT_CMDLINE
    ssh_key: ssh.SessionKey | None = None
    name: str = "boot"
    agent_init: bool = False  # the agent is PID 1: no systemd phases

    @property
    def cmdline(self) -> str:
        return kernel_cmdline(self.append, self.root_cmdline)

    def spec(self) -> VmSpec:
        creds = {ssh.CREDENTIAL: self.ssh_key.public} if self.ssh_key else {}
        return VmSpec(kernel=self.kernel.kernel, initrd=self.kernel.initrd, cmdline=self.cmdline,
                      image=self.image, accel=self.accel.name, memory=self.memory, cpus=self.cpus,
                      credentials=creds)


SPAN = re.compile(r"(?P<num>\d+(?:\.\d+)?)(?P<unit>min|ms|us|h|s)")
STARTUP = re.compile(r"Startup finished in (?P<parts>.*?) = (?P<total>[^\n]+?)\s*$", re.MULTILINE)
UNIT_SECONDS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def parse_span(text: str) -> float:
    """systemd's time span ("1min 2.5s", "865ms") in seconds."""
    return round(sum(float(m["num"]) * UNIT_SECONDS[m["unit"]] for m in SPAN.finditer(text)), 3)


def parse_startup(text: str) -> dict[str, float]:
    """`systemd-analyze` output -> {"kernel": s, "initrd": s, "userspace": s, "total": s}."""
    m = STARTUP.search(text)
    if not m:
        return {}
    out = {}
    for part in m["parts"].split(" + "):
        label = re.search(r"\((\w+)\)", part)
        if label:
            out[label.group(1)] = parse_span(part)
    out["total"] = parse_span(m["total"])
    return out


def parse_failed_units(text: str) -> list[str]:
    """Unit names from `systemctl list-units --failed --no-legend --plain`."""
    names = []
    for line in text.splitlines():
        words = line.replace("●", " ").split()
        if words:
            names.append(words[0])
    return names


@dataclass
class Guest:
    """One booting guest and the checks run on it. Use as a context manager."""

    opts: BootOptions
    vm: Vm | None = None
    agent: AgentClient | None = None
    ssh_client: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    guest_startup: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    failure: str = ""
    powerdown_seconds: float | None = None
    agent_started_at: float | None = None  # agent_init: its "starting as PID 1" console line

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(graceful=0 if exc_type is not None else None)

    def start(self) -> None:
        self.started_at = time.time()
        self.vm = Vm(self.opts.spec(), self.opts.log_dir)
        if self.opts.agent_init:
            self.vm.console.on_change(self._note_agent_started)
        self.vm.__enter__()
        self.timings["qemu_start"] = 0.0
        log.info("boot: %s: QEMU pid %s (%s), logs in %s", self.opts.name, self.vm.pid, self.opts.accel.name,
                 self.opts.log_dir)

    def _note_agent_started(self) -> None:
        """Console listener (reader thread): when the agent, as PID 1, logs that it starts."""
        if self.agent_started_at is not None or self.vm is None:
            return
        last = self.vm.console.tail(1)
        if last and AGENT_STARTED.search(last[0]):
            self.agent_started_at = self.now()  # merged into timings by collect_console_timings

    def close(self, graceful: float | None = None) -> None:
        """Stop the guest (power button first, unless it failed or `graceful` is 0) and write boot.json."""
        if self.ssh_client is not None:
            self.ssh_client.close()
        grace = graceful if graceful is not None else (0 if self.failure else 10)
        if (self.opts.agent_init and grace > 0 and self.agent is not None and self.vm is not None
                and self.vm.alive() and self.vm.shutdown_event is None):
            try:  # nothing in the guest handles the ACPI button: ask the agent (PID 1) instead
                self._agent_poweroff(grace)
            except (AgentError, QmpError):
                pass
            grace = 0  # no point pressing the power button afterwards
        if self.agent is not None:
            self.agent.close()
        if self.vm is not None:
            self.vm.stop(graceful=grace)
        self.collect_console_timings()
        self.write_boot_json()

    @property
    def log_dir(self) -> Path:
        return self.opts.log_dir

    def now(self) -> float:
        assert self.vm is not None
        return round(time.monotonic() - self.vm.t0, 3)

    # -- failure handling -----------------------------------------------------------------

    def fail(self, phase: str, reason: str, extra: str = "", infrastructure: bool = False) -> OsbuilderError:
        """Build (and remember) the error for a failed phase, with the console evidence."""
        self.phases[phase] = f"failed: {reason}"
        self.failure = f"{phase}: {reason}"
        parts = [extra] if extra else []
        if self.vm is not None:
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
        assert self.vm is not None
        for watcher in (self.vm.stderr, self.vm.console):
            hit = watcher.fatal
            if hit is not None:
                self.vm.console.wait(lambda: self.vm.console.closed, 1.5)  # let the evidence arrive
                raise self.fail(phase, hit.reason, f"matched ({hit.source}, {hit.at:.1f}s): {hit.line}",
                                hit.infrastructure)
        if not self.vm.alive():
            self.vm.console.join(2)
            self.vm.stderr.join(2)
            for watcher in (self.vm.stderr, self.vm.console):  # the last lines may hold the cause
                if watcher.fatal is not None:
                    return self.guard(phase)
            events = self.vm.qmp.event_names()
            code = self.vm.proc.returncode if self.vm.proc else "?"
            raise self.fail(phase, f"QEMU exited unexpectedly (exit {code}; events: {', '.join(events) or 'none'})")
        if "STOP" in self.vm.qmp.event_names():
            raise self.fail(phase, "the VM stopped (QEMU paused it: internal error?)", infrastructure=True)

    def settle(self, phase: str, seconds: float = 3.0) -> None:
        """After a lost connection: give QEMU and the console a moment to show why, then guard."""
        assert self.vm is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.vm.alive() and self.vm.console.fatal is None:
            time.sleep(0.1)
        self.guard(phase)

    def wait_until(self, phase: str, done: Callable[[], bool], budget: float, what: str) -> None:
        """Wait for `done()` while guarding; BootFailure naming the phase on timeout."""
        assert self.vm is not None
        deadline = time.monotonic() + budget
        while True:
            self.guard(phase)
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail(phase, f"timed out after {budget:.0f}s waiting for {what}")
            self.vm.console.wait(lambda: done() or self.vm.console.fatal is not None, min(1.0, left))

    # -- phases ---------------------------------------------------------------------------

    def wait_kernel(self) -> None:
        """The kernel starts and prints its banner."""
        assert self.vm is not None
        b = Budgets.from_timeout(self.opts.timeout)
        self.wait_until("kernel", lambda: "linux_version" in self.vm.console.milestones, b.kernel,
                        "the kernel's 'Linux version' banner on the console")
        self.phases["kernel"] = "passed"

    def wait_root(self) -> None:
        """The kernel mounts the root filesystem (read-only is verified in `check_exec`)."""
        assert self.vm is not None
        b = Budgets.from_timeout(self.opts.timeout)
        self.wait_until("root", lambda: "root_mounted" in self.vm.console.milestones, b.root,
                        "the kernel to mount /dev/vda1 ('EXT4-fs (vda1): mounted filesystem')")
        self.phases["root"] = "passed"

    def wait_init(self) -> None:
        """The root filesystem's init (systemd) starts. When the agent is init, the phase passes in
        `wait_agent`, once the agent answers and reports that it is PID 1."""
        assert self.vm is not None
        if self.opts.agent_init:
            self.guard("init")
            return
        b = Budgets.from_timeout(self.opts.timeout)
        self.wait_until("init", lambda: "systemd_started" in self.vm.console.milestones, b.root,
                        "systemd to start ('Welcome to' / 'systemd[1]' on the console)")
        self.phases["init"] = "passed"

    def wait_agent(self) -> str:
        """The agent answers ping on agent.channel.0; returns its version."""
        assert self.vm is not None
        b = Budgets.from_timeout(self.opts.timeout)
        deadline = self.vm.t0 + b.agent
        client = self._connect_agent(deadline)
        while True:
            self.guard(self._agent_phase())
            self._check_agent_lag(b)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail("agent", f"no answer from the agent on {PORT_NAME} within {b.agent:.0f}s",
                                self._agent_diagnostics())
            try:
                version = client.wait_ready(min(1.0, left), try_timeout=0.5)
                break
            except AgentTimeout:
                continue
            except AgentConnectionClosed as e:
                self.settle("agent")
                raise self.fail("agent", f"the agent's socket closed: {e}")
        self.timings["agent_ready"] = self.now()
        self.collect_console_timings()
        if version != AGENT_VERSION:
            raise self.fail("agent", f"agent version {version!r}, expected {AGENT_VERSION!r}")
        if self.opts.agent_init:
            self._check_agent_is_init(client)
        self.phases["agent"] = "passed"
        return version

    def _agent_phase(self) -> str:
        """The phase a fatal console line fails while waiting for the agent: "init" when the agent
        is init and the kernel (or the initramfs) found no init to run, else "agent"."""
        fatal = self.vm.console.fatal if self.vm is not None else None
        if self.opts.agent_init and fatal is not None and fatal.reason == "no init to run":
            return "init"
        return "agent"

    def _check_agent_is_init(self, client: AgentClient) -> None:
        """AGENT_INIT=yes: the agent that answers must be the guest's PID 1."""
        try:
            info = client.version(10)
        except AgentError as e:
            self.settle("init")
            raise self.fail("init", f"the agent answered ping but not `version`: {e}")
        if info.get("pid1") is not True:
            raise self.fail("init", "the agent answers but is not PID 1 (version says pid1 "
                            f"{info.get('pid1')!r}): /sbin/init did not run the agent")
        self.phases["init"] = "passed"

    def _connect_agent(self, deadline: float) -> AgentClient:
        assert self.vm is not None
        if self.agent is None:
            try:
                self.agent = AgentClient.connect_unix(self.vm.paths.agent, max(1.0, deadline - time.monotonic()))
            except AgentError as e:
                raise self.fail("agent", f"cannot connect to the agent socket: {e}")
        return self.agent

    def _check_agent_lag(self, b: Budgets) -> None:
        """Fail early when systemd finished booting long ago and the agent still is silent."""
        assert self.vm is not None
        reached = self.vm.console.milestones.get("multi_user") or self.vm.console.milestones.get("login_prompt")
        if reached is not None and self.now() - reached > b.agent_grace:
            raise self.fail("agent", f"systemd reached multi-user.target {self.now() - reached:.0f}s ago but the "
                            f"agent ({SERVICE_NAME}) does not answer on {PORT_NAME}", self._agent_diagnostics())

    def _agent_diagnostics(self) -> str:
        """The agent unit's status over SSH, when the session key gets us in."""
        if self.opts.agent_init:
            return "(the agent is init: no systemd unit and no sshd to ask; see the console's osbuilder-agent lines)"
        if self.opts.ssh_key is None or self.vm is None or not self.vm.alive():
            return ""
        try:
            client = ssh.connect(self.vm.host_port(22), self.opts.ssh_key, timeout=15)
        except (ssh.SshError, OsbuilderError) as e:
            return f"(no SSH for diagnostics: {e})"
        try:
            cmd = (f"systemctl status {SERVICE_NAME} --no-pager -n 0; ls -l /usr/bin/osbuilder-agent "
                   f"/dev/virtio-ports/ 2>&1; journalctl -b -u {SERVICE_NAME} --no-pager -n 15")
            status, out, err = ssh.run_command(client, cmd, timeout=20)
            return format_tail((out + err).splitlines()[-40:], f"agent diagnostics over SSH ({SERVICE_NAME})")
        except Exception as e:  # noqa: BLE001 - diagnostics are best effort
            return f"(SSH diagnostics failed: {e})"
        finally:
            client.close()

    def exec(self, argv: list[str], timeout: float = 30, phase: str = "exec") -> ExecResult:
        """Run argv in the guest through the agent."""
        if self.agent is None:
            raise self.fail(phase, "the agent is not connected")
        try:
            return self.agent.exec(argv, timeout)
        except AgentError as e:
            self.settle(phase)
            raise self.fail(phase, f"agent exec {argv[0]!r} failed: {e}")

    def wait_running(self) -> str:
        """systemctl is-system-running --wait: running passes, degraded fails listing failed units."""
        if self.opts.agent_init:
            self.phases["running"] = AGENT_INIT_SKIPS["running"]
            return "agent-init"
        b = Budgets.from_timeout(self.opts.timeout)
        deadline = time.monotonic() + b.running
        state = ""
        while time.monotonic() < deadline:
            self.guard("running")
            slice_ = max(1.0, min(10.0, deadline - time.monotonic()))
            r = self.exec(["systemctl", "is-system-running", "--wait"], timeout=slice_, phase="running")
            state = r.stdout.strip()
            if not r.timed_out and state not in ("initializing", "starting", ""):
                break
        self.timings["system_running"] = self.now()
        self._analyze()
        if state in EXPECTED_STATES:
            self.phases["running"] = "passed"
            return state
        if state == "degraded":
            units, journal = self.failed_units()
            raise self.fail("running", f"systemd is degraded; failed units: {', '.join(units) or '(none listed)'}",
                            journal)
        reason = f"systemd state {state!r}" if state else f"systemd did not finish starting within {b.running:.0f}s"
        raise self.fail("running", reason)

    def failed_units(self) -> tuple[list[str], str]:
        """The failed units and their journal lines."""
        r = self.exec(["systemctl", "list-units", "--failed", "--no-legend", "--plain", "--no-pager"],
                      phase="running")
        units = parse_failed_units(r.stdout)
        chunks = []
        for unit in units[:10]:
            j = self.exec(["journalctl", "-b", "-u", unit, "--no-pager", "-n", "20", "-o", "short-monotonic"],
                          phase="running")
            chunks.append(format_tail(j.stdout.splitlines(), f"journal of {unit}"))
        return units, "\n".join(chunks)

    def _analyze(self) -> None:
        try:
            r = self.agent.exec(["systemd-analyze", "time"], 20) if self.agent else None
        except AgentError:
            return
        if r is not None and r.status == 0:
            self.guest_startup = parse_startup(r.stdout)
            kernel_at = self.vm.console.milestones.get("linux_version") if self.vm else None
            if "total" in self.guest_startup and kernel_at is not None:
                self.timings["startup_finished"] = round(kernel_at + self.guest_startup["total"], 3)

    def check_exec(self) -> ExecResult:
        """The agent runs a command and returns its exit status and both output streams."""
        r = self.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
        if (r.status, r.stdout, r.stderr) != (3, "out\n", "err\n"):
            raise self.fail("exec", f"exec returned status={r.status} stdout={r.stdout!r} stderr={r.stderr!r}, "
                            "expected 3, 'out\\n', 'err\\n'")
        self.phases["exec"] = "passed"
        options = self.root_mount_options()
        if "ro" not in options:
            raise self.fail("root", f"the root filesystem is mounted {','.join(options)}, not read-only")
        return r

    def root_mount_options(self) -> list[str]:
        r = self.exec(["findmnt", "-n", "-o", "OPTIONS", "/"], phase="exec")
        return r.stdout.strip().split(",")

    def wait_ssh(self) -> Any:
        """Log in over SSH with the session key; the host key must be the one the guest made.
        Not applicable (recorded as skipped, returns None) when the agent is init: no sshd."""
        if self.opts.agent_init:
            self.phases["ssh"] = AGENT_INIT_SKIPS["ssh"]
            return None
        if self.opts.ssh_key is None:
            raise self.fail("ssh", "no session key was delivered to this guest")
        assert self.vm is not None
        b = Budgets.from_timeout(self.opts.timeout)
        host_key = None
        if self.agent is not None:
            r = self.exec(["cat", "/run/osbuilder/ssh/ssh_host_ed25519_key.pub"], phase="ssh")
            host_key = r.stdout.strip() if r.status == 0 else None
        try:
            port = self.vm.host_port(22)
            self.ssh_client = ssh.connect(port, self.opts.ssh_key, b.ssh, host_key=host_key,
                                          keep_going=lambda: self.guard("ssh"))
            status, out, _ = ssh.run_command(self.ssh_client, "id -un; systemctl is-system-running", timeout=30)
        except (ssh.SshError, OsbuilderError) as e:
            if isinstance(e, (BootFailure, BootInfrastructureError)):
                raise
            raise self.fail("ssh", str(e))
        if out.split()[:1] != ["root"]:
            raise self.fail("ssh", f"logged in, but `id -un` said {out!r}")
        self.timings["ssh_ready"] = self.now()
        self.phases["ssh"] = "passed"
        return self.ssh_client

    def powerdown(self) -> dict[str, Any]:
        """ACPI power button (the agent's `poweroff` request when the agent is init); the guest must
        shut itself down within the bound."""
        assert self.vm is not None
        b = Budgets.from_timeout(self.opts.timeout)
        if self.ssh_client is not None:
            self.ssh_client.close()
            self.ssh_client = None
        requested = self.now()
        self.timings["powerdown_requested"] = requested
        how = "the agent's poweroff request" if self.opts.agent_init else "system_powerdown"
        try:
            if self.opts.agent_init:
                if self.agent is None:
                    raise self.fail("powerdown", "the agent is not connected (it powers off a guest it is init of)")
                event = self._agent_poweroff(b.powerdown)
            else:
                event = self.vm.powerdown(b.powerdown)
        except QmpError as e:
            raise self.fail("powerdown", str(e))
        except AgentError as e:
            raise self.fail("powerdown", f"the agent refused to power off: {e}")
        if event is None:
            self.guard("powerdown")
            raise self.fail("powerdown", f"no SHUTDOWN within {b.powerdown:.0f}s of {how}")
        data = event.get("data", {})
        if not data.get("guest") or data.get("reason") != "guest-shutdown":
            raise self.fail("powerdown", f"unexpected shutdown: {data}")
        self.timings["shutdown"] = self.now()
        self.powerdown_seconds = round(self.timings["shutdown"] - requested, 3)
        self.phases["powerdown"] = "passed"
        return event

    def _agent_poweroff(self, timeout: float) -> dict[str, Any] | None:
        """Send `poweroff` to the agent (PID 1) and wait for QEMU's SHUTDOWN event (None on timeout).

        The reply may be lost if the guest is faster than the socket: a timeout or a closed
        connection is not an error here, the SHUTDOWN event decides. ok:false raises AgentError."""
        assert self.vm is not None and self.agent is not None
        deadline = time.monotonic() + timeout
        mark = len(self.vm.qmp.events)
        try:
            self.agent.poweroff(timeout=min(10.0, timeout))
        except (AgentTimeout, AgentConnectionClosed) as e:
            log.info("boot: %s: no reply to poweroff (%s); waiting for SHUTDOWN", self.opts.name, e)
        return self.vm.wait_shutdown(max(0.0, deadline - time.monotonic()), since=mark)

    # -- results --------------------------------------------------------------------------

    @property
    def passed(self) -> bool:
        return all(phase_ok(p, self.phases.get(p), self.opts.agent_init) for p in PHASES)

    def collect_console_timings(self) -> None:
        if self.vm is None:
            return
        names = {"first_byte": "first_console_byte", "linux_version": "kernel_handoff",
                 "init_started": "init_started", "root_mounted": "root_mounted",
                 "systemd_started": "systemd_started",
                 "multi_user": "multi_user_target"}
        for milestone, key in names.items():
            at = self.vm.console.milestones.get(milestone)
            if at is not None:
                self.timings.setdefault(key, round(at, 3))
        if self.agent_started_at is not None:
            self.timings.setdefault("agent_started", self.agent_started_at)

    def kernel_info(self) -> dict[str, Any]:
        k = self.opts.kernel
        return {"kind": k.name, "path": str(k.kernel), "initrd": str(k.initrd) if k.initrd else None,
                "version": k.version, "cmdline": self.opts.cmdline}

    def record(self) -> dict[str, Any]:
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
            "phases": {p: self.phases.get(p, "not run") for p in PHASES},
            "passed": self.passed,
            "failure": self.failure,
            "qemu_pid": self.vm.pid if self.vm else None,
            "command": self.vm.command if self.vm else [],
            "log_dir": str(self.log_dir),
        }

    def write_boot_json(self) -> Path:
        path = self.log_dir / "boot.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record(), indent=2) + "\n")
        return path

    def write_passing_records(self, workdir: Path) -> list[Path]:
        """Boot records for the image and kernel, only when every phase passed."""
        if not self.passed:
            return []
        return records.write_records(workdir, self.opts.image, self.opts.kernel.kernel, passed=True,
                                     kernel=self.kernel_info(), timings=self.timings,
                                     extra={"accel": self.opts.accel.name, "log_dir": str(self.log_dir)})


def boot_to_ready(guest: Guest) -> None:
    """Every phase but powerdown: kernel, agent, running, exec, ssh (when a key was given, or
    recorded as skipped when the agent is init)."""
    guest.wait_kernel()
    guest.wait_root()
    guest.wait_init()
    guest.wait_agent()
    guest.wait_running()
    guest.check_exec()
    if guest.opts.ssh_key is not None or guest.opts.agent_init:
        guest.wait_ssh()
    guest.collect_console_timings()


def run_check(opts: BootOptions, settings: Settings) -> dict[str, Any]:
    """The whole check, once; returns the boot record. Writes boot records when it passes."""
    with Guest(opts) as guest:
        boot_to_ready(guest)
        guest.powerdown()
    guest.write_passing_records(settings.workdir)
    return guest.record()


def with_kvm_fallback(opts: BootOptions, settings: Settings, fn: Callable[[BootOptions], Any]) -> Any:
    """Run `fn(opts)`; if KVM (chosen by ACCEL=auto) fails there, distrust it and retry under TCG."""
    try:
        return fn(opts)
    except InfrastructureError as e:
        if opts.accel.name != "kvm" or not opts.accel.auto:
            raise
        log.warning("boot: KVM failed (%s); retrying under TCG", e.message)
        accel_mod.distrust_kvm(settings, e.message)
        opts.accel = accel_mod.Accel("tcg", f"KVM failed during a boot: {e.message}", True)
        opts.log_dir = opts.log_dir.with_name(opts.log_dir.name + "-tcg")
        return fn(opts)


@contextmanager
def booted(opts: BootOptions, settings: Settings) -> Iterator[Guest]:
    """A guest booted through every phase but powerdown (KVM falling back to TCG), stopped on exit."""
    guests: list[Guest] = []

    def boot(o: BootOptions) -> Guest:
        guest = Guest(o)
        guests.append(guest)
        guest.start()
        try:
            boot_to_ready(guest)
        except BaseException:
            guest.close(graceful=0)
            raise
        return guest

    try:
        yield with_kvm_fallback(opts, settings, boot)
    finally:
        for guest in guests:
            guest.close()
