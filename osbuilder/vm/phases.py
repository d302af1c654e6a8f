"""The boot check's phases, one function each; each records the phase's Outcome on the guest.

In order, each named in its errors:

    kernel     the kernel prints "Linux version"
    root       the kernel mounts the root filesystem (the profile's attachment says which)
    init       the root filesystem's init starts: systemd's banner, or, when the agent is PID 1,
               the agent reporting pid1 (proven in `agent`, once it answers)
    agent      the agent answers ping on its port with the expected version
    running    `systemctl is-system-running --wait` says running; degraded lists the failed units
               with their journal
    exec       the agent runs a command and returns status and output; the root is read-only and,
               for a DAX attachment (nvdimm with a DAX header), mounted with DAX (prove_dax)
    ssh        paramiko logs in with the session key delivered as a systemd credential
    powerdown  the guest shuts itself down within a bound after the ACPI power button (or, when the
               agent is PID 1, its `poweroff` request)

While a phase waits, the guest's guard watches the console: a panic, emergency mode, an initramfs
shell, a missing init or a KVM internal error ends the boot within seconds. How long a phase waits
follows the guest's progress (options.Budget, guest.Wait, from BOOT_TIMEOUT): a guest that keeps
printing is slow, not hung, up to the boot's ceiling (then the host is at fault, exit 125); a silent
one is hung, unless the host is starving it. `run(guest, phase)` runs a phase the guest's profile's
way: a phase the profile skips is recorded as skipped, not run.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import paramiko

from osbuilder.agent import AGENT_VERSION
from osbuilder.agent.client import AgentClient, AgentConnectionClosed, AgentError, AgentTimeout, ExecResult
from osbuilder.errors import OsbuilderError
from osbuilder.vm import ssh as ssh_mod
from osbuilder.vm.console import format_tail
from osbuilder.vm.guest import BootFailure, BootInfrastructureError, Guest, Wait
from osbuilder.vm.options import Budgets
from osbuilder.vm.profiles import Outcome
from osbuilder.vm.qemu import QmpError
from osbuilder.vm.systemd import parse_failed_units, parse_startup

log = logging.getLogger("osbuilder")

EXPECTED_STATES = ("running",)
GUEST_HOST_KEY = "/run/osbuilder/ssh/ssh_host_ed25519_key.pub"


def kernel(guest: Guest) -> None:
    """The kernel starts and prints its banner."""
    milestones = guest.vm.console.milestones
    guest.wait_until("kernel", lambda: "linux_version" in milestones, guest.budgets.boot,
                     "the kernel's 'Linux version' banner on the console")
    guest.phases["kernel"] = Outcome.passed()


def root(guest: Guest) -> None:
    """The kernel mounts the root filesystem (read-only is verified in `exec`)."""
    attach = guest.profile.attach
    milestones = guest.vm.console.milestones
    guest.wait_until("root", lambda: attach.root_milestone in milestones, guest.budgets.boot, attach.root_awaited)
    guest.phases["root"] = Outcome.passed()


def init(guest: Guest) -> None:
    """The root filesystem's init (systemd) starts. When the agent is init, the phase passes in
    `agent`, once the agent answers and reports that it is PID 1."""
    if guest.profile.agent_is_init:
        guest.guard("init")
        return
    milestones = guest.vm.console.milestones
    guest.wait_until("init", lambda: "systemd_started" in milestones, guest.budgets.boot,
                     "systemd to start ('Welcome to' / 'systemd[1]' on the console)")
    guest.phases["init"] = Outcome.passed()


def agent(guest: Guest) -> str:
    """The agent answers over its protocol (osbuilder's ping, Kata's grpc.Health Check, hyperstart's
    READY and PING/ACK, ...); returns its own version ("" when the protocol cannot tell). An agent that
    opened its port and does not answer over the protocol for SPEAK_GRACE seconds fails at once: it
    speaks another protocol, or none. One that systemd could not run (203/EXEC on the console) fails as
    soon as systemd says so."""
    b = guest.budgets
    protocol = guest.protocol
    wait = guest.waiting("agent", b.boot, f"the agent to answer over the {protocol.name} protocol ({where(guest)})",
                         lambda: _agent_diagnostics(guest))
    client = _connect_agent(guest, wait)
    while True:
        guest.guard(_phase_while_agent_is_silent(guest))
        _check_agent_runs(guest)
        wait.check()
        _check_agent_lag(guest, b)
        _check_agent_speaks(guest)
        try:
            ready = protocol.wait_ready(client, wait.slice())
            break
        except AgentTimeout:
            continue
        except AgentConnectionClosed as e:
            guest.settle("agent")
            raise guest.fail("agent", f"the agent's connection closed: {e}")
    guest.agent_ready = ready
    guest.timings["agent_ready"] = guest.now()
    guest.collect_console_timings()
    if guest.opts.agent.osbuilders_own and ready.version != AGENT_VERSION:
        raise guest.fail("agent", f"agent version {ready.version!r}, expected {AGENT_VERSION!r}")
    if guest.profile.agent_is_init:
        _prove_agent_is_init(guest, client)
    guest.phases["agent"] = Outcome.passed()
    return ready.version


SPEAK_GRACE = 8.0  # seconds an agent that opened its port may take to answer over its protocol


def where(guest: Guest) -> str:
    """Where the agent is expected, for messages: its unit and its port(s) or vsock port."""
    a = guest.opts.agent
    ports = ", ".join(a.protocol.serial_ports) or f"vsock port {a.protocol.vsock_port}"
    return f"{a.service} on {ports}"


def past_grace(guest: Guest, since: float, grace: float) -> tuple[bool, str]:
    """Whether `grace` seconds of the CPU the guest asked for have passed since `since` (seconds after
    QEMU's start), and how long that took when the host starved the guest (for the message). Wall-clock
    seconds, except while the host starves the guest (host.Share.starved): then the agent may just be
    slow, and the wait stretches by the share of the CPU QEMU got (Share.given: at a third, three times
    `grace`), so it still ends before the boot's ceiling blames the host for a silent agent."""
    silent = guest.now() - since
    if silent <= grace:
        return False, ""
    share = guest.starved(guest.vm.t0 + since)
    if share is None:
        return True, ""
    why = f"; {silent:.0f}s here, the host giving QEMU {share.given:.0%} of the CPU it asked for"
    return silent * share.given > grace, why


def _check_agent_runs(guest: Guest) -> None:
    """Fail at once when systemd said on the console that the agent's unit could not run its program (status
    203/EXEC: missing, not executable, for another architecture): restarting the unit will not change that."""
    a = guest.opts.agent
    line = guest.vm.console.exec_failed.get(a.service)
    if line is None:
        return
    raise guest.fail("agent", f"systemd could not run the agent ({a.service}, /usr/bin/{a.name}): status "
                     "203/EXEC, the program is missing or cannot be executed in the guest",
                     format_tail([line], "systemd on the console"))


def _check_agent_speaks(guest: Guest) -> None:
    """Fail when the guest opened the agent's first port SPEAK_GRACE seconds ago (QMP's VSERPORT_CHANGE;
    seconds of the CPU the guest asked for, see past_grace) and the agent has not answered over the
    protocol: it speaks another one (a wrong first byte broke its session, or it ignores ours)."""
    ports = guest.protocol.serial_ports
    opened = guest.vm.port_opened_at(ports[0]) if ports else None
    if opened is None:
        return
    spent, starved = past_grace(guest, opened, SPEAK_GRACE)
    if not spent:
        return
    guest.timings["agent_gave_up"] = guest.now()  # before the diagnostics, which take seconds over SSH
    a = guest.opts.agent
    raise guest.fail("agent", f"the agent ({a.service}, /usr/bin/{a.name}) opened {ports[0]} at {opened:.1f}s "
                     f"but did not answer over the {guest.protocol.name} protocol within {SPEAK_GRACE:.0f}s{starved} "
                     "(set AGENT_PROTOCOL to the protocol it speaks)", _agent_diagnostics(guest))


def _phase_while_agent_is_silent(guest: Guest) -> str:
    """The phase a fatal console line fails while waiting for the agent: "init" when the agent
    is init and the kernel (or the initramfs) found no init to run, else "agent"."""
    fatal = guest.vm.console.fatal
    if guest.profile.agent_is_init and fatal is not None and fatal.reason == "no init to run":
        return "init"
    return "agent"


def _prove_agent_is_init(guest: Guest, client: AgentClient) -> None:
    """The agent that answers must be the guest's PID 1: that passes `init`."""
    try:
        info = client.version(10)
    except AgentError as e:
        guest.settle("init")
        raise guest.fail("init", f"the agent answered ping but not `version`: {e}")
    if info.get("pid1") is not True:
        raise guest.fail("init", "the agent answers but is not PID 1 (version says pid1 "
                         f"{info.get('pid1')!r}): /sbin/init did not run the agent")
    guest.phases["init"] = Outcome.passed()


def _connect_agent(guest: Guest, wait: Wait) -> Any:
    if guest.agent is None:
        try:
            guest.agent = guest.protocol.connect(guest.vm.paths.port, guest.opts.vsock_cid, max(1.0, wait.left()))
        except AgentError as e:
            raise guest.fail("agent", f"cannot connect to the agent ({where(guest)}): {e}")
    return guest.agent


def _check_agent_lag(guest: Guest, b: Budgets) -> None:
    """Fail early when systemd finished booting `agent_grace` ago (seconds of the CPU the guest asked for,
    see past_grace) and the agent still is silent."""
    milestones = guest.vm.console.milestones
    reached = milestones.get("multi_user") or milestones.get("login_prompt")
    if reached is None:
        return
    spent, starved = past_grace(guest, reached, b.agent_grace)
    if spent:
        raise guest.fail("agent", f"systemd reached multi-user.target {guest.now() - reached:.0f}s ago{starved}, but "
                         f"the agent ({where(guest)}) does not answer over the {guest.protocol.name} protocol",
                         _agent_diagnostics(guest))


def _agent_diagnostics(guest: Guest) -> str:
    """The agent unit's status over SSH, when the session key gets us in."""
    a = guest.opts.agent
    if guest.profile.agent_is_init:
        return f"(the agent is init: no systemd unit and no sshd to ask; see the console's {a.name} lines)"
    if guest.opts.ssh_key is None or not guest.vm.alive():
        return ""
    try:
        client = ssh_mod.connect(guest.vm.host_port(22), guest.opts.ssh_key, timeout=15)
    except (ssh_mod.SshError, OsbuilderError) as e:
        return f"(no SSH for diagnostics: {e})"
    try:
        unit = shlex.quote(a.service)
        cmd = (f"systemctl status {unit} --no-pager -n 0; ls -l {shlex.quote('/usr/bin/' + a.name)} "
               f"/dev/virtio-ports/ 2>&1; journalctl -b -u {unit} --no-pager -n 15")
        status, out, err = ssh_mod.run_command(client, cmd, timeout=20)
        return format_tail((out + err).splitlines()[-40:], f"agent diagnostics over SSH ({a.service})")
    except Exception as e:  # noqa: BLE001 - diagnostics are best effort
        return f"(SSH diagnostics failed: {e})"
    finally:
        client.close()


def running(guest: Guest) -> str:
    """systemctl is-system-running --wait: running passes, degraded fails listing failed units. Waits while
    the guest makes progress: console lines, and systemd's job queue changing (read between tries, so
    a quiet console, `systemd.show_status=0` say, is not silence)."""
    wait = guest.waiting("running", guest.budgets.boot, "systemd to finish starting")
    state = ""
    jobs: str | None = None
    while True:
        wait.check()
        r = guest.exec(["systemctl", "is-system-running", "--wait"], timeout=max(1.0, min(10.0, wait.left())),
                       phase="running")
        state = r.stdout.strip()
        if not r.timed_out and state not in ("initializing", "starting", ""):
            break
        jobs = _note_jobs(guest, jobs)
    guest.timings["system_running"] = guest.now()
    _analyze(guest)
    if state in EXPECTED_STATES:
        guest.phases["running"] = Outcome.passed()
        return state
    if state == "degraded":
        units, journal = failed_units(guest)
        raise guest.fail("running", f"systemd is degraded; failed units: {', '.join(units) or '(none listed)'}",
                         journal)
    raise guest.fail("running", f"systemd state {state!r}")


def _note_jobs(guest: Guest, before: str | None) -> str | None:
    """systemd's job queue (jobs queued, and installed since boot): progress when it changed."""
    r = guest.try_exec(["systemctl", "show", "--property=NJobs", "--property=NInstalledJobs", "--value"], 10)
    jobs = " ".join(r.stdout.split()) if r is not None and r.status == 0 else None
    if jobs is not None and before is not None and jobs != before:
        guest.note_progress(f"systemd's job queue (NJobs, NInstalledJobs: {before} -> {jobs})")
    return jobs if jobs is not None else before


def failed_units(guest: Guest) -> tuple[list[str], str]:
    """The failed units and their journal lines."""
    r = guest.exec(["systemctl", "list-units", "--failed", "--no-legend", "--plain", "--no-pager"],
                   phase="running")
    units = parse_failed_units(r.stdout)
    chunks = []
    for unit in units[:10]:
        j = guest.exec(["journalctl", "-b", "-u", unit, "--no-pager", "-n", "20", "-o", "short-monotonic"],
                       phase="running")
        chunks.append(format_tail(j.stdout.splitlines(), f"journal of {unit}"))
    return units, "\n".join(chunks)


def _analyze(guest: Guest) -> None:
    """systemd's own startup times (`systemd-analyze time`), best effort."""
    r = guest.try_exec(["systemd-analyze", "time"], 20)
    if r is not None and r.status == 0:
        guest.guest_startup = parse_startup(r.stdout)
        kernel_at = guest.vm.console.milestones.get("linux_version")
        if "total" in guest.guest_startup and kernel_at is not None:
            guest.timings["startup_finished"] = round(kernel_at + guest.guest_startup["total"], 3)


def exec(guest: Guest) -> ExecResult:  # named after the phase (it shadows the builtin only here)
    """The agent runs a command and returns its exit status and both output streams; the root
    filesystem is mounted read-only."""
    r = guest.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    if (r.status, r.stdout, r.stderr) != (3, "out\n", "err\n"):
        raise guest.fail("exec", f"exec returned status={r.status} stdout={r.stdout!r} stderr={r.stderr!r}, "
                         "expected 3, 'out\\n', 'err\\n'")
    options = root_mount_options(guest)
    if guest.profile.attach.root_read_only and "ro" not in options:
        raise guest.fail("exec", f"the root filesystem is mounted {','.join(options)}, not read-only")
    if guest.profile.attach.dax:
        prove_dax(guest)
    guest.phases["exec"] = Outcome.passed()
    return r


def root_mount_options(guest: Guest) -> list[str]:
    """The mount options of / in the guest, as findmnt reports them."""
    r = guest.exec(["findmnt", "-n", "-o", "OPTIONS", "/"], phase="exec")
    return r.stdout.strip().split(",")


# Read in the guest: the root's device and mount options, then the root's block device (found by its
# number, as the kernel may name it /dev/root) and the DAX flag of its disk's queue.
DAX_PROBE = ('findmnt -n -o SOURCE,OPTIONS /; b=$(readlink -f "/sys/dev/block/$(mountpoint -d /)"); '
             'echo "${b##*/} $(cat "$b/queue/dax" 2>/dev/null || cat "$b/../queue/dax" 2>/dev/null || echo -)"')


def prove_dax(guest: Guest) -> None:
    """The root is mounted with DAX, as the guest's kernel reports it (not as the command line asked):
    the mount options say dax (ext4 refuses the option on a device without DAX, so that alone would
    do) and the block queue of the root's disk has its DAX flag. Fails `exec` (which looks) otherwise."""
    r = guest.exec(["sh", "-c", DAX_PROBE], phase="exec")
    lines = r.stdout.split("\n")
    mount = lines[0].split()
    disk = lines[1].split() if len(lines) > 1 else []
    if len(mount) != 2 or len(disk) != 2:
        raise guest.fail("exec", f"cannot read the root's mount and disk in the guest: {r.stdout!r} {r.stderr!r}")
    source, options = mount[0], mount[1].split(",")
    dax_option = next((o for o in options if o == "dax" or o.startswith("dax=")), None)
    guest.root_mount = {"source": source, "options": options, "device": disk[0], "queue_dax": disk[1],
                        "dax": dax_option in ("dax", "dax=always") and disk[1] == "1"}
    if not guest.root_mount["dax"]:
        raise guest.fail("exec", f"the root ({source}, {disk[0]}) is not mounted with DAX: mount options "
                         f"{','.join(options)}, queue/dax of its disk {disk[1]}")


def ssh(guest: Guest) -> paramiko.SSHClient:
    """Log in over SSH with the session key; the host key must be the one the guest made."""
    if guest.opts.ssh_key is None:
        raise guest.fail("ssh", "no session key was delivered to this guest")
    host_key = None  # pinned when the agent can read it: an agent that cannot exec leaves it unpinned
    if guest.agent is not None and guest.protocol.can_exec:
        r = guest.exec(["cat", GUEST_HOST_KEY], phase="ssh")
        host_key = r.stdout.strip() if r.status == 0 else None
    wait = guest.waiting("ssh", guest.budgets.boot, "an SSH login with the session key")
    try:
        port = guest.vm.host_port(22)
        guest.ssh_client = ssh_mod.connect(port, guest.opts.ssh_key, wait.left() + 10, host_key=host_key,
                                           keep_going=wait.check)
        status, out, _ = ssh_mod.run_command(guest.ssh_client, "id -un; systemctl is-system-running", timeout=30)
    except (ssh_mod.SshError, OsbuilderError) as e:
        if isinstance(e, (BootFailure, BootInfrastructureError)):
            raise
        raise guest.fail("ssh", str(e))
    if out.split()[:1] != ["root"]:
        raise guest.fail("ssh", f"logged in, but `id -un` said {out!r}")
    guest.timings["ssh_ready"] = guest.now()
    guest.phases["ssh"] = Outcome.passed()
    return guest.ssh_client


def powerdown(guest: Guest) -> dict[str, Any]:
    """The ACPI power button (the agent's `poweroff` request when the agent is init); the guest
    must shut itself down, making progress (systemd stopping units), within the power-off's budget.
    Returns QEMU's SHUTDOWN event."""
    b = guest.budgets
    if guest.ssh_client is not None:
        guest.ssh_client.close()
        guest.ssh_client = None
    requested = guest.now()
    guest.timings["powerdown_requested"] = requested
    by_agent = guest.profile.agent_is_init
    how = "the agent's poweroff request" if by_agent else "system_powerdown"
    try:
        if not by_agent:
            mark = guest.vm.press_power_button()
        elif guest.agent is None:
            raise guest.fail("powerdown", "the agent is not connected (it powers off a guest it is init of)")
        else:
            mark = guest.request_agent_poweroff(min(10.0, b.powerdown.silence))
    except QmpError as e:
        raise guest.fail("powerdown", str(e))
    except AgentError as e:
        raise guest.fail("powerdown", f"the agent refused to power off: {e}")
    wait = guest.waiting("powerdown", b.powerdown, f"SHUTDOWN after {how}")
    event = guest.vm.wait_shutdown(0, since=mark)
    while event is None:
        if not guest.vm.alive():  # QEMU quits after its SHUTDOWN event: look once more before guarding
            event = guest.vm.wait_shutdown(2, since=mark)
            if event is None:
                guest.guard("powerdown")
            break
        wait.check(guard=False)
        event = guest.vm.wait_shutdown(wait.slice(), since=mark)
    if event is None:
        raise guest.fail("powerdown", f"no SHUTDOWN after {how}")
    data = event.get("data", {})
    if not data.get("guest") or data.get("reason") != "guest-shutdown":
        raise guest.fail("powerdown", f"unexpected shutdown: {data}")
    guest.timings["shutdown"] = guest.now()
    guest.powerdown_seconds = round(guest.timings["shutdown"] - requested, 3)
    guest.phases["powerdown"] = Outcome.passed()
    return event


CHECKS: dict[str, Callable[[Guest], Any]] = {
    "kernel": kernel, "root": root, "init": init, "agent": agent, "running": running, "exec": exec,
    "ssh": ssh, "powerdown": powerdown,
}


def run(guest: Guest, phase: str, checks: Mapping[str, Callable[[Guest], Any]] = CHECKS) -> Any:
    """Run one phase for the guest's profile: a phase the profile skips is recorded as skipped (and
    returns None); any other runs its check (`checks[phase]`), which returns what it found."""
    skip = guest.profile.skip(phase)
    if skip is not None:
        guest.phases[phase] = skip
        return None
    return checks[phase](guest)
